"""llama.cpp as a peer on the same model: build its `llama-perplexity`, convert a checkpoint
to GGUF, run llama.cpp's own perplexity procedure, and read its per-token log-probs.

- `build(dest)`: llama.cpp's source is the one vendored in the llama-cpp-python sdist of the
  installed version (so the binary and the Python bindings run the same llama.cpp commit);
  `llama-perplexity` is built with cmake for the CPU (`GGML_NATIVE` on), once per `dest`.
- `convert(model_dir, out_gguf, source)`: the vendored `convert_hf_to_gguf.py` with outtype
  f32, with the `gguf` package vendored beside it (gguf-py; the converter's own default):
  the gguf 0.19.0 release on PyPI predates this converter (it lacks `LazyChunkedTensor`,
  which the converter's tensor writer calls). The converter knows BPE
  pre-tokenizers by the hash of one test string's tokens; fastpath's tokenizers are trained
  here, so their hash is unknown and it refuses them. Their pre-tokenizer is GPT-2's regex
  (ByteLevel, `use_regex`), so the conversion names it "gpt-2"; the tests check that
  llama.cpp's tokens then equal the Hugging Face tokenizer's on the bundled text.
- `run_perplexity(...)`: `llama-perplexity` on a text file, its final estimate and chunk
  count parsed from its log. fp32 end to end: the KV cache in f32 (llama.cpp's default f16
  would round every key and value), flash attention off, a fixed thread count and one
  chunk per batch (batch = n_ctx).
- `LlamaCppScorer` / `token_logprobs(...)`: llama-cpp-python on the same GGUF with the same
  settings: float32 logits of every position, log-softmax in float64, the next token gathered.

`python -m fastpath.testing.llama_cpp build DEST` builds (tox -e llamacpp does this);
`convert` and `perplexity` run the other two steps from the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

PACKAGE = "llama-cpp-python"
TARGET = "llama-perplexity"
THREADS = 2  # one fixed count: llama.cpp splits its matmuls by thread
KV_TYPE = "f32"
FLASH_ATTN = "off"
BUILD_RECORD = "fastpath-build.json"
BUILD_DIR_ENV = "FASTPATH_LLAMA_CPP_DIR"  # where tests find the build (tox -e llamacpp sets it)
JOBS_ENV = "FASTPATH_BUILD_JOBS"  # cmake's parallel jobs (default: every core)
# llama-perplexity puts BOS first in each chunk only where the GGUF says add_bos_token; the
# converter copies that from the tokenizer's post-processor (none here), fastpath's
# convention puts BOS first wherever the tokenizer has one. Given at run time, in the open.
ADD_BOS_KEY = "tokenizer.ggml.add_bos_token"
ADD_BOS_OVERRIDE = f"{ADD_BOS_KEY}=bool:true"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON",
)


class LlamaCppError(RuntimeError):
    """A build, conversion or run of llama.cpp that failed; the message carries its output."""


def _run(command: Sequence[str], what: str, **kwargs: Any) -> str:
    """Run a command, its stdout and stderr together; LlamaCppError with the tail if it fails."""
    done = subprocess.run(list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace", **kwargs)
    if done.returncode != 0:
        raise LlamaCppError(f"{what} failed (exit {done.returncode}): {' '.join(command)}\n"
                            f"{done.stdout[-4000:]}")
    return done.stdout


def installed_version() -> str:
    """The installed llama-cpp-python's version: the sdist whose llama.cpp is built."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise LlamaCppError(f"{PACKAGE} is not installed: give the sdist to build from "
                            "(--sdist) or install it (tox -e llamacpp)") from None


def download_sdist(version: str, into: Path) -> Path:
    """`pip download` the sdist of llama-cpp-python `version` (no wheel, no dependencies)."""
    into.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "-q", f"{PACKAGE}=={version}",
          "--no-binary", ":all:", "--no-deps", "-d", str(into)], "pip download")
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise LlamaCppError(f"pip download left no llama_cpp_python-{version}.tar.gz in {into}")
    return found[0]


