"""Where a model worker spends its time while scoring: py-spy on the worker, shares by step.

Starts an engine, scores steady-state windows in a loop (default: whole windows, context
2048 = stride, every row scored, on the Llama-3 shape twin), finds the worker processes
(`fastpath.testing.measure.worker_pids`, by collective_rpc: the engine-core process itself where
one worker runs there), records each with `py-spy record --format raw` (collapsed stacks,
non-blocking sampling, active samples only) and writes a text summary per worker:
- each sample's step: `lm_head` (the model's `compute_logits`), `all_gather` (the
  vocabulary-parallel logits' gather inside it, TP > 1), `log_softmax` (the sampler's
  `compute_logprobs`), `gather` (the gather of the targets; on the standard path also
  `gather_logprobs`: top-k and ranks), `copy` (device-to-host copies, `.cpu()`, and the
  device sync that waits for them), `forward` (the model's forward pass), `other`;
- inclusive shares of the top functions, and the source lines that sample most (self).
Shares of time are what this gives; on a loaded machine the absolute rate is noise.

    python benchmarks/profile_worker.py                       # fast, whole windows, 8B twin
    python benchmarks/profile_worker.py --method standard --k 0  # the same windows, K=0
    python benchmarks/profile_worker.py --model-name llama3-70b-twin --tensor-parallel-size 2 \\
        --stride 512                                           # TP 2 (CPU: binds 0|1)

Needs `py-spy` (pip install py-spy; the `bench` extra) and permission to read the
worker's memory (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import collections
import linecache
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

# A frame of py-spy's raw (collapsed) format: "function (file:line)".
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")
STEPS = ("lm_head", "all_gather", "log_softmax", "gather", "copy", "forward", "other")
_SCORING_FUNCS = {"score_fixed_ids", "_get_prompt_logprobs_dict", "_score_rows",
                  "_score_chunk"}


def parse_frame(frame: str) -> tuple[str, str, int]:
    """(function, file, line) of one collapsed frame; line 0 where py-spy gave none."""
    match = _FRAME.match(frame)
    if match is None:
        return frame, "", 0
    return match["func"], match["file"], int(match["line"])


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: (frames root first, sample count) per distinct stack."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _source(file: str, line: int) -> str:
    return linecache.getline(file, line).strip() if file and line else ""


def classify(frames: Sequence[str]) -> str:
    """The scoring step a sample belongs to, from its functions and its leaf source line."""
    funcs = [parse_frame(f)[0].rsplit(".", 1)[-1] for f in frames]
    if any("all_gather" in f for f in funcs):
        return "all_gather"
    if "compute_logits" in funcs:
        return "lm_head"
    if "compute_logprobs" in funcs:
        return "log_softmax"
    if "gather_logprobs" in funcs:
        return "gather"
    if "_sync_device" in funcs:
        return "copy"
    inside_scoring = [i for i, f in enumerate(funcs) if f in _SCORING_FUNCS]
    if inside_scoring:
        _, file, line = parse_frame(frames[inside_scoring[-1]])
        text = _source(file, line)
        if ".gather(" in text:
            return "gather"
        if "copy_(" in text or ".cpu(" in text or ".to(" in text:
            return "copy"
        return "other"
    if "_model_forward" in funcs or "forward" in funcs:
        return "forward"
    return "other"


def summarize(stacks: list[tuple[list[str], int]], header: Iterable[str], top: int = 40) -> str:
    """The text report: step shares, top inclusive functions, top self source lines."""
    total = sum(count for _, count in stacks)
    if total == 0:
        return "\n".join([*header, "# no samples (was the worker busy?)"]) + "\n"
    steps: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[tuple[str, str, int]] = collections.Counter()
    for frames, count in stacks:
        steps[classify(frames)] += count
        for name in {parse_frame(f)[0] for f in frames}:
            inclusive[name] += count
        leaves[parse_frame(frames[-1])] += count
    lines = [*header, f"# {total} active samples", "", "## share of samples by step"]
    scoring = sum(steps[s] for s in ("lm_head", "all_gather", "log_softmax", "gather", "copy"))
    for step in STEPS:
        lines.append(f"{100 * steps[step] / total:6.1f}% {step}")
    lines.append(f"{100 * scoring / total:6.1f}% (scoring: lm_head + all_gather + log_softmax"
                 " + gather + copy)")
    lines += ["", f"## inclusive share per function (top {top})"]
    lines += [f"{100 * n / total:6.1f}% {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "## self share per source line (top 25)"]
    for (func, file, line), n in leaves.most_common(25):
        where = f"{Path(file).name}:{line}" if file else ""
        lines.append(f"{100 * n / total:6.1f}% {func} ({where}) {_source(file, line)}")
    return "\n".join(lines) + "\n"


def _score_loop(llm, requests, path: str, k: int, stop: threading.Event, rounds: list) -> None:
    from fastpath.engine import scoring

    while not stop.is_set():
        scoring.score(llm, requests, path, k)
        rounds.append(time.perf_counter())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-name", default="llama3-8b-twin", help="zoo model")
    parser.add_argument("--model", help="checkpoint path (overrides --model-name)")
    parser.add_argument("--method", choices=("fast", "standard"), default="fast")
    parser.add_argument("--k", type=int, default=0, help="prompt_logprobs K for --method standard")
    parser.add_argument("--context-length", type=int, default=2048)
    parser.add_argument("--stride", type=int, default=2048, help="2048 = whole windows")
    parser.add_argument("--windows", type=int, default=2, help="windows per scoring round")
    parser.add_argument("--duration", type=int, default=20, help="seconds py-spy records")
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("reports/profiles"))
    parser.add_argument("--name", help="file name stem (default from model, path, shape)")
    args = parser.parse_args(argv)

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        parser.error("py-spy not found: pip install py-spy")

    from fastpath import zoo
    from fastpath.data import bundled_text
    from fastpath.engine import scoring
    from fastpath.engine.runners import device_name
    from fastpath.metrics import perplexity
    from fastpath.metrics.windows import make_windows
    from fastpath.testing.measure import worker_pids

    model = args.model or str(zoo.get_model(args.model_name))
    kwargs = dict(tensor_parallel_size=args.tensor_parallel_size, max_num_batched_tokens=8192,
                  enable_prefix_caching=False)
    if scoring.on_cpu():
        kwargs["kv_cache_memory_bytes"] = 256 << 20
        if args.tensor_parallel_size == 2:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    name = Path(model).name if args.model else args.model_name
    label = args.method if args.method == "fast" else f"standard-k{args.k}"
    stem = args.name or (f"{name}_tp{args.tensor_parallel_size}_{label}_ctx"
                         f"{args.context_length}_stride{args.stride}")
    args.out.mkdir(parents=True, exist_ok=True)
    with scoring.engine(model, **kwargs) as llm:
        tokens = llm.get_tokenizer().encode(bundled_text())
        windows = make_windows(len(tokens), args.context_length, args.stride)
        windows = windows[1 : 1 + args.windows]  # steady state: full context
        requests = perplexity.window_requests(tokens, windows)
        started = time.perf_counter()
        scoring.score(llm, requests, args.method, args.k)  # warm-up: kernels for these shapes
        print(f"warm-up round: {time.perf_counter() - started:.2f} s", flush=True)
        pids = worker_pids(llm)
        stop, rounds = threading.Event(), []
        loop = threading.Thread(target=_score_loop,
                                args=(llm, requests, args.method, args.k, stop, rounds))
        loop.start()
        raw = [args.out / f"{stem}_worker{i}.raw" for i in range(len(pids))]
        try:
            time.sleep(1.0)  # the first round reaches the worker
            spies = [subprocess.Popen(
                [py_spy, "record", "--pid", str(pid), "--duration", str(args.duration),
                 "--rate", str(args.rate), "--format", "raw", "--nonblocking",
                 "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for pid, path in zip(pids, raw, strict=True)]
            for spy in spies:
                _, err = spy.communicate(timeout=args.duration + 120)
                if spy.returncode != 0:
                    raise RuntimeError(f"py-spy failed: {err.strip()}")
        finally:
            stop.set()
            loop.join()
        per_round = ((rounds[-1] - rounds[0]) / (len(rounds) - 1)) if len(rounds) > 1 else None
    for i, (pid, path) in enumerate(zip(pids, raw, strict=True)):
        header = [
            f"# py-spy record --pid <worker {i}: pid {pid}> --duration {args.duration} "
            f"--rate {args.rate} --format raw --nonblocking",
            f"# while {model if args.model else args.model_name} (TP {args.tensor_parallel_size}"
            f", {device_name()}) scored {len(requests)} windows per round (context "
            f"{args.context_length}, stride {args.stride}, "
            f"{sum(w.num_scored for w in windows)} scored rows) on path {label}, in a loop",
            f"# rounds completed in the loop: {len(rounds)}; seconds per round "
            + (f"{per_round:.2f}" if per_round else "n/a") + " (noisy machine: shares only)",
        ]
        summary = args.out / f"{stem}_worker{i}.txt"
        summary.write_text(summarize(read_collapsed(path), header))
        path.unlink()  # the raw stacks are large; the summary is what is kept
        print(summary.read_text().split("## inclusive")[0])
        print(f"wrote {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
