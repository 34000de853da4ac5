"""Bare-torch memory and bits of row-chunked scoring at Llama-3-8B's head shape, on a GPU.

What one scoring step puts on the device (no vLLM needed): for a whole window of R rows
(R = 2047 and 8191: steps of 2048 and 8192 tokens), the lm_head in bf16 (hidden 4096,
vocabulary 128,256), the fp32 log-softmax, and the gather of the targets, as the V1
runner patch does it
- all rows at once (the 'before'),
- in chunks of C rows (C = 1024, FASTPATH_SCORE_CHUNK_ROWS' default, and others),
and the standard path's device work at K=0 (log-softmax of all rows, the target's
logprob and its rank). Figures: peak `torch.cuda.max_memory_allocated` above what was
allocated before (hidden states and weights), milliseconds (CUDA events, median), and
whether each row's gathered value has the same bits chunked as unchunked (the row-subset
question: cuBLAS may choose another kernel for another row count).

    python benchmarks/gpu_step_memory.py out.json
"""

from __future__ import annotations

from functools import partial

import torch

try:
    from gpu_floor import HIDDEN, VOCAB, emit, timed  # run as a script
except ImportError:
    from benchmarks.gpu_floor import HIDDEN, VOCAB, emit, timed

STEPS = (2048, 8192)
CHUNKS = (1024, 512, 1000, 256)
SMALL_CHUNKS = (2, 1)  # checked on the first rows only (slow: one GEMM per chunk)
SMALL_ROWS = 64


def peak_bytes(fn) -> int:
    """Most bytes allocated while fn() runs, above what was allocated before it."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return int(peak)


def score_rows(hidden, weight, targets, chunk: int | None) -> torch.Tensor:
    """Target logprobs of all rows, `chunk` rows at a time (None: all at once), to the host."""
    rows = hidden.shape[0]
    out = torch.empty(rows, 1, dtype=torch.float32, pin_memory=True)
    step = rows if chunk is None else chunk
    for lo in range(0, rows, step):
        hi = min(lo + step, rows)
        logits = torch.nn.functional.linear(hidden[lo:hi], weight)
        logprobs = logits.log_softmax(-1, dtype=torch.float32)
        out[lo:hi].copy_(logprobs.gather(-1, targets[lo:hi]), non_blocking=True)
        del logits, logprobs
    torch.cuda.synchronize()
    return out


def standard_k0(hidden, weight, targets):
    """The standard path's device work at K=0: full log-softmax, target logprob and rank."""
    logprobs = torch.nn.functional.linear(hidden, weight).log_softmax(-1, dtype=torch.float32)
    token = logprobs.gather(-1, targets)
    rank = (logprobs >= token).sum(-1)
    values = token.cpu(), rank.cpu()
    return values


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * 0.02).to(torch.bfloat16)
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "shape": {"hidden": HIDDEN, "vocab": VOCAB, "dtype": "bfloat16 logits, fp32 log-softmax"},
        "steps": {},
    }
    for step in STEPS:
        rows = step - 1
        hidden = torch.randn(rows, HIDDEN, device=device).to(torch.bfloat16)
        targets = torch.randint(0, VOCAB, (rows, 1), device=device)
        figures: dict[str, object] = {"rows": rows,
                                      "bf16_logits_bytes": rows * VOCAB * 2,
                                      "fp32_logprobs_bytes": rows * VOCAB * 4}
        reference = score_rows(hidden, weight, targets, None)
        figures["unchunked"] = {
            "peak_bytes": peak_bytes(partial(score_rows, hidden, weight, targets, None)),
            "ms": timed(partial(score_rows, hidden, weight, targets, None)),
        }
        figures["standard_k0_device_work"] = {
            "peak_bytes": peak_bytes(partial(standard_k0, hidden, weight, targets)),
            "ms": timed(partial(standard_k0, hidden, weight, targets)),
        }
        for chunk in CHUNKS:
            values = score_rows(hidden, weight, targets, chunk)
            differ = (values.view(torch.int32) != reference.view(torch.int32)).flatten()
            figures[f"chunk_{chunk}"] = {
                "peak_bytes": peak_bytes(partial(score_rows, hidden, weight, targets, chunk)),
                "ms": timed(partial(score_rows, hidden, weight, targets, chunk)),
                "rows_bitwise_equal_to_unchunked": int((~differ).sum()),
                "rows_differing": int(differ.sum()),
                "max_abs_diff": float((values - reference).abs().max()),
            }
        for chunk in SMALL_CHUNKS:
            part = slice(0, SMALL_ROWS)
            values = score_rows(hidden[part], weight, targets[part], chunk)
            differ = (values.view(torch.int32) != reference[part].view(torch.int32)).flatten()
            figures[f"chunk_{chunk}_first_{SMALL_ROWS}_rows"] = {
                "rows_bitwise_equal_to_unchunked": int((~differ).sum()),
                "rows_differing": int(differ.sum()),
                "max_abs_diff": float((values - reference[part]).abs().max()),
            }
        result["steps"][str(step)] = figures
        del hidden, targets, reference
        torch.cuda.empty_cache()
    emit(result)


if __name__ == "__main__":
    main()
