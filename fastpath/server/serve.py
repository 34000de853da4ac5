"""What `fastpath serve` adds inside vLLM's server: the routes' addresses, a request-body
limit (HTTP 413 naming `--max-request-bytes`), `GET /fastpath/exactness|tokenizer`, a
check of the scoring and completions routes' bodies (HTTP 400 naming a field where vLLM
would answer a bare 500), and `/v1/completions` on the fast path
(`fastpath.patches.completions`, bound when the routes are built), loaded through vLLM's
own `--middleware` hook, so this module is imported by name in every API server process
(`fastpath.cli.serve` starts them)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any

SCORE_ROUTE = "/inference/v1/generate"
EXACTNESS_ROUTE = "/fastpath/exactness"  # fastpath serve: what the server's bits rest on
TOKENIZER_ROUTE = "/fastpath/tokenizer"  # its tokenizer's special ids and the vocabulary size
BODY_LIMIT_ENV = "FASTPATH_MAX_REQUEST_BYTES"
DEFAULT_MAX_REQUEST_BYTES = 64 << 20  # a 128K-token window with its ids is about 3 MB
TRACE_FIELD = "trace_decode_token_ids"  # SamplingParams field vLLM checks with bare ValueErrors
COMPLETIONS_ROUTE = "/v1/completions"
CHECKED_ROUTES = (SCORE_ROUTE, COMPLETIONS_ROUTE)  # bodies RequestChecks reads first


class BodyLimit:
    """ASGI middleware: refuse a request body over the limit (HTTP 413) before the app reads
    it. Loaded by vLLM's `--middleware` hook; the limit comes from FASTPATH_MAX_REQUEST_BYTES."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.limit = int(os.environ.get(BODY_LIMIT_ENV, DEFAULT_MAX_REQUEST_BYTES))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.limit <= 0:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, int(declared))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(send, size, complete=False)
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        await self.app(scope, replaying(body, receive), send)

    async def _refuse(self, send: Any, size: int, complete: bool = True) -> None:
        """A 413 in vLLM's error format, naming the limit and the flag that sets it."""
        seen = f"{size} bytes" if complete else f"more than {self.limit} bytes"
        message = (f"request body of {seen} exceeds the limit of {self.limit} bytes "
                   "(fastpath serve --max-request-bytes)")
        await _json(send, 413, {"error": {"message": message, "type": "RequestTooLarge",
                                          "param": "body", "code": 413}}, close=True)


class FastpathRoutes:
    """ASGI middleware answering fastpath's two GET routes; every other request goes to
    vLLM's app. Building it binds fastpath's `serve` patches in this process.

    - `GET /fastpath/exactness`: `scoring.exactness_report` of this server's engines (their
      workers are asked over vLLM's collective RPC; every data-parallel engine, each worker
      tagged with its `dp_rank`);
    - `GET /fastpath/tokenizer`: the BOS and EOS ids, the vocabulary size and the
      tokenizer's fingerprint (`basefile.tokenizer_fingerprint`), which a client needs to
      lay out windows as a convention does and to match a base file
      (`fastpath.server.client.ServerTokenizer`).
    """

    def __init__(self, app: Any) -> None:
        from fastpath import patches

        self.app = app
        patches.apply_serving()  # this API server process: completions on the fast path

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path")
        if scope["type"] != "http" or path not in (EXACTNESS_ROUTE, TOKENIZER_ROUTE):
            await self.app(scope, receive, send)
            return
        if scope.get("method") != "GET":
            await _json(send, 405, {"error": {"message": f"{path} takes GET",
                                              "type": "MethodNotAllowed", "code": 405}})
            return
        engine = scope["app"].state.engine_client
        if path == TOKENIZER_ROUTE:
            from fastpath.metrics.basefile import tokenizer_fingerprint

            tokenizer = engine.get_tokenizer()
            await _json(send, 200, {"bos_token_id": tokenizer.bos_token_id,
                                    "eos_token_id": tokenizer.eos_token_id,
                                    "vocab_size": engine.model_config.get_vocab_size(),
                                    "fingerprint": tokenizer_fingerprint(tokenizer)})
            return
        from fastpath.engine import scoring
        from fastpath.patches import completions

        workers = await every_engines_workers(engine)
        report = scoring.exactness_report(engine.vllm_config.scheduler_config, workers)
        # this API server's completions prompts answered on the fast path, by kind
        report["completions_fast_path"] = dict(completions.ANSWERED)
        await _json(send, 200, report)


