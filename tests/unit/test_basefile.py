"""The kld base file (no engine): round trip bit for bit, and refusal of every mismatch."""

from __future__ import annotations

import numpy as np
import pytest

from fastpath import zoo
from fastpath.metrics import basefile, conventions


def make_base(layout: conventions.Layout, k: int = 4, vocab: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = layout.num_scored
    logprobs = np.sort(-rng.exponential(3.0, (n, k)).astype(np.float32), axis=1)[:, ::-1]
    ids = np.stack([rng.permutation(vocab)[:k] for _ in range(n)]).astype(np.int32)
    return basefile.from_layout(layout, logprobs[:, 0].copy(), logprobs, ids, vocab,
                                "sha256:abc", model="base", meta={"note": "test"})


@pytest.fixture
def layout():
    rng = np.random.default_rng(1)
    return conventions.layout("llama.cpp", rng.integers(0, 50, 200).tolist(), 32, None, bos=1)


def test_round_trip_is_bitwise(tmp_path, layout):
    base = make_base(layout)
    size = base.save(tmp_path / "base.npz")
    loaded = basefile.BaseScores.load(tmp_path / "base.npz")
    for name in ("target_logprobs", "topk_logprobs", "topk_ids", "tokens", "windows"):
        ours, theirs = getattr(base, name), getattr(loaded, name)
        assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes(), name
    assert (loaded.convention, loaded.context_length, loaded.stride, loaded.vocab_size,
            loaded.tokenizer, loaded.model, loaded.meta, loaded.top_k) == (
        "llama.cpp", 32, None, 50, "sha256:abc", "base", {"note": "test"}, 4)
    loaded.check_matches(layout, 4, 50, "sha256:abc")  # made for this run: accepted
    # Per scored token: 4 + 8 K bytes of scores, plus the stream and the header.
    assert size < base.num_scored * (4 + 8 * base.top_k) + 200 * 4 + 4096


@pytest.mark.parametrize("change, message", [
    ({"top_k": 8}, "holds the top-4, this run asks for --top-k 8"),
    ({"vocab_size": 51}, "vocabulary size 50, this model 51"),
    ({"tokenizer": "sha256:def"}, "another tokenizer"),
    ({"layout": ("llama.cpp", 16, None)}, "--context-length 32"),
    ({"layout": ("fastpath", 32, 8)}, "--convention llama.cpp"),
    ({"tokens": 5}, "other text: 200 tokens, this run has 200; first difference at token 5"),
    ({"tokens": None}, "other text: 200 tokens, this run has 199"),
])
def test_mismatch_refused_by_name(tmp_path, layout, change, message):
    make_base(layout).save(tmp_path / "base.npz")
    loaded = basefile.BaseScores.load(tmp_path / "base.npz")
    tokens = list(layout.tokens)
    run = layout
    if "layout" in change:
        convention, context, stride = change["layout"]
        run = conventions.layout(convention, tokens, context, stride, bos=1)
    if "tokens" in change:
        if change["tokens"] is None:
            tokens = tokens[:-1]
        else:
            tokens[change["tokens"]] = (tokens[change["tokens"]] + 1) % 50
        run = conventions.layout("llama.cpp", tokens, 32, None, bos=1)
    with pytest.raises(basefile.BaseFileError, match=message.replace("(", r"\(")):
        loaded.check_matches(run, change.get("top_k", 4), change.get("vocab_size", 50),
                             change.get("tokenizer", "sha256:abc"))


def test_window_layout_mismatch_refused(tmp_path, layout):
    """Same tokens and flags, other windows (another BOS): refused."""
    make_base(layout).save(tmp_path / "base.npz")
    loaded = basefile.BaseScores.load(tmp_path / "base.npz")
    other = conventions.layout("llama.cpp", layout.tokens, 32, None, bos=2)
    with pytest.raises(basefile.BaseFileError, match="other windows"):
        loaded.check_matches(other, 4, 50, "sha256:abc")


def test_not_a_base_file(tmp_path):
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(basefile.BaseFileError, match="not a fastpath kld base file"):
        basefile.BaseScores.load(tmp_path / "x.npz")
    np.savez(tmp_path / "y.npz", header=np.array('{"format": "other", "version": 1}'),
             target_logprobs=np.zeros(1, np.float32), topk_logprobs=np.zeros((1, 1), np.float32),
             topk_ids=np.zeros((1, 1), np.int32), tokens=np.zeros(2, np.int32),
             windows=np.array([[0, 2, 1, -1]]))
    with pytest.raises(basefile.BaseFileError, match="format 'other'"):
        basefile.BaseScores.load(tmp_path / "y.npz")


def test_inconsistent_arrays_refused(layout):
    base = make_base(layout)
    base.topk_ids = base.topk_ids[:-1]
    with pytest.raises(basefile.BaseFileError, match="top-K arrays have shapes"):
        base.check_consistent()


def test_tokenizer_fingerprint():
    """The same tokenizer from two folders gives one fingerprint; one more token changes it."""
    from transformers import AutoTokenizer

    from fastpath.testing.quantize import get_quantized

    tokenizer = AutoTokenizer.from_pretrained(zoo.get_model("tiny-llama"))
    copy = AutoTokenizer.from_pretrained(get_quantized("tiny-llama", bits=8))
    first = basefile.tokenizer_fingerprint(tokenizer)
    assert first.startswith("sha256:") and first == basefile.tokenizer_fingerprint(copy)
    copy.add_tokens(["<extra-token>"])
    assert basefile.tokenizer_fingerprint(copy) != first
