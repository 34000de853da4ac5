"""`fastpath kld`: KL divergence of a model (e.g. a quantization) against its base model.

Two passes over the same windows (`fastpath.protocols`):
1. base pass: the base model scores the targets on the fast path and, through fastpath's
   top-K extension (`SamplingParams.extra_args["fastpath_top_k"]`), also returns each
   scored row's top-K log-probs and ids from the same fp32 log-softmax; no Python object
   per position. The result is the base file (`fastpath.basefile`), reusable by later runs.
2. model pass: the model scores exactly the base's top-K ids and the target on each row,
   through upstream's 2-D `prompt_logprob_token_ids` ([rows, K + 1]) with
   `prompt_logprob_start`, plus its own top-1 (for "same top token").
The statistics are in `fastpath.divergence`. The target columns of both passes are the
values `fastpath ppl` computes, so PPL and PPL(base) equal its figures bit for bit.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastpath import basefile, divergence, protocols, scoring
from fastpath.perplexity import PerplexityResult, window_requests
from fastpath.windows import Window

TOP_K_KEY = "fastpath_top_k"  # SamplingParams.extra_args key of the runner's top-K extension
DEFAULT_TOP_K = 32


def base_params(top_k: int):
    """SamplingParams of the base pass: targets on the fast path + the top-K extension."""
    return scoring.scoring_params("fast", extra_args={TOP_K_KEY: top_k})


def model_params(ids: np.ndarray, start: int):
    """SamplingParams of the model pass: fixed ids per row + the model's own top-1."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprob_token_ids=ids,
                          prompt_logprob_start=start, extra_args={TOP_K_KEY: 1})


def _batches(windows: Sequence[Window], size: int) -> list[tuple[int, Sequence[Window]]]:
    return [(first, windows[first : first + size]) for first in range(0, len(windows), size)]


@dataclass
class PassTiming:
    seconds: float
    windows: int


def base_pass(llm: Any, layout: protocols.Layout, top_k: int, max_batch_windows: int = 16,
              progress: Callable[[int], None] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, PassTiming]:
    """(target logprobs [n], top-K logprobs [n, K], top-K ids [n, K], timing) for a layout."""
    from fastpath.scoring import split_top_k

    targets, top_logprobs, top_ids = [], [], []
    params = base_params(top_k)
    started = time.perf_counter()
    for _, batch in _batches(layout.windows, max_batch_windows):
        requests = window_requests(layout.tokens, batch)
        outputs = scoring.submit_together(llm, [scoring.fast_prompt(r) for r in requests],
                                          params)
        for window, output in zip(batch, outputs, strict=True):
            scores, logprobs, ids = split_top_k(scoring.fixed_id_scores(output), 1, top_k)
            if scores.shape != (window.num_scored, 1):
                raise AssertionError(f"{window}: {scores.shape[0]} rows for "
                                     f"{window.num_scored} scored tokens")
            targets.append(scores[:, 0])
            top_logprobs.append(logprobs)
            top_ids.append(ids)
        if progress is not None:
            progress(len(batch))
    seconds = time.perf_counter() - started
    return (np.concatenate(targets), np.concatenate(top_logprobs), np.concatenate(top_ids),
            PassTiming(seconds, len(layout.windows)))


@dataclass
class ModelScores:
    """The model pass's answer: the model on the base's top-K ids, the target, its top-1."""

    topk_logprobs: np.ndarray  # float32 [n, K]: model log-probs of the base's top-K ids
    target_logprobs: np.ndarray  # float32 [n]
    top1_logprobs: np.ndarray  # float32 [n]: the model's own best log-prob
    top1_ids: np.ndarray  # int32 [n]
    timing: PassTiming


def model_pass(llm: Any, layout: protocols.Layout, base: basefile.BaseScores,
               max_batch_windows: int = 16, progress: Callable[[int], None] | None = None
               ) -> ModelScores:
    """Score the model on each row's base top-K ids and target (the target column is left
    out when K is the whole vocabulary: it is then one of the K ids)."""
    from fastpath.scoring import split_top_k

    k = base.top_k
    full = k == base.vocab_size
    targets_all = layout.targets()
    edges = np.concatenate([[0], np.cumsum([w.num_scored for w in layout.windows])])
    topk, target, top1, top1_ids = [], [], [], []
    started = time.perf_counter()
    for first, batch in _batches(layout.windows, max_batch_windows):
        prompts, params, rows = [], [], []
        for i, window in enumerate(batch, start=first):
            lo, hi = int(edges[i]), int(edges[i + 1])
            ids = base.topk_ids[lo:hi]
            if not full:
                ids = np.concatenate([ids, targets_all[lo:hi, None]], axis=1)
            prompts.append({"prompt_token_ids": window.prompt(layout.tokens)})
            params.append(model_params(np.ascontiguousarray(ids, dtype=np.int32),
                                       window.first_scored_row))
            rows.append((lo, hi))
        outputs = scoring.submit_together(llm, prompts, params)
        for (lo, hi), output in zip(rows, outputs, strict=True):
            n_ids = k if full else k + 1
            scores, best, best_ids = split_top_k(scoring.fixed_id_scores(output), n_ids, 1)
            if scores.shape != (hi - lo, n_ids):
                raise AssertionError(f"rows {lo}:{hi}: got scores of shape {scores.shape}")
            topk.append(scores[:, :k])
            if full:
                column = np.argmax(base.topk_ids[lo:hi] == targets_all[lo:hi, None], axis=1)
                target.append(np.take_along_axis(scores, column[:, None], axis=1)[:, 0])
            else:
                target.append(scores[:, k])
            top1.append(best[:, 0])
            top1_ids.append(best_ids[:, 0])
        if progress is not None:
            progress(len(batch))
    seconds = time.perf_counter() - started
    return ModelScores(np.concatenate(topk), np.concatenate(target), np.concatenate(top1),
                       np.concatenate(top1_ids), PassTiming(seconds, len(layout.windows)))


