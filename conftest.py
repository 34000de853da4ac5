"""Project-wide pytest setup: Hypothesis profiles, GPU skips, the model runner(s) under test,
and the machine conditions under test: a forced CPU kernel build (--cpu-isa) and busy cores
(--busy-cores)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from fastpath.engine.runners import RUNNER_ENV, RUNNERS, prepare_process, runner_environment
from fastpath.testing import kernels

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                     HealthCheck.function_scoped_fixture])
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("ci", max_examples=25, derandomize=True, print_blob=True, **_COMMON)
settings.register_profile("nightly", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runner", choices=("v1", "v2", "both"), default=None,
        help="vLLM model runner(s) the engine fixtures use (default: v2 where "
        "VLLM_USE_V2_MODEL_RUNNER=1, else v1). On CPU, V2 runs its Triton kernels in "
        "Triton's interpreter (fastpath/engine/runners.py).")


    parser.addoption(
        "--cpu-isa", choices=kernels.ISAS, default=os.environ.get(kernels.ISA_ENV) or "native",
        help="vLLM CPU kernel build every engine process loads: native (this CPU's best), "
        "avx2 (vLLM's _C_AVX2, PyTorch, oneDNN and MKL capped at AVX2: what an AVX2-only "
        f"machine runs) or avx512; default ${kernels.ISA_ENV} or native "
        "(fastpath/testing/kernels.py)")
    parser.addoption(
        "--busy-cores", default=os.environ.get("FASTPATH_BUSY_CORES") or "0",
        help="keep this many cores busy with other work for the whole run (a number, or "
        "'all'): the tests' exactness must not depend on a quiet machine")


def runners(config: pytest.Config) -> tuple[str, ...]:
    """The runners asked for: --runner, else what VLLM_USE_V2_MODEL_RUNNER says, else v1."""
    choice = config.getoption("runner")
    if choice is None:
        choice = "v2" if os.environ.get(RUNNER_ENV, "").lower() in ("1", "true") else "v1"
    return RUNNERS if choice == "both" else (choice,)


def pytest_configure(config: pytest.Config) -> None:
    # Before any test module imports vLLM: lets this process drive V2 engines on CPU
    # (the V2 tests run in every session); engines stay V1 unless a test asks for V2. An
    # engine core run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) would see the
    # stand-in too and try to compile V1's Triton kernels: run such a test in a fresh
    # interpreter (tests/engine/test_prefix_cache.py does).
    prepare_process()
    # Before any test imports vLLM: this process and every engine process load the kernel
    # build asked for (the environment reaches vLLM's spawned processes).
    isa = config.getoption("cpu_isa")
    try:
        os.environ.update(kernels.isa_env(isa))
    except kernels.IsaUnavailable as error:
        raise pytest.UsageError(str(error)) from None
    kernels.apply_in_process()
    try:
        config.fastpath_busy_cores = kernels.busy_cores_setting(config.getoption("busy_cores"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_report_header(config: pytest.Config) -> list[str]:
    import importlib.util
    from pathlib import Path

    from fastpath import upstream

    vllm_dir = Path(importlib.util.find_spec("vllm").origin).parent  # found, not imported
    source = ("native: it carries the upstream series, the plugin stands aside"
              if upstream.carries_series(vllm_dir.parent) else "stock: the plugin patches it")
    return [f"fastpath: CPU kernels {config.getoption('cpu_isa')}, busy cores "
            f"{config.fastpath_busy_cores}, runner(s) {'/'.join(runners(config))}",
            f"fastpath: vLLM from {vllm_dir} ({source})"]


def skip_repeated_conditions(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A `conditions` run forced to the build this CPU loads anyway, on quiet cores, repeats
    the main run: its tests are skipped with the reason (CI's conditions run on an
    AVX2-only machine; on an AVX-512 machine forced AVX2 is another build and they run)."""
    isa = config.getoption("cpu_isa")
    if isa == "native" or isa != kernels.native_build() or config.fastpath_busy_cores:
        return
    skip = pytest.mark.skip(reason=(
        f"--cpu-isa {isa} is this CPU's own kernel build, on quiet cores: "
        "the run without it already ran this test under the same build"))
    for item in items:
        if item.get_closest_marker("conditions"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def busy_cores(request: pytest.FixtureRequest):
    """Other work on the cores for the whole run, where --busy-cores asks for it."""
    with kernels.busy(request.config.fastpath_busy_cores) as pids:
        yield pids


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Engine tests run once per runner asked for (ids gain [v1]/[v2] when one is asked for)."""
    explicit = (metafunc.config.getoption("runner") is not None
                or runners(metafunc.config) != ("v1",))
    if "runner" in metafunc.fixturenames and explicit:
        metafunc.parametrize("runner", runners(metafunc.config), indirect=True, scope="session")


@pytest.fixture(scope="session")
def runner(request: pytest.FixtureRequest):
    """The model runner of this test's engines; its environment is set while it lives."""
    name = getattr(request, "param", "v1")
    with runner_environment(name):
        yield name


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def _runner_of(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("runner") if callspec else None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA, `v1_only` tests on V2 and a repeated `conditions` run,
    each with its reason; run the tests of one runner before the other's, so one runner's
    engines live at a time."""
    skip_repeated_conditions(config, items)
    order = {name: i for i, name in enumerate(RUNNERS)}
    items.sort(key=lambda item: order.get(_runner_of(item), -1))
    v1_asked = "v1" in runners(config)
    for item in items:
        marker = item.get_closest_marker("v1_only")
        if marker and _runner_of(item) == "v2":
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "")
            item.add_marker(pytest.mark.skip(reason=f"V1 runner only: {reason}"))
        elif (not v1_asked and item.get_closest_marker("engine")
              and not item.get_closest_marker("v2")  # these choose their runners themselves
              and "runner" not in getattr(item, "fixturenames", ())):
            # It would start a V1 engine in a run asked to check V2: say so, never pass it.
            item.add_marker(pytest.mark.skip(
                reason="starts its own engine on the default (V1) runner, not on the runner "
                "asked for (--runner); run it without --runner v2"))
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu); this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
