"""Real quantized checkpoints on vLLM's quantized CPU kernels: the kernel that runs,
`fastpath ppl --method both` bitwise equal on each, and `fastpath kld`'s passes bitwise the
standard path's.

The checkpoints are the embedded default (`trained-llama`) quantized by llm-compressor's
one-shot GPTQ, as model makers publish them (compressed-tensors; `fastpath.testing.compress`),
made in the quantizer's own environment ($FASTPATH_QUANTIZER_PYTHON; `tox -e quant` makes
it): W8A8 (int8 weights per channel, dynamic per-token int8 activations), W4A8 (int4 weights
in groups of 128, dynamic int8 activations) and W4A16 (int4 weights, 16-bit activations).

- the worker's linear layers run the scheme's quantized kernel, not the fp32 path: the
  classes read in the worker (quant method, compressed-tensors scheme, kernel), and the
  kernel's own `apply_weights` counted while a prompt runs (an eager engine);
- `fastpath ppl --method both` on each: fast path == vLLM's standard prompt_logprobs path,
  bit for bit, with a finite perplexity other than the unquantized model's;
- `fastpath kld`'s base and model passes on each, window by window: targets, top-K and the
  model's own top few equal vLLM's standard path (prompt_logprobs=K) bit for bit.

W4A16 runs vLLM's `CPUWNA16LinearKernel`, which calls `torch.ops._C.cpu_gemm_wna16`: vLLM's
AVX2 build (`_C_AVX2`, loaded on CPUs without AVX-512) lacks that op, so there the tests skip
with the lookup's own error and the library vLLM loaded, found in this process by vLLM's own
`import_kernels`; the kernel test checks, on the schemes that run, that the workers loaded
the same library and see the same op set.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest

from fastpath import cli, zoo
from fastpath.testing import quantize, reference
from tests.helpers import engine_kwargs, runner_engine

pytestmark = [
    pytest.mark.quantized,
    pytest.mark.correctness,
    pytest.mark.engine,
    pytest.mark.skipif(not os.environ.get(quantize.QUANTIZER_ENV),
                       reason="needs the quantizer venv: tox -e quant "
                       f"(${quantize.QUANTIZER_ENV} is not set)"),
]

MODEL = "trained-llama"
SCHEMES = ("W8A8", "W4A8", "W4A16")
# What vLLM 0.32 selects on CPU for each scheme's linear layers.
EXPECTED = {
    "W8A8": ("CompressedTensorsW8A8Int8", "CPUInt8ScaledMMLinearKernel"),
    "W4A8": ("CompressedTensorsW4A8Int", "Dynamic4bitLinearKernel"),
    "W4A16": ("CompressedTensorsWNA16", "CPUWNA16LinearKernel"),
}
LINEAR_LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
WNA16_OP = "cpu_gemm_wna16"
PPL_CONTEXT, PPL_STRIDE, PPL_SAMPLES = 128, 48, 40
PPL_FLAGS = ["--num-samples", str(PPL_SAMPLES), "--context-length", str(PPL_CONTEXT),
             "--stride", str(PPL_STRIDE), "--max-batch-windows", "7"]
# fp32 vLLM against fp32 transformers agree within 1e-6 relative on perplexity
# (tests/engine/test_perplexity.py); a quantized model must differ far beyond that.
MIN_PPL_REL_CHANGE = 1e-4
_PICKLE_ENV = "VLLM_ALLOW_INSECURE_SERIALIZATION"


def loaded_vllm_libraries() -> str:
    """vLLM's kernel libraries (`_C`, `_C_AVX2`, `_C_AVX512`) mapped into this process."""
    maps = Path("/proc/self/maps").read_text()
    return ", ".join(sorted(set(re.findall(r"/vllm/(_C\w*)\.abi3\.so", maps)))) or "none"


def kernel_library_probe() -> tuple[str, str | None]:
    """In this process, vLLM's own choice of kernel library (the workers inherit what decides
    it: the CPU and the forced-ISA environment): its name, and the AttributeError's text of
    looking up `torch.ops._C.cpu_gemm_wna16` there (None: the op exists)."""
    import torch
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    try:
        getattr(torch.ops._C, WNA16_OP)
    except AttributeError as error:
        return loaded_vllm_libraries(), str(error)
    return loaded_vllm_libraries(), None


def _count_kernel_calls(self) -> int:
    """In the worker (collective_rpc): wrap each quantized layer's kernel `apply_weights`
    with a counter; the number of kernels wrapped."""
    wrapped = 0
    for module in self.model_runner.get_model().modules():
        kernel = getattr(getattr(module, "scheme", None), "kernel", None)
        if kernel is None or hasattr(kernel, "fastpath_calls"):
            continue
        kernel.fastpath_calls = 0

        def counted(*args, _kernel=kernel, _apply=kernel.apply_weights, **kwargs):
            _kernel.fastpath_calls += 1
            return _apply(*args, **kwargs)

        kernel.apply_weights = counted
        wrapped += 1
    return wrapped


