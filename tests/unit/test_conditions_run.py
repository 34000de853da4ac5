"""CI's `conditions` run skips, with the reason, only what would repeat the main run: a
forced build that is this CPU's own, on quiet cores (conftest.skip_repeated_conditions)."""

from __future__ import annotations

import types

import pytest

import conftest
from fastpath.testing import kernels


def item(*markers: str) -> types.SimpleNamespace:
    """A stand-in test item: its markers and the ones added to it."""
    added: list = []
    return types.SimpleNamespace(
        get_closest_marker=lambda name: name if name in markers else None,
        add_marker=added.append, added=added)


def config(isa: str, busy: int) -> types.SimpleNamespace:
    return types.SimpleNamespace(getoption=lambda name: {"cpu_isa": isa}[name],
                                 fastpath_busy_cores=busy)


@pytest.mark.parametrize("own", ["avx2", "avx512"])
@pytest.mark.parametrize("isa, busy", [("native", 0), ("avx2", 0), ("avx512", 0),
                                       ("avx2", 2)])
def test_only_a_repeat_is_skipped(monkeypatch: pytest.MonkeyPatch, own: str, isa: str,
                                  busy: int) -> None:
    monkeypatch.setattr(kernels, "native_build", lambda: own)
    marked, other = item("conditions"), item()
    conftest.skip_repeated_conditions(config(isa, busy), [marked, other])
    repeat = isa == own and busy == 0
    assert [m.mark.name for m in marked.added] == (["skip"] if repeat else [])
    assert other.added == []
    if repeat:
        assert f"--cpu-isa {isa} is this CPU's own kernel build" in marked.added[0].kwargs[
            "reason"]


def test_this_cpu_is_read() -> None:
    """avx512 exactly where /proc/cpuinfo has the flags vLLM's AVX-512 build needs."""
    flags = kernels.cpu_flags()
    expected = "avx512" if {"avx512f", "avx512bw", "avx512vl"} <= flags else "avx2"
    assert kernels.native_build() == expected
