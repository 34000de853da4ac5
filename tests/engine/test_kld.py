"""`fastpath kld` on real engines: exactness against itself, against transformers' full
vocabulary, on a locally quantized copy, and end to end through the command line.

The base is tiny-llama (vocabulary 2048, so K can be the whole vocabulary); the quantized
model is its RTN int4 copy (`fastpath.testing.quantize`), a real, different set of weights.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastpath import cli, zoo
from fastpath.data import bundled_text
from fastpath.engine.scorer import EngineScorer
from fastpath.metrics import basefile, conventions, kld, perplexity
from fastpath.testing import quantize, reference
from tests.helpers import assert_bitwise_equal, engine_kwargs, runner_engine

pytestmark = [pytest.mark.correctness, pytest.mark.engine,
              pytest.mark.v1_only(reason="the base pass's top-K (fastpath_top_k) is computed "
                                  "by fastpath's V1 runner patch; V2 refuses it at submission "
                                  "and fastpath kld runs V1")]

TEXT = bundled_text()[:1400]
CONTEXT, STRIDE = 64, 24
# fastpath's KLD (vLLM fp32 log-softmax, float32 values, float64 sums) against a float64
# full-vocabulary KLD from transformers' fp32 logits, mean over the tokens.
FULL_KLD_RTOL = 1e-6
# Per token, vLLM and transformers log-probs differ by up to ~6e-6 (see test_perplexity);
# a per-token KLD can differ by about that much.
TOKEN_KLD_ATOL = 2e-5


BATCH = 5  # windows per submission; the `fastpath ppl` comparisons batch alike (same steps)


def run_passes(base_llm, model_llm, layout, k):
    """(base scores, model scores, divergence) through the engine passes."""
    target, top_lp, top_ids, _ = kld.base_pass(EngineScorer(base_llm, max_batch=BATCH), layout, k)
    vocab = base_llm.llm_engine.model_config.get_vocab_size()
    tokenizer = basefile.tokenizer_fingerprint(base_llm.get_tokenizer())
    base = basefile.from_layout(layout, target, top_lp, top_ids, vocab, tokenizer)
    model = kld.model_pass(EngineScorer(model_llm, max_batch=BATCH), layout, base)
    return base, model, kld.compare(layout, base, model)


@pytest.fixture(scope="module")
def layout(llama_llm):
    return conventions.build("fastpath", llama_llm.get_tokenizer(), TEXT, CONTEXT, STRIDE)


@pytest.fixture(scope="module")
def quantized_path():
    return str(quantize.get_quantized("tiny-llama", bits=4))


@pytest.fixture(scope="module")
def quantized_llm(quantized_path):
    with runner_engine(quantized_path, "v1", **engine_kwargs()) as llm:
        yield llm


@pytest.fixture(scope="module")
def full_reference(layout, quantized_path):
    """Float64 log-softmax of every scored row, base and model, from transformers."""
    rows = {}
    for name, path in (("base", str(zoo.get_model("tiny-llama"))), ("model", quantized_path)):
        model = reference.load_model(path)
        values = []
        with torch.inference_mode():
            for w in layout.windows:
                ids = torch.tensor([w.prompt(layout.tokens)])
                logits = model(input_ids=ids).logits[0].double()
                values.append(logits[w.first_scored_row : w.end - w.begin - 1].log_softmax(-1))
        rows[name] = torch.cat(values).numpy()
    return rows["base"], rows["model"]


def test_model_against_itself_is_exactly_zero(llama_llm, layout):
    base, model, result = run_passes(llama_llm, llama_llm, layout, 32)
    summary = result.summary()
    assert np.all(result.kld == 0.0), result.kld[result.kld != 0.0][:5]
    assert summary["kld_mean"] == 0.0 and summary["kld_max"] == 0.0
    assert summary["top1_agreement"] == 1.0 and summary["top1_undecided"] == 0
    assert summary["ln_ppl_ratio"] == 0.0 and summary["rms_delta_p"] == 0.0
    assert summary["reverse_kld_mean"] == 0.0 and summary["reverse_kld_max"] == 0.0
    assert summary["topk_agreement"] == {str(k): 1.0 for k in range(1, kld.AGREEMENT_K + 1)}
    # The model's own top few are the base's first values, bit for bit.
    assert_bitwise_equal(model.own_top_logprobs, base.topk_logprobs[:, :kld.AGREEMENT_K],
                         what="own top few vs base")
    # The base's top-K is the model's own: the model pass scored the same values.
    assert_bitwise_equal(model.topk_logprobs, base.topk_logprobs, what="model vs base top-K")
    assert_bitwise_equal(model.top1_logprobs, base.topk_logprobs[:, 0], what="top-1")
    # PPL and PPL(base) are `fastpath ppl`'s, bit for bit.
    ppl = perplexity.score_layout(EngineScorer(llama_llm, max_batch=BATCH), layout)
    assert_bitwise_equal(base.target_logprobs, ppl.logprobs, what="base targets vs ppl")
    assert_bitwise_equal(model.target_logprobs, ppl.logprobs, what="model targets vs ppl")
    assert summary["ppl"] == ppl.perplexity and summary["ppl_base"] == ppl.perplexity
    assert summary["tail_mass_mean"] > 0  # K=32 of 2048: the bound is a real bound here


def test_full_vocabulary_equals_transformers(llama_llm, quantized_llm, layout, full_reference):
    """K = vocabulary: fastpath's KLD is the full KLD (no tail), against transformers."""
    vocab = llama_llm.llm_engine.model_config.get_vocab_size()
    base, model, result = run_passes(llama_llm, quantized_llm, layout, vocab)
    ref_base, ref_model = full_reference
    expected = (np.exp(ref_base) * (ref_base - ref_model)).sum(axis=1)
    rel = abs(result.kld.mean() - expected.mean()) / expected.mean()
    worst = float(np.abs(result.kld - expected).max())
    print(f"\nK={vocab}: KLD mean fastpath {result.kld.mean():.9f} transformers "
          f"{expected.mean():.9f} rel diff {rel:.2e}; max per-token |diff| {worst:.2e}")
    assert result.kld.mean() > 0.01  # a real quantization, not a copy
    assert rel <= FULL_KLD_RTOL
    assert worst <= TOKEN_KLD_ATOL
    # The base file's ids are the whole vocabulary, in descending order of the base.
    assert np.all(np.sort(base.topk_ids, axis=1) == np.arange(vocab))
    assert np.all(np.diff(base.topk_logprobs.astype(np.float64), axis=1) <= 0)
    # The model's own top-1 is the best of the K (= all) ids it scored.
    assert_bitwise_equal(model.top1_logprobs, model.topk_logprobs.max(axis=1), what="top-1")
    assert result.summary()["top1_outside_base_topk"] == 0


