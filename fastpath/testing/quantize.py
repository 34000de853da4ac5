"""Locally built quantized copies of a checkpoint, for `fastpath kld` tests and examples.

Round-to-nearest (RTN) weight quantization, as the simplest W4A16 / W8A16 recipes do it:
each linear layer's weight (the output embedding excepted) is split into groups of
`group_size` input columns, scaled by the group's max |w| to signed `bits`-bit integers,
rounded, and scaled back. The result is saved as an ordinary fp32 checkpoint with the same
tokenizer ("fake-quantized": the weights take only the quantized values), which vLLM's CPU
backend and transformers load like the original. Cached under the zoo folder, keyed by the
source checkpoint and the recipe.

Real quantized checkpoints (`get_compressed`): llm-compressor's one-shot GPTQ with the W8A8,
W4A8 or W4A16 preset, saved in the compressed-tensors format, as model makers publish them,
so vLLM runs its quantized CPU kernels on them. llm-compressor cannot share vLLM's
environment (conflicting pins), so `compress.py` runs under the interpreter named by
$FASTPATH_QUANTIZER_PYTHON (`tox -e quant` makes that environment).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from fastpath import zoo

RECIPE_VERSION = 1


def rtn_(weight, bits: int, group_size: int) -> None:
    """Quantize a 2-D weight in place: symmetric RTN per group of input columns."""
    import torch

    rows, columns = weight.shape
    if columns % group_size:
        raise ValueError(f"group size {group_size} does not divide {columns} input columns")
    groups = weight.reshape(rows, columns // group_size, group_size)
    top = 2 ** (bits - 1) - 1
    scale = groups.abs().amax(dim=-1, keepdim=True) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    quantized = torch.clamp(torch.round(groups / scale), -top - 1, top)
    weight.copy_((quantized * scale).reshape(rows, columns))


def quantized_copy(model_path: str | Path, bits: int = 4, group_size: int = 32) -> Path:
    """Path of an RTN fake-quantized fp32 copy of `model_path`, built on first use."""
    source = Path(model_path).resolve()
    recipe = {"source": str(source), "bits": bits, "group_size": group_size,
              "scheme": "symmetric RTN per input-column group", "version": RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    path = zoo.zoo_dir() / "quantized" / f"{source.name}-w{bits}g{group_size}-{key}"
    if not (path / "fastpath-quantized.json").exists():
        _build(source, path, recipe)
    return path


def _build(source: Path, path: Path, recipe: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    output = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not output:
                rtn_(module.weight, recipe["bits"], recipe["group_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    (tmp / "fastpath-quantized.json").write_text(json.dumps(recipe, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)


def get_quantized(name: str, bits: int = 4, group_size: int = 32) -> Path:
    """The RTN copy of zoo model `name` (both built on first use)."""
    return quantized_copy(zoo.get_model(name), bits, group_size)


# ---------------------------------------------------------------- real quantized checkpoints

QUANTIZER_ENV = "FASTPATH_QUANTIZER_PYTHON"
COMPRESS_RECIPE_VERSION = 1  # bump when compress.py's recipe changes; part of the cache key
COMPRESSED_SCHEMES = ("W8A8", "W4A8", "W4A16")
COMPRESSED_META = "fastpath-compressed.json"
# Settings of the quantizer's process that reach no other fastpath process: its own Python,
# not this one's site (the engine-site PYTHONPATH imports fastpath) or test conditions.
_CHILD_ENV_DROPPED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FASTPATH_V2_CPU",
                      "FASTPATH_CPU_ISA")


class QuantizerUnavailable(RuntimeError):
    """No quantizer interpreter is configured or it fails to start: the message says how."""


def quantizer_python() -> str:
    """The quantizer venv's interpreter, from $FASTPATH_QUANTIZER_PYTHON (else a clear error)."""
    python = os.environ.get(QUANTIZER_ENV, "")
    if not python:
        raise QuantizerUnavailable(
            f"{QUANTIZER_ENV} is not set: real quantized checkpoints are made by llm-compressor "
            "in a Python environment of its own (its pins conflict with vLLM's); `tox -e quant` "
            f"makes one and sets {QUANTIZER_ENV} to its python")
    if not Path(python).is_file():
        raise QuantizerUnavailable(f"{QUANTIZER_ENV}={python}: no such interpreter "
                                   "(`tox -e quant` makes one)")
    return python


def compressed_path(model_name: str, scheme: str) -> Path:
    """Where `get_compressed(model_name, scheme)` is cached: keyed by the source weights'
    sha256, the scheme and the recipe version, so changed weights never reuse a stale copy."""
    if scheme not in COMPRESSED_SCHEMES:
        raise ValueError(f"scheme must be one of {COMPRESSED_SCHEMES}, got {scheme!r}")
    source = zoo.get_model(model_name)
    recipe = {"weights_sha256": zoo.weights_sha256(source), "scheme": scheme,
              "version": COMPRESS_RECIPE_VERSION}
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    return zoo.zoo_dir() / "compressed" / f"{model_name}-{scheme.lower()}-{key}"


def get_compressed(model_name: str, scheme: str) -> Path:
    """A compressed-tensors checkpoint of zoo model `model_name` quantized by llm-compressor
    with `scheme` (W8A8, W4A8, W4A16), built on first use by the quantizer interpreter."""
    path = compressed_path(model_name, scheme)
    if not (path / COMPRESSED_META).exists():
        _build_compressed(zoo.get_model(model_name), path, scheme)
    return path


def _build_compressed(source: Path, path: Path, scheme: str) -> None:
    """Run compress.py under the quantizer's Python into a temp folder, then rename it."""
    import subprocess

    from fastpath.data import bundled_text

    python = quantizer_python()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        text = tmp.parent / f"{tmp.name}.txt"  # calibration text, outside the checkpoint
        text.write_text(bundled_text(), encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k not in _CHILD_ENV_DROPPED}
        if zoo.pinned_numerics():
            env.update(zoo.BUILD_NUMERICS)  # as zoo builds: the same bytes on one machine class
        script = Path(__file__).with_name("compress.py")
        # -I: the quantizer's own site only (no user site, no PYTHON* variables, and not
        # this folder first on sys.path, where kernels.py would shadow a package)
        command = [python, "-I", str(script), "--source", str(source), "--out", str(tmp),
                   "--scheme", scheme, "--text", str(text)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise QuantizerUnavailable(
                f"{python} {script.name} --scheme {scheme} failed (exit code "
                f"{done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
        quantizer = json.loads((tmp / "quantizer.json").read_text())
        (tmp / COMPRESSED_META).write_text(json.dumps({
            "source": str(source), "weights_sha256": zoo.weights_sha256(source),
            "scheme": scheme, "version": COMPRESS_RECIPE_VERSION, "quantizer_python": python,
            **quantizer}, indent=2))
        tmp.rename(path)
    except OSError:
        if not (path / COMPRESSED_META).exists():
            raise
        # another process built it first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp.parent / f"{tmp.name}.txt").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m fastpath.testing.quantize MODEL SCHEME...`: build (or find in the cache)
    each compressed checkpoint of a zoo model and print its path, one per line."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastpath.testing.quantize",
                                     description=main.__doc__)
    parser.add_argument("model", help="a zoo model, e.g. trained-llama (the embedded default)")
    parser.add_argument("schemes", nargs="+", choices=COMPRESSED_SCHEMES)
    args = parser.parse_args(argv)
    try:
        for scheme in args.schemes:
            print(get_compressed(args.model, scheme))
    except QuantizerUnavailable as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
