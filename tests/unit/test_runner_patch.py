"""The V1 runner and scheduler patches' glue, without an engine.

The glue (`_update_states`, `sample_tokens`, `scheduled_prompts`, the scheduler's error
finish) is tested with the few runner fields it reads; the scorer it drives has its own
tests (tests/unit/test_fixed_ids.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.worker.gpu_model_runner import AsyncGPUModelRunnerOutput

from fastpath.patches import gpu_model_runner as patch
from fastpath.patches import scheduler as scheduler_patch
from fastpath.worker import fixed_id_runner, fixed_ids
from fastpath.worker.fixed_ids import ScheduledPrompt
from fastpath.worker.targets import TOP_K_KEY


def fixed_params(targets: np.ndarray, start: int = 0, top_k: int = 0):
    extra = {TOP_K_KEY: top_k} if top_k else None
    return SimpleNamespace(prompt_logprob_token_ids=np.asarray(targets),
                           prompt_logprob_start=start, extra_args=extra)



# --- the glue: what the patch reads from and writes to the runner ------------------------


def glue_runner(**fields) -> SimpleNamespace:
    """The runner fields the glue reads (device; requests and batch layout where asked)."""
    return SimpleNamespace(device=torch.device("cpu"), **fields)


def test_update_states_follows_each_request(monkeypatch):
    """finished -> removed, resumed -> reset, new with fixed ids -> added (with its start
    and top-K), new without -> untracked; upstream's update runs in between."""
    monkeypatch.setattr(patch, "_original_update_states", lambda self, out: "upstream")
    runner = glue_runner()
    tracker = fixed_id_runner.scorer(runner)
    tracker.add_request("done", [[1]], 0, 0)
    tracker.add_request("back", [[1], [2]], 0, 0)
    tracker.requests["back"].written[:] = True
    ids = fixed_params(np.array([[3], [4]]), start=1, top_k=2)
    plain = SimpleNamespace(prompt_logprob_token_ids=None)
    output = SimpleNamespace(
        finished_req_ids={"done"},
        scheduled_cached_reqs=SimpleNamespace(resumed_req_ids={"back"}),
        scheduled_new_reqs=[SimpleNamespace(req_id="new", sampling_params=ids),
                            SimpleNamespace(req_id="plain", sampling_params=plain)])
    assert patch._update_states(runner, output) == "upstream"
    assert set(tracker.requests) == {"back", "new"}
    assert not tracker.requests["back"].written.any()
    new = tracker.requests["new"]
    assert (new.start, new.top_k, new.token_ids.tolist()) == (1, 2, [[3], [4]])


def test_scheduled_prompts_read_the_runner_batch():
    runner = glue_runner(
        requests={"a": SimpleNamespace(prompt_token_ids=[0] * 9, num_computed_tokens=4),
                  "b": SimpleNamespace(prompt_token_ids=[0] * 7, num_computed_tokens=0),
                  "embeds": SimpleNamespace(prompt_token_ids=None, num_computed_tokens=0)},
        input_batch=SimpleNamespace(req_id_to_index={"b": 0, "a": 1, "embeds": 2}),
        query_start_loc=SimpleNamespace(np=np.array([0, 7, 12, 13], dtype=np.int32)))
    got = fixed_id_runner.scheduled_prompts(runner, ["a", "b", "embeds", "absent"],
                                  {"a": 5, "b": 7, "embeds": 1})
    assert got == [ScheduledPrompt("a", 9, 4, 5, 7), ScheduledPrompt("b", 7, 0, 7, 0)]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_sample_tokens_attaches_scores_to_either_output(monkeypatch, asynchronous):
    """The AsyncGPUModelRunnerOutput branch (async scheduling, off on CPU) too."""
    scores = torch.ones(3, 1)
    inner = ModelRunnerOutput(req_ids=["x"], req_id_to_index={"x": 0},
                              prompt_token_id_logprobs_dict={"old": torch.zeros(1, 1)})
    if asynchronous:
        wrapped = AsyncGPUModelRunnerOutput.__new__(AsyncGPUModelRunnerOutput)
        wrapped._model_runner_output = inner
    else:
        wrapped = inner

    def upstream_sample_tokens(self, *args, **kwargs):
        self.__dict__[fixed_id_runner.STEP_ATTRIBUTE] = {"x": scores}
        return wrapped

    monkeypatch.setattr(patch, "_original_sample_tokens", upstream_sample_tokens)
    runner = glue_runner()
    assert patch.sample_tokens(runner, None) is wrapped
    assert inner.prompt_token_id_logprobs_dict["x"] is scores
    assert "old" in inner.prompt_token_id_logprobs_dict
    assert fixed_id_runner.STEP_ATTRIBUTE not in runner.__dict__


def test_scheduler_turns_failed_scores_into_an_error_finish(monkeypatch):
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    class FakeScheduler:
        def __init__(self):
            self.requests = {"bad": SimpleNamespace(client_index=0),
                             "quiet": SimpleNamespace(client_index=1),
                             "good": SimpleNamespace(client_index=0)}
            self.finished = []

        def finish_requests(self, ids, status):
            self.finished.append((sorted(ids), status))
            for req_id in ids:
                self.requests.pop(req_id)

    def upstream(self, scheduler_output, runner_output):
        assert set(runner_output.prompt_token_id_logprobs_dict) == {"good"}
        return {0: EngineCoreOutputs(outputs=[
            EngineCoreOutput(request_id="bad", new_token_ids=[5]),
            EngineCoreOutput(request_id="good", new_token_ids=[6])])}

    monkeypatch.setattr(scheduler_patch, "_original_update_from_output", upstream)
    runner_output = SimpleNamespace(prompt_token_id_logprobs_dict={
        "bad": fixed_ids.FAILED_SCORES, "quiet": fixed_ids.FAILED_SCORES, "good": torch.ones(2, 1)})
    fake = FakeScheduler()
    outputs = scheduler_patch.update_from_output(fake, None, runner_output)
    by_id = {o.request_id: o for eco in outputs.values() for o in eco.outputs}
    assert by_id["bad"].finish_reason == FinishReason.ERROR
    assert by_id["quiet"].finish_reason == FinishReason.ERROR  # had no output: one is added
    assert by_id["good"].finish_reason is None
    (ids, status), = fake.finished
    assert ids == ["bad", "quiet"] and status.name == "FINISHED_ERROR"
    assert set(fake.requests) == {"good"}
