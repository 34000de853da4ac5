"""The schedule cannot change a bit on an isolated engine, and the machine conditions the
suite can be run under (a forced kernel build, busy cores) really reach the engine.

On a batched engine a row's bits may depend on which steps it shared and where its prompt
was split (vLLM's CPU attention tiles a prefill by where its chunk starts:
docs/exactness.md); fastpath's default schedule runs each request alone in its step, whole,
so its bits are a function of the request. Shown here on a 400-token prompt (past the CPU
attention's first 224-row tile): alone; after other requests queued before it; sent while
the engine already steps through others (no pause); and added while it is busy with a
flood of long requests.
"""

from __future__ import annotations

import os
import time

import numpy as np
import psutil
import pytest

from fastpath import zoo
from fastpath.engine import scoring
from fastpath.engine.scoring import ScoreRequest, fast_prompt, score
from fastpath.testing import kernels
from tests.helpers import assert_bitwise_equal, isolated_engine_kwargs, random_prompt, runner_engine

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def isolated_llm():
    with runner_engine(str(zoo.get_model(MODEL)), "v1", **isolated_engine_kwargs()) as llm:
        yield llm


def _prompts(llm, seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    vocab = llm.llm_engine.model_config.get_vocab_size()
    return [random_prompt(rng, n, vocab) for n in lengths]


def _assert_starts_equal_standard(llm, seed: int, lengths, starts, what: str) -> None:
    """Fast requests with these starts against the standard path's full prompts, each
    alone in its step (isolated engine): bit for bit from each start on."""
    prompts = _prompts(llm, seed, lengths)
    fast = score(llm, [ScoreRequest(p, p[s + 1:], start=s) for p, s in zip(prompts, starts)],
                 "fast")
    standard = score(llm, [ScoreRequest(p, p[1:]) for p in prompts], "standard")
    for got, reference, start in zip(fast, standard, starts, strict=True):
        assert_bitwise_equal(got, reference[start:], what=f"{what} start={start}")


@pytest.mark.correctness
@pytest.mark.engine
@pytest.mark.conditions
@pytest.mark.parametrize("path", ["fast", "standard"])
def test_isolated_bits_do_not_depend_on_company_or_arrival(isolated_llm, path):
    (prompt,) = _prompts(isolated_llm, 30, [400])
    request = ScoreRequest(prompt, prompt[1:])
    others = [ScoreRequest(p, p[1:]) for p in _prompts(isolated_llm, 31, [300, 17, 500, 2, 233])]
    assert scoring.schedule_mode(isolated_llm.llm_engine.vllm_config.scheduler_config) \
        == "isolated"
    (alone,) = score(isolated_llm, [request], path)

    queued = score(isolated_llm, [*others[:3], request, *others[3:]], path)
    assert_bitwise_equal(queued[3], alone, what=f"{path}: queued behind others")

    # Not paused: LLM.generate sends the requests one by one while the engine steps.
    requests = [others[4], request, *others[:4]]
    prompts = [fast_prompt(r) if path == "fast" else {"prompt_token_ids": r.prompt_token_ids}
               for r in requests]
    outputs = isolated_llm.generate(prompts, scoring.scoring_params(path), use_tqdm=False)
    (streamed,) = scoring.read_logprobs(outputs[1:2], requests[1:2], path)
    assert_bitwise_equal(streamed, alone, what=f"{path}: arriving while others run")

    # The engine busy with other requests; this one arrives while they are being computed.
    engine = isolated_llm.llm_engine
    params = scoring.scoring_params(path)
    for i, other in enumerate(_prompts(isolated_llm, 32, [450] * 6)):
        engine.add_request(f"flood-{path}-{i}", {"prompt_token_ids": other}, params)
    engine.step()
    engine.add_request(f"mid-flood-{path}", prompts[1], params)
    found = []
    while engine.has_unfinished_requests():
        found.extend(o for o in engine.step() if o.request_id == f"mid-flood-{path}")
    (mid,) = scoring.read_logprobs([o for o in found if o.finished], [request], path)
    assert_bitwise_equal(mid, alone, what=f"{path}: arriving while the engine is busy")


@pytest.mark.correctness
@pytest.mark.engine
@pytest.mark.conditions
def test_exactness_report_names_the_modes(isolated_llm):
    report = scoring.exactness(isolated_llm)
    assert report["schedule"] == "isolated" and "by construction" in report["schedule_detail"]
    (worker,) = report["workers"]
    assert worker["runner"] == "V1" and worker["lm_head_rows"] in ("verified", "construction")
    probe = worker["probe"]
    assert probe["piece_sizes"] == f"2-{worker['chunk_rows']}" and probe["subsets_checked"] > 2
    assert report["lm_head_rows"] == worker["lm_head_rows"]


@pytest.mark.correctness
@pytest.mark.engine
def test_by_construction_mode_equals_standard(monkeypatch):
    """FASTPATH_EXACTNESS=construction (what a failed probe falls back to): the standard
    path's rows in one call, and still the standard bits, with and without a start."""
    monkeypatch.setenv("FASTPATH_EXACTNESS", "construction")
    with runner_engine(str(zoo.get_model(MODEL)), "v1", **isolated_engine_kwargs()) as llm:
        report = scoring.exactness(llm)
        assert report["lm_head_rows"] == "construction"
        assert "FASTPATH_EXACTNESS=construction" in report["workers"][0]["reason"]
        _assert_starts_equal_standard(llm, 33, [300, 150], (0, 100), what="construction")


@pytest.mark.correctness
@pytest.mark.engine
@pytest.mark.slow
def test_oneDNN_without_avx2_the_probe_decides_and_bits_hold(monkeypatch, record_property):
    """oneDNN capped at AVX (its GEMMs then round a row by the step's size on the machine
    this was written on: the probe failed there and the runner fell back to construction):
    whatever the probe finds, fast == standard for the same schedule, starts included."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX")
    with runner_engine(str(zoo.get_model(MODEL)), "v1", **isolated_engine_kwargs()) as llm:
        (worker,) = scoring.exactness(llm)["workers"]
        probe = worker["probe"]
        assert worker["lm_head_rows"] == ("verified" if probe["exact"] else "construction")
        record_property("onednn_avx_lm_head_rows", worker["lm_head_rows"])
        record_property("onednn_avx_reason", worker["reason"])
        _assert_starts_equal_standard(llm, 34, [300, 150, 90], (0, 70, 88), what="oneDNN AVX")


@pytest.mark.engine
def test_schedule_mode_is_read_from_the_engine_config():
    from types import SimpleNamespace as Config

    assert scoring.schedule_mode(Config(max_num_seqs=1, enable_chunked_prefill=False)) \
        == "isolated"
    for batched in (Config(max_num_seqs=8, enable_chunked_prefill=False),
                    Config(max_num_seqs=1, enable_chunked_prefill=True)):
        assert scoring.schedule_mode(batched) == "batched"


@pytest.mark.engine
@pytest.mark.conditions
def test_forced_kernel_build_reaches_the_workers(isolated_llm, request):
    """Under --cpu-isa X the workers load vLLM's X build and PyTorch's X kernels; natively,
    the build vLLM picks for this CPU."""
    isa = request.config.getoption("cpu_isa")
    (worker,) = scoring.exactness(isolated_llm)["workers"]
    found = worker["kernels"]
    if isa == "native":
        flags = kernels.cpu_flags()
        expected = ("_C" if "avx512_bf16" in flags else "_C_AVX512") if "avx512f" in flags \
            else "_C_AVX2"
    else:
        expected = kernels.VLLM_LIBRARY[isa]
        assert found["aten"].lower() == isa, found
    assert found["vllm_cpu_library"] == [expected], found


def test_forcing_an_instruction_set_the_cpu_lacks_is_refused():
    flags = kernels.cpu_flags()
    missing = [isa for isa in ("avx2", "avx512") if not set(kernels.REQUIRED_FLAGS[isa]) <= flags]
    with pytest.raises(ValueError, match="FASTPATH_CPU_ISA must be one of"):
        kernels.check_isa("sse2")
    for isa in missing:
        with pytest.raises(kernels.IsaUnavailable, match="forced down, not up"):
            kernels.isa_env(isa)
    env = kernels.isa_env("avx2") if "avx2" in flags else {}
    if env:
        assert env["ATEN_CPU_CAPABILITY"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"
        assert env["PYTHONPATH"].split(os.pathsep)[0] == str(kernels.SITE_DIR)
        assert env["TORCHINDUCTOR_CACHE_DIR"].endswith("-fastpath-avx2")
        assert env["VLLM_CACHE_ROOT"].endswith("-fastpath-avx2")


def test_busy_cores_really_work_and_stop():
    """Each busy process burns CPU (0.3 s of it, however long a loaded machine takes to give
    it that: up to 120 s), and none is left after the block."""
    with kernels.busy(2) as pids:
        assert len(pids) == 2
        deadline = time.monotonic() + 120
        used = [0.0, 0.0]
        while time.monotonic() < deadline and not all(u > 0.3 for u in used):
            time.sleep(0.5)
            used = [psutil.Process(pid).cpu_times().user for pid in pids]
    assert all(u > 0.3 for u in used), used
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"
                   for pid in pids)
    assert kernels.busy_cores_setting("all") == os.cpu_count()
    with pytest.raises(ValueError, match="--busy-cores"):
        kernels.busy_cores_setting("many")


# Counts vLLM's compiled `batched_count_greater_than` (the standard path's prompt-logprob
# ranks) gives in a fresh process, against the plain count; the second call, with another
# row count, makes inductor compile the dynamic-shape kernel.
_COUNT_SCRIPT = """
import json
import torch
torch.set_num_threads(1)
from vllm.v1.sample.ops.logprobs import batched_count_greater_than
generator = torch.Generator().manual_seed(0)
wrong = 0
for rows in (5, 7, 9, 3):
    scores = torch.randn(rows, 2048, generator=generator).log_softmax(-1)
    values = scores[:, 7:8]
    wrong += int((batched_count_greater_than(scores, values) != (scores >= values).sum(-1)).sum())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "wrong": wrong}))
