"""Benchmark fixtures: the models (CPU shape twins, or real checkpoints on GPU runners),
their engines, and the windows each benchmark scores.

Real models on GPU runners: `--model-opt125m PATH`, `--model-8b PATH`, `--model-70b PATH`
(or FASTPATH_BENCH_OPT125M / _8B / _70B). They are named OPT-125M / 8B / 70B in the
reports; the zoo's CPU twins are always named as twins.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import pytest

from fastpath import zoo
from fastpath.data import bundled_text
from fastpath.engine import scoring
from fastpath.engine.runners import device_name
from fastpath.metrics.windows import make_windows


@dataclass(frozen=True)
class BenchModel:
    label: str  # the name reports use
    zoo_name: str | None  # CPU twin built by the zoo, or None for a real checkpoint
    path_option: str
    tensor_parallel_size: int = 1


MODELS = (
    BenchModel("OPT-125M", "opt-125m-twin", "opt125m"),
    BenchModel("8B", "llama3-8b-twin", "8b"),
    BenchModel("70B", "llama3-70b-twin", "70b", tensor_parallel_size=2),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("fastpath benchmarks")
    for model in MODELS:
        group.addoption(f"--model-{model.path_option}", default=None,
                        help=f"real {model.label} checkpoint (GPU runners); default: CPU twin")
    group.addoption("--bench-models", default=",".join(m.label for m in MODELS),
                    help="comma-separated subset of OPT-125M,8B,70B")
    group.addoption("--bench-windows", type=int, default=2,
                    help="windows scored per timed round (steady-state windows, stride apart)")
    group.addoption("--peer-windows", type=int, default=4,
                    help="windows of text each peer scores per timed round (test_peers)")


def _real_path(config: pytest.Config, model: BenchModel) -> str | None:
    return config.getoption(f"--model-{model.path_option}") or os.environ.get(
        f"FASTPATH_BENCH_{model.path_option.upper()}")


def resolve(config: pytest.Config, model: BenchModel) -> tuple[str, str]:
    """(name for reports, checkpoint path): the real model if given, else the CPU twin."""
    real = _real_path(config, model)
    if real:
        return model.label, real
    return f"{model.label} twin ({model.zoo_name})", str(zoo.get_model(model.zoo_name))


def selected_models(config: pytest.Config) -> list[BenchModel]:
    wanted = {label.strip() for label in config.getoption("--bench-models").split(",")}
    return [m for m in MODELS if m.label in wanted]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each benchmark runs on every selected model, or on those its `bench_models` mark names."""
    if "bench_model" in metafunc.fixturenames:
        models = selected_models(metafunc.config)
        mark = metafunc.definition.get_closest_marker("bench_models")
        if mark is not None:
            models = [m for m in models if m.label in mark.args]
        metafunc.parametrize("bench_model", models, ids=[m.label for m in models],
                             indirect=True, scope="session")


@pytest.fixture(scope="session")
def bench_model(request):
    return request.param


@pytest.fixture(scope="session")
def bench_engine(request, bench_model):
    """The engine for one benchmark model, alive while its benchmarks run."""
    name, path = resolve(request.config, bench_model)
    tp = bench_model.tensor_parallel_size
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    # max_model_len is the model's own (OPT-125M: 2048, so its windows are 2047 tokens).
    kwargs = dict(tensor_parallel_size=tp, max_num_batched_tokens=8192,
                  enable_prefix_caching=False)
    if scoring.on_cpu():
        kwargs["kv_cache_memory_bytes"] = 1 << 30
        if tp == 2:
            # Without a binding, TP=2 on 2 cores fails ("Not enough allowed NUMA nodes to
            # bind threads"); one core per worker works (docs/vllm-facts.md).
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        with scoring.engine(path, **kwargs) as llm:
            llm.fastpath_name = name
            llm.fastpath_shape = describe_shape(path)
            yield llm
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved


def describe_shape(path: str) -> str:
    """layers x hidden, vocabulary: what a twin shares with the model it stands for."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    return f"{layers}x{hidden}, vocab {config.vocab_size}"


@cache
def stream_tokens(path: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).encode(bundled_text())


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    """vLLM version, runner kind and device in every saved run."""
    import vllm

    machine_info["vllm_version"] = vllm.__version__
    machine_info["device"] = device_name()
    machine_info["use_v2_model_runner_env"] = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")


def steady_windows(tokens: list[int], context_length: int, stride: int, count: int):
    """`count` windows past the first: full context, `stride` scored tokens each."""
    windows = make_windows(len(tokens), context_length, stride)
    if len(windows) < count + 1:
        raise RuntimeError(f"bundled text too short for {count} windows of {context_length}")
    return windows[1 : 1 + count]
