"""Benchmark JSON (pytest-benchmark's own files) -> CSVs and plots, with pandas and matplotlib.

- `results.csv`: one row per (run, model, path, context, stride, TP, device) with the
  figures each benchmark stored in `extra_info`, the speed-up over each standard path
  measured in the same run, and the time relative to the floor and to `standard-k0`
  (`time_vs_floor`, `time_vs_standard-k0`); the whole-window and TP 2 ratios are printed.
- `compare.csv` (with `--baseline`): the same rows of two runs side by side, flagging a
  regression where time, objects or bytes grew by more than `--threshold`.
- `seconds_per_window.png`, `objects_per_window.png`: log-scale bars by path and model.
- `memory.csv`, `memory.png` (benchmarks/test_memory.py): peak worker memory of one
  scoring step by step size, path and chunk setting, and the extra over `prefill`.
- `peers.csv`, `peers.png` (benchmarks/test_peers.py): tokens/s per peer, and fastpath's
  speed-up over each peer in the same run.
- `lm_eval.csv`, `lm_eval.png` (benchmarks/test_lm_eval.py): lm-eval's wall time per
  backend (offline `vllm` and `fastpath-vllm`; `local-completions` against vLLM's server and
  against fastpath serve), each relative to lm-eval's `vllm` backend, to `fastpath-vllm` and
  to `local-completions` on vLLM's server of the same run and model.
Rows are told apart by `extra_info["table"]` ("memory", "peers", "modes", "lm_eval";
absent: results).


`fastpath kld --json` reports (recognised by `"kind": "fastpath-kld"`) give the KLD family,
so several quantizations of one base model compare side by side:
- `kld.csv`: one row per run: model, base, convention, window shape, K, every statistic
  (percentiles as `kld_p99.9`, ...), base file bytes per token, seconds per pass;
- `kld_histogram.png`: the per-token KLD histogram of each run (log bins, stored in the
  report itself), one line per model;
- `kld_percentiles.png`: KLD percentiles (0.1 .. 99.9, log scale) by model;
- `kld.md`: the columns variants are compared by, as a markdown table;
- `kld_size.png`: mean KLD and ln(PPL ratio) against checkpoint size (local checkpoints,
  two or more), the noise floor drawn across.
A several-variant run (`fastpath kld --model A --model B ...`) gives one row per variant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fastpath.extras import require

pd = require("pandas", "report", "fastpath report")
matplotlib = require("matplotlib", "report", "fastpath report")

KEY = ["run", "model", "path", "context_length", "stride", "tensor_parallel_size", "device"]
FIGURES = ["seconds_per_window", "objects_per_window", "bytes_per_window",
           "peak_rss_bytes", "scored_tokens", "perplexity"]
INFO = ["vllm_version", "runner", "model_shape", "extrapolated", "windows", "benchmark",
        "base_pass_cost_ratio", "model_pass_cost_ratio", "base_file_bytes_per_token"]
REGRESSION_FIGURES = ["seconds_per_window", "objects_per_window", "bytes_per_window"]
TABLES = ("results", "memory", "peers", "modes", "lm_eval")  # extra_info["table"] values
# lm-eval backends the others are compared with (benchmarks/test_lm_eval.py's names)
LM_EVAL_REFERENCES = ("vllm", "fastpath-vllm", "local-completions@vllm-serve")


KLD_KIND = "fastpath-kld"
KLD_COLUMNS = ["label", "role", "model", "base_model", "dtype", "quantization",
               "checkpoint_bytes", "weight_bits", "convention", "context_length", "stride", "top_k",
               "scored_tokens", "kld_mean", "kld_mean_stderr", "kld_median", "kld_max",
               "top1_agreement", "top1_agreement_stderr", "top1_undecided", "ppl", "ppl_stderr",
               "ppl_base",
               "ln_ppl_ratio", "ln_ppl_ratio_stderr", "ln_ppl_correlation", "delta_p_mean",
               "rms_delta_p", "tail_mass_mean", "non_finite_share", "reverse_kld_mean",
               "reverse_kld_mean_stderr", "base_file_bytes_per_token", "seconds_base_pass",
               "seconds_model_pass",
               "vllm_version", "device", "source"]
# The markdown table's columns (kld.md): what a reader compares variants by.
KLD_MARKDOWN = ["label", "ppl", "ppl_stderr", "ln_ppl_ratio", "ln_ppl_ratio_stderr", "kld_mean",
                "kld_mean_stderr", "kld_median", "kld_p99", "kld_max", "reverse_kld_mean",
                "top1_agreement", "top5_agreement", "rms_delta_p", "non_finite_share",
                "seconds_model_pass"]


def run_name(path: Path) -> str:
    """pytest-benchmark saves NNNN_NAME.json: the run is NAME."""
    stem = path.stem
    head, _, tail = stem.partition("_")
    return tail if head.isdigit() and tail else stem


def load_tables(path: Path) -> dict[str, pd.DataFrame]:
    """The fastpath benchmarks of a saved run by table: results, memory, peers.

    Figures come from extra_info; a results row without `seconds_per_window` gets
    pytest-benchmark's median. Benchmarks without fastpath figures are left out.
    """
    document = json.loads(path.read_text())
    rows: dict[str, list[dict]] = {name: [] for name in TABLES}
    for bench in document.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        table = info.pop("table", "results" if "path" in info else None)
        if table not in rows:
            continue  # not a fastpath benchmark
        if table == "results":
            info.setdefault("seconds_per_window", bench["stats"]["median"])
        if table == "lm_eval":
            info.setdefault("seconds", bench["stats"]["median"])
        rows[table].append({"run": run_name(path), "benchmark": bench["name"], **info})
    if not any(rows.values()):
        raise ValueError(
            f"{path}: no fastpath benchmarks (extra_info with 'path' or 'table') found")
    return {table: pd.DataFrame(found) for table, found in rows.items()}


def load_run(path: Path) -> pd.DataFrame:
    """The scoring rows (results table) of a saved run."""
    frame = load_tables(path)["results"]
    if frame.empty:
        raise ValueError(f"{path}: no fastpath scoring benchmarks (results rows) found")
    return frame


def results_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows keyed by KEY, with the speed-up of each row over every standard path of its run."""
    columns = [c for c in KEY + FIGURES + INFO if c in frame.columns]
    table = frame[columns].copy()
    group = [c for c in KEY if c != "path"]
    standard_paths = sorted(p for p in table["path"].unique() if str(p).startswith("standard"))
    for standard in standard_paths:
        reference = table[table["path"] == standard][group + ["seconds_per_window"]]
        reference = reference.rename(columns={"seconds_per_window": "_ref"})
        merged = table.merge(reference, on=group, how="left")
        table[f"speedup_vs_{standard}"] = (merged["_ref"] / merged["seconds_per_window"]).values
    for reference_path in ("floor", "standard-k0"):
        reference = table[table["path"] == reference_path][group + ["seconds_per_window"]]
        reference = reference.rename(columns={"seconds_per_window": "_ref"})
        merged = table.merge(reference, on=group, how="left")
        table[f"time_vs_{reference_path}"] = (merged["seconds_per_window"] / merged["_ref"]).values
    return table.sort_values(KEY).reset_index(drop=True)


