"""Which flags the user actually gave, fastpath's defaults for the rest, and how loud to be.

`fastpath ppl` and `fastpath serve` take vLLM's own flags (EngineArgs, the server's
FrontendArgs) and put fastpath's defaults only where the user gave no flag. "Gave" means
present on the command line (or in a `--config` file), not "differs from vLLM's default":
an explicit `--dtype auto` must win over fastpath's float32.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from typing import Any

VERBOSE_FLAGS = ("-v", "--verbose")
LOG_LEVEL_ENV = "VLLM_LOGGING_LEVEL"


def fill_defaults(args: argparse.Namespace, defaults: Mapping[str, Any],
                  given: set[str]) -> dict[str, Any]:
    """Set each default whose flag the user did not give; returns what was set."""
    applied = {key: value for key, value in defaults.items()
               if key not in given and hasattr(args, key)}
    for key, value in applied.items():
        setattr(args, key, value)
    return applied


def verbose_requested(argv: Sequence[str]) -> bool:
    """Whether -v/--verbose is on the command line (read before vLLM is imported)."""
    return any(arg in VERBOSE_FLAGS for arg in argv)


def quiet_vllm(verbose: bool) -> None:
    """Hide vLLM's INFO lines unless verbose, in this process and every one vLLM starts.

    vLLM reads VLLM_LOGGING_LEVEL when it is first imported, and its engine-core and
    worker processes inherit the environment; a level the user set is left alone.
    Must run before anything imports vLLM.
    """
    if not verbose and LOG_LEVEL_ENV not in os.environ:
        os.environ[LOG_LEVEL_ENV] = "WARNING"


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose on a sub-command (its effect is applied before parsing, see quiet_vllm)."""
    parser.add_argument(*VERBOSE_FLAGS, action="store_true", dest="verbose",
                        help="show vLLM's INFO log lines (default: warnings and errors only)")
