"""lm-eval wall time on the local tasks: `fastpath-vllm` against lm-eval's own `vllm` backend.

Both backends run in the same session on engines with the same model_args (the 8B shape
twin on CPU: vocabulary 128,256, so the log-softmax and the dicts are a real model's
size; `--model-8b PATH` or FASTPATH_BENCH_8B for the real model on a GPU runner). Each
backend first runs every task once untimed (kernel warm-up), counting the objects each
request's RequestOutput holds for its scores; then the three tasks together are timed.
The answers of the two backends are compared: lm-eval's `vllm` keeps vLLM's batched
defaults and fastpath-vllm runs the isolated schedule, so they are bitwise equal unless a
prompt was split otherwise; the count and size of differences go to `extra_info`, bounded.
Besides lm-eval's wall time, `model_request_seconds` is the time inside the model's
loglikelihood(_rolling) calls; the rest (task building, metrics) costs both backends the
same, and lm-eval's task index is built once, untimed. Figures go to `extra_info` (`table:
lm_eval`: `fastpath report` writes them to lm_eval.csv and lm_eval.png, each backend's time
against the others of the run).

Then, in the same session, lm-eval's `local-completions` (what evaluators point at a
server) against two servers of the same model and flags: vLLM's own (`FASTPATH_DISABLE=1
fastpath serve`: echo + logprobs answered from `prompt_logprobs`) and `fastpath serve`
(the same JSON from the fast path). The two servers' answers are checked equal; the
fastpath server's row carries its speedup over vLLM's server and its time relative to
the offline `fastpath-vllm` run.

A row's comparison with another backend (speedups, answers, the offline ratio) uses that
backend's reference run: a module-scoped fixture that times it itself (one untimed pass,
then ROUNDS timed, as its own benchmark does), so each test runs alone and its figures do
not depend on which tests ran before it. Where both run, the reference backend is timed
twice.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'fastpath[lm-eval]')")

from benchmarks.conftest import MODELS, resolve
from fastpath.engine import scoring
from fastpath.engine.runners import device_name
from fastpath.testing.measure import result_objects
from tests.helpers import running

ROOT = Path(__file__).resolve().parents[1]
TASKS_DIR = "tests/data/lm_eval_tasks"
TASKS = ["fastpath_wikitext", "fastpath_lambada", "fastpath_mc"]
BACKENDS = ("vllm", "fastpath-vllm")  # fastpath-vllm's row reports its ratio to vllm's
# lm-eval's local-completions against vLLM's server, and against fastpath serve
SERVERS = ("vllm-serve", "fastpath-serve")
MAX_MODEL_LEN = 2048
ROUNDS = 2


@cache
def task_manager():
    """lm-eval's task index (it reads every task YAML lm-eval ships): built once, untimed."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASKS_DIR)


def evaluate(lm, tasks=TASKS) -> dict:
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=tasks, log_samples=True,
                           task_manager=task_manager())


@contextlib.contextmanager
def timing_requests(lm):
    """Seconds spent inside the model's loglikelihood(_rolling) calls: the backend's share
    of lm-eval's wall time (the rest, task building and metrics, is the same for both)."""
    seconds: list[float] = []
    for name in ("loglikelihood", "loglikelihood_rolling"):
        original = getattr(lm, name)

        def timed(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds.append(time.perf_counter() - start)

        setattr(lm, name, timed)
    try:
        yield seconds
    finally:
        del lm.loglikelihood, lm.loglikelihood_rolling  # the bound methods again


@contextlib.contextmanager
def counting_objects(lm):
    """Objects each RequestOutput holds for its prompt scores, for every request answered:
    lm-eval's `vllm` collects outputs with `LLM.generate`, fastpath-vllm (which queues its
    batch before the first step) with `LLM.wait_for_completion`; neither calls the other."""
    counts: list[int] = []

    def counted(original):
        def collect(*args, **kwargs):
            outputs = original(*args, **kwargs)
            counts.extend(result_objects(o) for o in outputs)
            return outputs
        return collect

    names = ("generate", "wait_for_completion")
    for name in names:
        setattr(lm.model, name, counted(getattr(lm.model, name)))
    try:
        yield counts
    finally:
        for name in names:
            delattr(lm.model, name)  # the bound methods again
    if not counts:
        raise AssertionError(f"{type(lm).__name__} answered no request through the engine's "
                             "generate or wait_for_completion: nothing was counted")


def flat_answers(results: dict) -> list:
    """Every request's answer, by task, doc and choice: (log-likelihood, is_greedy) or ll."""
    return [resp[0] for task in TASKS
            for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])
            for resp in sample["resps"]]


