"""`fastpath ppl`: sliding-window perplexity through a local vLLM engine, or through
`fastpath serve` servers (`--server URL`, repeatable)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import numpy as np

from fastpath.cli.common import (
    EXIT_NOT_EQUAL,
    EXIT_SERVERS_FAILED,
    UsageError,
    add_json_flag,
    add_text_flags,
    build_layout,
    check_window_flags,
    context_limit_error,
    engine_args,
    engine_dests,
    finish_report,
    load_text,
)

# Flags that still mean something with --server: they choose the local tokenizer.
CLIENT_SIDE_ENGINE_FLAGS = {"tokenizer", "tokenizer_mode", "tokenizer_revision",
                            "trust_remote_code"}


def add_ppl_flags(parser: argparse.ArgumentParser) -> None:
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
    add_json_flag(group)
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


def check_ppl_flags(args: argparse.Namespace) -> None:
    """Refuse bad fastpath flags before any engine starts."""
    check_window_flags(args)
    if args.standard_k < -1:
        raise UsageError("--standard-k must be -1 (full vocabulary) or >= 0, "
                         f"got {args.standard_k}")
    if args.max_in_flight < 1:
        raise UsageError(f"--max-in-flight must be positive, got {args.max_in_flight}")
    if not args.request_timeout > 0:
        raise UsageError(f"--request-timeout must be positive, got {args.request_timeout}")


def run(args: argparse.Namespace, given: set[str]) -> int:
    """`fastpath ppl`: on servers where `--server` names them, else on a local engine."""
    return run_on_servers(args, given) if args.servers else run_locally(args, given)


def run_locally(args: argparse.Namespace, given: set[str]) -> int:
    """`fastpath ppl` on an engine built in this process."""
    import vllm

    from fastpath import perplexity, zoo
    from fastpath.runners import device_name, runner_environment

    check_ppl_flags(args)
    check_runner(args.model_runner)
    text, source = load_text(args)
    if args.model is None:
        args.model = str(zoo.get_model(zoo.DEFAULT_MODEL))
        model_name = f"{zoo.DEFAULT_MODEL} (embedded default)"
    else:
        model_name = args.model
    engine = engine_args(args, given)
    with contextlib.ExitStack() as stack:
        if args.model_runner != "auto":
            # Kept for the engine's life: vLLM's front end reads it at every request.
            stack.enter_context(runner_environment(args.model_runner))
        results, runner, layout, exactness = score_locally(args, engine, text, source)
    tokens = layout.tokens

    main = results["fast" if args.path == "both" else args.path]
    report: dict[str, Any] = {
        "model": model_name, "model_path": args.model, "source": source,
        "vllm_version": vllm.__version__, "runner": runner, "device": device_name(),
        "tensor_parallel_size": engine.tensor_parallel_size,
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
    finish_report(report, args, lambda r: print_summary(r, results))
    if args.save_logprobs:
        np.save(args.save_logprobs, main.logprobs)
    return exit_code


def score_locally(args: argparse.Namespace, engine: Any, text: str, source: str
                  ) -> tuple[dict[str, Any], str, Any, dict[str, Any]]:
    """Build the engine, score the layout on each path asked for; the engine always stops.
    Returns the results per path, the runner that scored ("V1"/"V2"), the layout and what
    the bits rest on (`scoring.exactness`)."""
    from tqdm import tqdm

    from fastpath import perplexity, scoring
    from fastpath.runners import runner_name

    llm = scoring.build_llm_from_engine_args(engine)
    try:
        layout = build_layout(llm, args, text, source)
        tokens = layout.tokens
        paths = ("fast", "standard") if args.path == "both" else (args.path,)
        perplexity.warm_up(llm, tokens, args.context_length, args.stride, layout.windows)
        results = {}
        for path in paths:
            with tqdm(total=len(layout.windows), desc=f"windows ({path})", unit="window") as bar:
                results[path] = perplexity.score_layout(
                    llm, layout, path=path, standard_k=args.standard_k,
                    max_batch_windows=args.max_batch_windows, progress=bar.update)
        runner = runner_name(llm)
        exactness = scoring.exactness(llm)
    finally:
        scoring.shutdown(llm)
    return results, runner, layout, exactness


def check_runner(runner: str) -> None:
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


def run_on_servers(args: argparse.Namespace, given: set[str]) -> int:
    """`fastpath ppl --server URL ...`: the same windows and report, scored by servers."""
    import asyncio

    from tqdm import tqdm

    from fastpath import client, perplexity
    from fastpath.windows import WindowError, count_windows

    check_ppl_flags(args)
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
                          if d in engine_dests() and d not in CLIENT_SIDE_ENGINE_FLAGS)
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
    finish_report(report, args, lambda r: print_summary(r, {"fast": result}))
    if args.save_logprobs:
        np.save(args.save_logprobs, result.logprobs)
    return 0


def print_summary(report: dict[str, Any], results: dict[str, Any]) -> None:
    """The report's lines: model, text and windows, each path's perplexity, servers, bits."""
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
