"""Patch of vLLM's completions server (`vllm/entrypoints/openai/completion/serving.py`,
`OpenAIServingCompletion`). Bound by `fastpath serve` in its API server processes only
(scope "serve"), never in an engine process.

Replaces: `OpenAIServingCompletion._create_completion`.
Why: evaluators score on `/v1/completions`: lm-evaluation-harness's `local-completions`
sends `echo: true, logprobs: N, max_tokens: 0 or 1` for every log-likelihood, which vLLM
answers from `prompt_logprobs=N`: the standard path, a dict per prompt position built from
the full-vocabulary log-softmax. And the OpenAI layer cannot ask for fixed ids at all.
How: such a request (echo, `logprobs` N in [0, --max-logprobs], `max_tokens` 0 or 1, no
`prompt_logprobs`, not streamed, `n` 1, no beam search, no `logprob_token_ids`) runs
through vLLM's own handler unchanged except for its engine client: each prompt is sent
with `target_token_ids` = its own next tokens, fastpath's N top-K columns and each
target's rank, and the float32 answer is turned into the `prompt_logprobs` that vLLM's own
`LogprobsProcessor` builds from the standard path's tensors (same ids, values, ranks,
decoded strings), so vLLM's code writes the same JSON. A request with `target_token_ids`
(and `target_start`) as extra fields gets each choice's scores as
`choices[i].target_logprobs` (floats that are float32 values); the ids are checked at
submission as for `TokensPrompt` (HTTP 400 naming the field). Every other request goes
to vLLM untouched.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: when upstream's completions endpoint answers echo logprobs from fixed-id scoring
and takes fixed ids itself.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
from vllm.exceptions import VLLMValidationError
from vllm.logprobs import create_prompt_logprobs
from vllm.v1.engine.logprobs import LogprobsProcessor
from vllm.v1.outputs import LogprobsTensors

from fastpath.patches._base import Replacement
from fastpath.worker.targets import RANKS_KEY, START_KEY, TARGET_KEY, TOP_K_KEY

_original_create_completion = OpenAIServingCompletion._create_completion

TARGET_LOGPROBS_FIELD = "target_logprobs"  # the choice field that answers target_token_ids
# Prompts this process answered on the fast path (GET /fastpath/exactness reports them).
ANSWERED = {"echo": 0, "targets": 0}


@dataclass(frozen=True)
class Plan:
    """How one completions request is answered on the fast path."""

    echo_top_n: int | None  # echo + logprobs N: the prompt's own next tokens, top-N, ranks
    targets: list[Any] | None  # target_token_ids per prompt (extra field)
    starts: list[Any] | None  # target_start per prompt


def _per_prompt(value: Any, name: str, num_prompts: int) -> list[Any]:
    """One entry per prompt: a batch takes a list with one entry per prompt."""
    if num_prompts == 1:
        return [value]
    if not isinstance(value, list) or len(value) != num_prompts:
        raise VLLMValidationError(
            f"{name} must hold one entry per prompt for a batch of {num_prompts} prompts "
            f"(a list of {num_prompts} lists of token ids)", parameter=name)
    return value


def _num_prompts(request: Any) -> int:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        return len(prompt)
    return 1


def plan_for(request: Any, max_logprobs: int) -> Plan | None:
    """The fast-path plan for a completions request, or None: vLLM answers it as is."""
    extra = request.model_extra or {}
    if TARGET_KEY in extra or START_KEY in extra:
        if TARGET_KEY not in extra:
            raise VLLMValidationError(f"{START_KEY} was given without {TARGET_KEY}",
                                      parameter=START_KEY)
        if request.echo and request.logprobs is not None:
            raise VLLMValidationError(
                f"{TARGET_KEY} cannot be combined with echo and logprobs (both ask for "
                "scores of the prompt); send them as two requests", parameter=TARGET_KEY)
        if request.stream or request.use_beam_search or (request.n or 1) != 1:
            raise VLLMValidationError(
                f"{TARGET_KEY} needs a non-streamed request with n=1 and no beam search",
                parameter=TARGET_KEY)
        if request.prompt_embeds is not None:
            raise VLLMValidationError(f"{TARGET_KEY} cannot be combined with prompt_embeds",
                                      parameter=TARGET_KEY)
        count = _num_prompts(request)
        targets = _per_prompt(extra[TARGET_KEY], TARGET_KEY, count)
        starts = _per_prompt(extra.get(START_KEY), START_KEY, count) \
            if extra.get(START_KEY) is not None else [None] * count
        return Plan(None, targets, starts)
    n = request.logprobs
    if not (
        request.echo
        and isinstance(n, int) and not isinstance(n, bool)
        and 0 <= n <= (max_logprobs if max_logprobs >= 0 else n)
        and request.prompt_logprobs is None
        and request.max_tokens in (0, 1)
        and not request.stream
        and not request.use_beam_search
        and (request.n or 1) == 1
        and not request.logprob_token_ids
        and request.prompt_embeds is None
        and request.suffix is None
    ):
        return None
    return Plan(n, None, None)


def build_prompt_logprobs(prompt_ids: Sequence[int], scores: np.ndarray, top_n: int,
                          tokenizer: Any, flat: bool) -> Any:
    """`RequestOutput.prompt_logprobs` as vLLM's standard path builds them, from the fast
    path's [rows, 1 + 2N + 1] answer (target, top-N values, top-N ids, target rank): the
    tensors the standard path hands vLLM's own `LogprobsProcessor`, so the ids, float32
    values, ranks and decoded strings are the ones it would give."""
    if scores.ndim != 2 or scores.shape != (len(prompt_ids) - 1, 2 + 2 * top_n):
        raise ValueError(f"fastpath: expected [{len(prompt_ids) - 1}, {2 + 2 * top_n}] "
                         f"scores, got {scores.shape}")
    values = np.ascontiguousarray(scores[:, : 1 + top_n], dtype=np.float32)
    top_ids = scores[:, 1 + top_n : 1 + 2 * top_n].astype(np.int64)
    ranks = scores[:, -1].astype(np.int64)
    targets = np.asarray(prompt_ids[1:], dtype=np.int64)[:, None]
    processor = LogprobsProcessor(
        tokenizer=tokenizer, logprobs=None, prompt_logprobs=create_prompt_logprobs(flat),
        cumulative_logprob=None, num_logprobs=None, num_prompt_logprobs=top_n)
    processor._update_prompt_logprobs(LogprobsTensors(
        torch.from_numpy(np.concatenate([targets, top_ids], axis=1)),
        torch.from_numpy(values), torch.from_numpy(ranks)))
    return processor.pop_prompt_logprobs()


class FastPathEngineClient:
    """The serving object's engine client for one request: `generate` sends each prompt
    on the fast path per the plan; everything else is the real client's."""

    def __init__(self, client: Any, plan: Plan, tokenizer: Any) -> None:
        self._client = client
        self._plan = plan
        self._tokenizer = tokenizer
        self._next_prompt = 0
        self.answers: dict[int, np.ndarray] = {}  # prompt index -> target_logprobs

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def generate(self, prompt: Any, sampling_params: Any, request_id: str,
                 **kwargs: Any) -> AsyncGenerator[Any, None]:
        index = self._next_prompt  # vLLM's handler submits the prompts in order
        self._next_prompt += 1
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
        if ids is None:
            if self._plan.targets is not None:
                raise VLLMValidationError(f"{TARGET_KEY} needs prompts with token ids",
                                          parameter=TARGET_KEY)
            return self._client.generate(prompt, sampling_params, request_id, **kwargs)
        if self._plan.targets is not None:
            prompt = {**prompt, TARGET_KEY: self._plan.targets[index]}
            if self._plan.starts[index] is not None:
                prompt[START_KEY] = self._plan.starts[index]
            return self._targets(index, prompt, sampling_params, request_id, **kwargs)
        if len(ids) < 2:  # no scored row: the standard path's answer is [None]
            return self._client.generate(prompt, sampling_params, request_id, **kwargs)
        return self._echo(ids, prompt, sampling_params, request_id, **kwargs)

    async def _targets(self, index: int, prompt: Any, params: Any, request_id: str,
                       **kwargs: Any) -> AsyncGenerator[Any, None]:
        async for output in self._client.generate(prompt, params, request_id, **kwargs):
            if output.finished and output.prompt_token_id_logprobs is not None:
                self.answers[index] = output.prompt_token_id_logprobs
                ANSWERED["targets"] += 1
            yield output

    async def _echo(self, ids: Sequence[int], prompt: Any, params: Any, request_id: str,
                    **kwargs: Any) -> AsyncGenerator[Any, None]:
        top_n = self._plan.echo_top_n
        fast = params.clone()
        fast.prompt_logprobs = None
        fast.extra_args = {**(fast.extra_args or {}), RANKS_KEY: True}
        if top_n:
            fast.extra_args[TOP_K_KEY] = top_n
        prompt = {**prompt, TARGET_KEY: list(ids[1:])}
        tokenizer = self._tokenizer if params.detokenize else None
        async for output in self._client.generate(prompt, fast, request_id, **kwargs):
            scores = output.prompt_token_id_logprobs
            if scores is not None:  # the final output (FINAL_ONLY): rebuild the dicts
                output.prompt_logprobs = build_prompt_logprobs(ids, scores, top_n, tokenizer,
                                                               params.flat_logprobs)
                output.prompt_token_id_logprobs = None
                ANSWERED["echo"] += 1
            yield output


async def _create_completion(self: OpenAIServingCompletion, request: Any,
                             raw_request: Any = None) -> Any:
    """vLLM's handler; eligible requests run it with a fast-path engine client."""
    plan = plan_for(request, self.model_config.max_logprobs)
    if plan is None:
        return await _original_create_completion(self, request, raw_request)
    serving = copy.copy(self)  # this request's view: the shared object is not touched
    client = serving.engine_client = FastPathEngineClient(
        self.engine_client, plan, self.renderer.tokenizer)
    response = await _original_create_completion(serving, request, raw_request)
    if plan.targets is not None and hasattr(response, "choices"):
        for index, choice in enumerate(response.choices):
            answer = client.answers.get(index)
            if answer is None:
                raise RuntimeError(f"fastpath: no fixed-id scores came back for prompt "
                                   f"{index}; failing the request instead of answering it")
            setattr(choice, TARGET_LOGPROBS_FIELD, answer[:, 0].tolist())
    return response


REPLACEMENTS = [
    Replacement(OpenAIServingCompletion, "_create_completion", _create_completion,
                frozenset({"3a8d5610cfba1b13", "410d188e937894b4"})),
]
