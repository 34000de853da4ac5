"""The HTTP surface fuzzed: Schemathesis against a real `fastpath serve` (tiny Llama).

Schemathesis reads the server's own OpenAPI schema (`/openapi.json`) and sends requests
built from it, valid and invalid (its `positive` and `negative` modes), to the scoring route
`POST /inference/v1/generate` and to `POST /v1/completions` as vLLM serves it. Its engine
(what `st run` drives) runs from Python here: its pytest integration
(`schemathesis.pytest.from_fixture`) does not run under pytest 9.2 (it sets
`request.node._nodeid`, which pytest 9.2 no longer has). Claims:
- no answer is a 5xx (Schemathesis' `not_a_server_error` check);
- no request hangs: each has a timeout (`REQUEST_TIMEOUT`), and a timeout fails the run;
- after the run the server is alive, answers /health, and answers a fixed valid scoring
  request with the same float32 bits as before the run.

Size: under any Hypothesis profile but `nightly` (conftest.py), Schemathesis' fuzzing phase,
`CI_EXAMPLES` cases per route, with a fixed seed under the `ci` profile (CI); under
`HYPOTHESIS_PROFILE=nightly` (tox -e nightly) also its coverage phase (every boundary and
wrong-type case the schema defines, about 800 per route) and `NIGHTLY_EXAMPLES` fuzzed cases
per route.

Classes of bad input found (each now a 400 naming the field, with a plain regression test,
`test_found_class_is_refused`):
1. `sampling_params.trace_decode_token_ids` that vLLM's `SamplingParams._validate_trace_replay`
   refuses (an empty list, negative ids, beside `prompt_logprobs`, `bad_words`, ...): a bare
   ValueError inside `AsyncLLM.generate`, which vLLM answers with an empty HTTP 500. Found by
   the coverage phase (its base body carries `"trace_decode_token_ids": []`): 167 of the 772
   coverage requests to the scoring route answered 500 before the fix; none of 660 fuzzed
   ones did. Fixed by `fastpath.server.serve.RequestChecks`.
2. a `/v1/completions` field of the wrong type that a vLLM `mode="before"` validator reads
   before pydantic checks it: a string `structured_outputs` (vLLM's
   `check_structured_outputs_count` calls `.get` on it: an AttributeError, an HTTP 500).
   Found by CI's fixed-seed run (seed 19, 1 of 30 completions requests) on an AMD EPYC
   (AVX2) machine; the guard now validates each body with vLLM's own request model first
   and refuses any such crash with a 400 naming the field
   (`test_found_completions_class_is_refused`).
Tried since the fix: two nightly-size runs (2147 requests each: 1547 coverage, 600 fuzzed)
and CI-size runs (60 each): no 5xx, no timeout, the same bits after. Without the fix the
nightly size fails on class 1 (a run with the check removed), and a 0.02 s request timeout
fails the run (what a hang does).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
import schemathesis.engine
from hypothesis import settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events

from fastpath import zoo
from fastpath.engine.scoring import ScoreRequest
from fastpath.server import client
from fastpath.server.client import ScoringClient
from fastpath.server.serve import SCORE_ROUTE, TRACE_FIELD
from tests.helpers import Server, running

pytestmark = [pytest.mark.engine]

MODEL = "tiny-llama"
# test_serve.py's engine flags but a shorter context: a generated body without max_tokens
# generates up to the context's end, which sets the run's time; and a body limit the
# fuzzer's large bodies can meet
MAX_MODEL_LEN = 128
FLAGS = ["--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN),
         "--kv-cache-memory-bytes", str(128 << 20), "--max-request-bytes", str(4 << 20)]
COMPLETIONS_ROUTE = "/v1/completions"
ROUTES = [SCORE_ROUTE, COMPLETIONS_ROUTE]
REQUEST_TIMEOUT = 120.0  # seconds per request: a 128-token generation took up to 34 s on 2
# cores at load average 30, and a hang is still caught
CI_EXAMPLES, NIGHTLY_EXAMPLES = 30, 300  # fuzzed cases per route
FIXED_SEED = 19  # the `ci` profile's run: the same requests every time
SHOWN_CHARS = 3000  # of each problem in a failure message


def nightly() -> bool:
    """The nightly size: the Hypothesis profile conftest.py loaded is `nightly`."""
    return settings.get_current_profile_name() == "nightly"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of its own: whatever the fuzzer sends reaches no other test's server."""
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    with running(str(zoo.get_model(MODEL)), FLAGS, log) as server:
        yield server


def vocab_size(url: str) -> int:
    return client.ServerTokenizer(url).info()["vocab_size"]


def fixed_request(vocab: int) -> ScoreRequest:
    """A valid scoring request: a prompt from a fixed seed, its own next tokens, a stride."""
    prompt = np.random.default_rng(19).integers(0, vocab, MAX_MODEL_LEN - 8).tolist()
    return ScoreRequest(prompt, prompt[21:], 20)


