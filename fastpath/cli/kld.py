"""`fastpath kld`: KL divergence of a model against its base model, on vLLM's V1 runner.

The passes and the statistics are `fastpath.metrics.kld`'s; this module reads the flags, builds
the two scorers one after the other (engines, or `fastpath serve` servers with `--server`
and `--base-server`; a base file replaces the base pass), and writes the report.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fastpath.cli.common import (
    EXIT_SERVERS_FAILED,
    UsageError,
    add_json_flag,
    add_server_flags,
    add_text_flags,
    build_layout,
    check_server_flags,
    check_window_flags,
    engine_args,
    finish_report,
    load_text,
    server_failures,
    server_scorer,
)
from fastpath.engine import scoring
from fastpath.engine.scorer import EngineScorer, Scorer
from fastpath.metrics import basefile, divergence
from fastpath.metrics.kld import DEFAULT_TOP_K, base_pass, compare, model_pass

BASE_OVERRIDES = {"base_quantization": "quantization", "base_dtype": "dtype",
                  "base_tensor_parallel_size": "tensor_parallel_size"}


def add_kld_flags(parser: argparse.ArgumentParser) -> None:
    """fastpath's flags of `kld` (engine flags come from EngineArgs and apply to both)."""
    group = parser.add_argument_group("KL divergence (fastpath)")
    group.add_argument("--base-model", help="the reference model (unquantized); optional "
                       "when --base-cache names an existing base file")
    group.add_argument("--base-quantization", help="--quantization for the base model "
                       "('none' for none; default: the same as --quantization)")
    group.add_argument("--base-dtype", help="--dtype for the base model (default: --dtype)")
    group.add_argument("--base-tensor-parallel-size", type=int,
                       help="--tensor-parallel-size for the base model")
    group.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                       help=f"base top-K ids kept per token (default {DEFAULT_TOP_K})")
    group.add_argument("--base-cache", help="base file (.npz): reused when made for the same "
                       "tokens, windows, K and tokenizer, else written here")
    group.add_argument("--save-per-token", help="write per-token KLD, Δp and both log-probs "
                       "(.npz)")
    add_text_flags(group)
    add_json_flag(group)
    add_server_flags(parser, base=True)


def base_namespace(args: argparse.Namespace, given: set[str]
                   ) -> tuple[argparse.Namespace, set[str]]:
    """The flags of the base engine, and which were given: the model's, with the --base-*
    overrides (`--base-quantization none` for an unquantized base)."""
    base = copy.copy(args)
    base.model = args.base_model
    base.tokenizer = None
    base_given = set(given) - {"tokenizer"}
    for flag, engine_flag in BASE_OVERRIDES.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if flag == "base_quantization" and str(value).lower() == "none":
            value = None
        setattr(base, engine_flag, value)
        base_given.add(engine_flag)
    return base, base_given


def check_kld_flags(args: argparse.Namespace, given: set[str]) -> None:
    """Refuse bad `kld` flags before any engine starts or server is asked."""
    check_window_flags(args)
    if args.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {args.top_k}")
    check_server_flags(args, given)
    if args.model is None and not args.servers:
        raise UsageError("--model is required (or --server): the model to compare with the "
                         "base model")
    if args.model is not None and args.servers:
        raise UsageError("--model and --server both name the model to compare: give one")
    reuse = args.base_cache and Path(args.base_cache).is_file()
    if args.base_model is None and not reuse and not args.base_servers:
        raise UsageError("--base-model is required unless --base-cache names an existing "
                         "base file or --base-server names a server of the base model")
    if args.base_model is not None and args.base_servers:
        raise UsageError("--base-model and --base-server both name the base model: give one")


def check_base_flags(base: basefile.BaseScores, args: argparse.Namespace) -> None:
    """Refuse a base file made with other flags before any engine starts."""
    try:
        base.check_settings(args.top_k, args.convention, args.context_length, args.stride,
                            source=f"--base-cache {args.base_cache}")
    except basefile.BaseFileError as error:
        raise UsageError(str(error)) from None


@contextlib.contextmanager
def open_scorer(args: argparse.Namespace, given: set[str], urls: list[str] | None,
                text: str) -> Iterator[tuple[Scorer, dict[str, Any]]]:
    """The servers at `urls`, else an engine built from the flags (always stopped after);
    with the report's engine fields."""
    if urls:
        yield server_scorer(urls, args, text), {"servers": urls, "tensor_parallel_size": None}
        return
    engine = engine_args(args, given)
    llm = scoring.build_llm_from_engine_args(engine)
    try:
        yield (EngineScorer(llm, max_batch=args.max_batch_windows),
               {"tensor_parallel_size": engine.tensor_parallel_size})
    finally:
        scoring.shutdown(llm)


def fingerprint_of(scorer: Scorer) -> str:
    """The scorer's tokenizer fingerprint: a server computes its own, else computed here."""
    tokenizer = scorer.tokenizer()
    return getattr(tokenizer, "fingerprint", None) or basefile.tokenizer_fingerprint(tokenizer)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="window")