def test_top_k_is_a_lower_bound_within_the_tail(llama_llm, quantized_llm, layout,
                                                full_reference):
    """K = 32 on the quantized pair: KLD > 0, never above the full KLD, gap reported; the
    value is the top-32 + tail KLD of transformers' distributions on the same ids."""
    base, model, result = run_passes(llama_llm, quantized_llm, layout, 32)
    ref_base, ref_model = full_reference
    full = (np.exp(ref_base) * (ref_base - ref_model)).sum(axis=1)
    ids = base.topk_ids.astype(np.int64)
    pb = np.exp(np.take_along_axis(ref_base, ids, 1))
    pm = np.exp(np.take_along_axis(ref_model, ids, 1))
    tb, tm = 1 - pb.sum(1), 1 - pm.sum(1)
    coarse = (pb * np.log(pb / pm)).sum(1) + tb * np.log(tb / tm)
    s = result.summary()
    gap = full.mean() - s["kld_mean"]
    print(f"\nK=32: KLD mean {s['kld_mean']:.6f} (transformers top-32+tail {coarse.mean():.6f}), "
          f"full {full.mean():.6f}, gap {gap:.6f} ({gap / full.mean():.1%}); base tail mass "
          f"mean {s['tail_mass_mean']:.4f}; same top {s['top1_agreement']:.3f}")
    assert s["kld_mean"] > 0 and 0 < s["top1_agreement"] < 1
    assert np.all(result.kld <= full + TOKEN_KLD_ATOL)
    assert s["kld_mean"] <= full.mean() * (1 + FULL_KLD_RTOL)
    assert abs(s["kld_mean"] - coarse.mean()) <= FULL_KLD_RTOL * coarse.mean() + 1e-6
    assert np.all(np.abs(result.kld - coarse) <= TOKEN_KLD_ATOL)
    np.testing.assert_allclose(result.tail_mass_base, tb, atol=1e-5)
    # The model's scores are `fastpath ppl`'s for the quantized model, bit for bit.
    ppl = perplexity.score_layout(EngineScorer(quantized_llm, max_batch=BATCH), layout)
    assert_bitwise_equal(model.target_logprobs, ppl.logprobs, what="model targets vs ppl")
    assert s["ppl"] == ppl.perplexity
    assert math.isfinite(s["ln_ppl_ratio_stderr"]) and s["rms_delta_p"] > 0


