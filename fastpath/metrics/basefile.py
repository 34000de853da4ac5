"""The base file of `fastpath kld`: the base model's top-K per scored token, and what it is for.

One `.npz` (numpy's own container, read without pickle) holding, per scored token, the
target's log-prob (float32), the top-K ids (int32) and log-probs (float32, descending), and
what they were computed on: the token stream, the windows (begin, end, score_from,
first_token), the convention, K, the vocabulary size and a fingerprint of the tokenizer. A
later run reuses it only when all of these match its own; otherwise it is refused with a
message naming what differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastpath.metrics.conventions import Layout
from fastpath.metrics.windows import Window

FORMAT = "fastpath-kld-base"
FORMAT_VERSION = 1


class BaseFileError(ValueError):
    """A base file that cannot be used for this run; the message says what differs."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides tokenization: the fast tokenizer's full definition (vocabulary,
    merges, normalizer, pre/post-processing, added tokens), else the vocabulary, + BOS/EOS."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)  # call-time settings, not the tokenizer
        definition.pop("padding", None)
    else:
        definition = sorted(tokenizer.get_vocab().items())
    payload = json.dumps([definition, tokenizer.bos_token_id, tokenizer.eos_token_id],
                         sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()


def windows_array(windows: Sequence[Window]) -> np.ndarray:
    """[W, 4] int64: begin, end, score_from, first_token (-1 where none)."""
    rows = [(w.begin, w.end, w.score_from, -1 if w.first_token is None else w.first_token)
            for w in windows]
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


@dataclass
class BaseScores:
    """The base pass's answer for one layout, and the facts a reuse must match."""

    target_logprobs: np.ndarray  # float32 [n]
    topk_logprobs: np.ndarray  # float32 [n, K], descending per row
    topk_ids: np.ndarray  # int32 [n, K]
    tokens: np.ndarray  # int32 [stream tokens]
    windows: np.ndarray  # int64 [W, 4], see windows_array
    convention: str
    context_length: int
    stride: int | None
    vocab_size: int
    tokenizer: str  # tokenizer_fingerprint
    model: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int:
        return int(self.topk_ids.shape[1])

    @property
    def num_scored(self) -> int:
        return int(self.target_logprobs.size)

    def check_consistent(self) -> None:
        """Shapes and dtypes agree with each other and with the windows."""
        n = int((self.windows[:, 1] - self.windows[:, 2]).sum()) if self.windows.size else 0
        problems = []
        if self.target_logprobs.shape != (n,):
            problems.append(f"target_logprobs has shape {self.target_logprobs.shape}, "
                            f"the windows score {n} tokens")
        if self.topk_ids.shape != self.topk_logprobs.shape or self.topk_ids.shape[:1] != (n,):
            problems.append(f"top-K arrays have shapes {self.topk_ids.shape} and "
                            f"{self.topk_logprobs.shape}, expected ({n}, K)")
        for name, array, dtype in (("target_logprobs", self.target_logprobs, np.float32),
                                   ("topk_logprobs", self.topk_logprobs, np.float32),
                                   ("topk_ids", self.topk_ids, np.int32),
                                   ("tokens", self.tokens, np.int32)):
            if array.dtype != dtype:
                problems.append(f"{name} is {array.dtype}, expected {np.dtype(dtype)}")
        if problems:
            raise BaseFileError("inconsistent base file: " + "; ".join(problems))

    def save(self, path: str | Path) -> int:
        """Write the file (exactly at `path`); returns its size in bytes."""
        self.check_consistent()
        header = {"format": FORMAT, "version": FORMAT_VERSION, "convention": self.convention,
                  "context_length": self.context_length, "stride": self.stride,
                  "vocab_size": self.vocab_size, "tokenizer": self.tokenizer,
                  "model": self.model, "top_k": self.top_k, "meta": self.meta}
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, header=np.array(json.dumps(header, default=str)),
                     target_logprobs=self.target_logprobs, topk_logprobs=self.topk_logprobs,
                     topk_ids=self.topk_ids, tokens=self.tokens, windows=self.windows)
        tmp.replace(path)
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | Path) -> BaseScores:
        """Read a base file; BaseFileError if it is not one (or not this format version)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {key: data[key] for key in ("target_logprobs", "topk_logprobs",
                                                     "topk_ids", "tokens", "windows")}
        except (OSError, ValueError, KeyError) as error:
            raise BaseFileError(f"{path} is not a fastpath kld base file ({error})") from None
        if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
            raise BaseFileError(f"{path}: format {header.get('format')!r} version "
                                f"{header.get('version')!r}, expected {FORMAT!r} version "
                                f"{FORMAT_VERSION}")
        scores = cls(**arrays, convention=header.get("convention", header.get("protocol")),
                     context_length=header["context_length"], stride=header["stride"],
                     vocab_size=header["vocab_size"], tokenizer=header["tokenizer"],
                     model=header.get("model", ""), meta=header.get("meta", {}))
        scores.check_consistent()
        return scores

    def check_settings(self, top_k: int, convention: str, context_length: int,
                       stride: int | None, source: str = "the base file") -> None:
        """Refuse (BaseFileError) unless made with this K, convention and window shape: what
        can be checked from the flags alone, before any engine starts."""
        if top_k != self.top_k:
            raise BaseFileError(f"{source} holds the top-{self.top_k}, this run asks for "
                                f"--top-k {top_k}")
        theirs = (self.convention, self.context_length, self.stride)
        ours = (convention, context_length, stride)
        if theirs != ours:
            raise BaseFileError(f"{source} was made with --convention {theirs[0]} "
                                f"--context-length {theirs[1]} --stride {theirs[2]}, this "
                                f"run uses {ours[0]}, {ours[1]}, {ours[2]}")

    def check_matches(self, layout: Layout, top_k: int, vocab_size: int, tokenizer: str,
                      source: str = "the base file") -> None:
        """Refuse (BaseFileError naming what differs) unless made for exactly this run."""
        if tokenizer != self.tokenizer:
            raise BaseFileError(f"{source} was made with another tokenizer "
                                f"({self.tokenizer[:19]}..., this model's is "
                                f"{tokenizer[:19]}...); KLD needs the same tokens")
        if vocab_size != self.vocab_size:
            raise BaseFileError(f"{source} has vocabulary size {self.vocab_size}, this "
                                f"model {vocab_size}")
        self.check_settings(top_k, layout.convention, layout.context_length, layout.stride,
                            source)
        tokens = np.asarray(layout.tokens, dtype=np.int32)
        if tokens.shape != self.tokens.shape or not np.array_equal(tokens, self.tokens):
            common = min(tokens.size, self.tokens.size)
            differ = np.flatnonzero(tokens[:common] != self.tokens[:common])
            where = int(differ[0]) if differ.size else common
            raise BaseFileError(f"{source} was made on other text: {self.tokens.size} tokens, "
                                f"this run has {tokens.size}; first difference at token "
                                f"{where} (check --dataset/--text-file/--num-samples)")
        if not np.array_equal(windows_array(layout.windows), self.windows):
            raise BaseFileError(f"{source} has other windows than this run's layout")


def from_layout(layout: Layout, target_logprobs: np.ndarray, topk_logprobs: np.ndarray,
                topk_ids: np.ndarray, vocab_size: int, tokenizer: str, model: str = "",
                meta: dict[str, Any] | None = None) -> BaseScores:
    """A BaseScores for `layout` from the base pass's arrays."""
    scores = BaseScores(
        target_logprobs=np.ascontiguousarray(target_logprobs, dtype=np.float32),
        topk_logprobs=np.ascontiguousarray(topk_logprobs, dtype=np.float32),
        topk_ids=np.ascontiguousarray(topk_ids, dtype=np.int32),
        tokens=np.asarray(layout.tokens, dtype=np.int32),
        windows=windows_array(layout.windows), convention=layout.convention,
        context_length=layout.context_length, stride=layout.stride, vocab_size=vocab_size,
        tokenizer=tokenizer, model=model, meta=dict(meta or {}))
    scores.check_consistent()
    return scores
