"""`fastpath report`: pytest-benchmark JSON and `fastpath kld --json` reports -> CSVs and
plots (the tables and figures are `fastpath.tools.report`'s; needs `fastpath[report]`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fastpath.extras import require


def add_report_flags(parser: argparse.ArgumentParser) -> None:
    """The runs to read, where to write, and the baseline to compare against."""
    parser.add_argument("runs", nargs="+", type=Path,
                        help="pytest-benchmark JSON files (e.g. .benchmarks/*/0001_NAME.json) "
                        "and/or `fastpath kld --json` reports")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="output folder")
    parser.add_argument("--baseline", type=Path,
                        help="a run to compare against: writes compare.csv")
    parser.add_argument("--threshold", type=float, default=0.10,
                        help="relative growth that counts as a regression (default 0.10)")


def _peer_line(row: Any) -> str:
    """One printed line per peers row: the peer's speed and fastpath's against it."""
    return (f"{row['run']}: {row['model']}: {row['peer']} {row['tokens_per_second']:.0f} "
            f"tokens/s (fastpath {row['fastpath_speedup_tokens_per_s']:.2f}x)")


def _mode_line(row: Any) -> str:
    """One printed line per exactness-mode row: its time and its ratio to the default."""
    return (f"{row['run']}: {row['model']} ctx {row['context_length']} stride "
            f"{row['stride']}: {row['schedule']} / {row['lm_head_rows']} "
            f"{row['seconds_per_window']:.3f} s/window ({row['time_vs_default']:.2f}x)")


def _lm_eval_line(row: Any) -> str:
    """One printed line per lm-eval row: its wall time and its time against the references."""
    ratios = ", ".join(f"{column[len('seconds_vs_'):]} {row[column]:.2f}x"
                       for column in row.index
                       if column.startswith("seconds_vs_")
                       and row[column] == row[column]  # not NaN: a reference of this run
                       and column != f"seconds_vs_{row['backend']}")
    return (f"{row['run']}: {row['model']}: {row['backend']} {row['seconds']:.1f} s"
            + (f" (time vs {ratios})" if ratios else ""))


def run(args: argparse.Namespace) -> int:
    """Write each table and plot the runs give, and say what was written."""
    from fastpath.tools.report import (
        TABLES,
        compare_runs,
        headline_ratios,
        is_kld_report,
        lm_eval_table,
        load_run,
        load_tables,
        memory_table,
        modes_table,
        peers_table,
        plot,
        plot_lm_eval,
        plot_memory,
        plot_modes,
        plot_peers,
        results_table,
        run_kld_report,
    )

    pd = require("pandas", "report", "fastpath report")
    kld_runs = [path for path in args.runs if is_kld_report(path)]
    written = run_kld_report(kld_runs, args.out) if kld_runs else []
    loaded = [load_tables(path) for path in args.runs if path not in kld_runs]
    frames = {name: pd.concat([t[name] for t in loaded], ignore_index=True) if loaded
              else pd.DataFrame() for name in TABLES}
    args.out.mkdir(parents=True, exist_ok=True)
    if not frames["results"].empty:
        table = results_table(frames["results"])
        written.append(args.out / "results.csv")
        table.to_csv(written[-1], index=False)
        if args.baseline is not None:
            base = results_table(load_run(args.baseline))
            comparison = compare_runs(base, table, args.threshold)
            written.append(args.out / "compare.csv")
            comparison.to_csv(written[-1], index=False)
            flagged = int(comparison["regression"].sum())
            print(f"{flagged} regression(s) beyond {args.threshold:.0%} against {args.baseline}")
        written.append(plot(table, "seconds_per_window", args.out, "seconds per window"))
        if "objects_per_window" in table:
            written.append(plot(table, "objects_per_window", args.out,
                                "Python objects per window"))
        for line in headline_ratios(table):
            print(line)
    for name, make_table, plot_table, describe in (
            ("memory", memory_table, plot_memory, None),
            ("peers", peers_table, plot_peers, _peer_line),
            ("modes", modes_table, plot_modes, _mode_line),
            ("lm_eval", lm_eval_table, plot_lm_eval, _lm_eval_line)):
        if frames[name].empty:
            continue
        table = make_table(frames[name])
        written.append(args.out / f"{name}.csv")
        table.to_csv(written[-1], index=False)
        written.append(plot_table(table, args.out))
        for _, row in table.iterrows() if describe else ():
            print(describe(row))
    for path in written:
        print(f"wrote {path}")
    return 0
