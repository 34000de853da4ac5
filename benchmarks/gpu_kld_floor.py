"""Bare-torch device cost of the `fastpath kld` passes at Llama-3-8B's head shape (no vLLM).

Per 2048-token window with 512 scored rows (stride 512), bf16 lm_head, fp32 log-softmax:
- fast: gather of the target, copied to the host (what `fastpath ppl` does per window);
- base pass: the same plus top-K (K=32) values and ids, one [rows, 1 + 2K] float32 array;
- model pass: gather of K + 1 fixed ids per row plus the row's top-1.
Also checks, on this GPU, the facts the KLD's exactness rests on: top-K values equal a gather
of their ids from the same log-softmax, a row's values do not depend on how many ids are
gathered, and ids survive the float32 round trip. Writes JSON to the path given.

    python benchmarks/gpu_kld_floor.py out.json
"""

from __future__ import annotations

import torch

try:
    from gpu_floor import HIDDEN, ROWS, SCORED, VOCAB, emit, timed  # run as a script
except ImportError:
    from benchmarks.gpu_floor import HIDDEN, ROWS, SCORED, VOCAB, emit, timed

TOP_K = 32


def main() -> None:
    torch.manual_seed(0)
    device = torch.device("cuda")
    hidden = torch.randn(SCORED, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = (torch.randn(VOCAB, HIDDEN, device=device) * 0.02).to(torch.bfloat16)
    targets = torch.randint(0, VOCAB, (SCORED, 1), device=device)

    def log_softmax():
        return torch.nn.functional.linear(hidden, weight).log_softmax(-1, dtype=torch.float32)

    def fast():
        return log_softmax().gather(-1, targets).cpu()

    def base_pass():
        logprobs = log_softmax()
        values, ids = logprobs.topk(TOP_K, dim=-1)
        return torch.cat([logprobs.gather(-1, targets), values, ids.float()], dim=1).cpu()

    reference = base_pass()
    fixed_ids = torch.cat([reference[:, 1 + TOP_K :].long(), targets.cpu()], dim=1).to(device)

    def model_pass():
        logprobs = log_softmax()
        best, best_id = logprobs.topk(1, dim=-1)
        return torch.cat([logprobs.gather(-1, fixed_ids), best, best_id.float()], dim=1).cpu()

    ms = {"fast_512_rows": timed(fast), "base_pass_k32_512_rows": timed(base_pass),
          "model_pass_k32_512_rows": timed(model_pass)}
    logprobs = log_softmax()
    values, ids = logprobs.topk(TOP_K, dim=-1)
    model = model_pass()
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "shape": {"hidden": HIDDEN, "vocab": VOCAB, "window": ROWS, "scored_rows": SCORED,
                  "top_k": TOP_K},
        "milliseconds": ms,
        "base_over_fast": ms["base_pass_k32_512_rows"] / ms["fast_512_rows"],
        "model_over_fast": ms["model_pass_k32_512_rows"] / ms["fast_512_rows"],
        "host_bytes_per_row": {"fast": 4, "base_pass": 4 * (1 + 2 * TOP_K),
                               "model_pass": 4 * (TOP_K + 1 + 2)},
        "bitwise": {
            "topk_values_equal_gather_of_their_ids": bool(
                torch.equal(values, logprobs.gather(-1, ids))),
            "model_pass_topk_columns_equal_base_values": bool(
                torch.equal(model[:, :TOP_K], reference[:, 1 : 1 + TOP_K])),
            "model_pass_target_equals_fast": bool(
                torch.equal(model[:, TOP_K : TOP_K + 1], fast())),
            "model_top1_equals_base_top1": bool(
                torch.equal(model[:, TOP_K + 1], reference[:, 1])),
            "ids_exact_through_float32": bool(
                torch.equal(reference[:, 1 + TOP_K :].long(), ids.cpu())),
        },
    }
    emit(result)


if __name__ == "__main__":
    main()