async def every_engines_workers(engine: Any) -> list[dict[str, Any]]:
    """`fixed_id_exactness` of every worker of every engine this server sends requests to.

    Under data parallelism vLLM's `collective_rpc` asks every engine but returns the first
    one's answer only (`DPLBAsyncMPClient.call_utility_async`), so a report from it would
    vouch for engines it never saw (another node may run other kernels). Each engine is
    asked here as vLLM's own `compute_weight_checksums_async` does, and each worker is
    tagged with its engine's data-parallel rank.
    """
    core = getattr(engine, "engine_core", None)
    ranks = list(getattr(core, "engine_ranks_managed", None) or [])
    if len(ranks) <= 1 or not hasattr(core, "call_utility_all_async"):
        return await engine.collective_rpc("fixed_id_exactness")
    per_engine = await core.call_utility_all_async("collective_rpc", "fixed_id_exactness",
                                                   None, (), None)
    return [{"dp_rank": rank, **worker}
            for rank, workers in zip(ranks, per_engine, strict=True) for worker in workers]


class RequestChecks:
    """ASGI middleware: refuse with HTTP 400, in vLLM's error format and naming the field,
    the bodies of `POST /inference/v1/generate` and `POST /v1/completions` that vLLM itself
    answers with a bare 500.

    Two classes so far (found by tests/servers/test_fuzz.py):
    1. the scoring route's `sampling_params.trace_decode_token_ids`, which vLLM checks with
       plain ValueErrors (`SamplingParams._validate_trace_replay`) inside `AsyncLLM.generate`,
       where every error that is not a client error becomes an empty HTTP 500;
    2. a value of the wrong type that one of vLLM's `mode="before"` request validators reads
       before pydantic checks its type (`CompletionRequest.check_structured_outputs_count`
       calls `.get` on a string `structured_outputs`): an AttributeError, which pydantic does
       not turn into a validation error, so vLLM answers 500. Every such crash of vLLM's own
       request model is caught here, not only the one found (`validation_crash`), and so is
       a raw TypeError, which vLLM answers with a 400 that names no field.
    A body vLLM refuses itself (400) or takes goes to vLLM untouched.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("path") not in CHECKED_ROUTES
                or scope.get("method") != "POST"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        refusal = validation_crash(request_model(scope["path"]), body)
        # A JSON key may be spelled with \u escapes: such a body is parsed too.
        if refusal is None and scope["path"] == SCORE_ROUTE and (
                TRACE_FIELD.encode() in body or b"\\u" in body):
            trace = trace_refusal(body, scope["app"].state.engine_client.vllm_config)
            refusal = None if trace is None else (f"sampling_params.{TRACE_FIELD}", trace)
        if refusal is not None:
            param, message_text = refusal
            await _json(send, 400, {"error": {
                "message": message_text, "type": "BadRequestError", "param": param,
                "code": 400}})
            return
        await self.app(scope, replaying(body, receive), send)


def request_model(route: str) -> Any:
    """vLLM's pydantic model for the body of `route` (one of CHECKED_ROUTES)."""
    if route == SCORE_ROUTE:
        from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest
        return GenerateRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    return CompletionRequest


