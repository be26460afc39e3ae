"""What ``kvhive bench`` runs: KV shapes, section names and :class:`BenchConfig`.

Kept free of heavy imports: the ``kvhive`` CLI builds the bench's arguments from it.
"""

from __future__ import annotations

from dataclasses import dataclass

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class KVShape:
    """A model's KV geometry (per token: ``2 * layers * kv_heads * head_size`` elements)."""

    name: str
    layers: int
    kv_heads: int
    head_size: int
    dtype: str = "bfloat16"

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk object (all layers, K and V)."""
        return 2 * self.layers * chunk_tokens * self.kv_heads * self.head_size * self.itemsize

    def layer_block_bytes(self, block_size: int) -> int:
        return 2 * self.kv_heads * block_size * self.head_size * self.itemsize


#: The issue's large shape (32 MiB per 256-token chunk), SmolLM2-135M (the e2e model) and a
#: tiny one for lookup latency (whose cost does not depend on bytes).
SHAPES: dict[str, KVShape] = {
    "32L-8H-128D": KVShape("32L-8H-128D", 32, 8, 128),
    "smollm2-135m": KVShape("smollm2-135m", 30, 3, 64),
    "tiny": KVShape("tiny", 2, 1, 16),
}


SECTIONS = ("memcpy", "healthy", "transfer", "concurrency", "lookup", "noop")
CLIENTS = ("lmcache", "kvhive")
MODES = ("lmcache_driven", "engine_driven")
BIG = "32L-8H-128D"


@dataclass
class BenchConfig:
    """What to run.  Defaults are the issue's full benchmark."""

    sections: tuple[str, ...] = SECTIONS
    vs_reference: bool = False
    clients: tuple[str, ...] = CLIENTS
    modes: tuple[str, ...] = MODES
    shapes: tuple[str, ...] = (BIG, "smollm2-135m")
    chunks: int = 16
    rounds: int = 3
    engines: tuple[int, ...] = (2, 4)
    concurrency_rounds: int = 2
    lookup_prefixes: tuple[int, ...] = (1, 64, 400)
    lookup_samples: int = 200
    noop_samples: int = 5000
    healthy_sizes_gb: tuple[float, ...] = (1.0, 16.0)
    healthy_reps: int = 3
    l1_size_gb: float = 8.0
    block_size: int = 16
    server_args: tuple[str, ...] = ()
    client_python: str | None = None
    log_dir: str | None = None
    memcpy_mib: int = 32
