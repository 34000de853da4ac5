"""What the `fastpath` commands share: errors and exit codes, which flags the user gave and
fastpath's defaults for the rest, the text and window flags, the engine arguments, the
window layout, and the report tail (print, `--json`).

`fastpath ppl`, `kld` and `serve` take vLLM's own flags (EngineArgs, the server's
FrontendArgs) and put fastpath's defaults only where the user gave no flag. "Gave" means
present on the command line (or in a `--config` file), not "differs from vLLM's default":
an explicit `--dtype auto` must win over fastpath's float32.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from fastpath.metrics import conventions

EXIT_USAGE = 2
EXIT_NOT_EQUAL = 3
EXIT_SERVERS_FAILED = 4

VERBOSE_FLAGS = ("-v", "--verbose")
LOG_LEVEL_ENV = "VLLM_LOGGING_LEVEL"


class UsageError(ValueError):
    """Bad flags or input: printed as one line, exit code 2, no traceback."""


# ---------------------------------------------------------------- given flags, defaults, noise


class _NotGiven:
    """Marker a probe namespace holds for every option until the command line sets it."""

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _NotGiven()
_ACCUMULATING = (argparse._AppendAction, argparse._ExtendAction, argparse._CountAction)


def given_flags(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the options `argv` gives explicitly, in any spelling `parser` accepts.

    A value typed on the command line wins even where it equals the default, so callers
    that put their own defaults on top (`fastpath ppl`, `fastpath serve`) must know which
    flags were given, not which values differ. argparse only fills a default where the
    namespace has no value yet, so `argv` is parsed again into a namespace holding a marker
    for every option: what still holds it was not given. That is argparse's own reading of
    the words, so `--flag=value`, `--flag value`, aliases (`-tp`), abbreviations,
    `--no-flag`, and vLLM's FlexibleArgumentParser spellings (`--max_logprobs`, `--config
    FILE`, dotted `--a.b`) all count. For a command with subcommands pass the subcommand's
    parser and the words after the command.
    """
    if any(isinstance(action, argparse._SubParsersAction) for action in parser._actions):
        raise TypeError("given_flags needs the subcommand's own parser, not one with subcommands")
    options = [a for a in parser._actions if a.option_strings and a.dest != argparse.SUPPRESS]
    # append/extend/count build on what the namespace holds: they start from None instead
    unset = {a.dest: None if isinstance(a, _ACCUMULATING) else _NOT_GIVEN for a in options}
    parsed = vars(parser.parse_args(list(argv), namespace=argparse.Namespace(**unset)))
    return {dest for dest, marker in unset.items() if parsed.get(dest, marker) is not marker}


@dataclass(frozen=True)
class RunFlags:
    """A command line read once: argparse's values (never written after parsing), which
    of them the user gave, and what fastpath derived from them (`derived`: the convention's
    stride, say). Attribute reads (`flags.context_length`) see a derived value first, then
    the parsed one; a changed copy is `flags.replace(...)`, never an assignment."""

    values: Mapping[str, Any]
    given: frozenset[str]
    derived: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))
        object.__setattr__(self, "derived", MappingProxyType(dict(self.derived)))

    @classmethod
    def read(cls, args: argparse.Namespace, given: set[str]) -> RunFlags:
        """The parsed namespace as flags (the namespace is copied, not kept)."""
        return cls(vars(args), frozenset(given))

    def __getattr__(self, name: str) -> Any:
        for source in ("derived", "values"):
            mapping = self.__dict__.get(source, {})
            if name in mapping:
                return mapping[name]
        raise AttributeError(f"no flag {name!r}")

    def replace(self, given: set[str] | None = None, **values: Any) -> RunFlags:
        """A copy with `values` set (and `given` instead of the user's given flags); a value
        set here replaces what was derived under the same name."""
        derived = {k: v for k, v in self.derived.items() if k not in values}
        return RunFlags({**self.values, **values},
                        self.given if given is None else frozenset(given), derived)

    def derive(self, **derived: Any) -> RunFlags:
        """A copy that also holds values fastpath derived from the flags."""
        return RunFlags(self.values, self.given, {**self.derived, **derived})

    def namespace(self, defaults: Mapping[str, Any] | None = None,
                  **overrides: Any) -> argparse.Namespace:
        """A new namespace for vLLM (EngineArgs.from_cli_args, its server): the values,
        `defaults` where the user gave no flag, then `overrides`."""
        unset = {k: v for k, v in (defaults or {}).items() if k not in self.given}
        return argparse.Namespace(**{**self.values, **self.derived, **unset, **overrides})

    def given_values(self) -> dict[str, Any]:
        """The flags the user gave, as given (what the report calls `flags`)."""
        return {k: self.values[k] for k in sorted(self.given)
                if k in self.values and jsonable(self.values[k])}

    def settings(self) -> dict[str, Any]:
        """Every value the run used, given or default, derived ones applied."""
        merged = {**self.values, **self.derived}
        return {k: v for k, v in sorted(merged.items()) if jsonable(v)}


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


