"""The actions of ``lmcache server``'s parser, built from the installed package's own
``add_*_args`` functions (as ``lmcache server`` builds it).  Runs in the client venv."""

from __future__ import annotations

import argparse
import logging

from _common import emit


def main() -> None:
    logging.disable(logging.CRITICAL)
    from lmcache.v1.distributed.config import add_storage_manager_args
    from lmcache.v1.mp_observability.config import add_observability_args
    from lmcache.v1.multiprocess.config import (
        add_coordinator_args,
        add_http_frontend_args,
        add_mp_server_args,
        add_p2p_args,
    )

    parser = argparse.ArgumentParser()
    for add in (
        add_mp_server_args,
        add_p2p_args,
        add_storage_manager_args,
        add_http_frontend_args,
        add_observability_args,
        add_coordinator_args,
    ):
        add(parser)
    actions = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        default = action.default
        actions.append(
            {
                "flags": list(action.option_strings),
                "choices": [str(c) for c in action.choices] if action.choices else None,
                "default": default
                if isinstance(default, (str, int, float, bool, list, type(None)))
                else repr(default),
            }
        )
    import lmcache

    emit({"version": getattr(lmcache, "__version__", "?"), "actions": actions})


if __name__ == "__main__":
    main()