def score_bits(url: str, request: ScoreRequest) -> bytes:
    """The server's answer to `request`: its float32 bytes."""
    async def go() -> np.ndarray:
        async with ScoringClient(url) as c:
            return (await c.score(request)).targets
    answer = asyncio.run(go())
    assert answer.dtype == np.float32 and answer.shape == (len(request.target_token_ids),)
    return answer.tobytes()


@pytest.fixture(scope="module")
def before(fuzz_server: Server) -> tuple[ScoreRequest, bytes]:
    """The fixed request and the server's bits for it before any fuzzed input."""
    request = fixed_request(vocab_size(fuzz_server.url))
    return request, score_bits(fuzz_server.url, request)


def _body_with_a_prompt(vocab: int) -> Any:
    """Schemathesis hook: half the completion bodies get a prompt (token ids or text) and
    the served model; without them vLLM refuses nearly every generated body before the
    engine (the schema marks both optional)."""
    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy:
        if context.operation.path != COMPLETIONS_ROUTE or not isinstance(body, dict):
            return st.just(body)
        prompt = st.one_of(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=64),
                           st.text(min_size=1, max_size=200))
        filled = st.fixed_dictionaries({"prompt": prompt, "model": st.none()})
        return st.one_of(st.just(body), filled.map(lambda extra: {**body, **extra}))
    return flatmap_body


@dataclasses.dataclass
class FuzzRun:
    """What one Schemathesis run sent and what went wrong."""

    seed: int
    statuses: dict[str, collections.Counter]  # route -> status code (or "no answer") -> count
    problems: list[str]  # failed checks (a 5xx), errors (a timeout: a hang), a stopped run
    slowest: float = 0.0  # seconds, the slowest answer's

    def sent(self) -> int:
        return sum(sum(counts.values()) for counts in self.statuses.values())


def fuzz_config(seed: int) -> SchemathesisConfig:
    """Fuzzing (and, nightly, coverage), one worker, `not_a_server_error` alone, every
    request under REQUEST_TIMEOUT; no schema examples (the schema has none)."""
    return SchemathesisConfig.from_dict({
        "seed": seed,
        "suppress-health-check": ["all"],
        "workers": 1,
        "request-timeout": REQUEST_TIMEOUT,
        "continue-on-failure": True,  # every failing class in one run, not the first
        "output": {"sanitization": {"enabled": False}},  # curl commands that reproduce
        "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
        "generation": {"mode": "all"},
        "phases": {"examples": {"enabled": False}, "coverage": {"enabled": nightly()},
                   "stateful": {"enabled": False},
                   "fuzzing": {"generation": {
                       "max-examples": NIGHTLY_EXAMPLES if nightly() else CI_EXAMPLES}}},
    })


def run_schemathesis(url: str, seed: int) -> FuzzRun:
    """Schemathesis' engine on the server's two POST routes; every request counted."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=fuzz_config(seed),
                                           timeout=REQUEST_TIMEOUT)
    schema = schema.include(path=ROUTES, method="POST")
    schema.hook(_body_with_a_prompt(vocab_size(url)))
    run = FuzzRun(seed, collections.defaultdict(collections.Counter), [])
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            route = recorder.label.split(" ", 1)[-1]
            for interaction in recorder.interactions.values():
                answer = interaction.response
                run.statuses[route][answer.status_code if answer else "no answer"] += 1
                run.slowest = max(run.slowest, answer.elapsed if answer else 0.0)
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.failure_info is not None:
                        failure = check.failure_info.failure
                        answer = recorder.find_response(case_id=case_id)
                        run.problems.append(
                            f"{event.phase} {recorder.label}: {failure.title} "
                            f"(HTTP {answer.status_code if answer else 'none'}) {failure.message}"
                            f"\n{check.failure_info.code_sample}"[:SHOWN_CHARS])
            if event.status == Status.ERROR:
                run.problems.append(f"{event.phase} {recorder.label}: an error (below)")
        elif isinstance(event, events.NonFatalError):
            run.problems.append(f"{event.phase} {event.label}: {event.info.title}: "
                                f"{event.info.message}")
        elif isinstance(event, events.FatalError):
            run.problems.append(f"Schemathesis itself failed: {event.exception!r}")
        elif isinstance(event, events.EngineFinished) and event.stop_reason != "completed":
            run.problems.append(f"the run stopped early: {event.stop_reason}")
    return run


@pytest.fixture(scope="module")
def fuzzed(fuzz_server: Server, before: tuple[ScoreRequest, bytes]) -> FuzzRun:
    """One Schemathesis run against the server, after the fixed request's first answer."""
    ci = settings.get_current_profile_name() == "ci"
    seed = FIXED_SEED if ci else random.getrandbits(32)
    started = time.perf_counter()
    run = run_schemathesis(fuzz_server.url, seed)
    print(f"schemathesis (seed {run.seed}, {time.perf_counter() - started:.0f} s, slowest "
          f"answer {run.slowest:.1f} s) sent {run.sent()} requests: "
          + json.dumps({route: {str(k): v for k, v in counts.items()}
                        for route, counts in run.statuses.items()}))
    return run