def source_dir(dest: Path) -> Path:
    """The llama.cpp source tree a build in `dest` uses (the converter lives there too)."""
    return Path(dest) / "src"


def binary_path(dest: Path) -> Path:
    """Where `build(dest)` puts `llama-perplexity`."""
    return Path(dest) / "bin" / TARGET


def build_record(dest: Path) -> dict[str, Any] | None:
    """What the build in `dest` was made from and how long it took (None: no build there)."""
    path = Path(dest) / BUILD_RECORD
    if not path.is_file() or not binary_path(dest).is_file():
        return None
    return json.loads(path.read_text())


def _sha256(path: Path) -> str:
    """sha256 of a file, recorded so a build names the exact sdist it came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_llama_cpp(sdist: Path, into: Path) -> None:
    """The sdist's `vendor/llama.cpp` tree, extracted to `into` (replacing what was there)."""
    if into.exists():
        shutil.rmtree(into)
    with tempfile.TemporaryDirectory(dir=into.parent) as scratch, tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in f"/{m.name}/"
                   or m.name.endswith("/vendor/llama.cpp")]
        if not members:
            raise LlamaCppError(f"{sdist} has no vendor/llama.cpp")
        tar.extractall(scratch, members=members, filter="data")
        (tree,) = Path(scratch).glob("*/vendor/llama.cpp")
        tree.rename(into)