def headline_ratios(table: pd.DataFrame) -> list[str]:
    """One line per fast row with a floor or K=0 beside it: fast/K=0 and fast/floor."""
    lines = []
    fast = table[table["path"] == "fast"]
    for _, row in fast.iterrows():
        parts = [f"{name} {row[column]:.2f}x"
                 for name, column in (("fast/K=0", "time_vs_standard-k0"),
                                      ("fast/floor", "time_vs_floor"))
                 if column in row and pd.notna(row[column])]
        if not parts:
            continue
        whole = row["stride"] >= row["context_length"]
        shape = f"ctx {row['context_length']} stride {row['stride']}" + (
            " (whole window)" if whole else "")
        lines.append(f"{row['run']}: {row['model']} TP {row['tensor_parallel_size']} {shape}: "
                     + ", ".join(parts))
    return lines


MEMORY_KEY = ["run", "model", "device", "step_tokens", "path", "chunk_setting"]


def memory_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Peak step memory per (step, path, chunk setting), and the extra over prefill's step."""
    columns = [c for c in MEMORY_KEY + [
        "chunk_rows_env", "prompt_tokens", "scored_rows", "peak_step_bytes", "baseline_bytes",
        "fp32_logits_bytes_all_rows", "seconds_per_step", "memory_kind",
        "tensor_parallel_size", "vllm_version", "runner", "benchmark"] if c in frame.columns]
    table = frame[columns].copy()
    group = ["run", "model", "device", "step_tokens"]
    prefill = table[table["path"] == "prefill"][group + ["peak_step_bytes"]]
    merged = table.merge(prefill.rename(columns={"peak_step_bytes": "_prefill"}), on=group,
                         how="left")
    table["peak_over_prefill_bytes"] = (merged["peak_step_bytes"] - merged["_prefill"]).values
    table["peak_step_gib"] = table["peak_step_bytes"] / 2**30
    return table.sort_values(MEMORY_KEY).reset_index(drop=True)


