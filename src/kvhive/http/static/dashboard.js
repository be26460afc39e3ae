// kvhive dashboard: polls /dashboard/data every second and renders it (no build step).
"use strict";
let updates = 0;

const $ = (id) => document.getElementById(id);
const setText = (id, v) => { $(id).textContent = v; };
const pct = (x) => (100 * x).toFixed(1) + "%";

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function duration(s) {
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function fillTable(id, rows, empty) {
  const body = $(id);
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = 6;
    td.textContent = empty;
    tr.appendChild(td);
    body.appendChild(tr);
    return;
  }
  for (const values of rows) {
    const tr = document.createElement("tr");
    values.forEach((v) => cell(tr, v));
    body.appendChild(tr);
  }
}

const WINDOW = 120; // seconds shown in the chart

function drawChart(buckets, now) {
  const svg = $("chart");
  const w = 600, h = 160;
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  for (const level of [0.5, 1]) {
    const y = (h - 4 - level * (h - 8)).toFixed(1);
    const grid = document.createElementNS(ns, "line");
    grid.setAttribute("x1", "0"); grid.setAttribute("x2", String(w));
    grid.setAttribute("y1", y); grid.setAttribute("y2", y);
    grid.setAttribute("stroke", "#e3e6ec");
    svg.appendChild(grid);
  }
  const start = Math.floor(now) - WINDOW;
  const points = buckets.filter((b) => b[0] > start && b[1] > 0).map((b) => ({
    x: ((b[0] - start) * w) / WINDOW,
    l1: b[2] / b[1], l2: b[3] / b[1], total: (b[2] + b[3]) / b[1],
  }));
  const series = [["total", "#2e8b57", 5, 0.35], ["l1", "#3b6fd8", 2, 1], ["l2", "#e67e22", 2, 1]];
  for (const [key, color, width, opacity] of series) {
    const pts = points.map((p) => p.x.toFixed(1) + "," + (h - 4 - p[key] * (h - 8)).toFixed(1));
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", pts.join(" "));
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", color);
    line.setAttribute("stroke-width", String(width));
    line.setAttribute("stroke-opacity", String(opacity));
    line.setAttribute("class", "series-" + key);
    svg.appendChild(line);
  }
}

function render(d) {
  const health = $("health");
  health.textContent = d.healthy ? "healthy" : "unhealthy";
  health.className = "badge " + (d.healthy ? "ok" : "bad");
  health.title = (d.unhealthy_reasons || []).join("\n");
  setText("version", d.version);
  setText("instance", d.service_instance_id || "(empty)");
  setText("uptime", duration(d.uptime_seconds));

  const l1 = d.l1;
  $("l1-bar").style.width = pct(Math.min(1, l1.usage));
  setText("l1-usage", pct(l1.usage));
  setText("l1-used", bytes(l1.used_bytes));
  setText("l1-capacity", bytes(l1.configured_bytes));
  setText("l1-objects", String(l1.objects));
  setText("l1-locked", String(l1.read_locked_objects));
  setText("l1-staging", String(l1.staging_objects));
  setText("l1-evicted", String(l1.evicted_objects));

  const c = d.counters;
  const t = d.lookup_tokens;
  setText("lookups", String(c.lookups));
  setText("hit-rate-total", t.requested ? pct(t.hit / t.requested) : "–");
  setText("hit-rate-l1", t.requested ? pct(t.l1 / t.requested) : "–");
  setText("hit-rate-l2", t.requested ? pct(t.l2 / t.requested) : "–");
  setText("stored", String(c.stored_chunks));
  setText("retrieved", String(c.retrieved_chunks));
  setText("sessions", String(d.active_sessions));

  drawChart(d.lookup_history || [], d.time);

  fillTable("l2-rows", d.l2_adapters.map((a) => [
    String(a.index), a.type, String(a.inflight_stores), String(a.inflight_loads),
    String(a.loaded_chunks), String(a.failures),
  ]), "none configured");
  fillTable("engine-rows", d.engines.map((e) => [
    e.instance_id, e.mode, e.model_name, String(e.world_size), e.kv_cache_layout,
    e.seconds_since_seen.toFixed(1) + " s ago",
  ]), "none registered");

  const bus = d.event_bus;
  setText("bus-depth", String(bus.queue_depth));
  setText("bus-max", String(bus.max_queue_size));
  setText("bus-delivered", String(bus.delivered_events));
  setText("bus-dropped", String(bus.dropped_events));
  setText("bus-lag", (1000 * bus.drain_lag_seconds).toFixed(1) + " ms");
}

async function poll() {
  try {
    const resp = await fetch("/dashboard/data", { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
    $("error").hidden = true;
    updates += 1;
    document.body.dataset.updates = String(updates);
  } catch (err) {
    $("error").hidden = false;
    $("error").textContent = "cannot reach the server: " + err;
  }
}

poll();
setInterval(poll, 1000);
