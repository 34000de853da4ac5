"""What the tests share, in one module (never imported from `conftest` or a test module):
engine settings and the one engine builder, random prompts, the bitwise assertion, real
`fastpath serve` processes, the row-subset sweep plans, and the rule that marks a
parameter slow unless CI keeps it.

Each server runs in its own process group (API server, engine core, workers), so it is
stopped, or killed to simulate a crash, as a whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fastpath import zoo
from fastpath.cli.common import LOG_LEVEL_ENV
from fastpath.engine import scoring
from fastpath.metrics.perplexity import bitwise_mismatches
from fastpath.testing import rowsweep, v2cpu

ROOT = Path(__file__).resolve().parents[1]  # the repository root

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


def ci_or_slow(values: Iterable[Any], kept_in_ci: Iterable[Any],
               ids: Any = None) -> list[Any]:
    """`pytest.param`s of `values` (a tuple is one value per argument name), each marked
    `slow` unless CI keeps it (`kept_in_ci` holds values, or their `ids`); the nightly and
    `-m correctness` run them all."""
    kept = set(kept_in_ci)
    params = []
    for value in values:
        name = value if ids is None else ids(value)
        marks = [] if name in kept else [pytest.mark.slow]
        args = value if isinstance(value, tuple) else (value,)
        params.append(pytest.param(*args, id=None if ids is None else name, marks=marks))
    return params


# ---------------------------------------------------------------- servers

START_TIMEOUT = 600.0  # seconds: ~30 s on an idle 2-core machine, minutes when it is shared
VLLM_INFO_LINE = re.compile(r"^\(\w+ pid=\d+\) INFO ", re.MULTILINE)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """One `python -m fastpath.cli serve MODEL ...` process group, its URL and its log."""

    def __init__(self, model: str, flags: Sequence[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, "-m", "fastpath.cli", "serve", model, "--host", "127.0.0.1",
                   "--port", str(self.port), *flags]
        # The level an in-process `fastpath` command of an earlier test left in os.environ
        # would pass for the user's own and silence -v: servers start from the user's env.
        inherited = {k: v for k, v in os.environ.items() if k != LOG_LEVEL_ENV}
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True,
                                            env={**inherited, **(env or {})})

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT, also: Sequence[Server] = ()) -> None:
        """Until /health answers 200; fails with the log's tail if the process, or one of
        `also` it needs (a `--headless` node holding some of its engines), dies first."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for server in (self, *also):
                if server.process.poll() is not None:
                    raise RuntimeError(f"fastpath serve exited with "
                                       f"{server.process.returncode}:\n"
                                       f"{server.log_text()[-4000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"fastpath serve not ready after {timeout} s:\n"
                           f"{self.log_text()[-4000:]}")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """SIGTERM the group, then SIGKILL whatever is left after 60 s."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=60)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # workers that outlived the server


@contextlib.contextmanager
def running(model: str, flags: Sequence[str], log: Path, **kwargs) -> Iterator[Server]:
    """A ready server for the duration of the block; always stopped."""
    server = Server(model, flags, log, **kwargs)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- row-subset sweeps

SHAPES = sorted({(spec.hidden_size, spec.vocab_size) for spec in zoo.ZOO.values()})
ROW_CHUNK = 1024  # FASTPATH_SCORE_CHUNK_ROWS' default off CPU; CPU's (64) is among COUNTS and
# the big shapes' runs below
EPS32 = 2.0**-23


def cpu_plan(hidden: int, vocab: int, chunk: int = 256) -> dict:
    """Subsets for a CPU run: every one at the small shape, the key ones at the big vocabularies.

    The big shapes take `chunk + 1` rows: two chunks, the second a lone row.
    """
    if hidden * vocab <= 1 << 20:
        return {"rows": 2047, "chunk": ROW_CHUNK, "counts": rowsweep.COUNTS,
                "count_starts": "edges"}
    return {"rows": chunk + 1, "chunk": chunk, "counts": (2, 3, 8, 64, 255),
            "count_starts": "one"}


def shape_id(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def describe(report: dict, key: str = "mismatches") -> str:
    items = report[key]
    return f"{rowsweep.summary(report)}; first: {json.dumps(items[:5])}"


def lm_eval_cli(model: str, model_args: str, tasks: Sequence[str], tasks_dir: str, out: Path,
                timeout: float) -> dict[str, Any]:
    """`fastpath lm-eval` (lm-eval's command line) in a subprocess at the repository root
    (task YAMLs name their data from there): the samples it saved, by task, and its results.
    `timeout` is a hang guard."""
    result = subprocess.run(
        [sys.executable, "-m", "fastpath.cli", "lm-eval", "--model", model, "--model_args",
         model_args, "--tasks", ",".join(tasks), "--include_path", tasks_dir,
         "--output_path", str(out), "--log_samples"],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    samples = {}
    for task in tasks:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    (results,) = out.rglob("results_*.json")
    return {"samples": samples, "results": json.loads(results.read_text())["results"]}


def answers(samples: list[dict]) -> tuple[np.ndarray, list]:
    """(log-likelihoods as float64, is_greedy or None) of every request, by doc then choice.

    Works on in-process samples (floats, tuples) and on saved ones (lm-eval writes str()).
    """
    lls, greedy = [], []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            value = resp[0]
            if isinstance(value, (tuple, list)):
                lls.append(float(value[0]))
                greedy.append(str(value[1]) == "True")
            else:
                lls.append(float(value))
                greedy.append(None)
    return np.array(lls, dtype=np.float64), greedy


def assert_same_float64(a: np.ndarray, b: np.ndarray, what: str) -> None:
    """Equal float64 bit patterns: lm-eval's sums are Python floats."""
    assert a.shape == b.shape and a.size > 0, f"{what}: {a.shape} vs {b.shape}"
    a, b = np.ascontiguousarray(a, np.float64), np.ascontiguousarray(b, np.float64)
    mismatched = np.flatnonzero(a.view(np.int64) != b.view(np.int64))
    assert mismatched.size == 0, (
        f"{what}: {mismatched.size}/{a.size} log-likelihoods differ in bits, first at "
        f"{mismatched[:5].tolist()}, max |diff| {np.abs(a - b).max():.3e}")
