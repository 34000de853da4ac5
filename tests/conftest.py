"""Engine fixtures shared by the test modules: real vLLM engines on zoo models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fastpath import scoring, zoo
from fastpath.perplexity import bitwise_mismatches
from fastpath.testing import v2cpu

ARCHITECTURES = ("tiny-llama", "tiny-opt", "tiny-qwen2", "tiny-gpt2")
CHUNK = 64  # max_num_batched_tokens: prompts longer than this are prefilled in chunks


def engine_kwargs(**overrides):
    """Batched test engines: requests share steps, chunked prefill forced by a small token
    budget, prefix caching on. A row's bits may depend on this schedule (CPU attention
    tiles a prefill by where its chunk starts), so a bitwise comparison on such an engine
    compares batches the scheduler lays out alike: the same prompt lengths in the same
    order, submitted together (`scoring.submit_together`) on an idle engine."""
    kwargs = dict(
        dtype="float32",  # also on GPU runners: the transformers bounds are fp32 bounds
        max_model_len=512,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=16,
        enable_chunked_prefill=True,
        enable_prefix_caching=True,
        kv_cache_memory_bytes=128 << 20,
    )
    kwargs.update(overrides)
    return kwargs


def isolated_engine_kwargs(**overrides):
    """Isolated test engines (fastpath's default schedule): one request per step, prompts
    never split, so a request's bits do not depend on what else runs or when it arrives;
    comparisons across schedules (arrival order, server against offline) use these."""
    kwargs = engine_kwargs(max_num_batched_tokens=None, **scoring.ISOLATED_SCHEDULE)
    kwargs.update(overrides)
    return kwargs


@contextlib.contextmanager
def runner_engine(model: str, runner: str, **kwargs: Any) -> Iterator[Any]:
    """An engine on `runner` (see the `runner` fixture); a skip with the reason where vLLM's
    V2 runner cannot start here, never a test that passes on V1 while claiming V2."""
    with contextlib.ExitStack() as stack:
        try:
            llm = stack.enter_context(v2cpu.engine(model, runner, **kwargs))
        except v2cpu.V2Unavailable as error:
            pytest.skip(f"V2 runner did not start: {error}")
        yield llm


# CI's test run keeps Llama (the default architecture) and GPT-2 (tied embeddings, another
# tokenizer); OPT and Qwen2 are slow: the nightly and `-m correctness` run all four.
CI_ARCHITECTURES = ("tiny-llama", "tiny-gpt2")


@pytest.fixture(scope="session", params=[
    pytest.param(arch, marks=[] if arch in CI_ARCHITECTURES else [pytest.mark.slow])
    for arch in ARCHITECTURES])
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


def vocab_size(llm) -> int:
    return llm.llm_engine.model_config.get_vocab_size()


def random_prompt(rng: np.random.Generator, length: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, length).tolist()


def assert_bitwise_equal(fast: np.ndarray, reference: np.ndarray, *, what: str) -> None:
    """Equal float32 bit patterns everywhere, else one message with every mismatch."""
    fast = np.ascontiguousarray(fast, dtype=np.float32)
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    assert fast.shape == reference.shape, f"{what}: shape {fast.shape} != {reference.shape}"
    flat_fast, flat_reference = fast.ravel(), reference.ravel()
    mismatched = bitwise_mismatches(flat_fast, flat_reference)
    if mismatched.size:
        diff = np.abs(flat_fast[mismatched].astype(np.float64) - flat_reference[mismatched])
        raise AssertionError(
            f"{what}: {mismatched.size}/{fast.size} values differ in bits; positions "
            f"{mismatched[:10].tolist()}, max |diff| {diff.max():.3e}"
        )
