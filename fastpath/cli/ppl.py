"""`fastpath ppl`: sliding-window perplexity through a local vLLM engine, or through
`fastpath serve` servers (`--server URL`, repeatable)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np

from fastpath.cli.common import (
    EXIT_NOT_EQUAL,
    EXIT_SERVERS_FAILED,
    RunFlags,
    UsageError,
    add_json_flag,
    add_server_flags,
    add_text_flags,
    build_layout,
    check_server_flags,
    check_window_flags,
    finish_report,
    load_text,
    open_scorer,
    server_failures,
    with_engine_defaults,
)
from fastpath.engine.scorer import EngineScorer, Exactness


def add_ppl_flags(parser: argparse.ArgumentParser) -> None:
    """The original script's flags and fastpath's own (engine flags come from EngineArgs)."""
    group = parser.add_argument_group("perplexity (fastpath)")
    add_text_flags(group)
    group.add_argument("--method", choices=("fast", "standard", "both"), default="fast",
                       help="how the engine scores: fast (target_token_ids), standard "
                       "(prompt_logprobs=K dicts), both (run both and check every logprob "
                       "is bitwise equal)")
    group.add_argument("--standard-k", type=int, default=0,
                       help="K of prompt_logprobs on the standard path (default 0)")
    group.add_argument("--model-runner", choices=("auto", "v1", "v2"), default="auto",
                       help="vLLM's model runner: auto (vLLM's choice: V1 on CPU, V2 on CUDA; "
                       "VLLM_USE_V2_MODEL_RUNNER is honoured), v1 or v2. On CPU, v2 runs "
                       "V2's Triton kernels in Triton's interpreter (~30x slower): a check "
                       "of V2's logic, not of a GPU's bits")
    add_json_flag(group)
    group.add_argument("--save-logprobs", help="write per-token logprobs (float32 .npy)")
    add_server_flags(parser)


def check_ppl_flags(flags: RunFlags) -> RunFlags:
    """Refuse bad fastpath flags before any engine starts or server is asked; the flags
    with what fastpath derives from them."""
    flags = check_window_flags(flags)
    if flags.standard_k < -1:
        raise UsageError("--standard-k must be -1 (full vocabulary) or >= 0, "
                         f"got {flags.standard_k}")
    check_server_flags(flags)
    if not flags.servers:
        check_runner(flags.model_runner)
        return with_engine_defaults(flags)
    if flags.method != "fast":
        raise UsageError(f"--method {flags.method} needs a local engine; servers answer the "
                         "fast method (drop --server, or --method fast)")
    if flags.model_runner != "auto":
        raise UsageError(f"--model-runner {flags.model_runner} applies to a local engine; a "
                         "server runs the runner it was started with (VLLM_USE_V2_MODEL_RUNNER "
                         "in fastpath serve's environment)")
    return flags


def run(args: argparse.Namespace, given: set[str]) -> int:
    """`fastpath ppl`: the windows of --convention scored on a local engine (each --method) or
    on `fastpath serve` servers (--server); one flow, one report."""
    from tqdm import tqdm

    from fastpath import zoo
    from fastpath.metrics import perplexity

    flags = check_ppl_flags(RunFlags.read(args, given))
    text, source = load_text(flags)
    model, model_name = flags.model, flags.model
    if model is None and not flags.servers:
        model = str(zoo.get_model(zoo.DEFAULT_MODEL))
        model_name = f"{zoo.DEFAULT_MODEL} (embedded default)"
    with open_scorer(flags, text, flags.servers, model, flags.model_runner) as opened:
        first = opened.scorer
        if opened.llm is None:  # servers answer the fast method
            scorers = {"fast": first}
            model_name = first.describe().model
        else:
            methods = ("fast", "standard") if flags.method == "both" else (flags.method,)
            scorers = {method: EngineScorer(opened.llm, method, flags.standard_k,
                                            flags.max_batch_windows) for method in methods}
            first = next(iter(scorers.values()))
        where = (f"{len(flags.servers)} server{'s' * (len(flags.servers) > 1)}"
                 if flags.servers else None)
        results = {}
        try:
            layout = build_layout(first, flags, text, source)
            perplexity.warm_up(first, layout)
            for method, scorer in scorers.items():
                with tqdm(total=len(layout.windows), desc=f"windows ({where or method})",
                          unit="window") as bar:
                    results[method] = perplexity.score_layout(scorer, layout, bar.update)
        except server_failures(flags) as error:
            print(f"fastpath ppl: servers failed: {error}", file=sys.stderr)
            return EXIT_SERVERS_FAILED
        info = first.describe()
        exactness = first.exactness()
        served = first.report() if flags.servers else {}

    main = results["fast" if flags.method == "both" else flags.method]
    engine_fields = {k: v for k, v in opened.fields.items() if k != "servers"}
    report: dict[str, Any] = {
        "model": model_name, "source": source,
        "vllm_version": info.vllm_version, "runner": info.runner,
        "device": info.extra.get("device"),
        **engine_fields, **layout.describe(), **main.summary(), **served,
        "methods": {method: r.summary() for method, r in results.items()},
        "exactness": exactness,
    }
    if flags.servers:
        report["servers"] = info.extra["servers"]
    exit_code = 0
    if flags.method == "both":
        mismatches = perplexity.bitwise_mismatches(results["fast"].logprobs,
                                                   results["standard"].logprobs)
        report["bitwise_equal"] = mismatches.size == 0
        report["bitwise_mismatches"] = int(mismatches.size)
        exit_code = 0 if mismatches.size == 0 else EXIT_NOT_EQUAL
    finish_report(report, flags, lambda r: print_summary(r, results))
    if flags.save_logprobs:
        np.save(flags.save_logprobs, main.logprobs)
    return exit_code


def check_runner(runner: str) -> None:
    """Refuse --model-runner v2 on CPU where the stand-in Triton backend came too late."""
    from fastpath.engine.runners import cpu_build

    if runner != "v2" or not cpu_build():
        return
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise UsageError("--model-runner v2 on CPU needs fastpath's stand-in Triton backend "
                         "registered before vLLM is imported (fastpath.engine.runners."
                         "prepare_process); run it as the `fastpath` command")
    print("fastpath ppl: V2 runner on CPU: Triton kernels run in Triton's interpreter "
          "(slow; checks V2's logic, says nothing about a GPU's bits)", file=sys.stderr)


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
    print(f"text    {report['source']}: {report['stream_tokens']} tokens; convention "
          f"{report.get('convention', 'fastpath')}, context {report['context_length']}{stride}, "
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
    for line in exactness_lines(report.get("exactness", [])):
        print(line)
    if "bitwise_equal" in report:
        verdict = "EQUAL" if report["bitwise_equal"] else "DIFFERENT"
        print(f"bitwise fast vs standard: {verdict} "
              f"({report['bitwise_mismatches']} of {report['scored_tokens']} differ)")


def exactness_lines(exactness: list[Exactness]) -> list[str]:
    """The summary's lines on what the bits rest on: one per engine or server."""
    lines = []
    for one in exactness:
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
