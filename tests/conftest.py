"""Engine fixtures shared by the test modules: real vLLM engines on zoo models (built by
`tests.helpers.runner_engine`, the one engine builder)."""

from __future__ import annotations

import pytest

from fastpath import zoo
from tests.helpers import (
    ARCHITECTURES,
    CI_ARCHITECTURES,
    ci_or_slow,
    engine_kwargs,
    runner_engine,
)


@pytest.fixture(scope="session", params=ci_or_slow(ARCHITECTURES, CI_ARCHITECTURES))
def arch_llm(request, runner):
    """One engine per architecture; pytest groups the tests so one is alive at a time."""
    with runner_engine(str(zoo.get_model(request.param)), runner, **engine_kwargs()) as llm:
        llm.fastpath_name = request.param
        yield llm


@pytest.fixture(scope="session")
def llama_llm(runner):
    """The tiny Llama engine, shared across modules for the cheaper single-model tests."""
    with runner_engine(str(zoo.get_model("tiny-llama")), runner, **engine_kwargs()) as llm:
        yield llm
