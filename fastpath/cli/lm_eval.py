"""`fastpath lm-eval ARGS`: lm-evaluation-harness's own command line, with the
`fastpath-vllm` model registered (`fastpath.lm_eval_model`; needs `fastpath[lm-eval]`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def run(argv: Sequence[str]) -> int:
    """Run lm-eval's command line on `argv` in this process."""
    from lm_eval.__main__ import cli_evaluate

    import fastpath.lm_eval_model  # noqa: F401  (registers fastpath-vllm with lm-eval)

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
