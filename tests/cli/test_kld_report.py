"""`fastpath report` on `fastpath kld --json` reports: kld.csv and the KLD plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from fastpath import cli
from fastpath.metrics import divergence
from fastpath.tools.report import is_kld_report


def kld_report(path, model: str, scale: float, seed: int) -> None:
    """A report as `fastpath kld` writes it, from a Divergence of synthetic figures."""
    rng = np.random.default_rng(seed)
    n = 500
    base_lp = -rng.exponential(2.0, n).astype(np.float32)
    model_lp = (base_lp - rng.normal(0.0, scale, n)).astype(np.float32)
    kld = np.concatenate([np.zeros(5), rng.exponential(scale, n - 5)])
    nll, nll_base = -model_lp.astype(np.float64), -base_lp.astype(np.float64)
    result = divergence.Divergence(
        kld=kld, base_logprobs=base_lp, model_logprobs=model_lp, same_top=rng.random(n) < 0.9,
        tail_mass_base=rng.random(n) * 0.1, ppl=math.exp(nll.mean()),
        ppl_base=math.exp(nll_base.mean()), mean_nll=nll.mean(), mean_nll_base=nll_base.mean(),
        top_k=32, base_top1_logprobs=np.maximum(base_lp, -rng.exponential(0.7, n)
                                                .astype(np.float32)))
    report = {"kind": "fastpath-kld", "model": model, "base_model": "/models/base",
              "convention": "fastpath", "context_length": 2048, "stride": 512,
              "base_file_bytes_per_token": 264.0, **result.summary()}
    path.write_text(json.dumps(report))


def test_kld_reports_to_csv_and_plots(tmp_path, capsys):
    runs = []
    for i, (name, scale) in enumerate([("w8a16", 1e-4), ("w4a16", 1e-2), ("w3a16", 5e-2)]):
        runs.append(tmp_path / f"{name}.json")
        kld_report(runs[-1], f"/models/{name}", scale, i)
    assert all(is_kld_report(p) for p in runs)
    out = tmp_path / "out"
    assert cli.main(["report", *map(str, runs), "--out", str(out)]) == 0
    table = pd.read_csv(out / "kld.csv")
    assert list(table["label"]) == ["w8a16", "w4a16", "w3a16"]
    assert table["kld_mean"].is_monotonic_increasing
    for column in ("kld_p99.9", "kld_p50", "kld_p0.1", "top1_agreement", "tail_mass_mean",
                   "ln_ppl_ratio", "base_file_bytes_per_token"):
        assert column in table.columns, column
    expected = json.loads(runs[1].read_text())
    assert table.loc[1, "kld_p99"] == expected["kld_percentiles"]["99"]
    for plot in ("kld_histogram.png", "kld_percentiles.png"):
        assert (out / plot).stat().st_size > 10_000
    assert "kld.csv" in capsys.readouterr().out


def test_a_several_variant_run_gives_a_row_per_variant(tmp_path):
    """One `fastpath kld --model A --model B` report: a row per variant and the noise floor,
    the markdown table, and KLD against checkpoint size with the noise floor across."""
    variants = []
    for i, (name, scale, size) in enumerate([("w8a8", 1e-4, 4 << 20), ("w4a8", 1e-2, 2 << 20),
                                             ("base", 1e-6, None)]):
        path = tmp_path / f"{name}.json"
        kld_report(path, f"/models/{name}", scale, i)
        row = json.loads(path.read_text())
        row.update(role="noise floor" if name == "base" else "variant", dtype="bfloat16",
                   checkpoint_bytes=size, seconds_model_pass=1.0 + i,
                   weight_bits={"w8a8": 8, "w4a8": 4}.get(name))
        variants.append({k: v for k, v in row.items() if k not in ("kind", "base_model")})
    report = {"kind": "fastpath-kld", "base_model": "/models/base", **variants[0],
              "variants": variants}
    run = tmp_path / "together.json"
    run.write_text(json.dumps(report))
    out = tmp_path / "out"
    assert cli.main(["report", str(run), "--out", str(out)]) == 0
    table = pd.read_csv(out / "kld.csv")
    assert list(table["label"]) == ["w8a8", "w4a8", "noise floor (bfloat16)"]
    assert list(table["role"]) == ["variant", "variant", "noise floor"]
    assert table.loc[1, "kld_mean"] == variants[1]["kld_mean"]
    assert "kld_mean_base_p0.8-1" in table.columns
    markdown = (out / "kld.md").read_text()
    assert markdown.startswith("| label") and "noise floor (bfloat16)" in markdown
    assert (out / "kld_size.png").stat().st_size > 10_000
    assert list(table["weight_bits"][:2]) == [8, 4]


def test_weight_bits_come_from_the_quantization_config(tmp_path):
    """compressed-tensors' num_bits (all groups agreeing), GPTQ's bits, AWQ's w_bit; None
    for an unquantized, unreadable or disagreeing config."""
    from fastpath.cli.kld import weight_bits

    def checkpoint(name: str, quantization: dict | None) -> str:
        folder = tmp_path / name
        folder.mkdir()
        config = {"model_type": "llama"}
        if quantization is not None:
            config["quantization_config"] = quantization
        (folder / "config.json").write_text(json.dumps(config))
        return str(folder)

    def groups(*bits: int) -> dict:
        return {"quant_method": "compressed-tensors", "config_groups": {
            f"group_{i}": {"weights": {"num_bits": b}} for i, b in enumerate(bits)}}

    assert weight_bits(checkpoint("w4a8", groups(4))) == 4
    assert weight_bits(checkpoint("w8a8", groups(8, 8))) == 8
    assert weight_bits(checkpoint("mixed", groups(4, 8))) is None
    assert weight_bits(checkpoint("gptq", {"quant_method": "gptq", "bits": 3})) == 3
    assert weight_bits(checkpoint("awq", {"quant_method": "awq", "w_bit": 4})) == 4
    assert weight_bits(checkpoint("fp32", None)) is None
    assert weight_bits(str(tmp_path / "missing")) is None and weight_bits(None) is None
