"""`fastpath` command line: `fastpath ppl` (sliding-window perplexity), `fastpath report`.

`fastpath ppl` takes every vLLM engine flag through vLLM's own `EngineArgs` parser, plus
the original script's flags. With no model and no data it runs offline on the embedded
default: a zoo model trained on the bundled text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

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
    group.add_argument("--stride", type=int, default=512,
                       help="new tokens scored per window after the first (<= context length)")
    group.add_argument("--path", choices=("fast", "standard", "both"), default="fast",
                       help="fast: target_token_ids; standard: prompt_logprobs=K dicts; "
                       "both: run both and check every logprob is bitwise equal")
    group.add_argument("--standard-k", type=int, default=0,
                       help="K of prompt_logprobs on the standard path (default 0)")
    group.add_argument("--max-batch-windows", type=int, default=16,
                       help="windows submitted together: bounds front-end memory and sets "
                       "how often the progress bar moves (default 16)")
    group.add_argument("--model-runner", choices=("auto", "v1", "v2"), default="auto",
                       help="vLLM's model runner: auto (vLLM's choice: V1 on CPU, V2 on CUDA; "
                       "VLLM_USE_V2_MODEL_RUNNER is honoured), v1 or v2. On CPU, v2 runs "
                       "V2's Triton kernels in Triton's interpreter (~30x slower): a check "
                       "of V2's logic, not of a GPU's bits")
    group.add_argument("--json", dest="json_path", help="write every figure to this JSON file")
    group.add_argument("--save-logprobs", help="write per-token logprobs (float32 .npy)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `fastpath` parser and its `ppl` subparser (whose defaults tell given flags apart)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from fastpath.report import add_report_flags

    parser = FlexibleArgumentParser(prog="fastpath", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("ppl", help="sliding-window perplexity through vLLM")
    EngineArgs.add_cli_args(ppl)
    ppl.set_defaults(model=None)  # None = the embedded default model
    _add_ppl_flags(ppl)
    add_report_flags(commands.add_parser("report", help="benchmark JSON -> CSVs and plots"))
    return parser, ppl


def _engine_args(args: argparse.Namespace, parser_defaults: dict[str, Any]):
    """vLLM EngineArgs from the parsed flags; fastpath's defaults where a flag was not given."""
    from vllm.engine.arg_utils import EngineArgs

    from fastpath import scoring

    for key, value in scoring.default_engine_kwargs().items():
        if getattr(args, key, None) == parser_defaults.get(key):
            setattr(args, key, value)
    return EngineArgs.from_cli_args(args)


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse bad fastpath flags before any engine starts."""
    from fastpath.windows import WindowError, check_shape

    try:
        check_shape(args.context_length, args.stride)
    except WindowError as error:
        raise UsageError(str(error)) from None
    if args.max_batch_windows < 1:
        raise UsageError(f"--max-batch-windows must be positive, got {args.max_batch_windows}")
    if args.standard_k < -1:
        raise UsageError(f"--standard-k must be -1 (full vocabulary) or >= 0, got {args.standard_k}")


def run_ppl(args: argparse.Namespace, parser_defaults: dict[str, Any]) -> int:
    from fastpath import data, zoo
    from fastpath.testing import v2cpu

    _check_flags(args)
    _check_runner(args.model_runner)
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
    engine_args = _engine_args(args, parser_defaults)
    with contextlib.ExitStack() as stack:
        if args.model_runner != "auto":
            # Kept for the engine's life: vLLM's front end reads it at every request.
            stack.enter_context(v2cpu.runner_environment(args.model_runner))
        return _score(args, engine_args, model_name, text, source)


def _check_runner(runner: str) -> None:
    """Refuse --model-runner v2 on CPU where the stand-in Triton backend came too late."""
    from fastpath.testing import v2cpu

    if runner != "v2" or not v2cpu.cpu_build():
        return
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise UsageError("--model-runner v2 on CPU needs fastpath's stand-in Triton backend "
                         "registered before vLLM is imported (fastpath.testing.v2cpu."
                         "prepare_process); run it as the `fastpath` command")
    print("fastpath ppl: V2 runner on CPU: Triton kernels run in Triton's interpreter "
          "(slow; checks V2's logic, says nothing about a GPU's bits)", file=sys.stderr)


def _score(args: argparse.Namespace, engine_args: Any, model_name: str, text: str,
           source: str) -> int:
    """Build the engine, score on each path asked for, report; the engine always stops."""
    import vllm
    from tqdm import tqdm

    from fastpath import perplexity, scoring
    from fastpath.measure import device_name
    from fastpath.windows import WindowError, count_windows

    llm = scoring.build_llm_from_engine_args(engine_args)
    try:
        max_len = llm.llm_engine.model_config.max_model_len
        if args.context_length > max_len - 1:
            raise UsageError(
                f"--context-length {args.context_length} exceeds what this engine can score: "
                f"max_model_len is {max_len} and one output token is always scheduled, so "
                f"the context length can be at most {max_len - 1}")
        tokens = llm.get_tokenizer().encode(text)
        try:
            total = count_windows(len(tokens), args.context_length, args.stride)
        except WindowError as error:
            raise UsageError(f"{source}: {error}") from None
        paths = ("fast", "standard") if args.path == "both" else (args.path,)
        perplexity.warm_up(llm, tokens, args.context_length, args.stride)
        results = {}
        for path in paths:
            with tqdm(total=total, desc=f"windows ({path})", unit="window") as bar:
                results[path] = perplexity.score_stream(
                    llm, tokens, args.context_length, args.stride, path=path,
                    standard_k=args.standard_k, max_batch_windows=args.max_batch_windows,
                    progress=bar.update)
        runner = "V2" if llm.llm_engine.vllm_config.use_v2_model_runner else "V1"
    finally:
        scoring.shutdown(llm)

    main = results[paths[0]]
    report: dict[str, Any] = {
        "model": model_name, "model_path": args.model, "source": source,
        "vllm_version": vllm.__version__, "runner": runner, "device": device_name(),
        "tensor_parallel_size": engine_args.tensor_parallel_size,
        "context_length": args.context_length, "stride": args.stride,
        "stream_tokens": len(tokens), **main.summary(),
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
    print(f"text    {report['source']}: {report['stream_tokens']} tokens; context "
          f"{report['context_length']}, stride {report['stride']}, {report['windows']} windows")
    for path, result in results.items():
        s = result.summary()
        print(f"{path:<9} PPL {s['perplexity']:.4f} ± {s['perplexity_stderr']:.4f}  "
              f"({s['scored_tokens']} tokens, {s['seconds_per_window']:.3f} s/window, "
              f"{s['tokens_per_second']:.0f} tokens/s)")
    if "bitwise_equal" in report:
        verdict = "EQUAL" if report["bitwise_equal"] else "DIFFERENT"
        print(f"bitwise fast vs standard: {verdict} "
              f"({report['bitwise_mismatches']} of {report['scored_tokens']} differ)")


def _prepare_runner(argv: list[str]) -> None:
    """`--model-runner v2` on CPU: register the stand-in Triton backend before vLLM is
    imported (the full parser imports vLLM), as vLLM decides V2 support at import."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model-runner", "--model_runner", dest="model_runner")
    known, _ = pre.parse_known_args(argv)
    if known.model_runner == "v2":
        from fastpath.testing import v2cpu

        v2cpu.prepare_process()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _prepare_runner(argv)
    parser, ppl_parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "ppl":
            defaults = {key: ppl_parser.get_default(key) for key in vars(args)}
            return run_ppl(args, defaults)
        from fastpath.report import run_report

        return run_report(args)
    except UsageError as error:
        print(f"fastpath {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
