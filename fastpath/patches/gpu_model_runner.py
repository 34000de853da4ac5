"""Patch of vLLM's V1 model runner (`vllm/v1/worker/gpu_model_runner.py`, `GPUModelRunner`).

Replaces: `GPUModelRunner._update_states`, `GPUModelRunner._get_prompt_logprobs_dict`,
`GPUModelRunner.sample_tokens` (the CPU runner inherits all three).
Why: upstream answers `prompt_logprob_token_ids` only in the V2 runner
(`vllm/v1/worker/gpu/sample/prompt_logprob.py`). This adds the same answer to V1: for each
request with fixed ids, the logits of its scored rows in this step, upstream's own fp32
`Sampler.compute_logprobs` (the log-softmax the `prompt_logprobs=k` path uses), then a
gather of the requested ids on the device. Only [rows, ids] float32 is copied to the host,
into `ModelRunnerOutput.prompt_token_id_logprobs_dict`, which the scheduler, the
engine-core output and `LogprobsProcessor` already carry to
`RequestOutput.prompt_token_id_logprobs`. No ranks, no detokenization.
With `SamplingParams.extra_args["fastpath_top_k"] = K` the same log-softmax also gives each
row's top-K log-probs and ids (torch.topk, as the standard path's), appended as 2K columns.

The scoring itself (request lifecycle, row pieces, exactness modes, memory bound) is
`fastpath.worker.fixed_ids.FixedIdScorer`, which takes explicit inputs; this module only binds it
to the runner: which requests it tracks (`_update_states`), what this step scheduled,
the runner's lm_head and log-softmax, and where the finished scores go (`sample_tokens`).
Those calls are `fastpath.worker.fixed_id_runner`, shared with the upstream series, which makes
them from inside the same three methods. `WorkerBase.fixed_id_exactness`
(patches/worker.py) reports the mode.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: when upstream's V1 runner answers `prompt_logprob_token_ids` itself, or V1 is retired.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from fastpath.patches._base import Replacement
from fastpath.worker import fixed_id_runner

_original_update_states = GPUModelRunner._update_states
_original_get_prompt_logprobs_dict = GPUModelRunner._get_prompt_logprobs_dict
_original_sample_tokens = GPUModelRunner.sample_tokens


def _update_states(self: GPUModelRunner, scheduler_output: Any) -> Any:
    """Upstream's state update, with the fixed-id scoring state following each request."""
    fixed_id_runner.forget_requests(self, scheduler_output)
    result = _original_update_states(self, scheduler_output)
    fixed_id_runner.track_new_requests(self, scheduler_output)
    return result


def _get_prompt_logprobs_dict(
    self: GPUModelRunner, hidden_states: torch.Tensor, num_scheduled_tokens: dict[str, int]
) -> Any:
    """Upstream's prompt logprobs, plus this step's fixed-id scores kept for sample_tokens."""
    result = _original_get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens)
    fixed_id_runner.score_step(self, hidden_states, num_scheduled_tokens)
    return result


def sample_tokens(self: GPUModelRunner, *args: Any, **kwargs: Any) -> Any:
    """Upstream's step output, with the fixed-id scores attached to the ModelRunnerOutput."""
    fixed_id_runner.begin_step(self)
    return fixed_id_runner.attach_scores(self, _original_sample_tokens(self, *args, **kwargs))


REPLACEMENTS = [
    Replacement(GPUModelRunner, "_update_states", _update_states,
                frozenset({"326599f31b273b94"})),
    Replacement(GPUModelRunner, "_get_prompt_logprobs_dict", _get_prompt_logprobs_dict,
                frozenset({"889fdb068dfc37dd"})),
    Replacement(GPUModelRunner, "sample_tokens", sample_tokens,
                frozenset({"047e6a4738dead56"})),
]
