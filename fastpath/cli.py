"""`fastpath` command line: `fastpath ppl` (sliding-window perplexity), `fastpath serve`
(vLLM's OpenAI-compatible server with the scoring route), `fastpath kld` (KL divergence
against a base model, `fastpath.kld`), `fastpath report`, `fastpath check-vllm` (judge a
vLLM release against the patches without installing it), `fastpath lm-eval`
(lm-evaluation-harness's own command line with the `fastpath-vllm` model).

`fastpath ppl` and `fastpath kld` take every vLLM engine flag through vLLM's own
`EngineArgs` parser, plus the original script's flags. With no model and no data `ppl` runs
offline on the embedded default: a zoo model trained on the bundled text. With `--server
URL` (repeatable) the windows are scored by running `fastpath serve` servers instead.
All are quiet by default (vLLM warnings and errors only); `-v` shows vLLM's INFO lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fastpath import protocols

EXIT_USAGE = 2
EXIT_NOT_EQUAL = 3
EXIT_SERVERS_FAILED = 4


class UsageError(ValueError):
    """Bad flags or input: printed as one line, exit code 2, no traceback."""


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
                       f"default {protocols.DEFAULT_STRIDE}; protocols fastpath and hf only)")
    group.add_argument("--protocol", choices=protocols.PROTOCOLS,
                       default=protocols.DEFAULT_PROTOCOL,
                       help="whose windows to use: fastpath (default), hf (the Hugging Face "
                       "guide's loop), lm-eval (loglikelihood_rolling), llama.cpp "
                       "(llama-perplexity's chunks); see the README")
    group.add_argument("--max-batch-windows", type=int, default=16,
                       help="windows submitted together: bounds front-end memory and sets "
                       "how often the progress bar moves (default 16)")


def _add_ppl_flags(parser: argparse.ArgumentParser) -> None:
    """The original script's flags and fastpath's own (engine flags come from EngineArgs)."""
    group = parser.add_argument_group("perplexity (fastpath)")
    add_text_flags(group)
    group.add_argument("--path", choices=("fast", "standard", "both"), default="fast",
                       help="fast: target_token_ids; standard: prompt_logprobs=K dicts; "
                       "both: run both and check every logprob is bitwise equal")
    group.add_argument("--standard-k", type=int, default=0,
                       help="K of prompt_logprobs on the standard path (default 0)")
    group.add_argument("--model-runner", choices=("auto", "v1", "v2"), default="auto",
                       help="vLLM's model runner: auto (vLLM's choice: V1 on CPU, V2 on CUDA; "
                       "VLLM_USE_V2_MODEL_RUNNER is honoured), v1 or v2. On CPU, v2 runs "
                       "V2's Triton kernels in Triton's interpreter (~30x slower): a check "
                       "of V2's logic, not of a GPU's bits")
    group.add_argument("--json", dest="json_path", help="write every figure to this JSON file")
    group.add_argument("--save-logprobs", help="write per-token logprobs (float32 .npy)")
    remote = parser.add_argument_group("scoring on servers (fastpath serve)")
    remote.add_argument("--server", action="append", dest="servers", metavar="URL",
                        help="score on this `fastpath serve` server instead of a local engine; "
                        "repeat to spread the windows over several (token ids from the "
                        "server's /tokenize unless --tokenizer is given)")
    remote.add_argument("--max-in-flight", type=int, default=8,
                        help="windows in flight per server (default 8)")
    remote.add_argument("--request-timeout", type=float, default=600.0,
                        help="seconds before a window is retried on another server (default 600)")


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser,
                            argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `fastpath` parser and its `ppl`, `kld` and `serve` subparsers (`given_flags`
    reads the flags given to each)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from fastpath.check_vllm import add_flags as add_check_vllm_flags
    from fastpath.kld import add_kld_flags
    from fastpath.report import add_report_flags

    from fastpath.flags import add_verbose_flag
    from fastpath.serve import add_serve_flags

    parser = FlexibleArgumentParser(prog="fastpath", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ppl = commands.add_parser("ppl", help="sliding-window perplexity through vLLM")
    EngineArgs.add_cli_args(ppl)
    ppl.set_defaults(model=None)  # None = the embedded default model
    _add_ppl_flags(ppl)
    add_verbose_flag(ppl)
    kld = commands.add_parser("kld", help="KL divergence of a model against a base model")
    EngineArgs.add_cli_args(kld)
    kld.set_defaults(model=None)
    add_kld_flags(kld)
    add_verbose_flag(kld)
    serve = commands.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with fastpath and the scoring route",
        usage="fastpath serve [MODEL] [vllm serve flags]")
    add_serve_flags(serve)
    add_verbose_flag(serve)
    add_report_flags(commands.add_parser("report", help="benchmark or kld JSON -> CSVs and plots"))
    add_check_vllm_flags(commands.add_parser(
        "check-vllm", help="judge a vLLM wheel or source tree against fastpath's patches"))
    commands.add_parser("lm-eval", add_help=False, help="lm-evaluation-harness's command line "
                        "with the fastpath-vllm model (fastpath/lm_eval_model.py)")
    return parser, ppl, kld, serve


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


def check_window_flags(args: argparse.Namespace) -> None:
    """Refuse bad window flags (`ppl` and `kld` share them): protocol, context, stride, and
    --max-batch-windows; fills in the protocol's stride."""
    from fastpath.windows import WindowError

    try:
        args.stride = protocols.check_protocol(args.protocol, args.context_length, args.stride)
    except WindowError as error:
        raise UsageError(str(error)) from None
    if args.max_batch_windows < 1:
        raise UsageError(f"--max-batch-windows must be positive, got {args.max_batch_windows}")


