"""Scoring over HTTP: a client for `fastpath serve` and a pool that spreads windows over servers.

The request is vLLM's own `POST /inference/v1/generate` (on with `--enable-scale-out`,
which `fastpath serve` sets): token ids plus a full SamplingParams, here one output token
and `prompt_logprob_token_ids` = one target id per scored row, `prompt_logprob_start` = the
first scored row. The answer's `prompt_token_id_logprobs` is a base64 `.npy` float32
array [rows, 1]: the same values, computed by the same code, as `fastpath ppl` offline.

    from fastpath.server.client import ScoringClient
    async with ScoringClient("http://127.0.0.1:8000") as client:
        ids = await client.tokenize(text)
        scores = await client.score(ScoreRequest(ids, ids[1:]))
        scores.targets                                              # float32 [len(ids) - 1]

`ServerPool` scores many requests over one or more servers: a bounded number in flight
per server, a request whose server fails or times out goes back to the queue and is
answered by another server, and every request is answered exactly once (or the run stops
with an error naming what is missing). `ServerScorer` is the pool as a
`fastpath.engine.scorer.Scorer`, what `fastpath ppl --server` and `fastpath kld --server` use.
Nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import base64
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fastpath.engine.scorer import Exactness, Method, Progress, ScorerInfo, Scores
from fastpath.engine.scoring import ScoreRequest
from fastpath.extras import require
from fastpath.server.serve import EXACTNESS_ROUTE, SCORE_ROUTE, TOKENIZER_ROUTE
from fastpath.worker.targets import TOP_K_KEY

httpx = require("httpx", "client", "scoring on servers (fastpath.server.client)")

DEFAULT_TIMEOUT = 600.0  # seconds per request: a long window on a busy CPU server
DEFAULT_MAX_IN_FLIGHT = 8


class ScoringError(RuntimeError):
    """A server's answer that cannot be used (wrong shape, NaN, not decodable): not retried,
    since a value that was not computed for the request must never be accepted."""


class RequestRefused(ValueError):
    """The server refused the request (HTTP 4xx): the request is wrong, on any server."""

    def __init__(self, url: str, status: int, message: str) -> None:
        super().__init__(f"{url} refused the request (HTTP {status}): {message}")
        self.status = status
        self.message = message


class ServerUnavailable(ConnectionError):
    """No usable answer from a server this time (connection, timeout, HTTP 5xx/429): retried."""


def score_body(request: ScoreRequest) -> dict[str, Any]:
    """The JSON body that asks a server for one ScoreRequest's scores: upstream's
    `prompt_logprob_token_ids` (one id per row, or the request's [rows, n]) and
    `prompt_logprob_start`, fastpath's top-K in `extra_args`."""
    prompt = [int(t) for t in request.prompt_token_ids]
    ids = np.asarray(request.target_token_ids, dtype=np.int64)
    params: dict[str, Any] = {
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprob_token_ids": (ids[:, None] if ids.ndim == 1 else ids).tolist(),
    }
    if request.start:
        params["prompt_logprob_start"] = int(request.start)
    if request.top_k:
        params["extra_args"] = {TOP_K_KEY: int(request.top_k)}
    return {"token_ids": prompt, "sampling_params": params}


def decode_scores(encoded: str) -> np.ndarray:
    """A base64 `.npy` string (vLLM's numpy2base64) back to its array, without pickle."""
    return np.load(io.BytesIO(base64.b64decode(encoded)), allow_pickle=False)


def check_scores(url: str, request: ScoreRequest, array: Any) -> Scores:
    """The answer cut into its columns; ScoringError unless it is float32 with exactly the
    request's rows and columns and no NaN among the log-probs (NaN is never a logprob)."""
    if not isinstance(array, np.ndarray) or array.dtype != np.float32:
        shape = getattr(array, "shape", None)
        dtype = getattr(array, "dtype", type(array).__name__)
        raise ScoringError(f"{url}: expected float32 prompt_token_id_logprobs, got {dtype} "
                           f"{shape}")
    try:
        scores = Scores.from_array(array, request)
    except ValueError as error:
        raise ScoringError(f"{url}: {error}") from None
    logprobs = np.concatenate([scores.ids, scores.top_logprobs], axis=1)
    nan = np.flatnonzero(np.isnan(logprobs).any(axis=1))
    if nan.size:
        raise ScoringError(f"{url}: NaN logprobs at rows {nan[:10].tolist()} "
                           f"({nan.size} of {logprobs.shape[0]})")
    return scores


def _error_message(reply: httpx.Response) -> str:
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error)