def compare(layout: protocols.Layout, base: basefile.BaseScores,
            model: ModelScores) -> divergence.Divergence:
    """The per-token divergence and both perplexities (as `fastpath ppl` computes them)."""
    full = base.top_k == base.vocab_size
    kld, tail_base, _ = divergence.topk_kld(base.topk_logprobs, model.topk_logprobs,
                                            full_vocabulary=full, vocab_size=base.vocab_size)
    # Same top token: the model's log-prob of the base's top id equals its own best (ties:
    # the base's top wins). Both come from the same log-softmax row, so this is exact.
    same_top = model.topk_logprobs[:, 0] == model.top1_logprobs
    outside = ~(base.topk_ids == model.top1_ids[:, None]).any(axis=1) & ~same_top
    weights = layout.token_weights()
    ppl = PerplexityResult(model.target_logprobs, len(layout.windows), weights=weights)
    ppl_base = PerplexityResult(base.target_logprobs, len(layout.windows), weights=weights)
    return divergence.Divergence(
        kld=kld, base_logprobs=base.target_logprobs, model_logprobs=model.target_logprobs,
        same_top=same_top, tail_mass_base=tail_base,
        top1_outside_base_topk=int(outside.sum()), top1_undecided=0,
        ppl=ppl.perplexity, ppl_base=ppl_base.perplexity, mean_nll=ppl.mean_nll,
        mean_nll_base=ppl_base.mean_nll, top_k=base.top_k)


# ---------------------------------------------------------------- command line


def add_kld_flags(parser: argparse.ArgumentParser) -> None:
    """fastpath's flags of `kld` (engine flags come from EngineArgs and apply to both)."""
    from fastpath.cli import add_text_flags

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


    group.add_argument("--json", dest="json_path", help="write every figure to this JSON file")


def _usage_error(message: str) -> Exception:
    from fastpath.cli import UsageError

    return UsageError(message)


def _engine_args(args: argparse.Namespace, given: set[str]):
    """vLLM EngineArgs from parsed flags, fastpath's defaults where none was given (as ppl)."""
    from fastpath import cli

    return cli._engine_args(args, given)


BASE_OVERRIDES = {"base_quantization": "quantization", "base_dtype": "dtype",
                  "base_tensor_parallel_size": "tensor_parallel_size"}


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


def _check_flags(args: argparse.Namespace) -> None:
    from fastpath.cli import check_window_flags

    check_window_flags(args)
    if args.top_k < 1:
        raise _usage_error(f"--top-k must be a positive integer, got {args.top_k}")
    if args.model is None:
        raise _usage_error("--model is required: the model to compare with the base model")
    reuse = args.base_cache and Path(args.base_cache).is_file()
    if args.base_model is None and not reuse:
        raise _usage_error("--base-model is required unless --base-cache names an existing "
                           "base file")


def _check_base_flags(base: basefile.BaseScores, args: argparse.Namespace) -> None:
    """Refuse a base file made with other flags before any engine starts."""
    source = f"--base-cache {args.base_cache}"
    if base.top_k != args.top_k:
        raise _usage_error(f"{source} holds the top-{base.top_k}, this run asks for "
                           f"--top-k {args.top_k}")
    theirs = (base.protocol, base.context_length, base.stride)
    ours = (args.protocol, args.context_length, args.stride)
    if theirs != ours:
        raise _usage_error(f"{source} was made with --protocol {theirs[0]} --context-length "
                           f"{theirs[1]} --stride {theirs[2]}, this run uses {ours[0]}, "
                           f"{ours[1]}, {ours[2]}")


def _engine(args: argparse.Namespace, given: set[str]):
    engine_args = _engine_args(args, given)
    return scoring.build_llm_from_engine_args(engine_args), engine_args


def _layout(llm: Any, args: argparse.Namespace, text: str, source: str) -> protocols.Layout:
    from fastpath.windows import WindowError

    from fastpath.cli import context_limit_error

    max_len = llm.llm_engine.model_config.max_model_len
    if args.context_length > max_len - 1:
        raise context_limit_error(args.context_length, max_len, "this engine")
    try:
        return protocols.build(args.protocol, llm.get_tokenizer(), text, args.context_length,
                               args.stride)
    except WindowError as error:
        raise _usage_error(f"{source}: {error}") from None


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="window")


