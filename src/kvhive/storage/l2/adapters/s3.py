"""``s3``: objects in an S3 bucket through the AWS CRT client (awscrt), as the reference.

Object name: ``naming.flat_name`` URL-quoted in the request path; body: the logical bytes
plus the integrity trailer (``integrity: "raw"``: bare bytes, reference format).

Endpoint forms (``s3_endpoint``):

* ``s3://<bucket>.<host>`` or ``<bucket>.<host>`` — virtual-hosted (the reference's form);
* ``s3://<bucket>`` — AWS, ``<bucket>.s3.<region>.amazonaws.com``;
* ``http(s)://<host>[:port]/<bucket>`` — path-style (kvhive; local S3-compatible servers),
  TLS follows the scheme.  ``s3_addressing_style`` ("auto"/"virtual"/"path") forces a style.

Fixes over the reference: a GET never writes past the caller's buffer (the object's length
is checked instead); lookups always ask S3 (no stale size cache); the connection breaker
(three connection errors in a row) re-opens after a cool-down instead of never.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

from kvhive.config.l2_adapters import FLAG, S3AdapterConfig
from kvhive.errors import ConfigError, L2Error, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.naming import flat_name
from kvhive.storage.l2.pooled import PooledAdapter

try:
    from awscrt import auth, s3
    from awscrt import io as crt_io
    from awscrt.http import HttpHeaders, HttpRequest
except ImportError:  # optional extra: pip install 'kvhive[s3]'
    s3 = None

REQUEST_TIMEOUT_S = 120.0
BREAKER_ERRORS = 3
BREAKER_COOLDOWN_S = 30.0
_CONNECTION_WORDS = ("CONNECTION_REFUSED", "SOCKET", "DNS", "TIMEOUT")


def split_endpoint(endpoint: str, region: str, style: str) -> tuple[str, str, bool | None]:
    """(Host header, path prefix, TLS from the scheme or None) for an ``s3_endpoint``."""
    scheme = None
    if "://" in endpoint:
        scheme, _, endpoint = endpoint.partition("://")
    host, _, path = endpoint.partition("/")
    tls = {"http": False, "https": True}.get(scheme or "")
    if path.strip("/"):  # host/bucket: path-style unless forced otherwise
        bucket = path.strip("/")
        return (f"{bucket}.{host}", "", tls) if style == "virtual" else (host, f"/{bucket}", tls)
    if "." not in host:  # s3://bucket on AWS
        host = f"{host}.s3.{region}.amazonaws.com"
    if style == "path":
        bucket, _, rest = host.partition(".")
        return rest, f"/{bucket}", tls
    return host, "", tls


class _PartsReader(io.RawIOBase):
    """A seekable read stream over consecutive buffers (the PUT body, no copy)."""

    def __init__(self, parts: Sequence[memoryview]) -> None:
        self._parts = [p.cast("B") for p in parts]
        self._size = sum(p.nbytes for p in parts)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        out = memoryview(buf).cast("B")
        done, base = 0, 0
        for part in self._parts:
            if self._pos < base + part.nbytes and done < out.nbytes:
                start = self._pos - base
                n = min(part.nbytes - start, out.nbytes - done)
                out[done : done + n] = part[start : start + n]
                done += n
                self._pos += n
            base += part.nbytes
        return done

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, min(self._size, base + offset))
        return self._pos

    def tell(self) -> int:
        return self._pos


class S3Store(ObjectStore):
    """Objects in one bucket (module docstring); static credentials when both keys are
    given, else the default AWS chain."""

    durable = True

    def __init__(self, cfg: S3AdapterConfig) -> None:
        if s3 is None:
            raise ConfigError(FLAG, "type 's3' needs awscrt: pip install 'kvhive[s3]'")
        self.host, self.prefix, tls = split_endpoint(
            cfg.s3_endpoint, cfg.s3_region, cfg.s3_addressing_style
        )
        use_tls = (not cfg.disable_tls) if tls is None else (tls and not cfg.disable_tls)
        self.region = cfg.s3_region
        elg = crt_io.EventLoopGroup(cfg.s3_num_io_threads)
        bootstrap = crt_io.ClientBootstrap(elg, crt_io.DefaultHostResolver(elg))
        if cfg.aws_access_key_id and cfg.aws_secret_access_key:
            self.creds = auth.AwsCredentialsProvider.new_static(
                cfg.aws_access_key_id, cfg.aws_secret_access_key
            )
        else:
            self.creds = auth.AwsCredentialsProvider.new_default_chain(bootstrap)
        tls_options = None
        if use_tls and cfg.s3_prefer_http2:
            tls_options = crt_io.ClientTlsContext(
                crt_io.TlsContextOptions()
            ).new_connection_options()
            tls_options.set_alpn_list(["h2", "http/1.1"])
        self.client = s3.S3Client(
            bootstrap=bootstrap,
            region=self.region,
            credential_provider=self.creds,
            tls_mode=s3.S3RequestTlsMode.ENABLED if use_tls else s3.S3RequestTlsMode.DISABLED,
            tls_connection_options=tls_options,
            enable_s3express=cfg.s3_enable_s3express,
        )
        self._lock = threading.Lock()
        self._errors = 0
        self._open_until = 0.0
        self.breaker_trips = 0

    # -- requests ---------------------------------------------------------------------

    def _request(self, method: str, key: ObjectKey, kind: Any, op: str, **kwargs: Any) -> Any:
        self._check_breaker()
        headers = [("Host", self.host)]
        body = kwargs.pop("body", None)
        if body is not None:
            headers += [
                ("Content-Length", str(body._size)),
                ("Content-Type", "application/octet-stream"),
            ]
        path = f"{self.prefix}/{urllib.parse.quote(flat_name(key), safe='')}"
        request = HttpRequest(method, path, HttpHeaders(headers), body_stream=body)
        return self.client.make_request(
            type=kind, request=request, operation_name=op, credential_provider=self.creds, **kwargs
        )

    def _wait(self, req: Any, key: ObjectKey) -> None:
        try:
            req.finished_future.result(REQUEST_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - classify: 404, connection trouble, anything else
            status = getattr(exc, "status_code", None)
            if status == 404:
                self._record(None)
                raise ObjectMissing(flat_name(key)) from None
            if isinstance(exc, TimeoutError):
                req.cancel()
            self._record(str(exc) or type(exc).__name__)
            raise L2Error(f"S3 {flat_name(key)}: {exc}") from None
        self._record(None)

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        req = self._request(
            "PUT", key, s3.S3RequestType.PUT_OBJECT, "PutObject", body=_PartsReader(parts)
        )
        self._wait(req, key)

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        total = [0]
        views = [p.cast("B") for p in parts]

        def on_headers(status_code: int, headers: list[tuple[str, str]], **_: Any) -> None:
            for name, value in headers:
                if name.lower() == "content-range" and "/" in value:
                    total[0] = int(value.rsplit("/", 1)[1])
                elif name.lower() == "content-length" and not total[0]:
                    total[0] = int(value)

        def on_body(chunk: Any, offset: int, **_: Any) -> None:
            _scatter(views, memoryview(chunk).cast("B"), offset)

        req = self._request("GET", key, s3.S3RequestType.GET_OBJECT, "GetObject",
                            on_headers=on_headers, on_body=on_body)  # fmt: skip
        self._wait(req, key)
        return total[0]

    def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        reqs = [self._request("HEAD", k, s3.S3RequestType.DEFAULT, "HeadObject") for k in keys]
        out = []
        for key, req in zip(keys, reqs, strict=True):
            try:
                self._wait(req, key)
                out.append(True)
            except ObjectMissing:
                out.append(False)
        return out

    def exists(self, key: ObjectKey) -> bool:
        return self.exists_many([key])[0]

    def delete(self, key: ObjectKey) -> bool:
        self._wait(self._request("DELETE", key, s3.S3RequestType.DEFAULT, "DeleteObject"), key)
        return True

    # -- breaker ----------------------------------------------------------------------

    def _check_breaker(self) -> None:
        with self._lock:
            if self._open_until and time.monotonic() < self._open_until:
                raise L2Error("S3 breaker open after repeated connection errors")

    def _record(self, error: str | None) -> None:
        with self._lock:
            if error is None or not any(w in error.upper() for w in _CONNECTION_WORDS):
                self._errors, self._open_until = 0, 0.0
                return
            self._errors += 1
            if self._errors >= BREAKER_ERRORS:
                self._open_until = time.monotonic() + BREAKER_COOLDOWN_S
                self.breaker_trips += 1

    def status(self) -> dict[str, Any]:
        with self._lock:
            open_ = bool(self._open_until and time.monotonic() < self._open_until)
        return {"host": self.host, "path_prefix": self.prefix, "breaker_open": open_,
                "breaker_trips": self.breaker_trips}  # fmt: skip


def _scatter(views: list[memoryview], chunk: memoryview, offset: int) -> None:
    """Copy ``chunk`` (at object ``offset``) into the consecutive ``views``, never past them."""
    base = 0
    for view in views:
        lo, hi = max(offset, base), min(offset + chunk.nbytes, base + view.nbytes)
        if lo < hi:
            view[lo - base : hi - base] = chunk[lo - offset : hi - offset]
        base += view.nbytes


def build(cfg: S3AdapterConfig) -> L2Adapter:
    """An :class:`S3Store` with ``num_workers`` requests in flight."""
    return PooledAdapter(
        S3Store(cfg), workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label
    )