def build(dest: Path, sdist: Path | None = None, jobs: int | None = None,
          version: str | None = None) -> Path:
    """`llama-perplexity` of the installed llama-cpp-python's llama.cpp, built into `dest`
    once (a build from the same version is reused); the binary's path."""
    dest = Path(dest).resolve()
    version = version or installed_version()
    record = build_record(dest)
    if record is not None and record.get("version") == version:
        return binary_path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if sdist is None:
        sdist = download_sdist(version, dest / "sdist")
    if jobs is None:
        jobs = int(os.environ.get(JOBS_ENV) or os.cpu_count() or 1)
    start = time.monotonic()
    _extract_llama_cpp(Path(sdist), source_dir(dest))
    build_dir = dest / "build"
    shutil.rmtree(build_dir, ignore_errors=True)
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run(["cmake", "-S", str(source_dir(dest)), "-B", str(build_dir), *generator, *CMAKE_FLAGS],
         "cmake configure")
    _run(["cmake", "--build", str(build_dir), "--target", TARGET, "-j", str(jobs)],
         "cmake build")
    built = next(build_dir.rglob(TARGET), None)
    if built is None:
        raise LlamaCppError(f"the build left no {TARGET} under {build_dir}")
    binary_path(dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(built, binary_path(dest))
    (dest / BUILD_RECORD).write_text(json.dumps({
        "version": version, "sdist": Path(sdist).name, "sdist_sha256": _sha256(Path(sdist)),
        "cmake_flags": list(CMAKE_FLAGS), "jobs": jobs,
        "build_seconds": round(time.monotonic() - start, 1)}, indent=2))
    return binary_path(dest)


# The converter, run in a child process: its own sys.path (the vendored `conversion`
# package), torch's inference mode and logging setup stay out of the caller's process.
_CONVERT = """
import sys
from pathlib import Path
source, model, out = sys.argv[1:4]
source = str(Path(source).resolve())
sys.path[:0] = [source, str(Path(source) / "gguf-py")]
import gguf
assert gguf.__file__.startswith(source), gguf.__file__
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", "f32"]
convert_hf_to_gguf.main()
"""


def convert(model_dir: Path, out_gguf: Path, source: Path) -> Path:
    """`model_dir` (a Hugging Face checkpoint with a GPT-2-regex BPE tokenizer) as an f32
    GGUF at `out_gguf`, by the converter in the llama.cpp tree `source`."""
    out_gguf = Path(out_gguf)
    out_gguf.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py
    _run([sys.executable, "-c", _CONVERT, str(source), str(model_dir), str(out_gguf)],
         "convert_hf_to_gguf", env=env)
    if not out_gguf.is_file():
        raise LlamaCppError(f"the converter wrote no {out_gguf}")
    return out_gguf


@dataclass(frozen=True)
class PerplexityRun:
    """llama-perplexity's answer: its final estimate, its chunks and its log."""

    perplexity: float  # its final estimate, printed to 4 decimals
    stderr: float
    chunks: int
    n_ctx: int
    mean_nll: float | None  # the mean NLL after the last chunk, printed to 6 decimals
    running: tuple[float, ...]  # the PPL it prints after each chunk
    seconds: float
    log: str

    @property
    def scored_tokens(self) -> int:
        """Tokens it scored: rows n_ctx/2 .. n_ctx-2 of each chunk."""
        return self.chunks * (self.n_ctx - self.n_ctx // 2 - 1)


_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_RUNNING = re.compile(r"\[(\d+)\]([0-9.]+|nan|inf),")
# --ppl-output-type 1: per chunk "start  PPL  mean-NLL  its-stderr".
_ROW = re.compile(r"^\s*(\d+)\s+([0-9.]+)\s+(-?[0-9.]+)\s+(-?[0-9.]+|nan|-nan)\s*$",
                  re.MULTILINE)


def parse_perplexity_log(log: str, seconds: float = 0.0) -> PerplexityRun:
    """The figures of a llama-perplexity log (either output type); LlamaCppError where the
    chunk count or the final estimate is missing."""
    chunks, final = _CHUNKS.search(log), _FINAL.search(log)
    if chunks is None or final is None:
        raise LlamaCppError(f"llama-perplexity's log has no chunk count or final estimate:\n"
                            f"{log[-4000:]}")
    rows = _ROW.findall(log)
    running = tuple(float(value) for _, value in _RUNNING.findall(log))
    if rows:
        running = tuple(float(row[1]) for row in rows)
    return PerplexityRun(perplexity=float(final.group(1)), stderr=float(final.group(2)),
                         chunks=int(chunks.group(1)), n_ctx=int(chunks.group(2)),
                         mean_nll=float(rows[-1][2]) if rows else None,
                         running=running, seconds=seconds, log=log)


def run_perplexity(binary: Path, gguf: Path, text_file: Path, n_ctx: int,
                   threads: int = THREADS, add_bos: bool = True,
                   extra_args: Sequence[str] = ()) -> PerplexityRun:
    """llama.cpp's own perplexity procedure on `text_file` (llama-perplexity strips one
    trailing newline): chunks of `n_ctx`, one per batch, fp32 KV cache; the mean NLL
    printed after each chunk (--ppl-output-type 1: 6 decimals, where the PPL has 4)."""
    command = [str(binary), "-m", str(gguf), "-f", str(text_file), "-c", str(n_ctx),
               "-b", str(n_ctx), "-ub", str(n_ctx), "-t", str(threads), "-tb", str(threads),
               "-ctk", KV_TYPE, "-ctv", KV_TYPE, "-fa", FLASH_ATTN, "--no-warmup",
               "--ppl-output-type", "1"]
    if add_bos:
        command += ["--override-kv", ADD_BOS_OVERRIDE]
    command += list(extra_args)
    start = time.monotonic()
    # Its log (stderr) and its figures (stdout) apart: one file for both loses lines.
    done = subprocess.run(command, capture_output=True, text=True, errors="replace")
    log = f"{done.stderr}\n{done.stdout}"
    if done.returncode != 0:
        raise LlamaCppError(f"llama-perplexity failed (exit {done.returncode}): "
                            f"{' '.join(command)}\n{log[-4000:]}")
    return parse_perplexity_log(log, time.monotonic() - start)


def perplexity_text(text: str, first_token_text: str) -> str:
    """The file content that makes llama-perplexity's stream fastpath's: llama.cpp tokenizes
    with BOS in front ([BOS] + tokens) and replaces each chunk's first token by BOS, fastpath
    tokenizes without BOS and does the same replacement. Dropping the first token's text
    makes the two streams equal past position 0, where both put BOS. The trailing newline
    is the one llama-perplexity strips when it reads the file."""
    if not text.startswith(first_token_text):
        raise ValueError(f"the text does not start with its first token {first_token_text!r}")
    return text[len(first_token_text):] + "\n"


class LlamaCppScorer:
    """One llama-cpp-python model on a GGUF with run_perplexity's settings (fp32 KV cache,
    flash attention off, add_bos_token as given): every position's logits, as llama.cpp
    computes them in a batch of the whole window."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int = THREADS,
                 add_bos: bool = True) -> None:
        import llama_cpp

        self.n_ctx = n_ctx
        self.llm = llama_cpp.Llama(
            model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
            n_threads=threads, n_threads_batch=threads, logits_all=True, flash_attn=False,
            type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
            kv_overrides={ADD_BOS_KEY: True} if add_bos else None, verbose=False)

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """llama.cpp's tokens for `text` (no special-token parsing)."""
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False))

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 logits [len(token_ids), vocab] of one window evaluated from position 0."""
        if not 1 <= len(token_ids) <= self.n_ctx:
            raise ValueError(f"a window of {len(token_ids)} tokens; n_ctx is {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(token_ids))
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def token_logprobs(self, token_ids: Sequence[int], score_from: int = 1) -> np.ndarray:
        """float64 log-prob of token_ids[i] given token_ids[:i], for i in score_from..len-1:
        log-softmax in float64 of llama.cpp's float32 logits, the next token gathered."""
        if not 1 <= score_from < len(token_ids):
            raise ValueError(f"score_from {score_from} outside 1..{len(token_ids) - 1}")
        rows = self.logits(token_ids)[score_from - 1:-1].astype(np.float64)
        top = rows.max(axis=1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(rows - top).sum(axis=1))
        targets = np.asarray(token_ids[score_from:], dtype=np.int64)
        return rows[np.arange(len(targets)), targets] - log_z


