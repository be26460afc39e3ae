"""Helpers of the Mooncake tests (imported by name: each test folder has its own conftest)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from support.net import free_port
from support.require import services_required, unavailable  # noqa: F401 - re-exported

MASTER_BIN = Path(sys.executable).parent / "mooncake_master"
WAIT_S = 30.0
MiB = 1 << 20
SEGMENT = 512 * MiB  # >= 256 MiB for 32 MiB objects (16 MiB: a 32 MiB put fails with -200)


def client_config(master_addr: str, segment: int = SEGMENT) -> dict[str, str]:
    """Mooncake's own settings for a loopback client (P2PHANDSHAKE: no metadata server)."""
    return {
        "local_hostname": "127.0.0.1",
        "metadata_server": "P2PHANDSHAKE",
        "protocol": "tcp",
        "rdma_devices": "",
        "global_segment_size": str(segment),
        "local_buffer_size": str(128 * MiB),
        "master_server_addr": master_addr,
    }


class Master:
    """A ``mooncake_master`` on 127.0.0.1 (RPC and metrics ports chosen once, kept across
    restarts), logging to ``work/master-<n>.log``."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.metrics_port = free_port(exclude=(self.port,))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self._log = open(self.work / f"master-{self.starts}.log", "wb")  # noqa: SIM115
        argv = [str(MASTER_BIN), "--rpc_address=127.0.0.1", f"--rpc_port={self.port}",
                "--metrics_host=127.0.0.1", f"--metrics_port={self.metrics_port}",
                "--logtostderr=true"]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mooncake_master exited with {self.proc.returncode}: {self.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mooncake_master did not listen on {self.port}: {self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 30) -> str:
        path = self.work / f"master-{self.starts}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
