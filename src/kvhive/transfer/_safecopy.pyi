# Stub of the native helper built from _safecopy.c (see kvhive.transfer.safecopy).
from typing import Any

def copy_rows(
    dst: Any, dst_offsets: Any, src: Any, src_offsets: Any, row_bytes: int, /
) -> int | None: ...
def copy_blocks(
    obj: Any,
    segments: tuple[Any, ...],
    plane_seg: Any,
    plane_step: Any,
    plane_obj: Any,
    statics: Any,
    ids: Any,
    first: int,
    blocks_per_chunk: int,
    row_bytes: int,
    to_engine: bool,
    u0: int,
    u1: int,
    /,
) -> int | None: ...
