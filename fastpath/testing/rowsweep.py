"""Row-subset sweeps: does a row get the same bits when computed among fewer rows, for a
kernel, over shapes, dtypes and chunk sizes? (A measurement; the engine's decision is
`fastpath.worker.rowsubset.probe`.)

fastpath's exactness argument for `target_start > 0` and for row-chunked scoring is that
a row's logits (the lm_head GEMM), its fp32 log-softmax and the gather of one id out of
it have the same bit pattern whether the row is computed among all the prompt rows of a
step (what the standard `prompt_logprobs` path computes) or among a subset of them (what
the fast path computes). That is a property of the kernels, not of the mathematics, so
it is swept here: deterministic random hidden states and lm_head weights of a given
shape, every row computed once among all `rows`, then again inside subsets (suffixes as
`target_start` makes them, runs of 2..N rows at several starts, the chunks of `chunk`
rows, lone rows), compared bit for bit per row at each stage.

Kernels: `linear` is `torch.nn.functional.linear`, which is vLLM's lm_head on CUDA;
`vllm-cpu` is whatever vLLM's CPU backend dispatches the lm_head to on this machine
(`dispatch_cpu_unquantized_gemm`: oneDNN, or sgl-kernel for 16-bit weights on AMX CPUs).
Only that kernel imports vLLM, and only when asked for; the module itself needs torch
alone, so it runs on a GPU machine that has torch and nothing else:

    python -m fastpath.testing.rowsweep --device cuda --hidden 4096 \
        --vocab 128256 --rows 2048 --chunk 1024 512 \
        --dtype bfloat16 float16 float32

prints a JSON list of reports (one per dtype x chunk) and exits 1 when any row computed
among two or more rows differs; a lone row that differs is reported apart
(`lone_row_mismatches`), since the patch never computes a lone row where the standard
path computes several.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from fastpath.worker.rowsubset import Subset, bitwise_equal, differing_rows

KERNELS = ("linear", "vllm-cpu")
# around both chunk defaults
COUNTS = (2, 3, 7, 8, 32, 63, 64, 65, 255, 256, 1023, 1024, 1025, 2047)


def subsets(rows: int, chunk: int, counts: Iterable[int] = COUNTS,
            count_starts: str = "edges") -> list[Subset]:
    """The row ranges checked among `rows` rows: suffixes, runs, chunks and lone rows.

    `count_starts`: "edges" puts each run of `count` rows at the start, one row in, and
    the end; "one" only one row in (cheaper, for the large shapes on CPU).
    """
    if rows < 2:
        raise ValueError(f"rows must be at least 2, got {rows}")
    found: dict[tuple[int, int], str] = {}

    def add(start: int, stop: int, why: str) -> None:
        if 0 <= start < stop <= rows and (start, stop) != (0, rows):
            found.setdefault((start, stop), why)

    for start in (1, rows // 2, rows - 2, rows - 1):  # target_start = start - 1
        add(start, rows, "suffix")
    for count in counts:
        if count >= rows:
            continue
        starts = (0, 1, rows - count) if count_starts == "edges" else (1,)
        for start in starts:
            add(start, start + count, f"run of {count}")
    for start in range(0, rows, chunk):
        add(start, min(start + chunk, rows), f"chunk of {chunk}")
    for row in sorted({0, 1, rows // 2, rows - 1} | set(range(chunk, rows, chunk))):
        add(row, row + 1, "lone row")
        add(row - 1, row + 1, "lone row beside its predecessor")
    return [(start, stop, why) for (start, stop), why in sorted(found.items())]


def lm_head(kernel: str, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The logits function of a kernel, for a weight [vocab, hidden]."""
    if kernel == "linear":
        return lambda hidden: torch.nn.functional.linear(hidden, weight)
    if kernel == "vllm-cpu":
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
        return lambda hidden: layer.cpu_linear(hidden, layer.weight, None)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def inputs(hidden: int, vocab: int, rows: int, dtype: torch.dtype, device: str,
           seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states [rows, hidden], lm_head weight [vocab, hidden], target ids
    [rows, 1].

    Drawn on the CPU from one seed, then moved, so every device sees the same values.
    """
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator) * (4.0 / hidden**0.5)
    targets = torch.randint(0, vocab, (rows, 1), generator=generator)
    return (states.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype),
            targets.to(device))


def sweep(hidden: int, vocab: int, rows: int, chunk: int = 1024, dtype: str = "float32",
          device: str = "cpu", *, kernel: str = "linear", counts: Sequence[int] = COUNTS,
          count_starts: str = "edges", seed: int = 0, threads: int | None = None
          ) -> dict[str, Any]:
    """Compare every checked subset's rows with the same rows computed among all `rows`.

    Returns a JSON-ready report. `mismatches` lists each (subset of two or more rows,
    stage) whose rows differ in bits, with the count of rows, the first one and the
    largest absolute difference; `lone_row_mismatches` the same for one-row subsets.
    Stages: `logits` (the lm_head), `log_softmax` (fp32, of the subset's own logits),
    `gather` (one target id per row); where a subset's logits differ,
    `log_softmax_given_logits` also checks log-softmax alone on the full computation's
    logits of those rows (where they are equal, `log_softmax` already is that check).
    `invariant`: no multi-row mismatch at any stage; `log_softmax_invariant`:
    log-softmax and gather never add a difference of their own.
    """
    if threads is not None:  # CPU kernels may split work by thread: sweep the worker's count
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return sweep(hidden, vocab, rows, chunk, dtype, device, kernel=kernel, counts=counts,
                         count_starts=count_starts, seed=seed)
        finally:
            torch.set_num_threads(saved)
    torch_dtype = getattr(torch, dtype)
    states, weight, targets = inputs(hidden, vocab, rows, torch_dtype, device, seed)
    logits_of = lm_head(kernel, weight)
    with torch.inference_mode():
        full = logits_of(states)
        full_lp = full.log_softmax(dim=-1, dtype=torch.float32)
        full_gathered = full_lp.gather(-1, targets)
        max_abs_logit = float(full.abs().max())
        checked = subsets(rows, chunk, counts, count_starts)
        mismatches: list[dict[str, Any]] = []
        for start, stop, why in checked:
            rows_here = slice(start, stop)
            sub = logits_of(states[rows_here])
            sub_lp = sub.log_softmax(dim=-1, dtype=torch.float32)
            stages = [
                ("logits", sub, full[rows_here]),
                ("log_softmax", sub_lp, full_lp[rows_here]),
                ("gather", sub_lp.gather(-1, targets[rows_here]), full_gathered[rows_here]),
            ]
            if not bitwise_equal(sub, full[rows_here]):
                # Given the same logits, does log-softmax alone give the same bits?
                stages.append(("log_softmax_given_logits",
                               full[rows_here].log_softmax(dim=-1, dtype=torch.float32),
                               full_lp[rows_here]))
            for stage, got, want in stages:
                if bitwise_equal(got, want):
                    continue
                bad = differing_rows(got, want)
                diff = (got[bad].double() - want[bad].double()).abs().max()
                mismatches.append({
                    "start": start, "stop": stop, "why": why, "stage": stage,
                    "rows": int(bad.numel()), "first_row": start + int(bad[0]),
                    "max_abs_diff": float(diff),
                })
            del sub, sub_lp, stages
    multi = [m for m in mismatches if m["stop"] - m["start"] > 1]
    logits_differ = {(m["start"], m["stop"]) for m in mismatches if m["stage"] == "logits"}
    softmax_differs = [
        m for m in mismatches
        if m["stage"] == "log_softmax_given_logits"
        or (m["stage"] != "logits" and (m["start"], m["stop"]) not in logits_differ)
    ]
    return {
        "hidden": hidden, "vocab": vocab, "rows": rows, "chunk": chunk, "dtype": dtype,
        "device": _device_name(device), "kernel": kernel, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seed": seed,
        "subsets_checked": len(checked),
        "rows_checked": sum(stop - start for start, stop, _ in checked),
        "max_abs_logit": max_abs_logit,
        "invariant": not multi,
        "log_softmax_invariant": not softmax_differs,
        "mismatches": multi,
        "lone_row_mismatches": [m for m in mismatches if m["stop"] - m["start"] == 1],
    }


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"{device} ({torch.backends.cpu.get_cpu_capability()})"


def summary(report: dict[str, Any]) -> str:
    """One line per report: shape, dtype, chunk, verdict and the worst stage."""
    shape = (f"{report['hidden']}x{report['vocab']} rows {report['rows']} "
             f"chunk {report['chunk']}")
    verdict = "invariant" if report["invariant"] else f"{len(report['mismatches'])} mismatches"
    lone = len({(m["start"], m["stop"]) for m in report["lone_row_mismatches"]})
    return (f"{report['kernel']} {report['dtype']} {shape}: {verdict} over "
            f"{report['subsets_checked']} subsets; lone rows differing: {lone}")


def main(argv: Sequence[str] | None = None) -> int:
    """Sweep the shapes, dtypes and chunk sizes given; print JSON; 1 if a multi-row run
    differs."""
    parser = argparse.ArgumentParser(prog="python -m fastpath.testing.rowsweep",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kernel", choices=KERNELS, default="linear")
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256],
                        help="one per --hidden (or one for all)")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--chunk", type=int, nargs="+", default=[1024])
    parser.add_argument("--dtype", nargs="+", default=["float32"])
    parser.add_argument("--counts", type=int, nargs="+", default=list(COUNTS))
    parser.add_argument("--count-starts", choices=("edges", "one"), default="edges")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--json", dest="json_path", help="also write the reports here")
    args = parser.parse_args(argv)
    vocabs = args.vocab * len(args.hidden) if len(args.vocab) == 1 else args.vocab
    if len(vocabs) != len(args.hidden):
        parser.error("give one --vocab per --hidden, or a single one")
    reports = []
    for hidden, vocab in zip(args.hidden, vocabs, strict=True):
        for dtype in args.dtype:
            for chunk in args.chunk:
                report = sweep(hidden, vocab, args.rows, chunk, dtype, args.device,
                               kernel=args.kernel, counts=args.counts,
                               count_starts=args.count_starts, seed=args.seed,
                               threads=args.threads)
                print(summary(report), file=sys.stderr)
                reports.append(report)
    text = json.dumps(reports, indent=2)
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as out:
            out.write(text + "\n")
    return 0 if all(r["invariant"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
