"""Which flags the user actually gave, fastpath's defaults for the rest, and how loud to be.

`fastpath ppl` and `fastpath serve` take vLLM's own flags (EngineArgs, the server's
FrontendArgs) and put fastpath's defaults only where the user gave no flag. "Gave" means
present on the command line (or in a `--config` file), not "differs from vLLM's default":
an explicit `--dtype auto` must win over fastpath's float32.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

VERBOSE_FLAGS = ("-v", "--verbose")
LOG_LEVEL_ENV = "VLLM_LOGGING_LEVEL"


class _Unset(list):
    """Stand-in default: a parsed value that is still this object was not on the command line.

    A list subclass so that argparse's append/extend actions can copy and extend it.
    """

    def __repr__(self) -> str:
        return "<unset>"


def _all_parsers(parser: argparse.ArgumentParser) -> Iterable[argparse.ArgumentParser]:
    """The parser and every sub-parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _all_parsers(sub)


def given_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """The `dest` of every option present in `argv`, found by parsing it once more with
    every default replaced by a marker (so abbreviations, `--a_b` spellings, `--x=y`,
    vLLM's `--config` files and dotted `--foo.bar` flags count as argparse reads them)."""
    unset = _Unset()
    saved: list[tuple[Any, str, Any]] = []
    for sub in _all_parsers(parser):
        for action in sub._actions:
            if action.default is argparse.SUPPRESS or isinstance(
                    action, (argparse._SubParsersAction, argparse._CountAction)):
                continue
            saved.append((action, "default", action.default))
            action.default = unset
        for dest in list(sub._defaults):
            saved.append((sub._defaults, dest, sub._defaults[dest]))
            sub._defaults[dest] = unset
    try:
        namespace = parser.parse_args(list(argv))
    finally:
        for owner, key, value in reversed(saved):
            if isinstance(owner, dict):
                owner[key] = value
            else:
                setattr(owner, key, value)
    return {dest for dest, value in vars(namespace).items() if value is not unset}


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
