"""`fastpath serve` / `fastpath ppl --server` flags, without starting an engine or a server."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fastpath import cli
from fastpath.cli import common
from fastpath.cli import serve as serve_command
from fastpath.engine import scoring
from fastpath.engine.scoring import ScoreRequest
from fastpath.server import client
from tests.helpers import free_port


@pytest.fixture(scope="module")
def parser():
    return cli.build_parser()


def serve_args(parsers, argv):
    """Parsed `fastpath serve` flags with fastpath's defaults filled in as run_serve does."""
    args = parsers[0].parse_args(argv)
    flags = common.RunFlags.read(args, common.given_flags(parsers[3], argv[1:]))
    return flags.namespace(serve_command.server_defaults(args.verbose))


def test_serve_defaults_only_where_no_flag_was_given(parser):
    defaults = scoring.default_engine_kwargs()
    args = serve_args(parser, ["serve", "m"])
    for key, value in defaults.items():
        if key != "disable_log_stats":
            assert getattr(args, key) == value, key
    assert args.enable_scale_out and args.uvicorn_log_level == "warning"
    # A server keeps vLLM's stats (GET /metrics) unless told: a store_true flag could not
    # undo fastpath's offline default.
    assert args.disable_log_stats is False
    assert serve_args(parser, ["serve", "m", "--disable-log-stats"]).disable_log_stats is True
    # An explicit flag wins even where it equals vLLM's own default.
    args = serve_args(parser, ["serve", "m", "--dtype", "auto", "--seed=7",
                               "--kv_cache_memory_bytes", "1000", "--uvicorn-log-level", "info"])
    assert (args.dtype, args.seed, args.kv_cache_memory_bytes) == ("auto", 7, 1000)
    assert args.uvicorn_log_level == "info"
    assert args.enforce_eager == defaults.get("enforce_eager", args.enforce_eager)
    assert serve_args(parser, ["serve", "m", "-v"]).uvicorn_log_level != "warning"


def test_config_file_flags_count_as_given(parser, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("dtype: bfloat16\nport: 9100\n")
    args = serve_args(parser, ["serve", "m", "--config", str(config)])
    assert (args.dtype, args.port) == ("bfloat16", 9100)


def test_given_flags_sees_serve_spellings(parser):
    given = common.given_flags(parser[3], ["--model", "m", "-tp", "2", "--max_model_len=64",
                                        "--middleware", "a.b", "--compilation-config.mode", "0"])
    assert {"model", "tensor_parallel_size", "max_model_len", "middleware",
            "compilation_config"} <= given
    assert "dtype" not in given and "port" not in given
    # parsing again must not have changed any default
    assert parser[0].parse_args(["serve", "m"]).dtype == "auto"


@pytest.mark.parametrize("extra, fragment", [
    (["--dtype", "float32"], "engine flags --dtype apply to a local engine"),
    (["--tensor-parallel-size", "2", "--max-model-len", "64"],
     "engine flags --max-model-len, --tensor-parallel-size apply to a local engine"),
    (["--model", "m"], "engine flags --model apply"),
    (["--method", "both"], "--method both needs a local engine"),
    (["--max-in-flight", "0"], "--max-in-flight must be positive"),
    (["--request-timeout", "0"], "--request-timeout must be positive"),
    ([], "cannot reach a server"),
])
def test_ppl_server_flag_errors(extra, fragment, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert cli.main(["ppl", "--server", url, *extra]) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def test_ppl_server_listed_twice(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["ppl", "--server", url, "--server", url + "/"]) == common.EXIT_USAGE
    assert "lists a server twice" in capsys.readouterr().err


def test_score_body_is_upstream_sampling_params():
    body = client.score_body(ScoreRequest([5, 6, 7, 8], [8], start=2))
    assert body == {"token_ids": [5, 6, 7, 8], "sampling_params": {
        "max_tokens": 1, "temperature": 0.0, "prompt_logprob_token_ids": [[8]],
        "prompt_logprob_start": 2}}
    from vllm import SamplingParams

    params = SamplingParams(**body["sampling_params"])  # what the route builds from it
    assert params.prompt_logprob_token_ids == [[8]] and params.prompt_logprob_start == 2


@pytest.mark.parametrize("array, fragment", [
    (np.zeros((3, 1), dtype=np.float64), "expected float32 prompt_token_id_logprobs, got float64"),
    (np.zeros((2, 1), dtype=np.float32), "expected [3, 1 + 2 * 0] scores, got shape (2, 1)"),
    (np.zeros((3, 2), dtype=np.float32), "expected [3, 1 + 2 * 0] scores, got shape (3, 2)"),
    (np.array([[0.0], [np.nan], [-1.0]], dtype=np.float32), "NaN logprobs at rows [1]"),
])
def test_answers_of_the_wrong_shape_or_nan_are_refused(array, fragment):
    request = ScoreRequest([1, 2, 3, 4], [2, 3, 4])
    with pytest.raises(client.ScoringError, match=re.escape(fragment)):
        client.check_scores("http://s", request, array)
    ok = np.array([[-1.0], [-np.inf], [-0.5]], dtype=np.float32)
    assert client.check_scores("http://s", request, ok).targets.tolist() == [-1.0, -np.inf, -0.5]


class _DataParallelCore:
    """What `every_engines_workers` reads of vLLM's DP client: the ranks it sends requests
    to, and one answer per engine."""

    engine_ranks_managed = (0, 1)

    async def call_utility_all_async(self, method, *args):
        assert (method, args) == ("collective_rpc", ("fixed_id_exactness", None, (), None))
        return [[{"tp_rank": 0}, {"tp_rank": 1}], [{"tp_rank": 0}, {"tp_rank": 1}]]


class _Engine:
    def __init__(self, core):
        self.engine_core = core

    async def collective_rpc(self, method):
        return [{"tp_rank": 0, "first engine only": True}]


def test_exactness_asks_every_data_parallel_engine():
    """vLLM's collective_rpc returns the first DP engine's workers only; the route reports
    each engine's, tagged with its rank (one engine: collective_rpc's answer as it is)."""
    import asyncio

    from fastpath.server.serve import every_engines_workers

    workers = asyncio.run(every_engines_workers(_Engine(_DataParallelCore())))
    assert [(w["dp_rank"], w["tp_rank"]) for w in workers] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    single = type("Single", (), {"engine_ranks_managed": (0,)})()
    assert asyncio.run(every_engines_workers(_Engine(single))) == [
        {"tp_rank": 0, "first engine only": True}]