def validation_crash(model: Any, body: bytes) -> tuple[str, str] | None:
    """(field, message) where vLLM's own request model crashes on this body (an exception
    that is not a validation error: vLLM answers an AttributeError with a bare 500, a raw
    TypeError with a 400 that names no field), or None: the body validates, or vLLM refuses
    it itself naming the field. The field is the top-level key without which the crash goes
    away."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None  # not JSON: vLLM answers 400 itself
    crash = _crash_of(model, data)
    if crash is None:
        return None
    # The culprit: a key without which the body validates; failing that, one without which
    # vLLM refuses it itself (removing `prompt` makes a missing-prompt error come first).
    without = {key: _outcome(model, {k: v for k, v in data.items() if k != key})
               for key in data}
    culprit = next((key for key, outcome in without.items() if outcome == "valid"),
                   next((key for key, outcome in without.items() if outcome == "refused"),
                        None))
    if culprit is None:
        return ("body", f"the request body cannot be read by vLLM's request validation "
                        f"({type(crash).__name__}: {crash})")
    field = model.model_fields.get(culprit)
    expected = _type_name(field.annotation) if field is not None else "another value"
    return (culprit, f"{culprit} has the wrong form: expected {expected}, got "
                     f"{type(data[culprit]).__name__} {json.dumps(data[culprit])[:80]} "
                     f"(vLLM's request validation fails on it with "
                     f"{type(crash).__name__}: {crash})")


def _crash_of(model: Any, data: Any) -> Exception | None:
    """The exception validating `data` raises that vLLM would not answer with a 400 naming
    the field (anything but pydantic's validation error and vLLM's client errors), or None."""
    return _validate(model, data)[1]


def _outcome(model: Any, data: dict) -> str:
    """"valid", "refused" (a 400 naming the field, from vLLM) or "crash"."""
    return _validate(model, data)[0]


def _validate(model: Any, data: Any) -> tuple[str, Exception | None]:
    """One validation of `data` by vLLM's request model: ("valid", None), ("refused", None)
    for what vLLM answers with a 400 naming the field, or ("crash", the exception)."""
    from pydantic import ValidationError
    from vllm.exceptions import VLLMClientError

    if not isinstance(data, dict):
        return "refused", None  # not an object: vLLM's own validation refuses it
    try:
        model.model_validate(data)
    except (ValidationError, VLLMClientError):
        return "refused", None
    except Exception as crash:  # a bare 500, or a 400 naming nothing
        return "crash", crash
    return "valid", None


def _type_name(annotation: Any) -> str:
    """A field's type as a reader knows it: `StructuredOutputsParams | None`."""
    text = getattr(annotation, "__name__", None) or str(annotation)
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", text)


def trace_refusal(body: bytes, vllm_config: Any) -> str | None:
    """Why vLLM would answer this scoring body's `sampling_params.trace_decode_token_ids`
    with a bare 500, or None: no such field, or a body vLLM refuses (HTTP 400) or takes
    itself. The reasons are vLLM's own: `SamplingParams._validate_trace_replay` (a borrowed
    name, fingerprinted in fastpath.patches.BORROWED) run on the parsed request, after vLLM's
    request validation; its client errors (`VLLMValidationError`) are left to vLLM."""
    from pydantic import ValidationError
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest
    from vllm.exceptions import VLLMValidationError

    try:
        params = GenerateRequest.model_validate_json(body).sampling_params
    except (ValidationError, ValueError, TypeError):
        return None  # vLLM's own request validation refuses it (HTTP 400), naming the field
    if params.trace_decode_token_ids is None:
        return None
    field = f"sampling_params.{TRACE_FIELD}"
    model_config = vllm_config.model_config
    if not model_config.enable_trace_replay:
        # vLLM's input processor refuses any trace then, but only after the check below,
        # whose ValueErrors come first as a bare 500: one answer for every trace.
        return (f"{field} is set but trace replay is not enabled: start the server with "
                "--enable-trace-replay to use it, or leave the field out")
    try:
        params._validate_trace_replay(model_config, vllm_config.speculative_config)
    except VLLMValidationError:
        return None  # a client error: vLLM answers it with a 400 itself
    except ValueError as error:
        reason = str(error)  # vLLM's words start with the field's short name, or are named
        return f"sampling_params.{reason}" if reason.startswith(TRACE_FIELD) else (
            f"{field}: {reason}")
    return None


def replaying(body: bytes, receive: Any) -> Callable[[], Awaitable[dict]]:
    """An ASGI `receive` for an app after a middleware has read the whole body: the body
    once, then the real `receive` (later calls wait for the disconnect, as vLLM expects)."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _json(send: Any, status: int, payload: dict[str, Any], close: bool = False) -> None:
    """One complete JSON response (`close`: and the connection with it)."""
    body = json.dumps(payload, default=str).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + [(b"connection", b"close")] * close})
    await send({"type": "http.response.body", "body": body})
