"""The same windows scored by the model in transformers (fp32, CPU): an independent check.

Shares only the window arithmetic with the vLLM path; the model code, attention and
log-softmax are transformers' and torch's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastpath.metrics.windows import make_windows


def load_model(model_path: str):
    """The checkpoint as a transformers causal LM, fp32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model.eval()


def score_stream(model, tokens: Sequence[int], context_length: int, stride: int) -> np.ndarray:
    """Per-token logprobs of stream tokens 1..N-1, float32, from transformers."""
    import torch

    logprobs = np.empty(len(tokens) - 1, dtype=np.float32)
    with torch.inference_mode():
        for window in make_windows(len(tokens), context_length, stride):
            ids = torch.tensor([tokens[window.begin : window.end]])
            logits = model(input_ids=ids).logits[0].float()
            rows = logits[window.first_scored_row : window.end - window.begin - 1]
            targets = ids[0, window.score_from - window.begin :]
            values = rows.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
            logprobs[window.score_from - 1 : window.end - 1] = values.numpy()
    return logprobs
