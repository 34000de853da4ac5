"""Patch of vLLM's renderer (`vllm/renderers/base.py`, `BaseRenderer`).

Replaces: `BaseRenderer.render_prompt`, `BaseRenderer._render_prompt_async`,
`BaseRenderer.process_for_engine`, `BaseRenderer.process_for_engine_async`.
Why: the renderer rebuilds each user prompt into an engine input and keeps only the keys
it knows, so `TokensPrompt(target_token_ids=...)` would be dropped silently. The
wrappers refuse target ids on prompts without token ids (text, embeddings) when the
prompt is first seen, and carry `target_token_ids` / `target_start` onto the engine
input, where the input-processor patch turns them into upstream's
`prompt_logprob_token_ids`.
Checked against: vLLM 0.32.0 and 0.33.0 (fingerprints below).
Removal: when upstream's `TokensPrompt` has `target_token_ids` (the plugin then stands aside).
"""

from __future__ import annotations

from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.renderers.base import BaseRenderer

from fastpath.patches._base import Replacement
from fastpath.worker.targets import START_KEY, TARGET_KEY, TargetTokenIdsError, check_prompt_kind

_original_render_prompt = BaseRenderer.render_prompt
_original_render_prompt_async = BaseRenderer._render_prompt_async
_original_process_for_engine = BaseRenderer.process_for_engine
_original_process_for_engine_async = BaseRenderer.process_for_engine_async


def _check(prompt: Any) -> None:
    """Refuse target ids on a prompt kind that cannot carry them, as a validation error."""
    try:
        check_prompt_kind(prompt)
    except TargetTokenIdsError as error:
        raise VLLMValidationError(str(error), parameter=error.parameter) from None


def _carry(prompt: Any, engine_input: dict[str, Any]) -> dict[str, Any]:
    """Copy the fastpath keys from the rendered prompt onto its engine input."""
    if isinstance(prompt, dict):
        for key in (TARGET_KEY, START_KEY):
            if key in prompt:
                engine_input[key] = prompt[key]
    return engine_input


def render_prompt(self: BaseRenderer, prompt: Any) -> Any:
    _check(prompt)
    return _original_render_prompt(self, prompt)


async def _render_prompt_async(self: BaseRenderer, prompt: Any) -> Any:
    _check(prompt)
    return await _original_render_prompt_async(self, prompt)


def process_for_engine(self: BaseRenderer, prompt: Any, *args: Any, **kwargs: Any) -> Any:
    return _carry(prompt, _original_process_for_engine(self, prompt, *args, **kwargs))


async def process_for_engine_async(
    self: BaseRenderer, prompt: Any, *args: Any, **kwargs: Any
) -> Any:
    engine_input = await _original_process_for_engine_async(self, prompt, *args, **kwargs)
    return _carry(prompt, engine_input)


REPLACEMENTS = [
    Replacement(BaseRenderer, "render_prompt", render_prompt,
                frozenset({"3a7fd48bc1dc4d6f"})),
    Replacement(BaseRenderer, "_render_prompt_async", _render_prompt_async,
                frozenset({"a7e81886440a552c"})),
    Replacement(BaseRenderer, "process_for_engine", process_for_engine,
                frozenset({"61a0719f57037b2e"})),
    Replacement(BaseRenderer, "process_for_engine_async", process_for_engine_async,
                frozenset({"1c31ba37f5b99f9b"})),
]
