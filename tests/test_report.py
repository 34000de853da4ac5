"""`fastpath report`: pytest-benchmark JSON -> results.csv, compare.csv and plots."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fastpath import cli
from fastpath.report import load_run, results_table, run_name


def _bench(path: str, seconds: float, objects: float, bytes_: float, model="8B twin") -> dict:
    return {
        "name": f"test_window[{path}]",
        "stats": {"median": seconds * 2},
        "extra_info": {"model": model, "path": path, "context_length": 2048, "stride": 512,
                       "tensor_parallel_size": 1, "device": "cpu", "vllm_version": "0.32.0",
                       "runner": "V1", "seconds_per_window": seconds,
                       "objects_per_window": objects, "bytes_per_window": bytes_},
    }


def _write(tmp_path, name: str, benches: list[dict]):
    path = tmp_path / name
    path.write_text(json.dumps({"benchmarks": benches + [{"name": "other", "stats": {},
                                                          "extra_info": {}}]}))
    return path


@pytest.fixture
def runs(tmp_path):
    base = _write(tmp_path, "0001_base.json", [
        _bench("fast", 0.5, 2, 2048), _bench("standard-k0", 5.0, 3000, 40000),
        _bench("standard-k1", 4.0, 5000, 60000)])
    new = _write(tmp_path, "0002_new.json", [
        _bench("fast", 0.6, 2, 2048), _bench("standard-k0", 5.0, 3000, 40000),
        _bench("standard-k1", 4.0, 5000, 90000)])
    return base, new


def test_run_name_follows_benchmark_save():
    from pathlib import Path

    assert run_name(Path("0003_cpu-baseline.json")) == "cpu-baseline"
    assert run_name(Path("bench.json")) == "bench"


def test_results_table_speedups(runs):
    table = results_table(load_run(runs[0]))
    fast = table[table["path"] == "fast"].iloc[0]
    assert fast["speedup_vs_standard-k0"] == pytest.approx(10.0)
    assert fast["speedup_vs_standard-k1"] == pytest.approx(8.0)
    assert len(table) == 3  # the benchmark without fastpath figures is left out


def test_cli_writes_csvs_plots_and_flags_regressions(runs, tmp_path, capsys):
    base, new = runs
    out = tmp_path / "out"
    assert cli.main(["report", str(new), "--baseline", str(base), "--threshold", "0.1",
                     "--out", str(out)]) == 0
    compare = pd.read_csv(out / "compare.csv").set_index("path")
    assert bool(compare.loc["fast", "regression"])
    assert compare.loc["fast", "regressions"] == "seconds_per_window"
    assert compare.loc["standard-k1", "regressions"] == "bytes_per_window"
    assert not bool(compare.loc["standard-k0", "regression"])
    assert compare.loc["fast", "seconds_per_window_ratio"] == pytest.approx(1.2)
    results = pd.read_csv(out / "results.csv")
    assert set(results["path"]) == {"fast", "standard-k0", "standard-k1"}
    for png in ("seconds_per_window.png", "objects_per_window.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "2 regression(s)" in capsys.readouterr().out


def test_run_without_fastpath_benchmarks_is_refused(tmp_path):
    empty = _write(tmp_path, "0001_empty.json", [])
    with pytest.raises(ValueError, match="no fastpath benchmarks"):
        load_run(empty)
