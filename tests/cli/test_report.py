"""`fastpath report`: pytest-benchmark JSON -> results.csv, compare.csv and plots."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fastpath import cli
from fastpath.tools.report import load_run, results_table, run_name


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


def _memory_bench(step: int, path: str, chunk: str, peak: int) -> dict:
    return {"name": f"test_step_memory[step{step}-{chunk}-{path}]", "stats": {"median": 1.0},
            "extra_info": {"table": "memory", "model": "8B twin", "path": path,
                           "chunk_setting": chunk, "step_tokens": step, "device": "cpu",
                           "scored_rows": step - 1, "peak_step_bytes": peak,
                           "memory_kind": "worker_rss_hwm", "seconds_per_step": 1.0}}


def _peer_bench(peer: str, tokens_per_second: float, seconds: float) -> dict:
    return {"name": f"test_peer[{peer}]", "stats": {"median": seconds},
            "extra_info": {"table": "peers", "peer": peer, "model": "8B twin", "device": "cpu",
                           "context_length": 2048, "scored_tokens": 8000, "seconds": seconds,
                           "tokens_per_second": tokens_per_second, "perplexity": 100.0}}


def test_whole_window_and_floor_ratios(tmp_path, capsys):
    """time_vs_floor / time_vs_standard-k0 per row, and the printed whole-window line."""
    whole = [_bench("fast", 2.0, 2, 8188), _bench("standard-k0", 4.0, 3000, 9000),
             _bench("floor", 1.6, 0, 8188)]
    for bench in whole:
        bench["extra_info"]["stride"] = 2048
    run = _write(tmp_path, "0001_whole.json", whole + [_bench("fast", 0.5, 2, 2048)])
    table = results_table(load_run(run)).set_index(["path", "stride"])
    assert table.loc[("fast", 2048), "time_vs_standard-k0"] == pytest.approx(0.5)
    assert table.loc[("fast", 2048), "time_vs_floor"] == pytest.approx(1.25)
    assert pd.isna(table.loc[("fast", 512), "time_vs_floor"])  # no floor at that shape
    assert cli.main(["report", str(run), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "ctx 2048 stride 2048 (whole window): fast/K=0 0.50x, fast/floor 1.25x" in printed


def test_memory_and_peers_tables(tmp_path, capsys):
    """memory.csv (extra over prefill) and peers.csv (fastpath speed-up) with their plots."""
    run = _write(tmp_path, "0001_mixed.json", [
        _memory_bench(2048, "prefill", "default", 100), _memory_bench(2048, "fast", "default", 600),
        _memory_bench(2048, "fast", "unchunked", 2100),
        _memory_bench(8192, "prefill", "default", 300),
        _memory_bench(8192, "fast", "unchunked", 8300),
        _peer_bench("hf-transformers", 1000.0, 8.0), _peer_bench("lm-eval-vllm", 500.0, 16.0),
        _peer_bench("fastpath-ppl", 2000.0, 4.0)])
    out = tmp_path / "out"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    memory = pd.read_csv(out / "memory.csv").set_index(["step_tokens", "path", "chunk_setting"])
    assert memory.loc[(2048, "fast", "unchunked"), "peak_over_prefill_bytes"] == 2000
    assert memory.loc[(8192, "fast", "unchunked"), "peak_over_prefill_bytes"] == 8000
    assert memory.loc[(2048, "prefill", "default"), "peak_over_prefill_bytes"] == 0
    peers = pd.read_csv(out / "peers.csv").set_index("peer")
    assert peers.loc["hf-transformers", "fastpath_speedup_tokens_per_s"] == pytest.approx(2.0)
    assert peers.loc["lm-eval-vllm", "fastpath_speedup_tokens_per_s"] == pytest.approx(4.0)
    assert peers.loc["lm-eval-vllm", "seconds_vs_fastpath"] == pytest.approx(4.0)
    assert peers.loc["fastpath-ppl", "fastpath_speedup_tokens_per_s"] == pytest.approx(1.0)
    for png in ("memory.png", "peers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "results.csv").exists()  # no scoring rows in this run
    assert "lm-eval-vllm 500 tokens/s (fastpath 4.00x)" in capsys.readouterr().out


def _mode(schedule: str, rows: str, seconds: float, stride: int = 512) -> dict:
    return {"name": f"test_mode[{schedule}-{rows}]", "stats": {"median": seconds * 4},
            "extra_info": {"table": "modes", "model": "8B", "context_length": 2048,
                           "stride": stride, "schedule": schedule, "lm_head_rows": rows,
                           "seconds_per_window": seconds, "probe_seconds": 14.0,
                           "windows": 4}}


def test_modes_csv_gives_each_mode_against_the_default(tmp_path, capsys):
    path = _write(tmp_path, "0003_modes.json", [
        _mode("isolated", "verified", 1.0), _mode("batched", "verified", 1.1),
        _mode("isolated", "construction", 5.0), _mode("isolated", "verified", 3.0, 2048),
        _mode("isolated", "construction", 6.0, 2048)])
    assert cli.main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "modes.csv")
    ratio = {(r.schedule, r.lm_head_rows, r.stride): r.time_vs_default for r in table.itertuples()}
    assert ratio == {("isolated", "verified", 512): 1.0, ("batched", "verified", 512): 1.1,
                     ("isolated", "construction", 512): 5.0,
                     ("isolated", "verified", 2048): 1.0,
                     ("isolated", "construction", 2048): 2.0}
    assert (tmp_path / "out" / "modes.png").stat().st_size > 0
    assert "isolated / construction 5.000 s/window (5.00x)" in capsys.readouterr().out


def _lm_eval(backend: str, seconds: float, model: str = "8B twin") -> dict:
    return {"name": f"test_lm_eval[{backend}]", "stats": {"median": seconds},
            "extra_info": {"table": "lm_eval", "backend": backend, "model": model,
                           "device": "cpu", "tasks": "a,b", "requests": 116}}


def test_lm_eval_csv_gives_each_backend_against_the_references(tmp_path, capsys):
    """lm_eval.csv: every backend's time over lm-eval's vllm, fastpath-vllm and
    local-completions on vLLM's server, within one run and model; a plot beside it."""
    path = _write(tmp_path, "0004_lm-eval.json", [
        _lm_eval("vllm", 20.0), _lm_eval("fastpath-vllm", 10.0),
        _lm_eval("local-completions@vllm-serve", 40.0),
        _lm_eval("local-completions@fastpath-serve", 16.0),
        _lm_eval("vllm", 7.0, model="OPT twin")])  # another model: its own references
    assert cli.main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "lm_eval.csv").set_index(["model", "backend"])
    served = table.loc[("8B twin", "local-completions@fastpath-serve")]
    assert served["seconds"] == 16.0
    assert served["seconds_vs_local-completions@vllm-serve"] == pytest.approx(0.4)
    assert served["seconds_vs_fastpath-vllm"] == pytest.approx(1.6)
    assert served["seconds_vs_vllm"] == pytest.approx(0.8)
    assert table.loc[("8B twin", "fastpath-vllm"), "seconds_vs_vllm"] == pytest.approx(0.5)
    other = table.loc[("OPT twin", "vllm")]
    assert other["seconds_vs_vllm"] == 1.0 and pd.isna(other["seconds_vs_fastpath-vllm"])
    assert (tmp_path / "out" / "lm_eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert ("local-completions@fastpath-serve 16.0 s (time vs vllm 0.80x, fastpath-vllm "
            "1.60x, local-completions@vllm-serve 0.40x)") in printed
