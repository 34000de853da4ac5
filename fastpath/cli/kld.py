"""`fastpath kld`: KL divergence of a model against its base model, on vLLM's V1 runner.

The passes and the statistics are `fastpath.metrics.kld`'s; this module reads the flags, builds
the two scorers one after the other (engines, or `fastpath serve` servers with `--server`
and `--base-server`; a base file replaces the base pass), and writes the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fastpath.cli.common import (
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
from fastpath.engine.scorer import Scorer
from fastpath.metrics import basefile, divergence
from fastpath.metrics.kld import DEFAULT_TOP_K, base_pass, compare, model_pass

NOISE_FLOOR_DTYPES = ("bfloat16", "float16", "float32", "none")
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
    group.add_argument("--noise-floor", choices=NOISE_FLOOR_DTYPES, default=None,
                       help="also score the base model in this dtype against the base pass: "
                       "the divergence rounding alone causes, a row beside the variants "
                       "(default: bfloat16 when --model is given twice or more, else none)")
    add_text_flags(group)
    add_json_flag(group)
    add_server_flags(parser, base=True)


def base_flags(flags: RunFlags) -> RunFlags:
    """The flags of the base engine: the model's, with the --base-* overrides
    (`--base-quantization none` for an unquantized base) counted as given."""
    values: dict[str, Any] = {"model": flags.base_model, "tokenizer": None}
    given = set(flags.given) - {"tokenizer"}
    for flag, engine_flag in BASE_OVERRIDES.items():
        value = getattr(flags, flag)
        if value is None:
            continue
        if flag == "base_quantization" and str(value).lower() == "none":
            value = None
        values[engine_flag] = value
        given.add(engine_flag)
    return flags.replace(given, **values)


def check_kld_flags(flags: RunFlags) -> RunFlags:
    """Refuse bad `kld` flags before any engine starts or server is asked; the flags with
    what fastpath derives from them."""
    flags = check_window_flags(flags)
    if flags.top_k < 1:
        raise UsageError(f"--top-k must be a positive integer, got {flags.top_k}")
    check_server_flags(flags)
    if flags.model is None and not flags.servers:
        raise UsageError("--model is required (or --server): the model to compare with the "
                         "base model")
    if flags.model is not None and flags.servers:
        raise UsageError("--model and --server both name the model to compare: give one")
    reuse = flags.base_cache and Path(flags.base_cache).is_file()
    if flags.base_model is None and not reuse and not flags.base_servers:
        raise UsageError("--base-model is required unless --base-cache names an existing "
                         "base file or --base-server names a server of the base model")
    if flags.base_model is not None and flags.base_servers:
        raise UsageError("--base-model and --base-server both name the base model: give one")
    if len(flags.models) > 1 and flags.servers:
        raise UsageError(f"--model was given {len(flags.models)} times with --server: the "
                         "servers serve one model; several variants run on local engines")
    flags = flags if flags.servers else with_engine_defaults(flags)
    return flags.derive(noise_floor=noise_floor_dtype(flags))


def noise_floor_dtype(flags: RunFlags) -> str:
    """The dtype of the noise floor's pass, or "none": --noise-floor as given; by default
    bfloat16 where two or more --model are compared and the base model is local."""
    local_base = flags.base_model is not None and not flags.base_servers
    if flags.noise_floor is None:
        return "bfloat16" if len(flags.models) > 1 and local_base else "none"
    if flags.noise_floor != "none" and not local_base:
        raise UsageError(f"--noise-floor {flags.noise_floor} re-runs the base model: it needs "
                         "--base-model (a local engine), not a base file or --base-server "
                         "alone")
    return flags.noise_floor


def check_base_flags(base: basefile.BaseScores, flags: RunFlags) -> None:
    """Refuse a base file made with other flags before any engine starts."""
    try:
        base.check_settings(flags.top_k, flags.convention, flags.context_length, flags.stride,
                            source=f"--base-cache {flags.base_cache}")
    except basefile.BaseFileError as error:
        raise UsageError(str(error)) from None


def fingerprint_of(scorer: Scorer) -> str:
    """The scorer's tokenizer fingerprint: a server computes its own, else computed here."""
    tokenizer = scorer.tokenizer()
    return getattr(tokenizer, "fingerprint", None) or basefile.tokenizer_fingerprint(tokenizer)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="window")