class ScoringClient:
    """One server: tokenize, model info, score one request (async, httpx)."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 max_connections: int = DEFAULT_MAX_IN_FLIGHT,
                 api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    async def __aenter__(self) -> ScoringClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self._http.post(path, json=body)
        except httpx.TransportError as error:  # connect/read/write errors and timeouts
            raise ServerUnavailable(f"{self.url}{path}: {type(error).__name__}: {error}") from error
        return self._json(path, reply)

    def _json(self, path: str, reply: httpx.Response) -> dict[str, Any]:
        if reply.status_code == 429 or reply.status_code >= 500:
            raise ServerUnavailable(f"{self.url}{path}: HTTP {reply.status_code}: "
                                    f"{_error_message(reply)}")
        if reply.status_code >= 400:
            raise RequestRefused(self.url, reply.status_code, _error_message(reply))
        return reply.json()

    async def health(self) -> bool:
        """Whether the server answers /health with 200 now."""
        try:
            reply = await self._http.get("/health", timeout=min(10.0, self.timeout))
            return reply.status_code == 200
        except httpx.TransportError:
            return False

    async def model(self) -> dict[str, Any]:
        """The served model: its id and max_model_len (from /v1/models)."""
        try:
            reply = await self._http.get("/v1/models")
        except httpx.TransportError as error:
            raise ServerUnavailable(f"{self.url}/v1/models: {error}") from error
        models = self._json("/v1/models", reply)["data"]
        return models[0]

    async def version(self) -> str:
        try:
            return self._json("/version", await self._http.get("/version"))["version"]
        except (httpx.TransportError, KeyError, RequestRefused):
            return "unknown"

    async def exactness(self) -> dict[str, Any]:
        """What the server's bits rest on (`fastpath serve`'s /fastpath/exactness), or
        {"error": why} from a server that does not say (not a fastpath serve)."""
        try:
            return self._json(EXACTNESS_ROUTE, await self._http.get(EXACTNESS_ROUTE))
        except (httpx.TransportError, RequestRefused, ServerUnavailable) as error:
            return {"error": str(error)}

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids from the server's own tokenizer (`tokenizer.encode(text,
        add_special_tokens=...)`, as offline)."""
        body = {"prompt": text, "add_special_tokens": add_special_tokens}
        return list(map(int, (await self._post("/tokenize", body))["tokens"]))

    async def tokenizer_info(self) -> dict[str, Any]:
        """BOS and EOS ids and the vocabulary size (`fastpath serve`'s /fastpath/tokenizer)."""
        try:
            return self._json(TOKENIZER_ROUTE, await self._http.get(TOKENIZER_ROUTE))
        except httpx.TransportError as error:
            raise ServerUnavailable(f"{self.url}{TOKENIZER_ROUTE}: {error}") from error

    async def score(self, request: ScoreRequest) -> Scores:
        """The request's scores: row r = prompt row start + r (`Scores.targets`: float32
        [len(targets)] for one id per row)."""
        answer = await self._post(SCORE_ROUTE, score_body(request))
        encoded = answer.get("prompt_token_id_logprobs")
        if not encoded:
            raise ScoringError(f"{self.url}: the answer has no prompt_token_id_logprobs; is "
                               "fastpath active on the server (fastpath serve)?")
        try:
            array = decode_scores(encoded)
        except (ValueError, OSError) as error:
            raise ScoringError(
                f"{self.url}: undecodable prompt_token_id_logprobs: {error}") from error
        return check_scores(self.url, request, array)