# ---------------------------------------------------------------- engine


def engine_args(flags: RunFlags, **overrides: Any):
    """vLLM EngineArgs from the flags: fastpath's defaults where a flag was not given, then
    `overrides` (the model path fastpath resolved, say)."""
    from vllm.engine.arg_utils import EngineArgs

    from fastpath.engine import scoring

    return EngineArgs.from_cli_args(flags.namespace(scoring.default_engine_kwargs(), **overrides))


def with_engine_defaults(flags: RunFlags) -> RunFlags:
    """The flags with fastpath's engine defaults derived where the user gave no flag, so
    the report's settings show what the engine ran with."""
    from fastpath.engine import scoring

    return flags.derive(**{k: v for k, v in scoring.default_engine_kwargs().items()
                           if k not in flags.given})


@dataclass(frozen=True)
class Opened:
    """What `open_scorer` opened: the scorer, the engine behind it (None for servers), and
    the report's fields on it."""

    scorer: Any  # fastpath.engine.scorer.Scorer
    llm: Any | None
    fields: dict[str, Any]


@contextlib.contextmanager
def open_scorer(flags: RunFlags, text: str, urls: Sequence[str] | None = None,
                model: str | None = None, runner: str = "auto") -> Iterator[Opened]:
    """The `fastpath serve` servers at `urls`, else an engine of `model` built from the
    flags on `runner` (always stopped after): the one way `ppl` and `kld` open a scorer."""
    if urls:
        yield Opened(server_scorer(list(urls), flags, text), None,
                     {"servers": list(urls), "model_path": None, "tensor_parallel_size": None})
        return
    from fastpath.engine import scoring
    from fastpath.engine.runners import runner_environment
    from fastpath.engine.scorer import EngineScorer

    engine = engine_args(flags, model=model)
    with contextlib.ExitStack() as stack:
        if runner != "auto":
            # Kept for the engine's life: vLLM's front end reads it at every request.
            stack.enter_context(runner_environment(runner))
        llm = scoring.build_llm_from_engine_args(engine)
        stack.callback(scoring.shutdown, llm)
        yield Opened(EngineScorer(llm, max_batch=flags.max_batch_windows), llm,
                     {"model_path": model, "tensor_parallel_size": engine.tensor_parallel_size})