def _check_flags(args: argparse.Namespace) -> None:
    """Refuse bad fastpath flags before any engine starts."""
    check_window_flags(args)
    if args.standard_k < -1:
        raise UsageError(f"--standard-k must be -1 (full vocabulary) or >= 0, got {args.standard_k}")
    if args.max_in_flight < 1:
        raise UsageError(f"--max-in-flight must be positive, got {args.max_in_flight}")
    if not args.request_timeout > 0:
        raise UsageError(f"--request-timeout must be positive, got {args.request_timeout}")


# Flags that still mean something with --server: they choose the local tokenizer.
_CLIENT_SIDE_ENGINE_FLAGS = {"tokenizer", "tokenizer_mode", "tokenizer_revision",
                             "trust_remote_code"}


def load_text(args: argparse.Namespace) -> tuple[str, str]:
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
    return UsageError(
        f"--context-length {context_length} exceeds what {where} can score: "
        f"max_model_len is {max_len} and one output token is always scheduled, so "
        f"the context length can be at most {max_len - 1}")


def run_ppl(args: argparse.Namespace, given: set[str]) -> int:
    import vllm

    from fastpath import perplexity, zoo
    from fastpath.runners import device_name, runner_environment

    _check_flags(args)
    _check_runner(args.model_runner)
    text, source = load_text(args)
    if args.model is None:
        args.model = str(zoo.get_model(zoo.DEFAULT_MODEL))
        model_name = f"{zoo.DEFAULT_MODEL} (embedded default)"
    else:
        model_name = args.model
    engine_args = _engine_args(args, given)
    with contextlib.ExitStack() as stack:
        if args.model_runner != "auto":
            # Kept for the engine's life: vLLM's front end reads it at every request.
            stack.enter_context(runner_environment(args.model_runner))
        results, runner, layout, exactness = _score_locally(args, engine_args, text, source)
    tokens = layout.tokens

    main = results["fast" if args.path == "both" else args.path]
    report: dict[str, Any] = {
        "model": model_name, "model_path": args.model, "source": source,
        "vllm_version": vllm.__version__, "runner": runner, "device": device_name(),
        "tensor_parallel_size": engine_args.tensor_parallel_size,
        "protocol": args.protocol, "context_length": args.context_length,
        "stride": args.stride, "stream_tokens": len(tokens), **main.summary(),
        "paths": {path: r.summary() for path, r in results.items()},
        "exactness": exactness,
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


def _score_locally(args: argparse.Namespace, engine_args: Any, text: str, source: str
                   ) -> tuple[dict[str, Any], str, Any, dict[str, Any]]:
    """Build the engine, score the layout on each path asked for; the engine always stops.
    Returns the results per path, the runner that scored ("V1"/"V2"), the layout and what
    the bits rest on (`scoring.exactness`)."""
    from tqdm import tqdm

    from fastpath import perplexity, runners, scoring
    from fastpath.windows import WindowError

    llm = scoring.build_llm_from_engine_args(engine_args)
    try:
        max_len = llm.llm_engine.model_config.max_model_len
        if args.context_length > max_len - 1:
            raise context_limit_error(args.context_length, max_len, "this engine")
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
        runner = runners.runner_name(llm)
        exactness = scoring.exactness(llm)
    finally:
        scoring.shutdown(llm)
    return results, runner, layout, exactness


def _check_runner(runner: str) -> None:
    """Refuse --model-runner v2 on CPU where the stand-in Triton backend came too late."""
    from fastpath.runners import cpu_build

    if runner != "v2" or not cpu_build():
        return
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise UsageError("--model-runner v2 on CPU needs fastpath's stand-in Triton backend "
                         "registered before vLLM is imported (fastpath.runners."
                         "prepare_process); run it as the `fastpath` command")
    print("fastpath ppl: V2 runner on CPU: Triton kernels run in Triton's interpreter "
          "(slow; checks V2's logic, says nothing about a GPU's bits)", file=sys.stderr)


def run_ppl_servers(args: argparse.Namespace, given: set[str]) -> int:
    """`fastpath ppl --server URL ...`: the same windows and report, scored by servers."""
    import asyncio

    from tqdm import tqdm

    from fastpath import client, perplexity
    from fastpath.windows import WindowError, count_windows

    _check_flags(args)
    if args.protocol != "fastpath":
        raise UsageError(f"--protocol {args.protocol} needs a local engine; servers score "
                         "fastpath's own windows (drop --server, or --protocol fastpath)")
    if args.path != "fast":
        raise UsageError(f"--path {args.path} needs a local engine; servers answer the fast "
                         "path (drop --server, or --path fast)")
    if args.model_runner != "auto":
        raise UsageError(f"--model-runner {args.model_runner} applies to a local engine; a "
                         "server runs the runner it was started with (VLLM_USE_V2_MODEL_RUNNER "
                         "in fastpath serve's environment)")
    engine_flags = sorted(f"--{d.replace('_', '-')}" for d in given
                          if d in _engine_dests() and d not in _CLIENT_SIDE_ENGINE_FLAGS)
    if engine_flags:
        raise UsageError(f"engine flags {', '.join(engine_flags)} apply to a local engine; with "
                         "--server the servers' own flags apply (give them to fastpath serve)")
    text, source = load_text(args)
    urls = [u.rstrip("/") for u in args.servers]
    if len(set(urls)) != len(urls):
        raise UsageError(f"--server lists a server twice: {urls}")
    try:
        described = asyncio.run(client.describe_servers(
            urls, timeout=min(60.0, args.request_timeout)))
    except (client.ServerUnavailable, client.RequestRefused) as error:
        raise UsageError(f"cannot reach a server: {error}") from None
    models = sorted({d["model"] for d in described})
    if len(models) > 1:
        print(f"fastpath ppl: warning: the servers name different models {models}; their "
              "token ids are compared below, their weights are not", file=sys.stderr)
    max_len = min(d["max_model_len"] for d in described)
    if args.context_length > max_len - 1:
        raise context_limit_error(args.context_length, max_len, "these servers")
    try:
        if args.tokenizer:
            from vllm.tokenizers import get_tokenizer

            tokenizer = get_tokenizer(args.tokenizer, tokenizer_mode=args.tokenizer_mode,
                                      trust_remote_code=args.trust_remote_code,
                                      revision=args.tokenizer_revision)
            tokens = tokenizer.encode(text)
        else:
            tokens = client.tokenize(urls[:1], text, timeout=args.request_timeout)
            probe = text[:4000]  # the servers must agree on the token ids
            first = client.tokenize(urls[:1], probe, timeout=args.request_timeout)
            for url in urls[1:]:
                if client.tokenize([url], probe, timeout=args.request_timeout) != first:
                    raise UsageError(f"{url} and {urls[0]} tokenize the text differently: "
                                     "they serve different models")
    except (client.ServerUnavailable, client.RequestRefused) as error:
        raise UsageError(f"tokenizing on the server failed: {error}") from None
    try:
        total = count_windows(len(tokens), args.context_length, args.stride)
    except WindowError as error:
        raise UsageError(f"{source}: {error}") from None
    pool_kwargs = dict(max_in_flight=args.max_in_flight, timeout=args.request_timeout)
    pool = client.ServerPool(urls, **pool_kwargs)
    try:
        perplexity.warm_up_servers(urls, tokens, args.context_length, args.stride, **pool_kwargs)
        with tqdm(total=total, desc=f"windows ({len(urls)} server{'s' * (len(urls) > 1)})",
                  unit="window") as bar:
            result = perplexity.score_stream_servers(pool, tokens, args.context_length,
                                                     args.stride, progress=bar.update)
    except (client.ServerUnavailable, client.RequestRefused, client.ScoringError) as error:
        print(f"fastpath ppl: servers failed: {error}", file=sys.stderr)
        return EXIT_SERVERS_FAILED
    report: dict[str, Any] = {
        "model": models[0] if len(models) == 1 else models, "model_path": None,
        "source": source, "vllm_version": described[0]["vllm_version"], "runner": "server",
        "device": None, "tensor_parallel_size": None,
        "context_length": args.context_length, "stride": args.stride,
        "stream_tokens": len(tokens), **result.summary(), "servers": described,
        "paths": {"fast": result.summary()},
        "exactness": [{"url": d["url"], **d["exactness"]} for d in described],
    }
    report["flags"] = {k: v for k, v in vars(args).items() if _jsonable(v)}
    _print_summary(report, {"fast": result})
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.save_logprobs:
        np.save(args.save_logprobs, result.logprobs)
    return 0


def _engine_dests() -> set[str]:
    """The `dest` of every vLLM engine flag (EngineArgs fields)."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}



def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _print_summary(report: dict[str, Any], results: dict[str, Any]) -> None:
    if "servers" in report:
        urls = ", ".join(s["url"] for s in report["servers"])
        print(f"model   {report['model']}  (vLLM {report['vllm_version']}, "
              f"{len(report['servers'])} server(s): {urls})")
    else:
        print(f"model   {report['model']}  (vLLM {report['vllm_version']}, {report['runner']} "
              f"runner, {report['device']}, TP {report['tensor_parallel_size']})")
    stride = f", stride {report['stride']}" if report.get("stride") is not None else ""
    print(f"text    {report['source']}: {report['stream_tokens']} tokens; protocol "
          f"{report.get('protocol', 'fastpath')}, context {report['context_length']}{stride}, "
          f"{report['windows']} windows")
    for path, result in results.items():
        s = result.summary()
        print(f"{path:<9} PPL {s['perplexity']:.4f} ± {s['perplexity_stderr']:.4f}  "
              f"({s['scored_tokens']} tokens, {s['seconds_per_window']:.3f} s/window, "
              f"{s['tokens_per_second']:.0f} tokens/s)")
        if "token_perplexity" in s:
            print(f"{'':<9} (windows weighted as the HF guide weights them; plain per-token "
                  f"PPL {s['token_perplexity']:.4f})")
    if "latency_seconds" in report:
        lat = report["latency_seconds"]
        print(f"servers windows answered {report['answered_by']}, {report['retries']} retried, "
              f"latency p50 {lat['p50']:.3f} s, p90 {lat['p90']:.3f} s, p99 {lat['p99']:.3f} s"
              + (f"; given up: {report['dead_servers']}" if report["dead_servers"] else ""))
    for line in exactness_lines(report.get("exactness")):
        print(line)
    if "bitwise_equal" in report:
        verdict = "EQUAL" if report["bitwise_equal"] else "DIFFERENT"
        print(f"bitwise fast vs standard: {verdict} "
              f"({report['bitwise_mismatches']} of {report['scored_tokens']} differ)")


def exactness_lines(exactness: dict[str, Any] | list | None) -> list[str]:
    """The summary's lines on what the bits rest on: one per engine or server."""
    if not exactness:
        return []
    lines = []
    for one in exactness if isinstance(exactness, list) else [exactness]:
        if "error" in one:
            lines.append(f"exact   {one.get('url', '')}: unknown ({one['error']})")
            continue
        rows = one["lm_head_rows"]
        how = {"verified": "row subsets verified on this machine",
               "construction": "the standard path's rows (exact by construction)"}
        where = f"{one['url']}: " if "url" in one else ""
        lines.append(f"exact   {where}fast == standard for the same schedule: "
                     f"{how.get(rows, rows) if isinstance(rows, str) else rows}; "
                     f"schedule {one['schedule']}")
    return lines


def _prepare_runner(argv: list[str]) -> None:
    """`--model-runner v2` on CPU: register the stand-in Triton backend before vLLM is
    imported (the full parser imports vLLM), as vLLM decides V2 support at import."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--model-runner", "--model_runner", dest="model_runner")
    known, _ = pre.parse_known_args(argv)
    if known.model_runner == "v2":
        from fastpath.runners import prepare_process

        prepare_process()


def main(argv: list[str] | None = None) -> int:
    from fastpath import flags

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["check-vllm"]:  # before build_parser: needs no installed vLLM
        from fastpath import check_vllm

        return check_vllm.main(argv[1:])
    flags.quiet_vllm(flags.verbose_requested(argv))  # before vLLM is imported
    _prepare_runner(argv)  # before vLLM is imported
    if argv[:1] == ["lm-eval"]:  # the rest is lm-eval's own command line
        from fastpath.lm_eval_model import cli_main

        return cli_main(argv[1:])
    parser, ppl_parser, kld_parser, serve_parser = build_parser()
    subparsers = {"ppl": ppl_parser, "kld": kld_parser, "serve": serve_parser}
    args = parser.parse_args(argv)
    try:
        if args.command in subparsers:
            given = given_flags(subparsers[args.command],
                                argv[list(argv).index(args.command) + 1:])
            if args.command == "kld":
                from fastpath.kld import run_kld

                return run_kld(args, given)
            if args.command == "serve":
                from fastpath.serve import run_serve

                return run_serve(args, given)
            if args.servers:
                return run_ppl_servers(args, given)
            return run_ppl(args, given)
        from fastpath.report import run_report

        return run_report(args)
    except UsageError as error:
        print(f"fastpath {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