@pytest.mark.slow
def test_command_line_self_then_quantized_with_base_file(tmp_path, capsys, quantized_path):
    """`fastpath kld A vs A` prints KLD 0 and 100% agreement and writes the base file; a
    second run reuses it for the int4 copy (one engine); other flags are refused."""
    base_model = str(zoo.get_model("tiny-llama"))
    common = ["--num-samples", "12", "--context-length", "96", "--stride", "32",
              "--top-k", "16", "--max-model-len", "256", "--kv-cache-memory-bytes",
              str(128 << 20), "--base-cache", str(tmp_path / "base.npz")]
    first = tmp_path / "self.json"
    assert cli.main(["kld", "--base-model", base_model, "--model", base_model, *common,
                     "--json", str(first)]) == 0
    out = capsys.readouterr().out
    assert "Mean    KLD:   0.000000 ±" in out and "Same top p: 100.000 ±" in out
    assert "lower bound" in out
    report = json.loads(first.read_text())
    assert report["kld_mean"] == 0.0 and report["top1_agreement"] == 1.0
    assert report["base_file_reused"] is False and report["ppl"] == report["ppl_base"]
    assert report["runner"] == "V1"  # the top-K extension's runner, whatever the default
    assert report["base_file_bytes_per_token"] < 4 + 8 * 16 + 64
    second = tmp_path / "int4.json"
    per_token = tmp_path / "per_token.npz"
    assert cli.main(["kld", "--model", quantized_path, *common, "--json", str(second),
                     "--save-per-token", str(per_token)]) == 0
    report = json.loads(second.read_text())
    assert report["base_file_reused"] is True and report["seconds_base_pass"] is None
    for key in ("kld_mean", "kld_mean_stderr", "kld_max", "kld_percentiles", "top1_agreement",
                "top1_agreement_stderr", "top1_undecided", "ppl", "ppl_base", "ln_ppl_ratio",
                "ln_ppl_ratio_stderr", "rms_delta_p", "tail_mass_mean"):
        assert key in report, key
    assert report["kld_mean"] > 0 and report["top1_agreement"] < 1
    assert report["ppl_base"] == json.loads(first.read_text())["ppl_base"]
    saved = np.load(per_token)
    assert saved["kld"].size == report["scored_tokens"] == saved["positions"].size
    assert saved["kld"].mean() == pytest.approx(report["kld_mean"], rel=1e-12)
    capsys.readouterr()
    # Reuse with another K or other windows: refused before any engine starts.
    assert cli.main(["kld", "--model", quantized_path, *common, "--top-k", "8"]) == 2
    assert "holds the top-16, this run asks for --top-k 8" in capsys.readouterr().err
    assert cli.main(["kld", "--model", quantized_path, *common, "--stride", "48"]) == 2
    assert "--stride 32, this run uses fastpath, 96, 48" in capsys.readouterr().err


def test_v2_runner_asked_for_is_refused(monkeypatch, capsys):
    """VLLM_USE_V2_MODEL_RUNNER=1 cannot give top-K: refused before any engine, saying why."""
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    assert cli.main(["kld", "--base-model", "/nonexistent", "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "needs vLLM's V1 model runner" in err and "VLLM_USE_V2_MODEL_RUNNER=1" in err


@pytest.mark.slow  # five engines, about 200 s on 2 cores; test_variants_and_noise_floor_runs
def test_several_variants_against_one_base_in_one_run(tmp_path, capsys, quantized_path):
    """`fastpath kld --model A --model Q` against base A: one base pass, a row per variant in
    order and the noise floor last. A variant identical to the base gives KLD 0.0 exactly and
    agreement 1.0; the int4 copy's row is the figures of a run of it alone on the same base
    file; the noise floor (the base in bfloat16) is above zero, since its numerics differ."""
    base_model = str(zoo.get_model("tiny-llama"))
    common = ["--num-samples", "8", "--context-length", "96", "--stride", "32",
              "--top-k", "16", "--max-model-len", "256", "--kv-cache-memory-bytes",
              str(128 << 20), "--base-cache", str(tmp_path / "base.npz")]
    together = tmp_path / "together.json"
    assert cli.main(["kld", "--base-model", base_model, "--model", base_model,
                     "--model", quantized_path, *common, "--json", str(together)]) == 0
    out = capsys.readouterr().out
    report = json.loads(together.read_text())
    same, int4, floor = report["variants"]
    assert [r["role"] for r in report["variants"]] == ["variant", "variant", "noise floor"]
    assert (same["model"], int4["model"], floor["model"]) == (base_model, quantized_path,
                                                              base_model)
    assert same["kld_mean"] == 0.0 and same["kld_max"] == 0.0
    assert same["top1_agreement"] == 1.0 and same["ppl"] == same["ppl_base"]
    assert same["reverse_kld_mean"] == 0.0 and set(same["topk_agreement"].values()) == {1.0}
    assert int4["reverse_kld_mean"] > 0 and int4["topk_agreement"]["5"] < 1.0
    assert int4["kld_mean"] > 0 and floor["dtype"] == "bfloat16" and floor["kld_mean"] > 0
    for row in report["variants"]:
        assert row["non_finite_share"] == 0.0 and row["seconds_model_pass"] > 0
        buckets = row["kld_by_base_confidence"]
        assert sum(b["tokens"] for b in buckets) == row["scored_tokens"]
    assert report["kld_mean"] == same["kld_mean"]  # the top level is the first variant's
    assert "noise floor: base in bfloat16" in out and "top-1 agree" in out
    alone = tmp_path / "alone.json"
    assert cli.main(["kld", "--model", quantized_path, *common, "--json", str(alone)]) == 0
    single = json.loads(alone.read_text())
    assert single["base_file_reused"] is True and len(single["variants"]) == 1
    for key in ("kld_mean", "kld_max", "kld_percentiles", "top1_agreement", "ppl",
                "ln_ppl_ratio", "rms_delta_p", "kld_by_base_confidence", "reverse_kld_mean",
                "topk_agreement"):
        assert single[key] == int4[key], key
