"""Patch of vLLM's input processor (`vllm/v1/engine/input_processor.py`, `InputProcessor`).

Replaces: `InputProcessor.process_inputs`, `InputProcessor._validate_params`.
Why: (1) `target_token_ids` on a prompt must become upstream's per-request
`prompt_logprob_token_ids` ([R, 1]) and `prompt_logprob_start`, checked at submission with
errors that name `target_token_ids`; (2) upstream refuses `prompt_logprob_token_ids` unless
the V2 model runner is in use, but the V1 runner, the only one on CPU, answers it once the
model-runner patch is in place. On V1 the refusal is lifted and upstream's own checks of
the ids (`SamplingParams._validate_logprobs`) still run; on V2 nothing changes.
(3) `SamplingParams.extra_args["fastpath_top_k"]` (top-K columns beside fixed-id scores,
a V1 runner-patch extension) and `extra_args["fastpath_ranks"]` (each fixed id's rank) are
checked here, at submission.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: when upstream accepts `prompt_logprob_token_ids` on the V1 runner and
`TokensPrompt` carries `target_token_ids`.
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.engine.input_processor import InputProcessor

from fastpath.patches._base import Replacement
from fastpath.worker.targets import (
    MAX_EXACT_FLOAT32_ID,
    RANKS_KEY,
    START_KEY,
    TARGET_KEY,
    TOP_K_KEY,
    TargetTokenIdsError,
    normalize_targets,
)

_original_process_inputs = InputProcessor.process_inputs
_original_validate_params = InputProcessor._validate_params


def _prompt_len(prompt: dict[str, Any]) -> int:
    token_ids = prompt.get("prompt_token_ids")
    return 0 if token_ids is None else len(token_ids)


def process_inputs(
    self: InputProcessor, request_id: str, prompt: Any, params: Any, *args: Any, **kwargs: Any
) -> Any:
    """Turn `target_token_ids` into upstream's fixed-id scoring on a per-request params copy."""
    if isinstance(prompt, dict) and (TARGET_KEY in prompt or START_KEY in prompt):
        prompt = dict(prompt)
        targets, start = prompt.pop(TARGET_KEY, None), prompt.pop(START_KEY, None)
        if not isinstance(params, SamplingParams):
            raise VLLMValidationError(
                f"{TARGET_KEY} needs SamplingParams (a generation request), "
                f"got {type(params).__name__}",
                parameter=TARGET_KEY,
            )
        if params.prompt_logprob_token_ids is not None:
            raise VLLMValidationError(
                f"{TARGET_KEY} and SamplingParams.prompt_logprob_token_ids both ask for "
                "fixed-id scores; give one of them",
                parameter=TARGET_KEY,
            )
        try:
            ids, first_row = normalize_targets(
                targets, start, _prompt_len(prompt), self.model_config.get_vocab_size()
            )
        except TargetTokenIdsError as error:
            raise VLLMValidationError(str(error), parameter=error.parameter) from None
        params = params.clone()
        params.prompt_logprob_token_ids = ids
        params.prompt_logprob_start = first_row
    return _original_process_inputs(self, request_id, prompt, params, *args, **kwargs)


def _validate_top_k(self: InputProcessor, params: SamplingParams) -> None:
    """Refuse a bad `extra_args["fastpath_top_k"]`, naming it and the expected form."""
    value = (params.extra_args or {}).get(TOP_K_KEY)
    if value is None:
        return
    vocab = self.model_config.get_vocab_size()
    limit = vocab if self.model_config.max_logprobs == -1 else self.model_config.max_logprobs
    expected = (f"an int in [1, {min(limit, vocab)}] "
                f"(--max-logprobs {self.model_config.max_logprobs}, "
                f"vocabulary {vocab}), together with target_token_ids or "
                "prompt_logprob_token_ids, on the V1 model runner")
    if self.vllm_config.use_v2_model_runner:
        raise VLLMValidationError(f"{TOP_K_KEY} needs the V1 model runner; expected {expected}",
                                  parameter=TOP_K_KEY)
    if params.prompt_logprob_token_ids is None:
        raise VLLMValidationError(f"{TOP_K_KEY} was given without fixed-id scores; expected "
                                  f"{expected}", parameter=TOP_K_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= min(limit, vocab):
        raise VLLMValidationError(f"{TOP_K_KEY} is {value!r}; expected {expected}",
                                  parameter=TOP_K_KEY)
    if vocab > MAX_EXACT_FLOAT32_ID:
        raise VLLMValidationError(
            f"{TOP_K_KEY} returns ids as float32, exact only below {MAX_EXACT_FLOAT32_ID}; "
            f"this vocabulary has {vocab}", parameter=TOP_K_KEY)


def _validate_ranks(self: InputProcessor, params: SamplingParams) -> None:
    """Refuse a bad `extra_args["fastpath_ranks"]`, naming it and the expected form."""
    value = (params.extra_args or {}).get(RANKS_KEY)
    if value is None or value is False:
        return
    expected = ("true, together with target_token_ids or prompt_logprob_token_ids, on the V1 "
                "model runner")
    if value is not True:
        raise VLLMValidationError(f"{RANKS_KEY} is {value!r}; expected {expected}",
                                  parameter=RANKS_KEY)
    if self.vllm_config.use_v2_model_runner or params.prompt_logprob_token_ids is None:
        raise VLLMValidationError(f"{RANKS_KEY} needs fixed-id scores on the V1 model runner; "
                                  f"expected {expected}", parameter=RANKS_KEY)


def _validate_params(self: InputProcessor, params: Any, supported_tasks: Any) -> Any:
    """Upstream's checks, with the V2-only refusal of fixed-id scoring lifted on V1."""
    if isinstance(params, SamplingParams):
        _validate_top_k(self, params)
        _validate_ranks(self, params)
    if (
        not isinstance(params, SamplingParams)
        or params.prompt_logprob_token_ids is None
        or self.vllm_config.use_v2_model_runner
    ):
        return _original_validate_params(self, params, supported_tasks)
    ids, start = params.prompt_logprob_token_ids, params.prompt_logprob_start
    params.prompt_logprob_token_ids = params.prompt_logprob_start = None
    try:
        result = _original_validate_params(self, params, supported_tasks)
    finally:
        params.prompt_logprob_token_ids, params.prompt_logprob_start = ids, start
    params._validate_logprobs(self.model_config)  # upstream's checks of the ids
    if self.vllm_config.cache_config.kv_sharing_fast_prefill:
        raise VLLMValidationError(
            "prompt_logprob_token_ids is incorrect with --kv-sharing-fast-prefill; "
            "disable it for scoring.",
            parameter="prompt_logprob_token_ids",
        )
    return result


REPLACEMENTS = [
    Replacement(InputProcessor, "process_inputs", process_inputs,
                frozenset({"e22b5f772979054c"})),
    Replacement(InputProcessor, "_validate_params", _validate_params,
                frozenset({"656325c2c4138dbd"})),
]