def _linear_kernels(self) -> dict:
    """In the worker (collective_rpc): per layer with a quant method, the classes of the
    method, its compressed-tensors scheme and kernel, and the kernel's counted calls; the
    kernel library loaded and whether it has the W4A16 op."""
    import re
    from pathlib import Path

    import torch

    layers = {}
    for name, module in self.model_runner.get_model().named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        scheme = getattr(module, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        layers[name] = {"method": type(method).__name__,
                        "scheme": None if scheme is None else type(scheme).__name__,
                        "kernel": None if kernel is None else type(kernel).__name__,
                        "calls": getattr(kernel, "fastpath_calls", None)}
    maps = Path("/proc/self/maps").read_text()
    library = ", ".join(sorted(set(re.findall(r"/vllm/(_C\w*)\.abi3\.so", maps)))) or "none"
    return {"library": library, "wna16_op": hasattr(torch.ops._C, "cpu_gemm_wna16"),
            "layers": layers}


@pytest.fixture(scope="module", params=SCHEMES)
def scheme(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def probe() -> tuple[str, str | None]:
    return kernel_library_probe()


@pytest.fixture(scope="module")
def checkpoint(scheme, probe) -> str:
    """The llm-compressor checkpoint of `scheme` (built on first use, then cached); a skip
    with vLLM's reason where this machine's kernel build cannot run it."""
    library, missing_op = probe
    if scheme == "W4A16" and missing_op is not None:
        pytest.skip(f"vLLM's {EXPECTED[scheme][1]} needs torch.ops._C.{WNA16_OP}, absent from "
                    f"the kernel library vLLM loaded here ({library}): {missing_op}")
    return str(quantize.get_compressed(MODEL, scheme))


@pytest.fixture(scope="module")
def base_perplexity() -> tuple[float, int]:
    """The unquantized model's perplexity over `PPL_FLAGS`' windows (transformers, fp32) and
    the number of tokens they score."""
    from transformers import AutoTokenizer

    from fastpath import data
    from fastpath.metrics import conventions
    from fastpath.metrics.perplexity import PerplexityResult

    path = zoo.get_model(MODEL)
    text, _ = data.load_text(num_samples=PPL_SAMPLES)
    layout = conventions.build("fastpath", AutoTokenizer.from_pretrained(path), text,
                               PPL_CONTEXT, PPL_STRIDE)
    logprobs = reference.score_stream(reference.load_model(str(path)), layout.tokens,
                                      PPL_CONTEXT, PPL_STRIDE)
    return PerplexityResult(logprobs, len(layout.windows)).perplexity, layout.num_scored


def test_worker_runs_the_quantized_kernel(scheme, checkpoint, probe, runner, monkeypatch):
    """The worker's linear layers hold the scheme's kernel, it runs on a prompt, and the
    workers load the kernel library this process's probe found."""
    from vllm import SamplingParams

    monkeypatch.setenv(_PICKLE_ENV, "1")  # lets collective_rpc send the probe functions
    scheme_class, kernel_class = EXPECTED[scheme]
    with runner_engine(checkpoint, runner, **engine_kwargs(enforce_eager=True)) as llm:
        assert all(n > 0 for n in llm.collective_rpc(_count_kernel_calls))
        llm.generate([{"prompt_token_ids": list(range(3, 40))}],
                     SamplingParams(max_tokens=1), use_tqdm=False)
        reports = llm.collective_rpc(_linear_kernels)
    for report in reports:
        print(f"\n{scheme}: worker loaded {report['library']}")
        assert (report["library"], report["wna16_op"]) == (probe[0], probe[1] is None), (
            "the workers' kernel library differs from this process's probe")
        linear = {name: layer for name, layer in report["layers"].items()
                  if name.rsplit(".", 1)[-1] in LINEAR_LAYERS}
        assert len(linear) == len(LINEAR_LAYERS) * 2, sorted(report["layers"])  # 2 layers
        for name, layer in sorted(linear.items()):
            print(f"  {name}: {layer['method']} / {layer['scheme']} / {layer['kernel']} "
                  f"({layer['calls']} calls)")
            assert layer["method"] == "CompressedTensorsLinearMethod", (name, layer)
            assert layer["method"] != "UnquantizedLinearMethod"
            assert (layer["scheme"], layer["kernel"]) == (scheme_class, kernel_class), name
            assert layer["calls"] > 0, f"{name}: {kernel_class} never ran"
        lm_head = report["layers"]["lm_head"]  # left out of the recipe: not quantized
        assert lm_head["scheme"] is None and "Unquantized" in lm_head["method"], lm_head


def test_ppl_both_bitwise_equal(scheme, checkpoint, base_perplexity, runner, tmp_path,
                                record_property):
    """`fastpath ppl --method both` on the quantized model: every logprob of the fast path
    equals the standard path's bit for bit; a finite PPL, not the unquantized model's.

    No `capsys`: with it, the next engine's shutdown warnings in this process failed to print
    ("I/O operation on closed file": a log handler kept the stream capsys closed)."""
    out = tmp_path / "ppl.json"
    code = cli.main(["ppl", "--model", checkpoint, "--method", "both", *PPL_FLAGS,
                     "--json", str(out), "--model-runner", runner])
    assert code == 0, "fastpath ppl failed: its output is in the captured stdout/stderr"
    report = json.loads(out.read_text())
    base, base_tokens = base_perplexity
    ppl = report["perplexity"]
    record_property("ppl", ppl)
    record_property("ppl_unquantized", base)
    print(f"\n{scheme}: PPL {ppl:.6f} (unquantized {base:.6f}, rel change "
          f"{abs(ppl - base) / base:.2e}) over {report['scored_tokens']} tokens, "
          f"bitwise_equal {report['bitwise_equal']}, mismatches {report['bitwise_mismatches']}")
    assert report["bitwise_equal"] is True and report["bitwise_mismatches"] == 0
    assert report["scored_tokens"] == base_tokens  # the same windows as the base figure
    assert math.isfinite(ppl) and ppl > 1
    assert abs(ppl - base) / base > MIN_PPL_REL_CHANGE, (ppl, base)


KLD_TOP_K, KLD_SAMPLES = 8, 8


def standard_rows(llm, prompt: list[int], first: int, k: int) -> tuple:
    """vLLM's standard path on one window (prompt_logprobs=k, the prompt alone on the idle
    engine): per scored position from `first`, the target's log-prob and the top-k ids and
    log-probs in rank order."""
    import numpy as np
    from vllm import SamplingParams

    (out,) = llm.generate([{"prompt_token_ids": prompt}],
                          SamplingParams(max_tokens=1, prompt_logprobs=k), use_tqdm=False)
    targets, ids, values = [], [], []
    for position in range(first, len(prompt)):
        entries = out.prompt_logprobs[position]
        targets.append(entries[prompt[position]].logprob)
        ranked = sorted((e.rank, token, e.logprob) for token, e in entries.items()
                        if e.rank <= k)
        ids.append([token for _, token, _ in ranked])
        values.append([value for *_, value in ranked])
    return (np.array(targets, np.float32), np.array(ids, np.int32),
            np.array(values, np.float32))


def test_kld_passes_bitwise_standard(scheme, checkpoint, runner):
    """`fastpath kld`'s passes on the quantized model, window by window against vLLM's
    standard path (prompt_logprobs=K) on the same engine, each window alone on it: the base
    pass's targets and top-K, and the model pass's targets, its scores on those K ids and its
    own top few, all bit for bit."""
    import numpy as np
    from transformers import AutoTokenizer

    from fastpath import data
    from fastpath.engine.scorer import EngineScorer
    from fastpath.metrics import basefile, conventions, kld
    from tests.helpers import assert_bitwise_equal

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    text, _ = data.load_text(num_samples=KLD_SAMPLES)
    layout = conventions.build("fastpath", tokenizer, text, PPL_CONTEXT, PPL_STRIDE)
    with runner_engine(checkpoint, runner, **engine_kwargs()) as llm:
        scorer = EngineScorer(llm, max_batch=1)  # each window alone, as the standard runs
        target, top_lp, top_ids, _ = kld.base_pass(scorer, layout, KLD_TOP_K)
        base = basefile.from_layout(layout, target, top_lp, top_ids,
                                    llm.llm_engine.model_config.get_vocab_size(),
                                    basefile.tokenizer_fingerprint(tokenizer))
        model = kld.model_pass(scorer, layout, base)
        rows = [standard_rows(llm, w.prompt(layout.tokens), w.score_from - w.begin, KLD_TOP_K)
                for w in layout.windows]
    std_target, std_ids, std_values = (np.concatenate(parts) for parts in zip(*rows))
    own = kld.own_top_k(base)
    print(f"\n{scheme}: {len(layout.windows)} windows, {std_target.size} scored tokens, "
          f"K={KLD_TOP_K}, own top {own}")
    assert_bitwise_equal(base.target_logprobs, std_target, what="base pass targets")
    assert_bitwise_equal(base.topk_logprobs, std_values, what="base pass top-K")
    assert np.array_equal(base.topk_ids, std_ids), "base pass top-K ids"
    assert_bitwise_equal(model.target_logprobs, std_target, what="model pass targets")
    assert_bitwise_equal(model.topk_logprobs, std_values, what="model pass on the top-K ids")
    assert_bitwise_equal(model.own_top_logprobs, std_values[:, :own], what="own top few")
