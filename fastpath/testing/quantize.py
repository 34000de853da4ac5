"""Locally built quantized copies of a checkpoint, for `fastpath kld` tests and examples.

Round-to-nearest (RTN) weight quantization, as the simplest W4A16 / W8A16 recipes do it:
each linear layer's weight (the output embedding excepted) is split into groups of
`group_size` input columns, scaled by the group's max |w| to signed `bits`-bit integers,
rounded, and scaled back. The result is saved as an ordinary fp32 checkpoint with the same
tokenizer ("fake-quantized": the weights take only the quantized values), which vLLM's CPU
backend and transformers load like the original. Cached under the zoo folder, keyed by the
source checkpoint and the recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
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