@dataclass
class _Server:
    client: ScoringClient
    healthy: asyncio.Event = field(default_factory=asyncio.Event)
    dead: bool = False
    failures: int = 0  # consecutive
    answered: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class PoolStats:
    """What happened: answers per server, retries, servers given up on, per-request latency."""

    answered_by: dict[str, int]
    retries: int
    dead_servers: list[str]
    latencies: list[float]  # seconds, one per answered request, in completion order
    answered_once: bool  # every request answered exactly once


@dataclass(eq=False)
class _PoolRun:
    """One `ServerPool.score` call: the queue of requests not yet answered, the answers, the
    servers and the stats, with one method per rule of answering each request exactly once."""

    pool: ServerPool
    requests: Sequence[ScoreRequest]
    servers: list[_Server]
    progress: Callable[[int], None] | None = None
    on_answer: Callable[[int, str], None] | None = None
    queue: asyncio.Queue[int] = field(default_factory=asyncio.Queue)  # indexes to send
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    fatal: list[BaseException] = field(default_factory=list)  # the first is raised
    probes: list[asyncio.Task] = field(default_factory=list)
    retries: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds, in completion order
    results: list[Scores | None] = field(init=False)
    times_answered: list[int] = field(init=False)
    attempts: list[int] = field(init=False)  # sends per request, failed ones included
    max_attempts: int = field(init=False)
    remaining: int = field(init=False)
    loop: asyncio.AbstractEventLoop = field(init=False)

    def __post_init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        for server in self.servers:
            server.healthy.set()
        for index in range(len(self.requests)):
            self.queue.put_nowait(index)
        self.results = [None] * len(self.requests)
        self.times_answered = [0] * len(self.requests)
        self.attempts = [0] * len(self.requests)
        self.max_attempts = self.pool.max_failures * len(self.servers) + 1
        self.remaining = len(self.requests)
        if self.remaining == 0:
            self.finished.set()

    async def run(self) -> None:
        """`max_in_flight` workers per server until the run finishes or every worker has
        ended; then the workers and probes stopped and the clients closed, whatever happened."""
        tasks = [asyncio.create_task(self.work(s))
                 for s in self.servers for _ in range(self.pool.max_in_flight)]
        watcher = asyncio.create_task(self.finished.wait())
        try:
            await self.supervise(tasks, watcher)
        finally:
            for task in [*tasks, watcher, *self.probes]:
                task.cancel()
            await asyncio.gather(*tasks, watcher, *self.probes, return_exceptions=True)
            for server in self.servers:
                await server.client.aclose()

    async def supervise(self, tasks: list[asyncio.Task], watcher: asyncio.Task) -> None:
        """Wait until the run finishes or no worker is left (every server given up); a worker
        that raised (a callback's error, say) stops the run with its exception."""
        pending = set(tasks)
        while not self.finished.is_set() and pending:
            done, pending = await asyncio.wait(pending | {watcher},
                                               return_when=asyncio.FIRST_COMPLETED)
            pending.discard(watcher)
            for task in done:
                if task is not watcher and task.exception() is not None:
                    self.stop(task.exception())

    async def work(self, server: _Server) -> None:
        """One of `server`'s workers: send it one request at a time while it is healthy,
        until the run finishes or the server is given up."""
        while not self.finished.is_set():
            await server.healthy.wait()
            if server.dead:
                return
            index = await self.next_request(server)
            if index is not None:
                await self.send(server, index)

    async def next_request(self, server: _Server) -> int | None:
        """The next queued request for `server`, or None with the request put back for the
        others when the server failed (or was given up) while this worker waited for it."""
        index = await self.queue.get()
        if not server.healthy.is_set() or server.dead:
            self.queue.put_nowait(index)
            return None
        return index

    async def send(self, server: _Server, index: int) -> None:
        """Request `index` to `server`: the answer kept, or the request retried (the server
        unavailable), or the run stopped (a refusal or an unusable answer: same on any server)."""
        self.attempts[index] += 1
        started = self.loop.time()
        try:
            values = await server.client.score(self.requests[index])
        except ServerUnavailable as error:
            self.on_failure(server, index, error)
        except (RequestRefused, ScoringError) as error:
            self.stop(error)
        else:
            self.on_scores(server, index, values, started)

    def on_scores(self, server: _Server, index: int, values: Scores, started: float) -> None:
        """Keep `server`'s answer to request `index` and report it; a second answer to one
        request stops the run (exactly once); the last answer finishes it."""
        server.failures = 0
        self.times_answered[index] += 1
        if self.results[index] is not None:
            self.stop(AssertionError(f"request {index} was answered twice"))
            return
        self.results[index] = values
        self.latencies.append(self.loop.time() - started)
        server.answered += 1
        self.remaining -= 1
        if self.progress is not None:
            self.progress(1)
        if self.on_answer is not None:
            self.on_answer(index, server.client.url)
        if self.remaining == 0:
            self.finished.set()

    def on_failure(self, server: _Server, index: int, error: ServerUnavailable) -> None:
        """Request `index` back in the queue for any server and `server` paused; a request
        that has failed `max_attempts` times stops the run (it is not the servers' fault)."""
        self.queue.put_nowait(index)
        self.retries += 1
        server.errors.append(str(error))
        if self.attempts[index] >= self.max_attempts:
            self.stop(ScoringError(
                f"request {index} failed {self.attempts[index]} times; last: {error}"))
            return
        server.failures += 1
        self.pause(server)

    def pause(self, server: _Server) -> None:
        """No more requests to `server` until `probe` finds its /health again (one probe at
        a time, however many of its requests failed)."""
        if server.healthy.is_set():
            server.healthy.clear()
            self.probes.append(asyncio.create_task(self.probe(server)))

    async def probe(self, server: _Server) -> None:
        """Ask the paused `server`'s /health with a doubling wait: resume it when it answers,
        give it up after `max_failures` failed probes."""
        for attempt in range(self.pool.max_failures):
            await asyncio.sleep(self.pool.probe_interval * 2 ** attempt)
            if await server.client.health():
                server.healthy.set()
                return
        self.give_up_on(server)

    def give_up_on(self, server: _Server) -> None:
        """Mark `server` dead and wake its waiting workers so that they see it and end."""
        server.dead = True
        server.healthy.set()

    def stop(self, error: BaseException) -> None:
        """End the run with `error` (of several, the first one recorded is raised)."""
        self.fatal.append(error)
        self.finished.set()

    def stats(self) -> PoolStats:
        """What this run did: answers per server, retries, servers given up, latencies."""
        return PoolStats(
            answered_by={s.client.url: s.answered for s in self.servers}, retries=self.retries,
            dead_servers=[s.client.url for s in self.servers if s.dead],
            latencies=self.latencies, answered_once=all(n == 1 for n in self.times_answered))

    def answers(self) -> list[Scores]:
        """Each request's scores in request order; else the error that stopped the run, or
        ServerUnavailable naming how many requests no server answered."""
        if self.fatal:
            raise self.fatal[0]
        if self.remaining:
            last = "; ".join(f"{s.client.url}: {s.errors[-1]}" for s in self.servers if s.errors)
            raise ServerUnavailable(f"every server failed with {self.remaining} of "
                                    f"{len(self.requests)} requests unanswered ({last})")
        return self.results  # type: ignore[return-value]