def token_logprobs(gguf: Path, token_ids: Sequence[int], score_from: int = 1,
                   threads: int = THREADS) -> np.ndarray:
    """llama.cpp's float64 log-prob of each of token_ids[score_from:] (one window)."""
    return LlamaCppScorer(gguf, len(token_ids), threads).token_logprobs(token_ids, score_from)


def main(argv: list[str] | None = None) -> int:
    """Command line: build llama-perplexity, convert a checkpoint, run llama-perplexity."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    built = commands.add_parser("build", help=f"build {TARGET} into DEST (once)")
    built.add_argument("dest", type=Path)
    built.add_argument("--sdist", type=Path, help="llama-cpp-python sdist (default: download)")
    built.add_argument("--version", help=f"{PACKAGE} version (default: the installed one)")
    built.add_argument("--jobs", type=int, help=f"parallel jobs (default ${JOBS_ENV} or cores)")
    converted = commands.add_parser("convert", help="checkpoint -> f32 GGUF")
    converted.add_argument("model", type=Path)
    converted.add_argument("out", type=Path)
    converted.add_argument("--build", type=Path, required=True, help="a build's DEST")
    ppl = commands.add_parser("perplexity", help=f"run {TARGET} and print its figures")
    ppl.add_argument("gguf", type=Path)
    ppl.add_argument("text_file", type=Path)
    ppl.add_argument("--build", type=Path, required=True, help="a build's DEST")
    ppl.add_argument("--context-length", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "build":
        binary = build(args.dest, args.sdist, args.jobs, args.version)
        print(json.dumps({"binary": str(binary), **(build_record(args.dest) or {})}))
    elif args.command == "convert":
        print(convert(args.model, args.out, source_dir(args.build)))
    else:
        run = run_perplexity(binary_path(args.build), args.gguf, args.text_file,
                             args.context_length)
        print(json.dumps({"perplexity": run.perplexity, "stderr": run.stderr,
                          "mean_nll": run.mean_nll, "chunks": run.chunks, "n_ctx": run.n_ctx,
                          "scored_tokens": run.scored_tokens, "seconds": run.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