def test_no_server_error_no_hang(fuzzed: FuzzRun) -> None:
    """Every generated request answered within REQUEST_TIMEOUT, none with a 5xx; and the
    run as large as asked (a request that timed out ends its route's run early)."""
    assert not fuzzed.problems, (f"seed {fuzzed.seed} (st run --seed): "
                                 + "\n\n".join(fuzzed.problems[:10]))
    assert sorted(fuzzed.statuses) == sorted(ROUTES), fuzzed.statuses
    for route, counts in fuzzed.statuses.items():
        assert sum(counts.values()) >= CI_EXAMPLES, (route, counts)


def test_after_the_run_same_bits(fuzz_server: Server, before: tuple[ScoreRequest, bytes],
                                 fuzzed: FuzzRun) -> None:
    """Alive, healthy and answering the fixed request with the bits it answered first."""
    assert fuzzed.sent() > 0
    assert fuzz_server.alive(), fuzz_server.log_text()[-4000:]
    assert httpx.get(f"{fuzz_server.url}/health", timeout=REQUEST_TIMEOUT).status_code == 200
    request, bits = before
    assert score_bits(fuzz_server.url, request) == bits, "the fixed request's bits changed"


def post_json(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{SCORE_ROUTE}", json=body, timeout=REQUEST_TIMEOUT)


def _trace_body(**params: Any) -> dict:
    return {"token_ids": [1, 2, 3], "sampling_params": {"max_tokens": 1, **params}}


# Class 1: `trace_decode_token_ids` that vLLM refuses with a bare ValueError (an empty 500),
# one case per reason of SamplingParams._validate_trace_replay tried; and a valid trace on a
# server without --enable-trace-replay, which vLLM refuses itself (with a 400, no `param`).
FOUND = [
    ("empty trace", _trace_body(trace_decode_token_ids=[])),
    ("negative id", _trace_body(trace_decode_token_ids=[-1])),
    ("with prompt_logprobs", _trace_body(trace_decode_token_ids=[1], prompt_logprobs=1)),
    ("with bad_words", _trace_body(trace_decode_token_ids=[1], bad_words=["a"])),
    ("with thinking_token_budget", _trace_body(trace_decode_token_ids=[1],
                                               thinking_token_budget=1)),
    ("valid trace, replay off", _trace_body(trace_decode_token_ids=[1])),
]


@pytest.mark.parametrize("name, body", FOUND, ids=[case[0] for case in FOUND])
def test_found_class_is_refused(fuzz_server: Server, name: str, body: dict) -> None:
    """A 400 in vLLM's error format naming the field, where vLLM answered an empty 500."""
    reply = post_json(fuzz_server.url, body)
    assert reply.status_code == 400, (name, reply.status_code, reply.text[:500])
    error = reply.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400, error
    assert error["param"] == f"sampling_params.{TRACE_FIELD}", error
    assert f"sampling_params.{TRACE_FIELD}" in error["message"], error


# Class 2: the body CI's fuzzer sent (its surrogate-laden strings kept), then the field alone.
FOUND_COMPLETIONS = [
    ("as fuzzed", {"kv_transfer_params": {}, "return_token_offsets": "\ud976\udcd4}\u00df",
                   "stream_interval": None, "structured_outputs": "\u00ee\u0088O<\udbc5\udf38",
                   "prompt": [147, 197, 1565, 540, 1236, 113, 2047, 647], "model": None}),
    ("string structured_outputs", {"prompt": [1, 2, 3], "max_tokens": 1,
                                   "structured_outputs": "x"}),
]


@pytest.mark.parametrize("name, body", FOUND_COMPLETIONS,
                         ids=[case[0] for case in FOUND_COMPLETIONS])
def test_found_completions_class_is_refused(fuzz_server: Server, name: str,
                                            body: dict) -> None:
    """A 400 naming `structured_outputs` where vLLM answered a 500."""
    reply = httpx.post(f"{fuzz_server.url}{COMPLETIONS_ROUTE}", timeout=REQUEST_TIMEOUT,
                       content=json.dumps(body).encode(),
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400, (name, reply.status_code, reply.text[:500])
    error = reply.json()["error"]
    assert error["param"] == "structured_outputs", error
    assert "structured_outputs has the wrong form" in error["message"], error


def test_scoring_body_without_the_field_is_answered(fuzz_server: Server) -> None:
    """The check stands aside for a body without the field, or with it null."""
    for extra in ({}, {TRACE_FIELD: None}):
        reply = post_json(fuzz_server.url, _trace_body(**extra))
        assert reply.status_code == 200, (extra, reply.text[:500])
        assert reply.json()["choices"][0]["token_ids"], reply.text[:500]