def engine_dests() -> set[str]:
    """The `dest` of every vLLM engine flag (EngineArgs fields)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


# ---------------------------------------------------------------- text and windows


def add_text_flags(group: Any) -> None:
    """The text and window flags `ppl` and `kld` share (checked by `check_window_flags`)."""
    group.add_argument("--dataset", help="a `datasets` dataset name, e.g. wikitext")
    group.add_argument("--dataset-config", help="its configuration, e.g. wikitext-2-raw-v1")
    group.add_argument("--dataset-split", default="test", help="split to score (default test)")
    group.add_argument("--text-file", help="local text, JSONL or parquet file (column 'text')")
    group.add_argument("--num-samples", type=int, help="keep only the first N rows/lines")
    group.add_argument("--context-length", type=int, default=2048, help="tokens per window")
    group.add_argument("--stride", type=int, default=None,
                       help="new tokens scored per window after the first (<= context length; "
                       f"default {conventions.DEFAULT_STRIDE}; conventions fastpath and hf only)")
    group.add_argument("--convention", choices=conventions.CONVENTIONS,
                       default=conventions.DEFAULT_CONVENTION,
                       help="whose evaluation convention (tokens, windows, averaging): "
                       "fastpath (default), hf (the Hugging Face guide's loop), lm-eval "
                       "(loglikelihood_rolling), llama.cpp (llama-perplexity's chunks); see "
                       "docs/cli.md")
    group.add_argument("--max-batch-windows", type=int, default=16,
                       help="windows submitted together: bounds front-end memory and sets "
                       "how often the progress bar moves (default 16)")


def check_window_flags(flags: RunFlags) -> RunFlags:
    """Refuse bad window flags (`ppl` and `kld` share them): convention, context, stride, and
    --max-batch-windows; the flags with the convention's stride derived."""
    from fastpath.metrics.windows import WindowError

    try:
        stride = conventions.check_convention(flags.convention, flags.context_length,
                                              flags.stride)
    except WindowError as error:
        raise UsageError(str(error)) from None
    if flags.max_batch_windows < 1:
        raise UsageError(f"--max-batch-windows must be positive, got {flags.max_batch_windows}")
    return flags.derive(stride=stride)


def load_text(args: RunFlags) -> tuple[str, str]:
    """The text to score and a description of its source; UsageError if there is none."""
    from fastpath import data

    try:
        text, source = data.load_text(args.dataset, args.dataset_config, args.text_file,
                                      args.num_samples, split=args.dataset_split)
    except data.DataError as error:
        raise UsageError(str(error)) from None
    if not text.strip():
        raise UsageError(f"the text from {source} is empty")
    return text, source


def context_limit_error(context_length: int, max_len: int, where: str) -> UsageError:
    """The refusal of a context length the engine or servers cannot score."""
    return UsageError(
        f"--context-length {context_length} exceeds what {where} can score: "
        f"max_model_len is {max_len} and one output token is always scheduled, so "
        f"the context length can be at most {max_len - 1}")


def build_layout(scorer: Any, args: RunFlags, text: str, source: str
                 ) -> conventions.Layout:
    """The windows of `--convention` over `text` in the scorer's tokens (an engine's or a
    server's tokenizer); UsageError where it cannot score the context length or the text
    gives no window."""
    from fastpath.metrics.windows import WindowError

    info = scorer.describe()
    if args.context_length > info.max_model_len - 1:
        raise context_limit_error(args.context_length, info.max_model_len, info.where)
    try:
        return conventions.build(args.convention, scorer.tokenizer(), text, args.context_length,
                               args.stride)
    except WindowError as error:
        raise UsageError(f"{source}: {error}") from None


# ---------------------------------------------------------------- servers

# Engine flags that still mean something with --server: they choose the local tokenizer.
CLIENT_SIDE_ENGINE_FLAGS = {"tokenizer", "tokenizer_mode", "tokenizer_revision",
                            "trust_remote_code"}


def add_server_flags(parser: argparse.ArgumentParser, base: bool = False) -> None:
    """`--server URL` (repeatable; `--base-server` too where `base`), in-flight, timeout."""
    remote = parser.add_argument_group("scoring on servers (fastpath serve)")
    remote.add_argument("--server", action="append", dest="servers", metavar="URL",
                        help="score on this `fastpath serve` server instead of a local engine; "
                        "repeat to spread the windows over several (token ids from the "
                        "server's /tokenize unless --tokenizer is given)")
    if base:
        remote.add_argument("--base-server", action="append", dest="base_servers",
                            metavar="URL", help="score the base pass on this server (serving "
                            "the base model) instead of a local base engine; repeatable")
    remote.add_argument("--max-in-flight", type=int, default=8,
                        help="windows in flight per server (default 8)")
    remote.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds before a window is retried on another server (default 600)")


