"""Which schedule differences change a row's bits on this machine: a measurement, not a test.

One engine (batched: chunked prefill on, several requests per step), one prompt X scored on
the fast path, every submission queued before the first step (`scoring.submit_together`) so
the schedule is exactly the one asked for. X alone in one step is the reference; then
- company: a filler request before X in the same step (X still in one piece);
- chunk boundary: a filler of `budget - c` tokens before X, so X's prompt is split after c
  tokens and finished in the next step, its first c rows read back from the KV cache;
for each prompt length. Rows that differ from the reference in bits are counted (the
logprob's largest change too). Run once per worker thread count (`VLLM_CPU_OMP_THREADS_BIND`,
e.g. `0` for one thread, `0-1` for two): vLLM's CPU attention splits a step's work across
threads by the whole batch.

    python benchmarks/schedule_bits.py --json reports/schedule_bits_avx2_1thread.json
    VLLM_CPU_OMP_THREADS_BIND=0-1 python benchmarks/schedule_bits.py --json ...

Explained in docs/exactness.md (vLLM's CPU attention: query tiles, KV tiles sized by the
query tile).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import numpy as np


def measure(model: str, lengths: list[int], cuts: list[int], fillers: list[int],
            budget: int) -> dict[str, Any]:
    from fastpath import zoo
    from fastpath.engine import scoring

    llm = scoring.build_llm(str(zoo.get_model(model)), max_model_len=max(*lengths, budget) + 8,
                            max_num_batched_tokens=budget, max_num_seqs=16,
                            enable_chunked_prefill=True, enable_prefix_caching=False,
                            kv_cache_memory_bytes=256 << 20)
    try:
        vocab = llm.llm_engine.model_config.get_vocab_size()
        rng = np.random.default_rng(0)
        params = scoring.scoring_params("fast")
        (worker,) = scoring.exactness(llm)["workers"]

        def scores_of_x(x: list[int], before: list[int] | None) -> np.ndarray:
            prompts = [] if before is None else [{"prompt_token_ids": before}]
            prompts.append(scoring.fast_prompt(scoring.ScoreRequest(x, x[1:])))
            return scoring.target_logprobs(scoring.submit_together(llm, prompts, params)[-1])

        def compare(got: np.ndarray, want: np.ndarray) -> dict[str, Any]:
            bad = np.flatnonzero(got.view(np.int32) != want.view(np.int32))
            diff = np.abs(got[bad].astype(np.float64) - want[bad]) if bad.size else np.zeros(1)
            return {"rows_differing": int(bad.size),
                    "first_row": int(bad[0]) + 1 if bad.size else None,  # prompt position
                    "max_abs_diff": float(diff.max())}

        results = []
        for length in lengths:
            x = rng.integers(0, vocab, length).tolist()
            alone = scores_of_x(x, None)
            repeat = compare(scores_of_x(x, None), alone)
            for f in fillers:
                if f + length <= budget:
                    got = scores_of_x(x, rng.integers(0, vocab, f).tolist())
                    results.append({"length": length, "change": "company", "filler": f,
                                    **compare(got, alone)})
            for c in cuts:
                if 0 < c < length and budget - c >= 2:
                    got = scores_of_x(x, rng.integers(0, vocab, budget - c).tolist())
                    results.append({"length": length, "change": "chunk boundary", "cut": c,
                                    **compare(got, alone)})
            results.append({"length": length, "change": "none (repeat)", **repeat})
        return {"model": model, "budget": budget, "kernels": worker["kernels"],
                "lm_head_rows": worker["lm_head_rows"], "probe": worker.get("probe"),
                "batch_invariant": os.environ.get("VLLM_BATCH_INVARIANT", "0"),
                "cpu_isa_forced": os.environ.get("FASTPATH_CPU_ISA", "native"),
                "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                "results": results}
    finally:
        scoring.shutdown(llm)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--lengths", type=int, nargs="+", default=[200, 300, 600])
    parser.add_argument("--cuts", type=int, nargs="+",
                        default=[1, 2, 32, 64, 96, 128, 200, 224, 248, 256, 300, 496])
    parser.add_argument("--fillers", type=int, nargs="+", default=[2, 17, 100, 300])
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    report = measure(args.model, args.lengths, args.cuts, args.fillers, args.budget)
    for r in report["results"]:
        where = r.get("cut", r.get("filler", ""))
        print(f"len {r['length']:4d} {r['change']:<15} {where!s:>4}: {r['rows_differing']:4d} "
              f"rows differ (first position {r['first_row']}, max {r['max_abs_diff']:.2e})",
              file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.json_path:
        with open(args.json_path, "w") as out:
            out.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
