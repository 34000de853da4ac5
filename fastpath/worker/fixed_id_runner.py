"""The V1 runner's side of fixed-id scoring, as functions of the runner and worker
objects.

Shared by two callers that must not drift: fastpath's plugin (`fastpath.patches`, which
wraps upstream methods around these calls) and the upstream patch series
(`fastpath/upstream/`, which makes the same calls from inside vLLM's own methods and
carries this module, with its imports rewritten, as
`vllm/v1/worker/fixed_id_runner.py`). It reads the runner by duck typing and imports
vLLM only inside functions, so it loads in either place.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from fastpath.worker.fixed_ids import (
    FixedIdScorer,
    RowMode,
    ScheduledPrompt,
    chunk_rows_setting,
    decide_rows,
)
from fastpath.worker.targets import RANKS_KEY, TOP_K_KEY

SCORER_ATTRIBUTE = "_fixed_id_scorer"  # the runner's FixedIdScorer, created on first use
STEP_ATTRIBUTE = "_fixed_id_step_output"  # this step's finished scores, until sample_tokens
V2_CHUNK_ROWS = 1024  # vllm/v1/worker/gpu/sample/prompt_logprob.py CHUNK_SIZE


def top_k_of(sampling_params: Any) -> int:
    """The top-K columns a request asked for with its fixed-id scores (0: none)."""
    return int((getattr(sampling_params, "extra_args", None) or {}).get(TOP_K_KEY, 0) or 0)


def ranks_of(sampling_params: Any) -> bool:
    """Whether a request asked for each fixed id's rank beside its score."""
    return bool((getattr(sampling_params, "extra_args", None) or {}).get(RANKS_KEY, False))


def row_mode(runner: Any, chunk_rows: int) -> RowMode:
    """`decide_rows` on this runner's own lm_head and log-softmax, at its step size."""
    return decide_rows(runner.model.compute_logits, runner.sampler.compute_logprobs,
                       runner.model_config.get_hidden_size(), runner.model_config.dtype,
                       runner.device, runner.max_num_tokens, chunk_rows)


def scorer(runner: Any) -> FixedIdScorer:
    """The runner's FixedIdScorer, created on first use."""
    found = runner.__dict__.get(SCORER_ATTRIBUTE)
    if found is None:
        chunk_rows = chunk_rows_setting(runner.device.type)
        found = runner.__dict__[SCORER_ATTRIBUTE] = FixedIdScorer(
            runner.device, chunk_rows, lambda: row_mode(runner, chunk_rows))
    return found


def forget_requests(runner: Any, scheduler_output: Any) -> None:
    """Before the runner's state update: drop finished requests, reset resumed ones."""
    tracker = scorer(runner)
    for req_id in scheduler_output.finished_req_ids:
        tracker.remove_request(req_id)
    for req_id in scheduler_output.scheduled_cached_reqs.resumed_req_ids:
        tracker.resume_request(req_id)


def track_new_requests(runner: Any, scheduler_output: Any) -> None:
    """After the runner's state update: track each new request that asks for fixed
    ids."""
    tracker = scorer(runner)
    for new_request in scheduler_output.scheduled_new_reqs:
        params = new_request.sampling_params
        if params is not None and params.prompt_logprob_token_ids is not None:
            tracker.add_request(new_request.req_id, params.prompt_logprob_token_ids,
                                params.prompt_logprob_start or 0, top_k_of(params),
                                ranks_of(params))


def scheduled_prompts(runner: Any, tracked: Any,
                      num_scheduled_tokens: dict[str, int]) -> list[ScheduledPrompt]:
    """This step's part of each tracked request, read from the runner's batch."""
    scheduled = []
    for req_id in tracked:
        num_tokens = num_scheduled_tokens.get(req_id)
        request = runner.requests.get(req_id)
        if num_tokens is None or request is None or request.prompt_token_ids is None:
            continue
        index = runner.input_batch.req_id_to_index[req_id]
        scheduled.append(ScheduledPrompt(req_id, len(request.prompt_token_ids),
                                         request.num_computed_tokens, num_tokens,
                                         int(runner.query_start_loc.np[index])))
    return scheduled


def scores_function(runner: Any) -> Any:
    """What a row's scores are: the fp32 log-softmax, or the logits in a raw-logits
    mode."""
    if runner.model_config.logprobs_mode in ("raw_logits", "processed_logits"):
        return lambda logits: logits.to(torch.float32)
    return runner.sampler.compute_logprobs


def score_step(runner: Any, hidden_states: torch.Tensor,
               num_scheduled_tokens: dict[str, int]) -> None:
    """Score this step's rows of every tracked request; keep the finished ones for the
    output."""
    tracker = scorer(runner)
    runner.__dict__[STEP_ATTRIBUTE] = tracker.score_step(
        hidden_states, scheduled_prompts(runner, tracker.requests, num_scheduled_tokens),
        runner.model.compute_logits, scores_function(runner), runner._sync_device)


def begin_step(runner: Any) -> None:
    """At the start of sample_tokens: no scores yet for this step."""
    runner.__dict__[STEP_ATTRIBUTE] = {}


def attach_scores(runner: Any, output: Any) -> Any:
    """Put this step's finished scores on the step's ModelRunnerOutput (async or
    not)."""
    scores = runner.__dict__.pop(STEP_ATTRIBUTE, None)
    if scores:
        target = getattr(output, "_model_runner_output", output)
        target.prompt_token_id_logprobs_dict = {**target.prompt_token_id_logprobs_dict,
                                                **scores}
    return output


def exactness_report(worker: Any) -> dict[str, Any]:
    """How this worker computes fixed-id scores: runner, row mode and the probe's
    report."""
    from vllm.distributed.parallel_state import get_pp_group, get_tp_group
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = worker.model_runner
    where = {"tp_rank": get_tp_group().rank_in_group, "pp_rank": get_pp_group().rank_in_group,
             "kernels": kernels()}
    if not get_pp_group().is_last_rank:
        return {**where, "runner": type(runner).__name__, "lm_head_rows": "none",
                "reason": "no lm_head on this pipeline stage"}
    if isinstance(runner, GPUModelRunner):
        return {**where, "runner": "V1", **scorer(runner).row_mode().report()}
    from fastpath.worker import rowsubset

    report = rowsubset.probe(runner.model.compute_logits, lambda logits: logits,
                             runner.model_config.get_hidden_size(), runner.model_config.dtype,
                             runner.device, runner.max_num_tokens, V2_CHUNK_ROWS)
    verdict = "verified" if report["exact"] else "not verified"
    return {**where, "runner": "V2", "lm_head_rows": f"upstream V2 ({verdict})",
            "reason": f"vLLM's V2 runner scores rows in chunks of {V2_CHUNK_ROWS} "
            f"itself; a probe of the logits at those pieces: {verdict}",
            "chunk_rows": V2_CHUNK_ROWS, "probe": report}


def kernels() -> dict[str, Any]:
    """The kernels this process computes with: vLLM's CPU kernel library (which of
    `_C_AVX2`, `_C_AVX512`, `_C` it loaded), PyTorch's CPU capability and thread
    count."""
    libraries = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/maps").read_text().splitlines():
            name = line.rsplit("/", 1)[-1]
            if name.startswith("_C") and name.endswith(".abi3.so"):
                libraries.add(name.split(".", 1)[0])
    return {"vllm_cpu_library": sorted(libraries), "aten": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}