class ServerPool:
    """Many requests over one or more servers, each answered exactly once.

    Up to `max_in_flight` requests per server at a time. A request whose server fails
    (connection refused or reset, timeout, HTTP 5xx/429) goes back to the queue and the
    server pauses until its /health answers again; after `max_failures` failed probes in a
    row it is given up and the others finish the work. A refusal (4xx) or an unusable
    answer stops the run: it would fail the same way on every server.
    """

    def __init__(self, urls: Sequence[str], *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 timeout: float = DEFAULT_TIMEOUT, max_failures: int = 3,
                 probe_interval: float = 1.0, api_key: str | None = None) -> None:
        if not urls:
            raise ValueError("ServerPool needs at least one server URL")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
        self.urls = [u.rstrip("/") for u in urls]
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"a server is listed twice: {self.urls}")
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.max_failures = max_failures
        self.probe_interval = probe_interval
        self.api_key = api_key
        self.stats: PoolStats | None = None

    def clients(self) -> list[ScoringClient]:
        return [ScoringClient(u, timeout=self.timeout, max_connections=self.max_in_flight,
                              api_key=self.api_key) for u in self.urls]

    async def score(self, requests: Sequence[ScoreRequest],
                    progress: Callable[[int], None] | None = None,
                    on_answer: Callable[[int, str], None] | None = None) -> list[Scores]:
        """Each request's scores, in request order.

        `progress(1)` after each answer (a tqdm bar's update); `on_answer(index, url)` too.
        """
        run = _PoolRun(self, requests, [_Server(c) for c in self.clients()], progress, on_answer)
        await run.run()
        self.stats = run.stats()
        return run.answers()

    def score_sync(self, requests: Sequence[ScoreRequest],
                   progress: Callable[[int], None] | None = None) -> list[Scores]:
        """`score` from synchronous code (runs its own event loop)."""
        return asyncio.run(self.score(requests, progress))


