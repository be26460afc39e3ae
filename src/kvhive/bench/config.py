"""What ``kvhive bench`` runs: KV shapes, section names and :class:`BenchConfig`.

Kept free of heavy imports: the ``kvhive`` CLI builds the bench's arguments from it.
"""

from __future__ import annotations

from dataclasses import dataclass

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class KVShape:
    """A model's KV geometry (per token: ``2 * layers * kv_heads * head_size`` elements, or
    ``layers * head_size`` for MLA's one latent plane).

    Engine layout of one layer (vLLM CPU): ``[2, blocks, kv_heads, block_size, head_size]``
    ("HND"), or ``[blocks, block_size, head_size]`` for MLA.
    """

    name: str
    layers: int
    kv_heads: int
    head_size: int
    dtype: str = "bfloat16"
    mla: bool = False

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    @property
    def kv_planes(self) -> int:
        """2 (K and V) or 1 (MLA's latent)."""
        return 1 if self.mla else 2

    @property
    def block_axis(self) -> int:
        """The block axis of :meth:`layer_dims`."""
        return 0 if self.mla else 1

    def layer_dims(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        if self.mla:
            return (num_blocks, block_size, self.head_size)
        return (2, num_blocks, self.kv_heads, block_size, self.head_size)

    def chunk_bytes(self, chunk_tokens: int) -> int:
        """Bytes of one chunk object (all layers, K and V)."""
        return (
            self.kv_planes
            * self.layers
            * chunk_tokens
            * self.kv_heads
            * self.head_size
            * (self.itemsize)
        )

    def layer_block_bytes(self, block_size: int) -> int:
        return self.kv_planes * self.kv_heads * block_size * self.head_size * self.itemsize


#: The 8B-class GQA shape (Llama-3-8B: 32 MiB per 256-token chunk), SmolLM2-135M (the e2e
#: model), an MLA shape (DeepSeek-V2-Lite: 27 layers, a 512 + 64 latent) and a tiny one for
#: lookup latency (whose cost does not depend on bytes).
SHAPES: dict[str, KVShape] = {
    "32L-8H-128D": KVShape("32L-8H-128D", 32, 8, 128),
    "smollm2-135m": KVShape("smollm2-135m", 30, 3, 64),
    "mla-27L-576D": KVShape("mla-27L-576D", 27, 1, 576, mla=True),
    "tiny": KVShape("tiny", 2, 1, 16),
}


SECTIONS = (
    "memcpy", "healthy", "engine", "transfer", "concurrency", "lookup", "noop", "l2", "cuda",
)  # fmt: skip
CLIENTS = ("lmcache", "kvhive")
MODES = ("lmcache_driven", "engine_driven")
BIG = "32L-8H-128D"
#: Adapter configurations of the ``l2`` section (``kvhive.bench.l2_section.TIERS``)
L2_TIERS = (
    "fs", "fs_odirect", "fs_native", "fs_native_odirect", "nixl_posix", "nixl_posix_dynamic",
    "nixl_obj", "resp", "s3", "mooncake", "dax", "mock",
)  # fmt: skip


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
    # the engine pattern (kvhive.bench.engineload): fresh block tables, cold and warm
    engine_shapes: tuple[str, ...] = (BIG, "smollm2-135m", "mla-27L-576D")
    engine_cache_gib: float = 2.0
    engine_settle_s: float = 1.0
    #: (chunks per request, requests) of the cold and the warm pass
    engine_cold_requests: tuple[tuple[int, int], ...] = ((1, 6), (16, 2))
    engine_warm_requests: tuple[tuple[int, int], ...] = ((1, 12), (16, 3))
    # the l2 section (kvhive.bench.l2_section): adapters vs their floors, one object per call
    l2_tiers: tuple[str, ...] = L2_TIERS
    l2_reps: int = 5
    l2_object_mib: int = 32
    #: scratch files go to a fresh directory under this one (None: the system temp dir)
    l2_dir: str | None = None
    #: the tmpfs directory of the dax tier's file (None: /dev/shm)
    l2_tmpfs_dir: str | None = None
    l2_dd_bs_mib: int = 4
    #: also read each object after dropping this bench's own cached pages (file tiers)
    l2_cold: bool = True
    #: also measure integrity "raw" for tiers that frame objects with a checksum trailer
    l2_raw: bool = True
    #: MiB of memory touched and freed before timing (a VM's never-used pages are slow)
    l2_warm_mib: int = 1024