def peers_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Tokens/s per peer, with fastpath's speed-up over each peer of the same run and model."""
    columns = [c for c in ["run", "model", "device", "peer", "context_length", "stream_tokens",
                           "windows", "scored_tokens", "seconds", "tokens_per_second",
                           "perplexity", "threads", "tensor_parallel_size", "vllm_version",
                           "benchmark"] if c in frame.columns]
    table = frame[columns].copy()
    group = ["run", "model", "device"]
    ours = table[table["peer"] == "fastpath-ppl"][group + ["tokens_per_second", "seconds"]]
    merged = table.merge(ours.rename(columns={"tokens_per_second": "_tps", "seconds": "_s"}),
                         on=group, how="left")
    table["fastpath_speedup_tokens_per_s"] = (merged["_tps"] / merged["tokens_per_second"]).values
    table["seconds_vs_fastpath"] = (merged["seconds"] / merged["_s"]).values
    return table.sort_values(group + ["peer"]).reset_index(drop=True)


def modes_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Exactness modes: seconds per window and the ratio to (isolated, verified), fastpath's
    default, for the same run, model and window layout."""
    group = ["run", "model", "context_length", "stride"]
    default = frame[(frame["schedule"] == "isolated") & (frame["lm_head_rows"] == "verified")]
    merged = frame.merge(default[group + ["seconds_per_window"]].rename(
        columns={"seconds_per_window": "_default"}), on=group, how="left")
    merged["time_vs_default"] = merged["seconds_per_window"] / merged.pop("_default")
    columns = [*group, "schedule", "lm_head_rows", "seconds_per_window", "time_vs_default",
               "probe_seconds", "windows"]
    return merged[columns].sort_values(group + ["schedule", "lm_head_rows"]).reset_index(
        drop=True)


def lm_eval_table(frame: pd.DataFrame) -> pd.DataFrame:
    """lm-eval wall time per backend, with `seconds_vs_REF`: its time over each reference
    backend's (LM_EVAL_REFERENCES) in the same run, model and device (below 1: faster)."""
    columns = [c for c in ["run", "model", "device", "backend", "tasks", "requests", "seconds",
                           "model_request_seconds", "objects_per_request",
                           "answers_equal_to_vllm", "answers_equal_to_vllm_serve",
                           "max_model_len", "vllm_version", "lm_eval_version", "benchmark"]
               if c in frame.columns]
    table = frame[columns].copy()
    group = ["run", "model", "device"]
    for reference in LM_EVAL_REFERENCES:
        seconds = table[table["backend"] == reference][group + ["seconds"]]
        merged = table.merge(seconds.rename(columns={"seconds": "_ref"}), on=group, how="left")
        table[f"seconds_vs_{reference}"] = (merged["seconds"] / merged["_ref"]).values
    return table.sort_values(group + ["backend"]).reset_index(drop=True)


def plot_lm_eval(table: pd.DataFrame, out: Path) -> Path:
    """Bars of lm-eval wall seconds: one group per run and model, one bar per backend."""
    matplotlib.use("Agg")

    data = table.assign(label=table["model"].str.split(" (", regex=False).str[0])
    if data["run"].nunique() > 1:
        data["label"] = data["run"] + ": " + data["label"]
    pivot = data.pivot_table(index="label", columns="backend", values="seconds",
                             aggfunc="median")
    axes = pivot.plot.bar(figsize=(max(7, 2.2 * len(pivot) + 4), 5), rot=0)
    axes.legend(title="backend", bbox_to_anchor=(1.0, 1.0), loc="upper left", fontsize=8)
    axes.set_ylabel("lm-eval wall seconds (same tasks)")
    axes.set_xlabel("")
    axes.set_title("lm-evaluation-harness: offline backends and\n"
                   "local-completions against each server")
    for container in axes.containers:
        axes.bar_label(container, fmt="%.1f", fontsize=8)
    return save_figure(axes.figure, out / "lm_eval.png")