async def _first_answer(urls: Sequence[str], call: Callable[[ScoringClient], Any],
                        api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """`call(client)` on the first server that answers (for tokenize/model/version)."""
    errors = []
    for url in urls:
        async with ScoringClient(url, api_key=api_key, timeout=timeout) as client:
            try:
                return await call(client)
            except ServerUnavailable as error:
                errors.append(str(error))
    raise ServerUnavailable("no server answered: " + "; ".join(errors))


async def describe_servers(urls: Sequence[str], api_key: str | None = None,
                           timeout: float = 60.0) -> list[dict[str, Any]]:
    """Each server's model id, max_model_len, vLLM version and what its bits rest on
    (ServerUnavailable if one is down)."""
    described = []
    for url in urls:
        async with ScoringClient(url, api_key=api_key, timeout=timeout) as client:
            model = await client.model()
            described.append({"url": client.url, "model": model.get("id"),
                              "max_model_len": model.get("max_model_len"),
                              "vllm_version": await client.version(),
                              "exactness": await client.exactness()})
    return described


def percentiles(latencies: Sequence[float], qs: Sequence[float] = (50, 90, 99)) -> dict[str, float]:
    """Latency percentiles in seconds, keyed p50/p90/p99 (NaN with no samples)."""
    if not latencies:
        return {f"p{q:g}": math.nan for q in qs}
    values = np.percentile(np.asarray(latencies, dtype=np.float64), qs)
    return {f"p{q:g}": float(v) for q, v in zip(qs, values)}


class ServerTokenizer:
    """A server's tokenizer, as `fastpath.metrics.conventions` uses one: `encode` through its
    /tokenize, the special ids from /fastpath/tokenizer (asked once)."""

    def __init__(self, url: str, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url, self.api_key, self.timeout = url, api_key, timeout
        self._info: dict[str, Any] | None = None

    def _call(self, call: Callable[[ScoringClient], Any]) -> Any:
        return asyncio.run(_first_answer([self.url], call, self.api_key, self.timeout))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._call(lambda c: c.tokenize(text, add_special_tokens))

    def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = self._call(lambda c: c.tokenizer_info())
        return self._info

    @property
    def bos_token_id(self) -> int | None:
        return self.info()["bos_token_id"]

    @property
    def eos_token_id(self) -> int | None:
        return self.info()["eos_token_id"]

    @property
    def fingerprint(self) -> str:
        """`basefile.tokenizer_fingerprint` of the server's tokenizer, computed there."""
        return self.info()["fingerprint"]


class ServerScorer:
    """`fastpath serve` servers as a `fastpath.engine.scorer.Scorer`: requests spread over them by
    a `ServerPool` (each answered once, retried on another server where one fails).

    The tokenizer is the first server's (`ServerTokenizer`) unless `tokenizer` is given;
    `check_tokenizers` makes sure every server tokenizes a probe of the text the same way.
    """

    method: Method = "fast"

    def __init__(self, urls: Sequence[str], *, tokenizer: Any = None,
                 api_key: str | None = None, describe_timeout: float = 60.0,
                 **pool_options: Any) -> None:
        self.pool = ServerPool(urls, api_key=api_key, **pool_options)
        self.urls = self.pool.urls
        self.api_key = api_key
        self.describe_timeout = describe_timeout
        self._tokenizer = tokenizer
        # One per server, each asking its /fastpath/tokenizer once (describe, tokenizer and
        # check_tokenizers share them).
        self._server_tokenizers = [ServerTokenizer(u, api_key, self.pool.timeout)
                                   for u in self.urls]
        self._described: list[dict[str, Any]] | None = None
        self._info: ScorerInfo | None = None

    def servers(self) -> list[dict[str, Any]]:
        """Each server's model, max_model_len, vLLM version and exactness (asked once)."""
        if self._described is None:
            self._described = asyncio.run(describe_servers(self.urls, self.api_key,
                                                           self.describe_timeout))
        return self._described

    def describe(self) -> ScorerInfo:
        if self._info is None:
            self._info = self._describe()
        return self._info

    def _describe(self) -> ScorerInfo:
        described = self.servers()
        models = sorted({str(d["model"]) for d in described})
        return ScorerInfo(model=str(described[0]["model"]), models=tuple(models),
                          max_model_len=min(int(d["max_model_len"]) for d in described),
                          vocab_size=self._server_tokenizers[0].info()["vocab_size"],
                          runner="server",
                          vllm_version=described[0]["vllm_version"],
                          where="these servers", extra={"servers": described})

    def exactness(self) -> list[Exactness]:
        return [{"url": d["url"], **d["exactness"]} for d in self.servers()]

    def tokenizer(self) -> Any:
        return self._tokenizer if self._tokenizer is not None else self._server_tokenizers[0]

    def check_tokenizers(self, probe: str) -> None:
        """ValueError unless every server gives `probe` the same token ids (with and
        without special tokens): they must serve the same tokenizer."""
        if len(self.urls) == 1:
            return
        first, *others = self._server_tokenizers
        for special in (True, False):
            ids = first.encode(probe, special)
            for other in others:
                if other.encode(probe, special) != ids:
                    raise ValueError(f"{other.url} and {first.url} tokenize the text "
                                     "differently: they serve different models")

    def warm_up(self, requests: Sequence[ScoreRequest]) -> None:
        """The requests once on each server in turn (untimed)."""
        for url in self.urls:
            ServerPool([url], timeout=self.pool.timeout, api_key=self.api_key
                       ).score_sync(requests)

    def score(self, requests: Sequence[ScoreRequest],
              progress: Progress | None = None) -> list[Scores]:
        return self.pool.score_sync(requests, progress)

    def report(self) -> dict[str, Any]:
        """Who answered what in the last `score`: per-server answers, retries, latency."""
        stats = self.pool.stats
        if stats is None:
            return {}
        return {"servers": list(self.urls), "answered_by": stats.answered_by,
                "retries": stats.retries, "dead_servers": stats.dead_servers,
                "max_in_flight_per_server": self.pool.max_in_flight,
                "latency_seconds": percentiles(stats.latencies)}