def run_kld(args: argparse.Namespace, given: set[str]) -> int:
    """The `fastpath kld` command on vLLM's V1 model runner, the one that computes the top-K
    extension (V2, CUDA's default, refuses `fastpath_top_k`); a V2 request is refused."""
    from fastpath import runners

    if runners.v2_requested():
        raise _usage_error(f"fastpath kld needs vLLM's V1 model runner: the base pass's top-K "
                           f"(fastpath_top_k) is computed by fastpath's V1 runner patch, and "
                           f"{runners.RUNNER_ENV}={os.environ[runners.RUNNER_ENV]} asks for V2; "
                           f"unset it (fastpath kld then runs V1, on CUDA too)")
    with runners.runner_environment("v1"):
        return _run_kld(args, given)


def _run_kld(args: argparse.Namespace, given: set[str]) -> int:
    """Base pass (or base file), model pass, statistics."""
    import vllm

    from fastpath.cli import load_text
    from fastpath.runners import device_name, runner_name

    _check_flags(args)
    text, source = load_text(args)

    base: basefile.BaseScores | None = None
    base_file_bytes = None
    reused = False
    if args.base_cache and Path(args.base_cache).is_file():
        try:
            base = basefile.BaseScores.load(args.base_cache)
        except basefile.BaseFileError as error:
            raise _usage_error(f"--base-cache: {error}") from None
        reused = True
        base_file_bytes = Path(args.base_cache).stat().st_size
        _check_base_flags(base, args)
    base_timing = None
    if base is None:
        llm, _ = _engine(*base_namespace(args, given))
        try:
            layout = _layout(llm, args, text, source)
            tokenizer = basefile.tokenizer_fingerprint(llm.get_tokenizer())
            vocab = llm.llm_engine.model_config.get_vocab_size()
            if args.top_k > vocab:
                raise _usage_error(f"--top-k {args.top_k} exceeds the vocabulary ({vocab})")
            with _progress(len(layout.windows), "base pass") as bar:
                target, top_lp, top_ids, base_timing = base_pass(
                    llm, layout, args.top_k, args.max_batch_windows, bar.update)
        finally:
            scoring.shutdown(llm)
        base = basefile.from_layout(layout, target, top_lp, top_ids, vocab, tokenizer,
                                    model=args.base_model,
                                    meta={"vllm_version": vllm.__version__, "source": source})
        if args.base_cache:
            base_file_bytes = base.save(args.base_cache)

    llm, engine_args = _engine(args, given)
    try:
        layout = _layout(llm, args, text, source)
        try:
            base.check_matches(layout, args.top_k,
                               llm.llm_engine.model_config.get_vocab_size(),
                               basefile.tokenizer_fingerprint(llm.get_tokenizer()),
                               source=f"--base-cache {args.base_cache}" if reused
                               else "the base model")
        except basefile.BaseFileError as error:
            raise _usage_error(str(error)) from None
        with _progress(len(layout.windows), "model pass") as bar:
            model = model_pass(llm, layout, base, args.max_batch_windows, bar.update)
        runner = runner_name(llm)
    finally:
        scoring.shutdown(llm)

    result = compare(layout, base, model)
    report: dict[str, Any] = {
        "kind": "fastpath-kld", "model": args.model, "base_model": base.model,
        "base_file": args.base_cache, "base_file_reused": reused,
        "base_file_bytes": base_file_bytes,
        "base_file_bytes_per_token": base_file_bytes / base.num_scored
        if base_file_bytes else None,
        "source": source, "vllm_version": vllm.__version__, "runner": runner,
        "device": device_name(), "tensor_parallel_size": engine_args.tensor_parallel_size,
        **layout.describe(), **result.summary(),
        "seconds_base_pass": base_timing.seconds if base_timing else None,
        "seconds_model_pass": model.timing.seconds,
    }
    report["flags"] = {k: v for k, v in vars(args).items() if _jsonable(v)}
    _print_report(report)
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
    if args.save_per_token:
        with open(args.save_per_token, "wb") as handle:
            np.savez(handle, positions=layout.positions(), targets=layout.targets(),
                     **result.per_token())
    return 0


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _print_report(report: dict[str, Any]) -> None:
    base = report["base_model"] + (f" (base file {report['base_file']})"
                                   if report["base_file_reused"] else "")
    print(f"model   {report['model']}  vs base {base}")
    print(f"        vLLM {report['vllm_version']}, {report['runner']} runner, "
          f"{report['device']}, TP {report['tensor_parallel_size']}")
    stride = f", stride {report['stride']}" if report["stride"] is not None else ""
    print(f"text    {report['source']}: {report['stream_tokens']} tokens; protocol "
          f"{report['protocol']}, context {report['context_length']}{stride}, "
          f"{report['windows']} windows, {report['scored_tokens']} scored")
    if report["base_file_bytes"]:
        print(f"base file {report['base_file_bytes']} bytes, "
              f"{report['base_file_bytes_per_token']:.1f} bytes per scored token")
    print()
    print(divergence.format_summary(report))