def plot_modes(table: pd.DataFrame, out: Path) -> Path:
    """Bars of seconds per window: one group per window layout, one bar per mode."""
    matplotlib.use("Agg")

    table = table.assign(layout=[f"{m}\nctx {c} stride {s}" for m, c, s in
                                 zip(table["model"], table["context_length"], table["stride"])],
                         mode=table["schedule"] + " / " + table["lm_head_rows"])
    pivot = table.pivot_table(index="layout", columns="mode", values="seconds_per_window")
    axes = pivot.plot.bar(figsize=(8, 4.5), rot=0)
    axes.set_ylabel("seconds per window")
    axes.set_title("Exactness modes (schedule / lm_head rows)")
    return save_figure(axes.figure, out / "modes.png")


def save_figure(figure, path: Path) -> Path:
    """Lay out, write as PNG (120 dpi) and close a matplotlib figure; its path."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def compare_runs(base: pd.DataFrame, new: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Matching rows of two runs; `regression` where a figure grew beyond the threshold."""
    join = [c for c in KEY if c != "run"]
    merged = base.merge(new, on=join, suffixes=("_base", "_new"))
    merged["regressions"] = ""
    for figure in REGRESSION_FIGURES:
        if f"{figure}_base" not in merged:
            continue
        ratio = merged[f"{figure}_new"] / merged[f"{figure}_base"]
        merged[f"{figure}_ratio"] = ratio
        worse = ratio > 1 + threshold
        merged.loc[worse, "regressions"] += figure + " "
    merged["regression"] = merged["regressions"].str.len() > 0
    merged["regressions"] = merged["regressions"].str.strip()
    figures = [f"{figure}_{side}" for figure in REGRESSION_FIGURES
               for side in ("base", "new", "ratio")]
    keep = join + ["run_base", "run_new", "regression", "regressions"] + figures
    return merged[[c for c in keep if c in merged.columns]]


def plot(table: pd.DataFrame, figure: str, out: Path, ylabel: str) -> Path:
    """Log-scale grouped bars: one group per model (and context/stride), one bar per path."""
    matplotlib.use("Agg")

    data = table.assign(label=table["model"].str.split(" (", regex=False).str[0]
                        + "\nctx " + table["context_length"].astype(str)
                        + " stride " + table["stride"].astype(str)
                        + "\nTP " + table["tensor_parallel_size"].astype(str))
    if data["run"].nunique() > 1:
        data["label"] = data["run"] + ": " + data["label"]
    pivot = data.pivot_table(index="label", columns="path", values=figure, aggfunc="median")
    axes = pivot.plot.bar(logy=True, figsize=(max(6, 1.6 * len(pivot) + 2), 5), rot=0)
    axes.legend(title="path", bbox_to_anchor=(1.0, 1.0), loc="upper left")
    axes.set_ylabel(ylabel + " (log scale)")
    axes.set_xlabel("")
    axes.set_title(f"{ylabel} by path and model")
    if "extrapolated" in data and data["extrapolated"].fillna(False).astype(bool).any():
        axes.annotate("standard-k-1: extrapolated from short windows", xy=(0.01, 0.97),
                      xycoords="axes fraction", va="top", fontsize=8)
    return save_figure(axes.figure, out / f"{figure}.png")


def is_kld_report(path: Path) -> bool:
    """Whether a JSON file is a `fastpath kld` report."""
    try:
        return json.loads(path.read_text()).get("kind") == KLD_KIND
    except (OSError, ValueError, AttributeError):
        return False


def model_label(model: str) -> str:
    """A short name for a model path: its last component."""
    return Path(str(model).rstrip("/")).name or str(model)


def variant_rows(report: dict) -> list[dict]:
    """A report's rows: one per variant of a several-variant run (the run's own fields,
    base and windows, beside each variant's statistics), else the report itself."""
    variants = report.get("variants") or []
    if len(variants) < 2:
        return [report]
    shared = {k: v for k, v in report.items() if k != "variants"}
    return [{**shared, **variant,
             "variant_label": "noise floor" if variant.get("role") == "noise floor"
             else None} for variant in variants]


