"""The vLLM general plugin: vLLM calls `register()` in every process it starts.

That is the front end, the engine core and each worker, so the patches reach the code
that runs there, not only the process that imported fastpath. Switch it off with
`FASTPATH_DISABLE=1` (or leave `fastpath` out of vLLM's own `VLLM_PLUGINS`).
`FASTPATH_PATCH_LOG=path` appends one line per process the plugin ran in: its pid and the
functions it patched, or `"native": true` with none where the installed vLLM carries the
upstream series (`fastpath.upstream`) and the plugin stood aside. The tests use it to show
the patch is live inside the engine processes, and `tox -e upstream` that it is not.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("fastpath")

DISABLE_ENV = "FASTPATH_DISABLE"
LOG_ENV = "FASTPATH_PATCH_LOG"


def disabled() -> bool:
    """Whether the user switched fastpath off for this process tree."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """Entry point of group `vllm.general_plugins`: apply the patches, idempotently."""
    from fastpath import patches

    if disabled():
        logger.info("fastpath: disabled by %s", DISABLE_ENV)
        return
    native = patches.native_support()
    if native:
        logger.info("fastpath: vLLM supports target_token_ids natively; not patching")
    functions = [] if native else patches.apply()
    if log_path := os.environ.get(LOG_ENV):
        with open(log_path, "a") as log:
            log.write(json.dumps({"pid": os.getpid(), "ppid": os.getppid(),
                                  "patched": functions, "native": native}) + "\n")