# Largest relative difference of a log-likelihood against lm-eval's `vllm` on its batched
# defaults (measured: 7.5e-9 on the 8B twin, CPU; reports/README.md).
DEFAULTS_RTOL = 1e-6


def answers_against(ours: list, theirs: list) -> dict[str, float | int | bool]:
    """How two backends' answers compare: equal bits, how many differ, by how much."""
    def split(answer):
        return (answer[0], answer[1]) if isinstance(answer, list | tuple) else (answer, None)

    pairs = [(split(a), split(b)) for a, b in zip(ours, theirs, strict=True)]
    differing = [(a[0], b[0]) for a, b in pairs if a[0] != b[0]]
    return {
        "answers_equal_to_vllm": repr(ours) == repr(theirs),
        "answers_differing_from_vllm": len(differing),
        "max_abs_difference_to_vllm": max((abs(a - b) for a, b in differing), default=0.0),
        "max_relative_difference_to_vllm": max((abs(a - b) / abs(b) for a, b in differing
                                                if b), default=0.0),
        "is_greedy_flips_vs_vllm": sum(a[1] != b[1] for a, b in pairs),
    }


@dataclass(frozen=True)
class Reference:
    """A backend's run over all TASKS that other backends' rows are compared with."""
    seconds: float  # median wall seconds of ROUNDS timed rounds
    request_seconds: float  # seconds inside loglikelihood(_rolling), per round
    answers: list  # flat_answers of the last round


def reference_run(lm) -> Reference:
    """One untimed pass over TASKS, then ROUNDS timed: as the backend's own test times it."""
    evaluate(lm)  # untimed: warm-up
    seconds: list[float] = []
    with timing_requests(lm) as request_seconds:
        for _ in range(ROUNDS):
            started = time.perf_counter()
            results = evaluate(lm)
            seconds.append(time.perf_counter() - started)
    return Reference(float(np.median(seconds)), sum(request_seconds) / ROUNDS,
                     flat_answers(results))


@pytest.fixture(scope="module")
def lm_eval_checkpoint(request) -> tuple[str, str]:
    """(name for reports, path) of the 8B model (its twin on CPU), which every backend runs."""
    model = next(m for m in MODELS if m.label == "8B")
    wanted = request.config.getoption("--bench-models").split(",")
    if model.label not in wanted:
        pytest.skip("the 8B model is not among --bench-models")
    return resolve(request.config, model)


@pytest.fixture(scope="module")
def lm_eval_models(lm_eval_checkpoint):
    """Both backends on the 8B shape (twin on CPU), alive together for one session."""
    from fastpath import lm_eval_model

    name, path = lm_eval_checkpoint
    args = dict(pretrained=path, max_model_len=MAX_MODEL_LEN, seed=0)
    if scoring.on_cpu():
        args.update(dtype="float32", kv_cache_memory_bytes=256 << 20, enforce_eager=True)
    classes = {"vllm": lm_eval_model.VLLM, "fastpath-vllm": lm_eval_model.FastpathVLLM}
    models = {}
    saved = Path.cwd()
    os.chdir(ROOT)  # the task YAMLs name their data relative to the repository root
    try:
        for backend in BACKENDS:
            models[backend] = classes[backend](**args)
            models[backend].bench_name = name
        yield models
    finally:
        os.chdir(saved)
        for lm in models.values():
            scoring.shutdown(lm.model)


# Module scope: a reference costs ROUNDS + 1 passes of lm-eval over all TASKS; it is timed
# once per module for the rows compared with it (both servers' rows use the offline
# fastpath-vllm one), by the fixture itself, the same way whichever test asks first.
@pytest.fixture(scope="module")
def vllm_offline_reference(lm_eval_models) -> Reference:
    """lm-eval's `vllm` backend: fastpath-vllm's row is compared with it."""
    return reference_run(lm_eval_models["vllm"])


@pytest.fixture(scope="module")
def fastpath_offline_reference(lm_eval_models) -> Reference:
    """The offline fastpath-vllm backend: both servers' rows are compared with it."""
    return reference_run(lm_eval_models["fastpath-vllm"])


