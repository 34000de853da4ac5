"""Bare-torch costs of scoring at real shapes on a GPU (no vLLM needed).

Llama-3-8B's head: hidden 4096, vocabulary 128,256, a 2048-token window with 512 scored
rows (stride 512). Times lm_head, fp32 log-softmax, gather, top-k and rank (what the
standard path adds), and the device-to-host copies of a full log-softmax against the
targets alone. Also checks the bit-level facts fastpath relies on, on this GPU: does the
lm_head give a row the same bits when computed among 512 rows as among 2048, and does
log-softmax? Writes JSON to the path given (default stdout).

    python benchmarks/gpu_floor.py out.json
"""

from __future__ import annotations

import json
import sys

import torch

HIDDEN, VOCAB, ROWS, SCORED = 4096, 128_256, 2048, 512


def timed(fn, repeat: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def emit(result: dict) -> None:
    """Print the figures as JSON, and write them to the path given on the command line."""
    text = json.dumps(result, indent=2)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as out:
            out.write(text + "\n")
    print(text)


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    hidden = torch.randn(ROWS, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (ROWS, 1), device=device)
    scored = slice(ROWS - SCORED, ROWS)
    host_full = torch.empty(ROWS, VOCAB, dtype=torch.float32, pin_memory=True)

    logits = torch.nn.functional.linear(hidden, weight)
    logprobs = logits.log_softmax(-1, dtype=torch.float32)
    result: dict[str, object] = {"device": torch.cuda.get_device_name(0),
                                 "torch": torch.__version__,
                                 "shape": {"hidden": HIDDEN, "vocab": VOCAB, "rows": ROWS,
                                           "scored_rows": SCORED}}
    ms = {
        "lm_head_2048_rows": timed(lambda: torch.nn.functional.linear(hidden, weight)),
        "lm_head_512_rows": timed(lambda: torch.nn.functional.linear(hidden[scored], weight)),
        "log_softmax_2048_rows": timed(lambda: logits.log_softmax(-1, dtype=torch.float32)),
        "log_softmax_512_rows": timed(lambda: logits[scored].log_softmax(-1, dtype=torch.float32)),
        "gather_2048_rows": timed(lambda: logprobs.gather(-1, targets)),
        "topk1_2048_rows": timed(lambda: logprobs.topk(1, dim=-1)),
        "topk20_2048_rows": timed(lambda: logprobs.topk(20, dim=-1)),
        "rank_2048_rows": timed(lambda: (logprobs >= logprobs.gather(-1, targets)).sum(-1)),
        "d2h_full_logprobs_2048_rows": timed(lambda: host_full.copy_(logprobs), repeat=5),
        "d2h_targets_512_rows": timed(lambda: logprobs[scored].gather(-1, targets[scored]).cpu()),
    }

    def fast_floor():
        rows = torch.nn.functional.linear(hidden[scored], weight)
        return rows.log_softmax(-1, dtype=torch.float32).gather(-1, targets[scored]).cpu()

    def standard_k0():
        full = torch.nn.functional.linear(hidden, weight).log_softmax(-1, dtype=torch.float32)
        token = full.gather(-1, targets)
        rank = (full >= token).sum(-1)
        top = full.topk(1, dim=-1)
        return token.cpu(), rank.cpu(), top.values.cpu(), top.indices.cpu()

    ms["fast_floor_512_scored_rows"] = timed(fast_floor)
    ms["standard_k0_device_work_2048_rows"] = timed(standard_k0)
    result["milliseconds"] = ms
    result["bytes"] = {"full_logprobs_2048_rows": ROWS * VOCAB * 4,
                       "targets_512_rows_fp32": SCORED * 4}

    # Bit-level facts: a row computed among fewer rows, and a lone row.
    sub = torch.nn.functional.linear(hidden[scored], weight)
    lone = torch.nn.functional.linear(hidden[-1:], weight)
    sub_lp = sub.log_softmax(-1, dtype=torch.float32)
    result["bitwise"] = {
        "lm_head_512_of_2048_equal": bool(torch.equal(sub, logits[scored])),
        "lm_head_512_of_2048_max_abs_diff": float(
            (sub.float() - logits[scored].float()).abs().max()),
        "lm_head_1_row_equal": bool(torch.equal(lone, logits[-1:])),
        "lm_head_1_row_max_abs_diff": float((lone.float() - logits[-1:].float()).abs().max()),
        "log_softmax_rows_equal_given_equal_logits": bool(
            torch.equal(logits[scored].log_softmax(-1, dtype=torch.float32), logprobs[scored])),
        "fast_vs_full_target_logprob_equal": bool(torch.equal(
            sub_lp.gather(-1, targets[scored]), logprobs[scored].gather(-1, targets[scored]))),
        "fast_vs_full_target_logprob_max_abs_diff": float(
            (sub_lp.gather(-1, targets[scored]) - logprobs[scored].gather(-1, targets[scored]))
            .abs().max()),
    }
    emit(result)


if __name__ == "__main__":
    main()
