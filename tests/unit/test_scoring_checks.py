"""`fastpath.server.serve.RequestChecks` as an ASGI middleware around a stand-in app: no engine, no
server (tests/servers/test_fuzz.py checks it on a real server)."""

from __future__ import annotations

import asyncio
import json
import types
from typing import Any

import pytest
from pydantic import BaseModel, model_validator

from fastpath.server.serve import (
    COMPLETIONS_ROUTE,
    SCORE_ROUTE,
    TRACE_FIELD,
    RequestChecks,
    trace_refusal,
    validation_crash,
)

FIELD = f"sampling_params.{TRACE_FIELD}"
VOCAB = 1000


def body(**params: Any) -> bytes:
    return json.dumps({"token_ids": [1, 2, 3],
                       "sampling_params": {"max_tokens": 1, **params}}).encode()


def config(enabled: bool) -> types.SimpleNamespace:
    """A stand-in for the engine's VllmConfig: what vLLM's trace check reads."""
    model = types.SimpleNamespace(enable_trace_replay=enabled, get_vocab_size=lambda: VOCAB)
    return types.SimpleNamespace(model_config=model, speculative_config=None)


def call(payload: bytes, path: str = SCORE_ROUTE, method: str = "POST",
         enabled: bool = False, chunks: int = 1) -> tuple[list[bytes], list[dict]]:
    """Send `payload` (in `chunks` pieces) through the middleware; returns the bodies the app
    read and the messages sent back."""
    seen: list[bytes] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    engine = types.SimpleNamespace(vllm_config=config(enabled))
    scope = {"type": "http", "path": path, "method": method,
             "app": types.SimpleNamespace(state=types.SimpleNamespace(engine_client=engine))}
    step = max(1, -(-len(payload) // chunks))
    pieces = [payload[i:i + step] for i in range(0, len(payload), step)] or [b""]
    messages = [{"type": "http.request", "body": piece, "more_body": i < len(pieces) - 1}
                for i, piece in enumerate(pieces)]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(RequestChecks(app)(scope, receive, send))
    return seen, sent


def error_of(sent: list[dict]) -> tuple[int, dict]:
    return sent[0]["status"], json.loads(sent[1]["body"])["error"]


@pytest.mark.parametrize("params", [{}, {TRACE_FIELD: None}, {"n": 1, "bad_words": ["x"]}])
def test_bodies_without_a_trace_reach_the_app_unchanged(params):
    payload = body(**params)
    seen, sent = call(payload, chunks=3)
    assert seen == [payload] and sent[0]["status"] == 200


@pytest.mark.parametrize("params", [{TRACE_FIELD: []}, {TRACE_FIELD: [-1]}, {TRACE_FIELD: [1]},
                                    {TRACE_FIELD: [1], "prompt_logprobs": 1}])
def test_any_trace_refused_without_trace_replay(params):
    seen, sent = call(body(**params), chunks=2)
    status, error = error_of(sent)
    assert not seen and status == 400
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", FIELD, 400)
    assert "--enable-trace-replay" in error["message"] and FIELD in error["message"]


# vLLM's own words (SamplingParams._validate_trace_replay), after the field's full name
@pytest.mark.parametrize("params, fragment", [
    ({TRACE_FIELD: []}, "must be a non-empty list"),
    ({TRACE_FIELD: [3, -1]}, "must contain non-negative integers"),
    ({TRACE_FIELD: [1], "n": "2"}, "requires n=1"),  # as pydantic reads it
    ({TRACE_FIELD: [1], "prompt_logprobs": 0}, "not supported with prompt_logprobs"),
    ({TRACE_FIELD: [1], "prompt_logprob_token_ids": [[1], [2]]},
     "not supported with prompt_logprob_token_ids"),
    ({TRACE_FIELD: [1], "bad_words": ["x"]}, "not supported with bad_words"),
    ({TRACE_FIELD: [1], "thinking_token_budget": 4}, "not supported with thinking_token_budget"),
])
def test_trace_refused_with_vllms_reasons_under_trace_replay(params, fragment):
    seen, sent = call(body(**params), enabled=True)
    status, error = error_of(sent)
    assert not seen and status == 400 and error["param"] == FIELD
    assert error["message"].startswith(FIELD) and fragment in error["message"], error


def test_reasons_come_from_vllms_own_check(monkeypatch):
    """A reason vLLM's check gives (here one it does not give today) is what the client reads,
    with the field named in front when vLLM's words do not start with it."""
    from vllm.sampling_params import SamplingParams

    def refuse(self, model_config, speculative_config):
        raise ValueError("speculative decoding is on")

    monkeypatch.setattr(SamplingParams, "_validate_trace_replay", refuse)
    _, sent = call(body(**{TRACE_FIELD: [1]}), enabled=True)
    assert error_of(sent)[1]["message"] == f"{FIELD}: speculative decoding is on"


@pytest.mark.parametrize("payload", [body(**{TRACE_FIELD: [1, 2]}),  # a valid trace
                                     body(**{TRACE_FIELD: [VOCAB]}),  # vLLM's 400 names it
                                     body(**{TRACE_FIELD: "x"}),  # vLLM's validation names it
                                     b'{"' + TRACE_FIELD.encode() + b'": [',  # broken JSON
                                     json.dumps([TRACE_FIELD]).encode()])
def test_under_trace_replay_vllm_answers_the_rest(payload):
    seen, sent = call(payload, enabled=True)
    assert seen == [payload] and sent[0]["status"] == 200
    assert trace_refusal(payload, config(enabled=True)) is None


def test_field_name_spelled_with_escapes_is_found():
    escaped = "".join(f"\\u{ord(c):04x}" for c in TRACE_FIELD)
    payload = body().replace(b'"max_tokens"', f'"{escaped}": [], "max_tokens"'.encode())
    assert TRACE_FIELD.encode() not in payload
    seen, sent = call(payload)
    assert not seen and error_of(sent)[1]["param"] == FIELD


@pytest.mark.parametrize("path, method", [(SCORE_ROUTE, "GET"), (COMPLETIONS_ROUTE, "GET"),
                                          ("/v1/chat/completions", "POST")])
def test_other_routes_untouched(path, method):
    payload = body(**{TRACE_FIELD: []})
    seen, sent = call(payload, path=path, method=method)
    assert seen == [payload] and sent[0]["status"] == 200


def test_client_gone_mid_upload_ends_quietly():
    seen: list[Any] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        seen.append(scope)

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        seen.append(message)

    asyncio.run(RequestChecks(app)({"type": "http", "path": SCORE_ROUTE, "method": "POST"},
                                   receive, send))
    assert seen == []


def completion(**fields: Any) -> bytes:
    return json.dumps({"prompt": [1, 2, 3], "max_tokens": 1, **fields}).encode()


def test_completions_field_that_crashes_vllms_validation_is_refused_by_name():
    """Found by the fuzzer: vLLM's `check_structured_outputs_count` calls `.get` on a string
    `structured_outputs` (an AttributeError: a bare 500 from vLLM)."""
    seen, sent = call(completion(structured_outputs="x"), path=COMPLETIONS_ROUTE)
    assert seen == []
    status, error = error_of(sent)
    assert status == 400 and error["param"] == "structured_outputs", error
    assert "expected StructuredOutputsParams | None, got str" in error["message"], error


@pytest.mark.parametrize("payload", [completion(), completion(structured_outputs=None),
                                     completion(structured_outputs={"regex": "a+"}),
                                     completion(return_token_offsets="x"),  # vLLM's 400
                                     completion(prompt_logprobs="x"),  # vLLM's own 400
                                     b'{"prompt": [1', b"[1, 2]", b"\xff"])
def test_completions_bodies_vllm_answers_itself_pass_untouched(payload):
    seen, sent = call(payload, path=COMPLETIONS_ROUTE)
    assert seen == [payload] and sent[0]["status"] == 200


class Fragile(BaseModel):
    """A request model with the flaw class 2 is about: a before-validator that trusts a type."""

    a: int = 0
    options: dict | None = None

    @model_validator(mode="before")
    @classmethod
    def count(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("options") is not None:
            len(data["options"].keys())
        if isinstance(data, dict) and 13 in (data.get("a"), data.get("b")):
            raise TypeError("two thirteens")
        return data


def test_the_guard_catches_any_crash_not_only_the_one_found():
    assert validation_crash(Fragile, b'{"a": 1, "options": {"x": 1}}') is None
    assert validation_crash(Fragile, b'{"a": "not an int"}') is None  # a validation error
    field, message = validation_crash(Fragile, b'{"a": 1, "options": [1]}')
    assert field == "options" and "expected dict | None, got list [1]" in message, message
    assert "AttributeError" in message
    # a crash no single field explains is refused as the body's
    field, message = validation_crash(Fragile, b'{"a": 13, "b": 13}')
    assert field == "body" and "TypeError: two thirteens" in message, message