@pytest.fixture(scope="module")
def vllm_serve_reference(completions_lms) -> Reference:
    """local-completions against vLLM's server: fastpath serve's row is compared with it."""
    return reference_run(completions_lms["vllm-serve"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_lm_eval_wall_time(benchmark, request, lm_eval_models, backend):
    import lm_eval
    import vllm

    lm = lm_eval_models[backend]
    objects: dict[str, float] = {}
    requests: dict[str, int] = {}
    for task in TASKS:  # untimed: warm-up and object counts
        with counting_objects(lm) as counts:
            evaluate(lm, [task])
        objects[task] = float(np.mean(counts))
        requests[task] = len(counts)

    with timing_requests(lm) as request_seconds:
        results = benchmark.pedantic(evaluate, args=(lm,), rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    model_request_seconds = sum(request_seconds) / ROUNDS
    answers = flat_answers(results)

    info = {
        "table": "lm_eval", "backend": backend, "model": lm.bench_name, "tasks": ",".join(TASKS),
        "max_model_len": MAX_MODEL_LEN, "requests": sum(requests.values()),
        "model_request_seconds": model_request_seconds,
        "objects_per_request": sum(objects[t] * requests[t] for t in TASKS)
        / sum(requests.values()),
        **{f"objects_per_request_{t}": objects[t] for t in TASKS},
        **{f"requests_{t}": requests[t] for t in TASKS},
        **{f"{t}_{k}": v for t in TASKS for k, v in results["results"][t].items()
           if isinstance(v, float)},
        "device": device_name(), "vllm_version": vllm.__version__,
        "lm_eval_version": lm_eval.__version__,
    }
    if backend == "fastpath-vllm":
        vllm_run = request.getfixturevalue("vllm_offline_reference")
        info["speedup_vs_vllm"] = vllm_run.seconds / seconds
        info["request_speedup_vs_vllm"] = vllm_run.request_seconds / model_request_seconds
        info.update(answers_against(answers, vllm_run.answers))
        # lm-eval's `vllm` runs vLLM's batched defaults, fastpath-vllm the isolated schedule:
        # bitwise equal only where no prompt was split differently (docs/cli.md), so the
        # bound is on the size of a difference, and is_greedy must not flip.
        assert info["max_relative_difference_to_vllm"] <= DEFAULTS_RTOL, info
        assert info["is_greedy_flips_vs_vllm"] == 0, info
    benchmark.extra_info.update(info)


@pytest.fixture(scope="module")
def completions_lms(lm_eval_checkpoint, lm_eval_models, tmp_path_factory):
    """lm-eval `local-completions` models on vLLM's server (fastpath off) and on fastpath
    serve, both serving the offline engines' model with their flags (lm_eval_models: the
    working directory the task YAMLs need)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    name, path = lm_eval_checkpoint
    flags = ["--max-model-len", str(MAX_MODEL_LEN), "--seed", "0"]
    if scoring.on_cpu():
        flags += ["--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20),
                  "--enforce-eager"]
    logs = tmp_path_factory.mktemp("lm_eval_servers")
    envs = {"vllm-serve": {"FASTPATH_DISABLE": "1"}, "fastpath-serve": {}}
    with contextlib.ExitStack() as stack:
        lms = {}
        for backend in SERVERS:
            server = stack.enter_context(running(path, flags, logs / f"{backend}.log",
                                                 env=envs[backend]))
            lm = LocalCompletionsAPI(base_url=f"{server.url}/v1/completions", model=path,
                                     tokenizer=path, tokenizer_backend="huggingface",
                                     max_length=MAX_MODEL_LEN, num_concurrent=1)
            lm.bench_name = name
            lms[backend] = lm
        yield lms


@pytest.mark.parametrize("backend", SERVERS)
def test_lm_eval_local_completions_wall_time(benchmark, request, completions_lms, backend):
    import lm_eval
    import vllm

    lm = completions_lms[backend]
    evaluate(lm)  # untimed: warm-up
    results = benchmark.pedantic(evaluate, args=(lm,), rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    answers = flat_answers(results)
    info = {
        "table": "lm_eval", "backend": f"local-completions@{backend}",
        "model": lm.bench_name,
        "tasks": ",".join(TASKS), "max_model_len": MAX_MODEL_LEN,
        "requests": len(answers),
        **{f"{t}_{k}": v for t in TASKS for k, v in results["results"][t].items()
           if isinstance(v, float)},
        "device": device_name(), "vllm_version": vllm.__version__,
        "lm_eval_version": lm_eval.__version__,
    }
    if backend == "fastpath-serve":
        vllm_serve = request.getfixturevalue("vllm_serve_reference")
        info["speedup_vs_vllm_serve"] = vllm_serve.seconds / seconds
        info["answers_equal_to_vllm_serve"] = repr(answers) == repr(vllm_serve.answers)
        assert info["answers_equal_to_vllm_serve"], "fastpath serve's answers differ"
    offline = request.getfixturevalue("fastpath_offline_reference")
    info["seconds_vs_fastpath_vllm_offline"] = seconds / offline.seconds
    benchmark.extra_info.update(info)
