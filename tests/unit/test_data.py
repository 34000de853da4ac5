"""Loading text: bundled default, local text / JSONL / parquet through `datasets`."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from fastpath.data import BUNDLED, DataError, bundled_text, load_text

ROWS = ["first row", "second row", "third row"]


def test_bundled_default():
    text, source = load_text()
    assert source == BUNDLED and text == bundled_text() and len(text) > 100_000


def test_bundled_num_samples_keeps_first_paragraphs():
    text, _ = load_text(num_samples=2)
    assert text == "\n\n".join(bundled_text().split("\n\n")[:2])


def test_text_file_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n".join(ROWS) + "\n")
    assert load_text(text_file=str(path)) == ("\n".join(ROWS), str(path))
    assert load_text(text_file=str(path), num_samples=2)[0] == "first row\nsecond row"


def test_jsonl_and_parquet_rows(tmp_path):
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(ROWS)))
    parquet = tmp_path / "t.parquet"
    pd.DataFrame({"text": ROWS}).to_parquet(parquet)
    for path in (jsonl, parquet):
        assert load_text(text_file=str(path))[0] == "\n\n".join(ROWS)
        assert load_text(text_file=str(path), num_samples=1)[0] == ROWS[0]


def test_missing_text_column(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no 'text' column"):
        load_text(text_file=str(path))