def load_kld_reports(paths: list[Path]) -> list[dict]:
    """The reports' rows (a several-variant run gives one per variant), each with a
    `label` unique among them (the model's folder name; the noise floor says so)."""
    rows, stems = [], []
    for path in paths:
        for row in variant_rows(json.loads(path.read_text())):
            rows.append(row)
            stems.append(path.stem)
    labels = [(row.get("variant_label") and f"noise floor ({row.get('dtype')})")
              or model_label(row["model"]) for row in rows]
    for i, row in enumerate(rows):
        same = [j for j, label in enumerate(labels) if label == labels[i]]
        row["label"] = labels[i] if len(same) == 1 else f"{labels[i]} ({stems[i]}#{i})"
    return rows


def kld_table(reports: list[dict]) -> pd.DataFrame:
    """One row per kld run, percentiles flattened into kld_pQ columns."""
    rows = []
    for report in reports:
        row = {c: report.get(c) for c in KLD_COLUMNS}
        row.update({f"kld_p{q}": v for q, v in report.get("kld_percentiles", {}).items()})
        row.update({f"top{k}_agreement": v  # top-1 is top1_agreement, the same definition
                    for k, v in report.get("topk_agreement", {}).items() if k != "1"})
        for bucket in report.get("kld_by_base_confidence", []):
            name = f"kld_mean_base_p{bucket['base_top1_p_low']:g}-{bucket['base_top1_p_high']:g}"
            row[name] = bucket["kld_mean"]
        rows.append(row)
    return pd.DataFrame(rows)


def kld_markdown(table: pd.DataFrame) -> str:
    """The table a reader compares variants by, as markdown (pandas, via tabulate)."""
    columns = [c for c in KLD_MARKDOWN if c in table.columns]
    return table[columns].to_markdown(index=False, floatfmt=".6g") + "\n"