"""


def _count_in_subprocess(env: dict[str, str]) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _COUNT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_forced_run_does_not_load_kernels_compiled_for_another_isa(tmp_path, record_property):
    """PyTorch's inductor cache is not keyed by the vector ISA (ATEN_CPU_CAPABILITY): a kernel
    compiled natively and loaded under forced AVX2 counts wrong (vLLM's prompt-logprob ranks
    off by up to the vocabulary size). A forced run therefore keeps caches of its own, as a
    real AVX2 machine would: after a native run fills the usual cache, the forced run's
    counts are right. The same two runs sharing one cache are measured and reported."""
    if not set(kernels.REQUIRED_FLAGS["avx512"]) <= kernels.cpu_flags():
        pytest.skip("needs a CPU with AVX-512: only there is AVX2 a forced, different ISA")
    base = {k: v for k, v in os.environ.items() if k not in kernels.isa_cache_dirs("avx2")
            and k not in kernels.LIBRARY_CAPS["avx2"] and k != kernels.ISA_ENV}
    base["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    base["PYTHONPATH"] = os.pathsep.join(p for p in [str(kernels.SITE_DIR.parent.parent),
                                                      base.get("PYTHONPATH", "")] if p)
    native = _count_in_subprocess(base)
    assert native["wrong"] == 0, native
    with pytest.MonkeyPatch.context() as patch:  # isa_env reads the caller's environment
        patch.setattr(os, "environ", dict(base))
        forced_env = {**base, **kernels.isa_env("avx2")}
    assert forced_env["TORCHINDUCTOR_CACHE_DIR"] != base["TORCHINDUCTOR_CACHE_DIR"]
    forced = _count_in_subprocess(forced_env)
    shared = _count_in_subprocess({**forced_env,
                                   "TORCHINDUCTOR_CACHE_DIR": base["TORCHINDUCTOR_CACHE_DIR"]})
    record_property("shared_cache_wrong_counts", shared["wrong"])
    record_property("native_capability", native["capability"])
    record_property("native_wrong_counts", native["wrong"])
    record_property("forced_capability", forced["capability"])
    record_property("forced_wrong_counts", forced["wrong"])
    record_property("shared_cache_capability", shared["capability"])
    record_property("counts_per_run", 24)
    assert forced["capability"] == "AVX2" and forced["wrong"] == 0, forced
