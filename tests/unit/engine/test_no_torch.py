"""The server runs without torch: only the engine-driven pickle registration is refused,
with a clear reason.  Runs in a subprocess where importing torch fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from support.net import free_port

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    from kvhive.config import parse_server_args
    from kvhive.errors import UnsupportedError
    from kvhive.server.core import KvhiveServer
    from kvhive.transfer import pickle_codec
    from kvhive.wire.types import EngineDrivenPayload

    assert not pickle_codec.torch_available()
    cfg = parse_server_args(["--host", "127.0.0.1", "--port", sys.argv[1],
                             "--l1-size-gb", "0.0625", "--eviction-policy", "LRU"])
    srv = KvhiveServer(cfg)
    srv.start()
    try:
        payload = EngineDrivenPayload(1, "m", 1, 16, 2, 64, "bfloat16", False, 256)
        try:
            srv.engine_driven.register_kv_cache_engine_driven_context(payload)
        except UnsupportedError as exc:
            print("REFUSED:", exc)
        assert srv.engine.get_chunk_size() == 256
    finally:
        srv.close()
    assert "torch" not in [m for m, v in sys.modules.items() if v is not None]
    print("OK")
    """
)


def test_server_without_torch_refuses_pickle_registration_clearly() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "REFUSED:" in out.stdout and "needs torch" in out.stdout
    assert out.stdout.strip().endswith("OK")