def run(args: argparse.Namespace, given: set[str], models: Sequence[str] = ()) -> int:
    """The `fastpath kld` command on vLLM's V1 model runner, the one that computes the top-K
    extension (V2, CUDA's default, refuses `fastpath_top_k`); a V2 request is refused.
    `models`: every --model given, in order (each a variant scored against the one base)."""
    import os

    from fastpath.engine import runners

    if runners.v2_requested():
        raise UsageError(f"fastpath kld needs vLLM's V1 model runner: the base pass's top-K "
                         f"(fastpath_top_k) is computed by fastpath's V1 runner patch, and "
                         f"{runners.RUNNER_ENV}={os.environ[runners.RUNNER_ENV]} asks for V2; "
                         f"unset it (fastpath kld then runs V1, on CUDA too)")
    flags = RunFlags.read(args, given).derive(models=list(models or filter(None, [args.model])))
    with runners.runner_environment("v1"):
        try:
            return _run_kld(flags)
        except server_failures(flags) as error:
            print(f"fastpath kld: servers failed: {error}", file=sys.stderr)
            return EXIT_SERVERS_FAILED


@dataclass(frozen=True)
class Variant:
    """One model pass against the base: a --model (or the servers), or the noise floor."""

    label: str
    flags: RunFlags  # the engine flags of its pass
    role: str  # "variant" or "noise floor"


def variants_of(flags: RunFlags) -> list[Variant]:
    """Every --model in order (the servers' model with --server), then the noise floor
    (the base model in --noise-floor's dtype) where one is asked for."""
    if flags.servers:
        runs = [Variant("the servers' model", flags, "variant")]
    else:
        runs = [Variant(Path(m.rstrip("/")).name or m, flags.replace(model=m), "variant")
                for m in flags.models]
    if flags.noise_floor != "none":
        base = base_flags(flags)
        runs.append(Variant(f"noise floor: base in {flags.noise_floor}",
                            base.replace(base.given | {"dtype"}, dtype=flags.noise_floor),
                            "noise floor"))
    return runs


def checkpoint_bytes(model: str | None) -> int | None:
    """The size of a local checkpoint's weight files (what a variant costs to keep)."""
    if not model or not Path(model).is_dir():
        return None
    files = [*Path(model).glob("*.safetensors"), *Path(model).glob("*.bin")]
    return sum(f.stat().st_size for f in files) or None


def weight_bits(model: str | None) -> int | None:
    """The bits per weight of a local checkpoint's quantized linear layers, from its
    config.json's `quantization_config` (compressed-tensors' `num_bits` when every group
    agrees, GPTQ's `bits`, AWQ's `w_bit`); None where unquantized or unknown."""
    if not model or not (Path(model) / "config.json").is_file():
        return None
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    quantization = config.get("quantization_config") or {}
    groups = quantization.get("config_groups") or {}
    bits = {(group.get("weights") or {}).get("num_bits") for group in groups.values()}
    bits |= {quantization.get("bits"), quantization.get("w_bit")}
    bits.discard(None)
    return bits.pop() if len(bits) == 1 else None


def obtain_base(flags: RunFlags, text: str, source: str) -> tuple[basefile.BaseScores,
                                                                   dict[str, Any]]:
    """The base file named by --base-cache, else a base pass (saved where --base-cache says);
    with the report's fields on it."""
    if flags.base_cache and Path(flags.base_cache).is_file():
        try:
            base = basefile.BaseScores.load(flags.base_cache)
        except basefile.BaseFileError as error:
            raise UsageError(f"--base-cache: {error}") from None
        check_base_flags(base, flags)
        return base, {"base_file_reused": True, "seconds_base_pass": None,
                      "base_file_bytes": Path(flags.base_cache).stat().st_size}
    base_run = base_flags(flags)
    with open_scorer(base_run, text, flags.base_servers, base_run.model) as opened:
        scorer = opened.scorer
        layout = build_layout(scorer, flags, text, source)
        tokenizer = fingerprint_of(scorer)
        described = scorer.describe()
        vocab = described.vocab_size
        if flags.top_k > vocab:
            raise UsageError(f"--top-k {flags.top_k} exceeds the vocabulary ({vocab})")
        with _progress(len(layout.windows), "base pass") as bar:
            target, top_lp, top_ids, timing = base_pass(scorer, layout, flags.top_k,
                                                        bar.update)
    base = basefile.from_layout(layout, target, top_lp, top_ids, vocab, tokenizer,
                                model=flags.base_model or described.model,
                                meta={"vllm_version": described.vllm_version, "source": source})
    saved = base.save(flags.base_cache) if flags.base_cache else None
    return base, {"base_file_reused": False, "seconds_base_pass": timing.seconds,
                  "base_file_bytes": saved}


