"""The zoo's bytes: the embedded default ships as a file (checked at every load), and the
random-init builds give the same bytes on every machine.

What each pin rests on (fastpath/zoo.py's docstring, docs/exactness.md):
- `trained-llama` is shipped: its sha256 is checked here on whatever machine runs the suite,
  and README's figure is scored on those bytes (tests/engine/test_perplexity.py). Its
  rebuild from the recipe gives those bytes only on the machine class they were made on
  (training amplifies vendor- and ISA-specific last bits), so that test names the class and
  skips elsewhere.
- `tiny-llama` (random init: serial random fills and a multiply by a power of two, no
  reduction, no matrix product) is built here; its sha256 was taken on an AVX2-only AMD EPYC
  and found the same on an Intel Xeon with AVX-512 and AMX and on an AMD EPYC with AVX-512.
"""

from __future__ import annotations

import json
import shutil

import pytest

from fastpath import zoo

TINY_LLAMA_SHA256 = "d064eb21d76e5ad0ca253fd38828d701b4ea69e6a50acc4dbf9b742fe26d95d8"

needs_pinned = pytest.mark.skipif(
    not zoo.pinned_numerics(),
    reason="the pinned build numerics need an x86-64 CPU with AVX2 and FMA; elsewhere a "
    "build runs unpinned and its bytes may differ")


def test_the_embedded_default_is_the_shipped_bytes():
    """What README's figure is scored on, on any machine: the shipped file, checked."""
    path = zoo.get_model(zoo.DEFAULT_MODEL)
    assert path == zoo.shipped_dir(zoo.DEFAULT_MODEL)
    meta = json.loads((path / "fastpath-zoo.json").read_text())
    assert zoo.weights_sha256(path) == zoo.SHIPPED_SHA256[zoo.DEFAULT_MODEL]
    assert meta["weights_sha256"] == zoo.SHIPPED_SHA256[zoo.DEFAULT_MODEL]
    assert meta["name"] == zoo.DEFAULT_MODEL and meta["train_steps"] > 0
    assert set(meta["made_on"]) == {"vendor", "cpu_family", "isa", "torch"}


def test_a_changed_shipped_file_is_refused_by_name(tmp_path, monkeypatch):
    """A damaged or replaced weights file (a Git LFS pointer, say) is never scored."""
    copy = tmp_path / zoo.DEFAULT_MODEL
    shutil.copytree(zoo.shipped_dir(zoo.DEFAULT_MODEL), copy)
    monkeypatch.setattr(zoo, "shipped_dir", lambda name: tmp_path / name)
    assert zoo.get_model(zoo.DEFAULT_MODEL) == copy
    (copy / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\n")
    with pytest.raises(zoo.ShippedModelError, match=r"sha256 \w+, not the pinned"):
        zoo.get_model(zoo.DEFAULT_MODEL)
    (copy / "model.safetensors").unlink()
    with pytest.raises(zoo.ShippedModelError, match=r"lacks \['model.safetensors'\]"):
        zoo.get_model(zoo.DEFAULT_MODEL)


@needs_pinned
def test_a_random_init_build_is_the_pinned_bytes():
    path = zoo.get_model("tiny-llama")
    meta = json.loads((path / "fastpath-zoo.json").read_text())
    assert meta["pinned"] and meta["build_numerics"] == zoo.BUILD_NUMERICS
    assert zoo.weights_sha256(path) == meta["weights_sha256"] == TINY_LLAMA_SHA256


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
    assert zoo.weights_sha256(zoo.get_model("tiny-llama")) == TINY_LLAMA_SHA256


@needs_pinned
@pytest.mark.slow
@pytest.mark.skipif(
    zoo.machine_class() != zoo.shipped_made_on(zoo.DEFAULT_MODEL),
    reason="machine-class-bound: the recipe gives the shipped trained-llama bytes only on the "
    "machine class they were made on (vendor, CPU family, vector ISA, torch build: "
    "fastpath/data/models/trained-llama/fastpath-zoo.json, made_on); training amplifies the "
    "last bits of kernels that differ by vendor and ISA, so elsewhere other bytes are expected")
def test_the_recipe_rebuilds_the_shipped_bytes_on_their_machine_class(tmp_path, monkeypatch):
    """The recipe that made the shipped default is still the one in the code. About 2 min."""
    monkeypatch.setenv("FASTPATH_ZOO_DIR", str(tmp_path))
    path = zoo.recipe_build(zoo.DEFAULT_MODEL)
    assert path != zoo.shipped_dir(zoo.DEFAULT_MODEL)
    assert zoo.weights_sha256(path) == zoo.SHIPPED_SHA256[zoo.DEFAULT_MODEL], \
        zoo.rebuild_report(zoo.DEFAULT_MODEL, path)
    for file in ("tokenizer.json", "config.json"):
        assert (path / file).read_bytes() == (zoo.shipped_dir(zoo.DEFAULT_MODEL) / file
                                              ).read_bytes(), file


def test_rebuild_report_says_whether_other_bytes_are_expected(tmp_path, monkeypatch):
    """Off the shipped bytes' machine class, a rebuild that differs says so is expected."""
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    other = {"vendor": "GenuineIntel", "cpu_family": "6", "isa": "avx512+amx", "torch": "x"}
    monkeypatch.setattr(zoo, "machine_class", lambda: other)
    report = zoo.rebuild_report(zoo.DEFAULT_MODEL, tmp_path)
    assert "other bytes are expected" in report and "GenuineIntel family 6" in report
    monkeypatch.setattr(zoo, "machine_class", lambda: zoo.shipped_made_on(zoo.DEFAULT_MODEL))
    assert "the recipe or its dependencies changed" in zoo.rebuild_report(zoo.DEFAULT_MODEL,
                                                                          tmp_path)


def test_unknown_model_is_refused_by_name():
    with pytest.raises(KeyError, match="unknown zoo model 'no-such-model'"):
        zoo.get_model("no-such-model")
