"""Print the through-engine form of kvhive chunk hashes (run with the vLLM venv's python).

Each argument is a chunk hash in hex, as kvhive's ``subscribe_kv_events`` records carry it
(bytes); the output is one JSON list of what vLLM's ``maybe_convert_block_hash`` makes of it.
The LMCache connector converts its records' hashes with exactly that function
(``lmcache_mp_connector._convert_kv_event_hash``; importing the connector itself costs ~10 s
more), so these are the ints a router sees through the engine.
"""

from __future__ import annotations

import json
import sys

from vllm.v1.core.kv_cache_utils import BlockHash, maybe_convert_block_hash

print(json.dumps([maybe_convert_block_hash(BlockHash(bytes.fromhex(h))) for h in sys.argv[1:]]))