def score_variant(variant: Variant, position: str, base: basefile.BaseScores, base_from: str,
                  flags: RunFlags, text: str, source: str) -> tuple[dict[str, Any], Any, Any]:
    """One variant's model pass against the base: its report row, the divergence and the
    layout (the same windows as the base's, checked; `base_from` names where they came
    from in a refusal)."""
    run = variant.flags
    urls = run.servers if variant.role == "variant" else None
    with open_scorer(run, text, urls, run.model) as opened:
        scorer = opened.scorer
        layout = build_layout(scorer, flags, text, source)
        info = scorer.describe()
        try:
            base.check_matches(layout, flags.top_k, info.vocab_size, fingerprint_of(scorer),
                               source=base_from)
        except basefile.BaseFileError as error:
            raise UsageError(f"{variant.label}: {error}") from None
        with _progress(len(layout.windows), f"model pass {position}") as bar:
            model = model_pass(scorer, layout, base, bar.update)
        config = opened.llm.llm_engine.model_config if opened.llm else None
    result = compare(layout, base, model)
    row = {"label": variant.label, "role": variant.role,
           "model": run.model if run.model and not urls else info.model,
           "dtype": str(config.dtype).removeprefix("torch.") if config else None,
           "quantization": config.quantization if config else None,
           "checkpoint_bytes": checkpoint_bytes(run.model),
           "weight_bits": weight_bits(run.model),
           "vllm_version": info.vllm_version, "runner": info.runner,
           "device": info.extra.get("device"), **opened.fields, **result.summary(),
           "seconds_model_pass": model.timing.seconds}
    return row, result, layout


def _run_kld(flags: RunFlags) -> int:
    """Base pass (or base file) once, then each variant's model pass, statistics."""
    flags = check_kld_flags(flags)
    text, source = load_text(flags)
    base, base_fields = obtain_base(flags, text, source)
    variants = variants_of(flags)
    rows, results = [], []
    for number, variant in enumerate(variants, 1):
        base_from = (f"--base-cache {flags.base_cache}" if base_fields["base_file_reused"]
                     else "the base model")
        row, result, layout = score_variant(variant, f"{number}/{len(variants)}", base,
                                            base_from, flags, text, source)
        rows.append(row)
        results.append(result)
    base_file_bytes = base_fields["base_file_bytes"]
    first = rows[0]
    report: dict[str, Any] = {
        "kind": "fastpath-kld", "model": first["model"], "base_model": base.model,
        "base_file": flags.base_cache, **base_fields,
        "base_file_bytes_per_token": base_file_bytes / base.num_scored
        if base_file_bytes else None,
        "source": source, **{k: v for k, v in first.items() if k not in ("label", "role")},
        **layout.describe(),
        "variants": rows,
    }
    finish_report(report, flags, print_report)
    if flags.save_per_token:
        with open(flags.save_per_token, "wb") as handle:
            per_token = {f"{k}_{i}" if i else k: v for i, result in enumerate(results)
                         for k, v in result.per_token().items()}
            np.savez(handle, positions=layout.positions(), targets=layout.targets(), **per_token)
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
    if len(report["variants"]) == 1:
        print(divergence.format_summary(report))
        return
    print(variants_table(report["variants"]))


# The terminal table of several variants: (heading, width, the row's text).
TABLE_COLUMNS: tuple[tuple[str, int, Callable[[dict[str, Any]], str]], ...] = (
    ("PPL", 10, lambda r: f"{r['ppl']:.4f}"),
    ("ln(PPL ratio) ± se", 20,
     lambda r: f"{r['ln_ppl_ratio']:+.5f} ± {r['ln_ppl_ratio_stderr']:.5f}"),
    ("KLD mean ± se", 20, lambda r: f"{r['kld_mean']:.6f} ± {r['kld_mean_stderr']:.6f}"),
    ("median", 9, lambda r: f"{r['kld_median']:.2e}"),
    ("p99", 9, lambda r: f"{r['kld_percentiles']['99']:.2e}"),
    ("max", 9, lambda r: f"{r['kld_max']:.2e}"),
    ("top-1 agree", 11, lambda r: f"{100 * r['top1_agreement']:.2f}%"),
    ("top-5 agree", 11, lambda r: (f"{100 * r['topk_agreement']['5']:.2f}%"
                                   if "5" in r.get("topk_agreement", {}) else "-")),
    ("rev. KLD", 9, lambda r: (f"{r['reverse_kld_mean']:.2e}"
                               if "reverse_kld_mean" in r else "-")),
    ("RMS Δp", 8, lambda r: f"{100 * r['rms_delta_p']:.3f}%"),
    ("pass s", 8, lambda r: f"{r['seconds_model_pass']:.1f}"),
)


def variants_table(rows: list[dict[str, Any]]) -> str:
    """One line per variant (the noise floor last), fixed-width for a terminal."""
    width = max(len("variant"), *(len(r["label"]) for r in rows))
    lines = ["  ".join([f"{'variant':<{width}}",
                        *(f"{h:>{w}}" for h, w, _ in TABLE_COLUMNS)])]
    for row in rows:
        lines.append("  ".join([f"{row['label']:<{width}}",
                                *(f"{cell(row):>{w}}" for _, w, cell in TABLE_COLUMNS)]))
    lines.append(f"KLD over the base's top-{rows[0]['top_k']} + tail (a lower bound); "
                 "every statistic per variant is in --json")
    return "\n".join(lines)