def check_server_flags(args: RunFlags) -> None:
    """Refuse bad server flags, and engine flags that a server run would ignore."""
    if args.max_in_flight < 1:
        raise UsageError(f"--max-in-flight must be positive, got {args.max_in_flight}")
    if not args.request_timeout > 0:
        raise UsageError(f"--request-timeout must be positive, got {args.request_timeout}")
    for flag, urls in (("--server", args.servers),
                       ("--base-server", getattr(args, "base_servers", None))):
        cleaned = [u.rstrip("/") for u in urls or []]
        if len(set(cleaned)) != len(cleaned):
            raise UsageError(f"{flag} lists a server twice: {cleaned}")
    everything_on_servers = args.servers and (getattr(args, "base_servers", None)
                                             or not hasattr(args, "base_servers"))
    if not everything_on_servers:
        return
    engine_flags = sorted(f"--{d.replace('_', '-')}" for d in args.given
                          if d in engine_dests() and d not in CLIENT_SIDE_ENGINE_FLAGS)
    if engine_flags:
        raise UsageError(f"engine flags {', '.join(engine_flags)} apply to a local engine; with "
                         "--server the servers' own flags apply (give them to fastpath serve)")


def server_failures(args: RunFlags) -> tuple[type[BaseException], ...]:
    """What a run on servers stops on (exit code EXIT_SERVERS_FAILED); none without one."""
    if not (args.servers or getattr(args, "base_servers", None)):
        return ()
    from fastpath.server import client

    return (client.ServerUnavailable, client.RequestRefused, client.ScoringError)


def server_scorer(urls: list[str], args: RunFlags, text: str) -> Any:
    """A `ServerScorer` over `urls`, its tokenizer local where --tokenizer names one; the
    servers must answer and agree on the text's token ids (UsageError naming the problem)."""
    from fastpath.server import client

    tokenizer = None
    if args.tokenizer:
        from vllm.tokenizers import get_tokenizer

        tokenizer = get_tokenizer(args.tokenizer, tokenizer_mode=args.tokenizer_mode,
                                  trust_remote_code=args.trust_remote_code,
                                  revision=args.tokenizer_revision)
    scorer = client.ServerScorer(urls, tokenizer=tokenizer, max_in_flight=args.max_in_flight,
                                 timeout=args.request_timeout,
                                 describe_timeout=min(60.0, args.request_timeout))
    try:
        models = scorer.describe().models
        if tokenizer is None:
            scorer.check_tokenizers(text[:4000])
    except (client.ServerUnavailable, client.RequestRefused) as error:
        raise UsageError(f"cannot reach a server: {error}") from None
    except ValueError as error:
        raise UsageError(str(error)) from None
    if len(models) > 1:
        print(f"fastpath: warning: the servers name different models {models}; their "
              "token ids agree, their weights are not compared", file=sys.stderr)
    return scorer


# ---------------------------------------------------------------- report tail


def add_json_flag(group: Any) -> None:
    """`--json PATH`, read by `finish_report`."""
    group.add_argument("--json", dest="json_path", help="write every figure to this JSON file")


def jsonable(value: Any) -> bool:
    """Whether `json.dumps` takes the value as it is."""
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def finish_report(report: dict[str, Any], args: RunFlags,
                  show: Callable[[dict[str, Any]], None]) -> None:
    """Add the flags the user gave and the settings the run used to the report, print it
    with `show`, and write it where `--json` says."""
    report["flags"] = args.given_values()
    report["settings"] = args.settings()
    show(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
