# Stub of the native helper built from _safecopy.c (see kvhive.transfer.safecopy).
from typing import Any

def copy_rows(
    dst: Any, dst_offsets: Any, src: Any, src_offsets: Any, row_bytes: int, /
) -> int | None: ...
