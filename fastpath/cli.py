"""`fastpath` command line: `fastpath ppl` (sliding-window perplexity), `fastpath kld` (KL
divergence against a base model, `fastpath.kld`), `fastpath report`, `fastpath check-vllm`
(judge a vLLM release against the patches without installing it).

`fastpath ppl` and `fastpath kld` take every vLLM engine flag through vLLM's own
`EngineArgs` parser, plus the original script's flags. With no model and no data `ppl` runs
offline on the embedded default: a zoo model trained on the bundled text.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastpath import protocols

EXIT_USAGE = 2
EXIT_NOT_EQUAL = 3


class UsageError(ValueError):
    """Bad flags or input: printed as one line, exit code 2, no traceback."""


def _add_ppl_flags(parser: argparse.ArgumentParser) -> None:
    """The original script's flags and fastpath's own (engine flags come from EngineArgs)."""
    group = parser.add_argument_group("perplexity (fastpath)")
    group.add_argument("--dataset", help="a `datasets` dataset name, e.g. wikitext")
    group.add_argument("--dataset-config", help="its configuration, e.g. wikitext-2-raw-v1")
    group.add_argument("--dataset-split", default="test", help="split to score (default test)")
    group.add_argument("--text-file", help="local text, JSONL or parquet file (column 'text')")
    group.add_argument("--num-samples", type=int, help="keep only the first N rows/lines")
    group.add_argument("--context-length", type=int, default=2048, help="tokens per window")
    group.add_argument("--stride", type=int, default=None,
                       help="new tokens scored per window after the first (<= context length; "
                       f"default {protocols.DEFAULT_STRIDE}; protocols fastpath and hf only)")
    group.add_argument("--protocol", choices=protocols.PROTOCOLS,
                       default=protocols.DEFAULT_PROTOCOL,
                       help="whose windows to use: fastpath (default), hf (the Hugging Face "
                       "guide's loop), lm-eval (loglikelihood_rolling), llama.cpp "
                       "(llama-perplexity's chunks); see the README")
    group.add_argument("--path", choices=("fast", "standard", "both"), default="fast",
                       help="fast: target_token_ids; standard: prompt_logprobs=K dicts; "
                       "both: run both and check every logprob is bitwise equal")
    group.add_argument("--standard-k", type=int, default=0,
                       help="K of prompt_logprobs on the standard path (default 0)")
    group.add_argument("--max-batch-windows", type=int, default=16,
                       help="windows submitted together: bounds front-end memory and sets "
                       "how often the progress bar moves (default 16)")
    group.add_argument("--json", dest="json_path", help="write every figure to this JSON file")
    group.add_argument("--save-logprobs", help="write per-token logprobs (float32 .npy)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser,
                            argparse.ArgumentParser]:
    """The `fastpath` parser, its `ppl` and its `kld` subparser (`given_flags` reads the
    flags given)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from fastpath.check_vllm import add_flags as add_check_vllm_flags
    from fastpath.kld import add_kld_flags
    from fastpath.report import add_report_flags

    parser = FlexibleArgumentParser(prog="fastpath", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("ppl", help="sliding-window perplexity through vLLM")
    EngineArgs.add_cli_args(ppl)
    ppl.set_defaults(model=None)  # None = the embedded default model
    _add_ppl_flags(ppl)
    kld = commands.add_parser("kld", help="KL divergence of a model against a base model")
    EngineArgs.add_cli_args(kld)
    kld.set_defaults(model=None)
    add_kld_flags(kld)
    add_report_flags(commands.add_parser("report", help="benchmark or kld JSON -> CSVs and plots"))
    add_check_vllm_flags(commands.add_parser(
        "check-vllm", help="judge a vLLM wheel or source tree against fastpath's patches"))
    return parser, ppl, kld


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


def _engine_args(args: argparse.Namespace, given: set[str]):
    """vLLM EngineArgs from the parsed flags; fastpath's defaults where a flag was not given."""
    from vllm.engine.arg_utils import EngineArgs

    from fastpath import scoring

    for key, value in scoring.default_engine_kwargs().items():
        if key not in given:
            setattr(args, key, value)
    return EngineArgs.from_cli_args(args)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse bad fastpath flags before any engine starts."""
    from fastpath.windows import WindowError

    try:
        args.stride = protocols.check_protocol(args.protocol, args.context_length, args.stride)
    except WindowError as error:
        raise UsageError(str(error)) from None
    if args.max_batch_windows < 1:
        raise UsageError(f"--max-batch-windows must be positive, got {args.max_batch_windows}")
    if args.standard_k < -1:
        raise UsageError(f"--standard-k must be -1 (full vocabulary) or >= 0, got {args.standard_k}")


def run_ppl(args: argparse.Namespace, given: set[str]) -> int:
    import vllm
    from tqdm import tqdm

    from fastpath import data, perplexity, scoring, zoo
    from fastpath.measure import device_name
    from fastpath.windows import WindowError

    _check_flags(args)
    try:
        text, source = data.load_text(args.dataset, args.dataset_config, args.text_file,
                                      args.num_samples, split=args.dataset_split)
    except data.DataError as error:
        raise UsageError(str(error)) from None
    if not text.strip():
        raise UsageError(f"the text from {source} is empty")
    if args.model is None:
        args.model = str(zoo.get_model(zoo.DEFAULT_MODEL))
        model_name = f"{zoo.DEFAULT_MODEL} (embedded default)"
    else:
        model_name = args.model
    engine_args = _engine_args(args, given)
    llm = scoring.build_llm_from_engine_args(engine_args)
    try:
        max_len = llm.llm_engine.model_config.max_model_len
        if args.context_length > max_len - 1:
            raise UsageError(
                f"--context-length {args.context_length} exceeds what this engine can score: "
                f"max_model_len is {max_len} and one output token is always scheduled, so "
                f"the context length can be at most {max_len - 1}")
        try:
            layout = protocols.build(args.protocol, llm.get_tokenizer(), text,
                                     args.context_length, args.stride)
        except WindowError as error:
            raise UsageError(f"{source}: {error}") from None
        tokens = layout.tokens
        paths = ("fast", "standard") if args.path == "both" else (args.path,)
        perplexity.warm_up(llm, tokens, args.context_length, args.stride, layout.windows)
        results = {}
        for path in paths:
            with tqdm(total=len(layout.windows), desc=f"windows ({path})", unit="window") as bar:
                results[path] = perplexity.score_layout(
                    llm, layout, path=path, standard_k=args.standard_k,
                    max_batch_windows=args.max_batch_windows, progress=bar.update)
        runner = "V2" if llm.llm_engine.vllm_config.use_v2_model_runner else "V1"
    finally:
        scoring.shutdown(llm)

    main = results[paths[0]]
    report: dict[str, Any] = {
        "model": model_name, "model_path": args.model, "source": source,
        "vllm_version": vllm.__version__, "runner": runner, "device": device_name(),
        "tensor_parallel_size": engine_args.tensor_parallel_size,
        "protocol": args.protocol, "context_length": args.context_length,
        "stride": args.stride, "stream_tokens": len(tokens), **main.summary(),
        "paths": {path: r.summary() for path, r in results.items()},
    }
    exit_code = 0
    if args.path == "both":
        mismatches = perplexity.bitwise_mismatches(results["fast"].logprobs,
                                                   results["standard"].logprobs)
        report["bitwise_equal"] = mismatches.size == 0
        report["bitwise_mismatches"] = int(mismatches.size)
        exit_code = 0 if mismatches.size == 0 else EXIT_NOT_EQUAL
    report["flags"] = {k: v for k, v in vars(args).items() if _jsonable(v)}
    _print_summary(report, results)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.save_logprobs:
        np.save(args.save_logprobs, main.logprobs)
    return exit_code


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _print_summary(report: dict[str, Any], results: dict[str, Any]) -> None:
    print(f"model   {report['model']}  (vLLM {report['vllm_version']}, {report['runner']} "
          f"runner, {report['device']}, TP {report['tensor_parallel_size']})")
    stride = f", stride {report['stride']}" if report["stride"] is not None else ""
    print(f"text    {report['source']}: {report['stream_tokens']} tokens; protocol "
          f"{report['protocol']}, context {report['context_length']}{stride}, "
          f"{report['windows']} windows")
    for path, result in results.items():
        s = result.summary()
        print(f"{path:<9} PPL {s['perplexity']:.4f} ± {s['perplexity_stderr']:.4f}  "
              f"({s['scored_tokens']} tokens, {s['seconds_per_window']:.3f} s/window, "
              f"{s['tokens_per_second']:.0f} tokens/s)")
        if "token_perplexity" in s:
            print(f"{'':<9} (windows weighted as the HF guide weights them; plain per-token "
                  f"PPL {s['token_perplexity']:.4f})")
    if "bitwise_equal" in report:
        verdict = "EQUAL" if report["bitwise_equal"] else "DIFFERENT"
        print(f"bitwise fast vs standard: {verdict} "
              f"({report['bitwise_mismatches']} of {report['scored_tokens']} differ)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-vllm"]:  # before build_parser: needs no installed vLLM
        from fastpath import check_vllm

        return check_vllm.main(argv[1:])
    parser, ppl_parser, kld_parser = build_parser()
    subparsers = {"ppl": ppl_parser, "kld": kld_parser}
    args = parser.parse_args(argv)
    try:
        if args.command in subparsers:
            given = given_flags(subparsers[args.command],
                                argv[list(argv).index(args.command) + 1:])
            if args.command == "kld":
                from fastpath.kld import run_kld

                return run_kld(args, given)
            return run_ppl(args, given)
        from fastpath.report import run_report

        return run_report(args)
    except UsageError as error:
        print(f"fastpath {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
