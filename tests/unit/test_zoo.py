"""The zoo's checkpoints (the embedded default among them) are the same bytes on every
machine: built in a child process with pinned numerics (fastpath/zoo.py, BUILD_NUMERICS),
whatever kernels and thread count the caller's machine and environment would pick.

tiny-llama's sha256 (random init, no matrix product) was taken on an AVX2-only AMD EPYC and
is the same on an Intel Xeon with AVX-512 and AMX. trained-llama's was taken on that Intel
Xeon with MKL's COMPATIBLE branch: under the earlier `MKL_CBWR=AVX2,STRICT` the two machines
trained different weights (MKL honours that branch on Intel processors only and silently
runs its automatic choice elsewhere), and with them README's perplexity differed.
"""

from __future__ import annotations

import json

import pytest

from fastpath import zoo

PINNED_SHA256 = {
    "tiny-llama": "d064eb21d76e5ad0ca253fd38828d701b4ea69e6a50acc4dbf9b742fe26d95d8",
    "trained-llama": "5db830b3a1a60ace0dc9228085ebcedbabb4a0672352bbdffc15ba70f25c4e69",
}

needs_pinned = pytest.mark.skipif(
    not zoo.pinned_numerics(),
    reason="the pinned build numerics need an x86-64 CPU with AVX2 and FMA; elsewhere a "
    "build runs unpinned and its bytes may differ")


@needs_pinned
@pytest.mark.parametrize("name", sorted(PINNED_SHA256))
def test_build_is_the_pinned_bytes(name):
    path = zoo.get_model(name)
    meta = json.loads((path / "fastpath-zoo.json").read_text())
    assert meta["pinned"] and meta["build_numerics"] == zoo.BUILD_NUMERICS
    assert zoo.weights_sha256(path) == meta["weights_sha256"] == PINNED_SHA256[name]


@needs_pinned
@pytest.mark.parametrize("caller", [
    {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"},
    {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "OMP_NUM_THREADS": "3",
     "MKL_CBWR": "COMPATIBLE"},
], ids=["scalar-aten-1-thread", "sse-mkl-3-threads"])
def test_build_does_not_depend_on_the_callers_kernels_or_threads(tmp_path, monkeypatch, caller):
    """A fresh build with the caller's environment asking for other kernels and threads:
    the same bytes (without the pinning, `default` PyTorch kernels gave other weights)."""
    for key, value in caller.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FASTPATH_ZOO_DIR", str(tmp_path))
    assert zoo.weights_sha256(zoo.get_model("tiny-llama")) == PINNED_SHA256["tiny-llama"]


@needs_pinned
@pytest.mark.slow
@pytest.mark.parametrize("instructions", ["SSE4_2", "AVX512"])
def test_training_does_not_depend_on_the_instructions_mkl_may_use(tmp_path, monkeypatch,
                                                                 instructions):
    """trained-llama (the one build with matrix products) with MKL allowed other instruction
    sets than the pin's, as on a CPU that MKL would dispatch differently: the same bytes, since
    the COMPATIBLE branch runs the same code whatever the CPU offers. About 2 minutes each."""
    monkeypatch.setattr(zoo, "BUILD_NUMERICS",
                        {**zoo.BUILD_NUMERICS, "MKL_ENABLE_INSTRUCTIONS": instructions})
    monkeypatch.setenv("FASTPATH_ZOO_DIR", str(tmp_path))
    assert zoo.weights_sha256(zoo.get_model("trained-llama")) == PINNED_SHA256["trained-llama"]


def test_unknown_model_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown zoo model 'no-such-model'"):
        zoo.get_model("no-such-model")