def plot_kld_against_size(table: pd.DataFrame, out: Path) -> Path | None:
    """Mean KLD and ln(PPL ratio) against bits per weight where two or more variants say
    theirs (their quantization config), else against checkpoint size (local checkpoints);
    one point per variant, the noise floor as a line; None where fewer than two are known."""
    variants = table[table["role"].fillna("variant") == "variant"]
    if "weight_bits" in variants and variants["weight_bits"].notna().sum() >= 2:
        known = variants.dropna(subset=["weight_bits"])
        x, x_name = known["weight_bits"].astype(float), "bits per weight (quantized layers)"
    else:
        known = variants.dropna(subset=["checkpoint_bytes"])
        x, x_name = known["checkpoint_bytes"] / 2**20, "checkpoint size (MiB)"
    if len(known) < 2:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for axes, column, error, name in ((left, "kld_mean", "kld_mean_stderr", "mean KLD (nats)"),
                                      (right, "ln_ppl_ratio", "ln_ppl_ratio_stderr",
                                       "ln(PPL / PPL base)")):
        axes.errorbar(x, known[column], yerr=known[error], fmt="o")
        for x_value, y, label in zip(x, known[column], known["label"]):
            axes.annotate(label, (x_value, y), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")
        floor = table[table["role"] == "noise floor"]
        if len(floor):
            axes.axhline(float(floor[column].iloc[0]), linestyle="--", color="grey",
                         label="noise floor")
            axes.legend(fontsize=8)
        axes.set_xlabel(x_name)
        axes.set_ylabel(name)
    figure.suptitle(f"Variants against their base: divergence by {x_name.split(' (')[0]}",
                    fontsize=10)
    return save_figure(figure, out / "kld_size.png")


def plot_kld_histogram(reports: list[dict], out: Path) -> Path:
    """Per-token KLD histograms, one step line per model, log-spaced bins."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for report in reports:
        histogram = report["kld_histogram"]
        edges = np.asarray(histogram["edges"], dtype=float)
        counts = np.asarray(histogram["counts"], dtype=float)
        share = counts / max(counts.sum(), 1)
        left = edges[:-1].copy()
        left[0] = edges[1] / 10 ** 0.25  # the [0, 1e-8) bin drawn one bin to the left
        axes.step(np.append(left, edges[-1]), np.append(share, share[-1]), where="post",
                  label=f"{report['label']} (mean {report['kld_mean']:.3g})")
    axes.set_xscale("log")
    axes.set_xlabel("per-token KLD (nats; leftmost bin: below 1e-8, zero included)")
    axes.set_ylabel("share of scored tokens")
    base = {model_label(r.get("base_model", "")) for r in reports}
    axes.set_title(f"Per-token KLD against {', '.join(sorted(base))} (top-K + tail: lower "
                   "bound)", fontsize=10)
    axes.legend(fontsize=8)
    return save_figure(figure, out / "kld_histogram.png")


def plot_kld_percentiles(table: pd.DataFrame, out: Path) -> Path:
    """KLD percentiles by model (log scale): one group of bars per percentile."""
    matplotlib.use("Agg")

    columns = sorted((c for c in table.columns if c.startswith("kld_p")),
                     key=lambda c: float(c[len("kld_p"):]))
    data = table.set_index("label")[columns].T
    data.index = [c[len("kld_p"):] + "%" for c in columns]
    axes = data.clip(lower=1e-12).plot.bar(logy=True, figsize=(max(7, 0.9 * len(data) + 3), 5),
                                           rot=0)
    axes.set_xlabel("percentile of per-token KLD")
    axes.set_ylabel("KLD (nats, log scale)")
    axes.set_title("KLD percentiles by model (top-K + tail: lower bound)", fontsize=10)
    axes.legend(title="model", fontsize=8)
    if (data <= 1e-12).to_numpy().any():
        axes.annotate("bars at 1e-12: KLD <= 1e-12 (zero included)", xy=(0.01, 0.97),
                      xycoords="axes fraction", va="top", fontsize=8)
    return save_figure(axes.figure, out / "kld_percentiles.png")


def plot_memory(table: pd.DataFrame, out: Path) -> Path:
    """Bars of peak step memory (GiB): one group per step size, one bar per setting."""
    matplotlib.use("Agg")

    data = table.assign(
        setting=table["path"] + " (" + table["chunk_setting"].astype(str) + ")",
        label=table["model"].str.split(" (", regex=False).str[0] + "\n"
        + table["step_tokens"].astype(str) + "-token step")
    if data["run"].nunique() > 1:
        data["label"] = data["run"] + ": " + data["label"]
    pivot = data.pivot_table(index="label", columns="setting", values="peak_step_gib",
                             aggfunc="max")
    axes = pivot.plot.bar(figsize=(max(6, 1.8 * len(pivot) + 3), 5), rot=0)
    axes.legend(title="path (chunk)", bbox_to_anchor=(1.0, 1.0), loc="upper left")
    kinds = ", ".join(sorted(table["memory_kind"].dropna().astype(str).unique()))
    axes.set_ylabel(f"peak above the pre-step baseline, GiB ({kinds})")
    axes.set_xlabel("")
    axes.set_title("Worker memory of one\nwhole-window scoring step")
    return save_figure(axes.figure, out / "memory.png")


def run_kld_report(paths: list[Path], out: Path) -> list[Path]:
    """kld.csv, kld.md and the KLD plots from `fastpath kld --json` reports."""
    reports = load_kld_reports(paths)
    table = kld_table(reports)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "kld.csv", out / "kld.md"]
    table.to_csv(written[0], index=False)
    written[1].write_text(kld_markdown(table))
    written.append(plot_kld_histogram(reports, out))
    written.append(plot_kld_percentiles(table, out))
    by_size = plot_kld_against_size(table, out)
    return written + ([by_size] if by_size else [])


def plot_peers(table: pd.DataFrame, out: Path) -> Path:
    """Bars of tokens/s per peer (one group per run and model), speed-ups written on top."""
    matplotlib.use("Agg")

    data = table.assign(label=table["model"].str.split(" (", regex=False).str[0]
                        + "\nctx " + table["context_length"].astype(str))
    if data["run"].nunique() > 1:
        data["label"] = data["run"] + ": " + data["label"]
    pivot = data.pivot_table(index="label", columns="peer", values="tokens_per_second",
                             aggfunc="median")
    axes = pivot.plot.bar(figsize=(max(6, 1.8 * len(pivot) + 3), 5), rot=0)
    axes.legend(title="peer", bbox_to_anchor=(1.0, 1.0), loc="upper left")
    axes.set_ylabel("scored tokens per second")
    axes.set_xlabel("")
    axes.set_title("Perplexity: fastpath and peers\n(same model, text, window length)")
    for container in axes.containers:
        axes.bar_label(container, fmt="%.0f", fontsize=8)
    return save_figure(axes.figure, out / "peers.png")