def run(args: argparse.Namespace, given: set[str]) -> int:
    """The `fastpath kld` command on vLLM's V1 model runner, the one that computes the top-K
    extension (V2, CUDA's default, refuses `fastpath_top_k`); a V2 request is refused."""
    import os

    from fastpath.engine import runners

    if runners.v2_requested():
        raise UsageError(f"fastpath kld needs vLLM's V1 model runner: the base pass's top-K "
                         f"(fastpath_top_k) is computed by fastpath's V1 runner patch, and "
                         f"{runners.RUNNER_ENV}={os.environ[runners.RUNNER_ENV]} asks for V2; "
                         f"unset it (fastpath kld then runs V1, on CUDA too)")
    with runners.runner_environment("v1"):
        try:
            return _run_kld(args, given)
        except server_failures(args) as error:
            print(f"fastpath kld: servers failed: {error}", file=sys.stderr)
            return EXIT_SERVERS_FAILED


def _run_kld(args: argparse.Namespace, given: set[str]) -> int:
    """Base pass (or base file), model pass, statistics."""
    check_kld_flags(args, given)
    text, source = load_text(args)

    base: basefile.BaseScores | None = None
    base_file_bytes = None
    reused = False
    if args.base_cache and Path(args.base_cache).is_file():
        try:
            base = basefile.BaseScores.load(args.base_cache)
        except basefile.BaseFileError as error:
            raise UsageError(f"--base-cache: {error}") from None
        reused = True
        base_file_bytes = Path(args.base_cache).stat().st_size
        check_base_flags(base, args)
    base_timing = None
    if base is None:
        base_args, base_given = base_namespace(args, given)
        with open_scorer(base_args, base_given, args.base_servers, text) as (scorer, _):
            layout = build_layout(scorer, args, text, source)
            tokenizer = fingerprint_of(scorer)
            vocab = scorer.describe().vocab_size
            if args.top_k > vocab:
                raise UsageError(f"--top-k {args.top_k} exceeds the vocabulary ({vocab})")
            with _progress(len(layout.windows), "base pass") as bar:
                target, top_lp, top_ids, base_timing = base_pass(scorer, layout, args.top_k,
                                                                 bar.update)
        described = scorer.describe()
        base = basefile.from_layout(layout, target, top_lp, top_ids, vocab, tokenizer,
                                    model=args.base_model or described.model,
                                    meta={"vllm_version": described.vllm_version,
                                          "source": source})
        if args.base_cache:
            base_file_bytes = base.save(args.base_cache)

    with open_scorer(args, given, args.servers, text) as (scorer, engine_fields):
        layout = build_layout(scorer, args, text, source)
        info = scorer.describe()
        try:
            base.check_matches(layout, args.top_k, info.vocab_size, fingerprint_of(scorer),
                               source=f"--base-cache {args.base_cache}" if reused
                               else "the base model")
        except basefile.BaseFileError as error:
            raise UsageError(str(error)) from None
        with _progress(len(layout.windows), "model pass") as bar:
            model = model_pass(scorer, layout, base, bar.update)

    result = compare(layout, base, model)
    report: dict[str, Any] = {
        "kind": "fastpath-kld", "model": args.model or info.model, "base_model": base.model,
        "base_file": args.base_cache, "base_file_reused": reused,
        "base_file_bytes": base_file_bytes,
        "base_file_bytes_per_token": base_file_bytes / base.num_scored
        if base_file_bytes else None,
        "source": source, "vllm_version": info.vllm_version, "runner": info.runner,
        "device": info.extra.get("device"), **engine_fields,
        **layout.describe(), **result.summary(),
        "seconds_base_pass": base_timing.seconds if base_timing else None,
        "seconds_model_pass": model.timing.seconds,
    }
    finish_report(report, args, print_report)
    if args.save_per_token:
        with open(args.save_per_token, "wb") as handle:
            np.savez(handle, positions=layout.positions(), targets=layout.targets(),
                     **result.per_token())
    return 0


def print_report(report: dict[str, Any]) -> None:
    """The report's lines: models, engine, text and windows, base file, statistics."""
    base = report["base_model"] + (f" (base file {report['base_file']})"
                                   if report["base_file_reused"] else "")
    print(f"model   {report['model']}  vs base {base}")
    if report.get("servers"):
        print(f"        vLLM {report['vllm_version']}, servers {', '.join(report['servers'])}")
    else:
        print(f"        vLLM {report['vllm_version']}, {report['runner']} runner, "
              f"{report['device']}, TP {report['tensor_parallel_size']}")
    stride = f", stride {report['stride']}" if report["stride"] is not None else ""
    print(f"text    {report['source']}: {report['stream_tokens']} tokens; convention "
          f"{report['convention']}, context {report['context_length']}{stride}, "
          f"{report['windows']} windows, {report['scored_tokens']} scored")
    if report["base_file_bytes"]:
        print(f"base file {report['base_file_bytes']} bytes, "
              f"{report['base_file_bytes_per_token']:.1f} bytes per scored token")
    print()
    print(divergence.format_summary(report))
