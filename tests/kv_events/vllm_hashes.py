"""Print vLLM's external form of kvhive chunk hashes (run with the vLLM venv's python).

Each argument is a chunk hash in hex; the output is one JSON list of what
``vllm.v1.core.kv_cache_utils.maybe_convert_block_hash`` makes of it: the conversion the
LMCache connector applies to the bytes hashes of kvhive's records before vLLM publishes them
(``lmcache_mp_connector._convert_kv_event_hash``), i.e. the through-engine stream's ints.
"""

from __future__ import annotations

import json
import sys

from vllm.v1.core.kv_cache_utils import BlockHash, maybe_convert_block_hash

print(json.dumps([maybe_convert_block_hash(BlockHash(bytes.fromhex(h))) for h in sys.argv[1:]]))
