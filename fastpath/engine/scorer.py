"""The one scoring interface: what everything above the engine asks, whoever answers.

`Scorer` answers: *score these requests* (fixed ids per scored row, an optional first
scored row, optional top-K columns), *describe yourself* (model, tokenizer, max length,
runner, vLLM version) and *what do your bits rest on*. `perplexity`, `kld` and the
`fastpath-vllm` lm-eval model ask only these, so the same windows are scored the same way
by an in-process engine (`EngineScorer`, here) or by `fastpath serve` servers
(`fastpath.server.client.ServerScorer`); a later backend (vLLM data parallel, Ray) is one more
class with the same methods.

A request's answer (`Scores`) is the engine's own float32 array cut into its columns:
one per requested id, then the top-K log-probs and ids of the same log-softmax row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from fastpath.engine import scoring
from fastpath.engine.scoring import ScoreRequest

Progress = Callable[[int], None]  # called with the number of requests just answered
Method = Literal["fast", "standard"]  # fixed ids, or prompt_logprobs dicts read back
# What one engine's (or one server's) bits rest on: `scoring.exactness_report`'s fields,
# with "url" for a server and "error" where a server could not say.
Exactness = dict[str, Any]


@dataclass(frozen=True)
class Scores:
    """One request's answer: `ids[r, j]` = log-prob of requested id j at scored row r;
    `top_logprobs[r]` (descending) and `top_ids[r]` the row's top-K (K = request.top_k)."""

    ids: np.ndarray  # float32 [rows, ids per row]
    top_logprobs: np.ndarray  # float32 [rows, K]
    top_ids: np.ndarray  # int32 [rows, K]

    @property
    def targets(self) -> np.ndarray:
        """float32 [rows]: the first requested id's log-prob (the target, for 1-D ids)."""
        return self.ids[:, 0]

    @classmethod
    def from_array(cls, array: np.ndarray, request: ScoreRequest) -> Scores:
        """Cut the engine's [rows, ids + 2K] array into columns; ValueError unless it has
        exactly the request's rows and columns (a value not computed for it is never kept)."""
        rows, width = request_shape(request)
        if array.ndim != 2 or array.shape != (rows, width + 2 * request.top_k):
            raise ValueError(f"expected [{rows}, {width} + 2 * {request.top_k}] scores, "
                             f"got shape {array.shape}")
        ids, top_lp, top_ids = scoring.split_top_k(array, width, request.top_k)
        return cls(ids, top_lp, top_ids)


def request_shape(request: ScoreRequest) -> tuple[int, int]:
    """(scored rows, ids per row) of a request: 1-D targets are one id per row."""
    ids = np.asarray(request.target_token_ids)
    return (int(ids.shape[0]), 1 if ids.ndim == 1 else int(ids.shape[1]))


@dataclass(frozen=True)
class ScorerInfo:
    """What answers: enough to lay out windows and to say in a report what scored them."""

    model: str  # the model that answers (the first server's name, where servers differ)
    models: tuple[str, ...]  # every name the answering engines or servers give it
    max_model_len: int
    vocab_size: int | None
    runner: str  # "V1", "V2", or "server"
    vllm_version: str
    where: str  # "this engine", or "these servers"
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores fixed ids of prompts: an engine here, servers, later more."""

    method: Method  # how the values are computed; servers answer the fast method

    def describe(self) -> ScorerInfo:
        """Model, max length, runner, vLLM version (cheap: asks no worker)."""
        ...

    def exactness(self) -> list[Exactness]:
        """What the bits rest on: one report per engine or server that answers."""
        ...

    def tokenizer(self) -> Any:
        """The model's tokenizer, as conventions use it: `encode(text, add_special_tokens=)`,
        `bos_token_id`, `eos_token_id`."""
        ...

    def score(self, requests: Sequence[ScoreRequest],
              progress: Progress | None = None) -> list[Scores]:
        """Each request's answer, in request order; an error rather than a missing one."""
        ...

    def warm_up(self, requests: Sequence[ScoreRequest]) -> None:
        """Score once, untimed, so kernels for these shapes exist on whatever answers."""
        ...


class EngineScorer:
    """A `vllm.LLM` in this process as a `Scorer`.

    `method` chooses how the engine computes the values: `fast` (fixed ids) or `standard`
    (prompt_logprobs=`standard_k` dicts, read back per target: 1-D targets only, no top-K).
    Requests go in batches of `max_batch` (`scoring.submit_together`: queued before the
    first step, so the schedule depends on the requests alone). `engine_options` reach
    `LLM.enqueue` (`lora_request`, ...); `detokenize=False` skips detokenizing the one
    generated token (the lm-eval model's choice; no effect on the scores).
    """

    def __init__(self, llm: Any, method: Method = "fast", standard_k: int = 0,
                 max_batch: int = 16, use_tqdm: bool = False, detokenize: bool = True,
                 **engine_options: Any) -> None:
        if method not in ("fast", "standard"):
            raise ValueError(f"method must be 'fast' or 'standard', got {method!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.llm = llm
        self.method: Method = method
        self.standard_k = standard_k
        self.max_batch = max_batch
        self.use_tqdm = use_tqdm
        self.detokenize = detokenize
        self.engine_options = engine_options

    def describe(self) -> ScorerInfo:
        import vllm

        from fastpath.engine.runners import device_name, runner_name

        config = self.llm.llm_engine.model_config
        return ScorerInfo(model=str(config.model), models=(str(config.model),),
                          max_model_len=int(config.max_model_len),
                          vocab_size=int(config.get_vocab_size()),
                          runner=runner_name(self.llm), vllm_version=vllm.__version__,
                          where="this engine", extra={"device": device_name()})

    def exactness(self) -> list[Exactness]:
        return [scoring.exactness(self.llm)]

    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def warm_up(self, requests: Sequence[ScoreRequest]) -> None:
        self.score(requests)

    def score(self, requests: Sequence[ScoreRequest],
              progress: Progress | None = None) -> list[Scores]:
        answers: list[Scores] = []
        for first in range(0, len(requests), self.max_batch):
            batch = requests[first : first + self.max_batch]
            answers.extend(self._score_batch(batch))
            if progress is not None:
                progress(len(batch))
        return answers

    def _score_batch(self, batch: Sequence[ScoreRequest]) -> list[Scores]:
        if self.method == "standard":
            return self._standard(batch)
        prompts, params = [], []
        for request in batch:
            prompt, param = scoring.engine_request(request, detokenize=self.detokenize)
            prompts.append(prompt)
            params.append(param)
        outputs = scoring.submit_together(self.llm, prompts, params, use_tqdm=self.use_tqdm,
                                          **self.engine_options)
        return [Scores.from_array(scoring.fixed_id_scores(o), r)
                for o, r in zip(outputs, batch, strict=True)]

    def _standard(self, batch: Sequence[ScoreRequest]) -> list[Scores]:
        for request in batch:
            if request.top_k or np.asarray(request.target_token_ids).ndim != 1:
                raise ValueError("the standard method reads one target per row from "
                                 "prompt_logprobs: no 2-D ids, no top_k")
        outputs = scoring.generate(self.llm, batch, "standard", self.standard_k, self.use_tqdm)
        values = scoring.read_logprobs(outputs, batch, "standard")
        return [Scores(v.reshape(-1, 1), np.empty((v.size, 0), np.float32),
                       np.empty((v.size, 0), np.int32)) for v in values]
