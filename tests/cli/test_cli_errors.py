"""`fastpath ppl` refuses bad input with one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fastpath import cli
from fastpath.cli import common


@pytest.mark.parametrize("flags, fragment", [
    (["--stride", "0"], "--stride must be in [1, --context-length=2048], got 0"),
    (["--stride", "3000"], "--stride must be in"),
    (["--context-length", "1"], "--context-length must be at least 2"),
    (["--text-file", "/nonexistent/file.txt"], "no such file"),
    (["--text-file", "pyproject.toml"], "expected one of"),
    (["--num-samples", "0"], "--num-samples must be positive"),
    (["--max-batch-windows", "0"], "--max-batch-windows must be positive"),
    (["--standard-k", "-2"], "--standard-k must be"),
    (["--dataset", "surely-not-a-dataset-xyz", "--text-file", "x.txt"], "not both"),
    (["--server", "http://127.0.0.1:9", "--model-runner", "v1"],
     "--model-runner v1 applies to a local engine"),
])
def test_flag_errors_before_any_engine(flags, fragment, capsys):
    assert cli.main(["ppl", *flags]) == common.EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_unreadable_dataset(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert cli.main(["ppl", "--dataset", "wikitext", "--dataset-config",
                     "wikitext-2-raw-v1"]) == common.EXIT_USAGE
    assert "cannot read wikitext/wikitext-2-raw-v1:test" in capsys.readouterr().err


def test_corrupt_parquet(capsys, tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    assert cli.main(["ppl", "--text-file", str(bad)]) == common.EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize("content, flags, fragment", [
    ("word", ["--context-length", "8", "--stride", "4"], "perplexity needs at least 2"),
    ("plenty of text here " * 50, ["--context-length", "5000", "--stride", "10"],
     "--context-length 5000 exceeds what this engine can score"),
])
def test_text_and_model_limits(content, flags, fragment, tmp_path):
    """Run as users do, in a fresh process: the engine starts, then the input is refused."""
    text = tmp_path / "t.txt"
    text.write_text(content)
    # a hang guard, not a time limit: an engine starts in the subprocess, slowly on a busy machine
    done = subprocess.run([sys.executable, "-m", "fastpath.cli", "ppl", "--text-file", str(text),
                           *flags], capture_output=True, text=True, timeout=1200)
    assert done.returncode == common.EXIT_USAGE, done.stderr[-2000:]
    assert fragment in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("content", ["", "   \n\n  "])
def test_empty_text_file(content, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(content)
    assert cli.main(["ppl", "--text-file", str(text)]) == common.EXIT_USAGE
    assert "is empty" in capsys.readouterr().err
