"""Text for perplexity: the bundled corpus, local files, or a `datasets` dataset.

The bundled corpus (CPython standard-library docstrings, PSF licence) is the offline
default. Local text, JSONL and parquet files are read through the `datasets` library's
own loaders, like hub datasets (WikiText-2 where a hub is reachable).
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

from fastpath.extras import MissingExtra, require

BUNDLED = "bundled"
_LOCAL_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
                   ".parquet": "parquet"}


class DataError(ValueError):
    """Text that cannot be loaded; the message says which input and why."""


@cache
def bundled_text() -> str:
    """The bundled corpus, about 250 KB of English prose with code."""
    return resources.files(__package__).joinpath("stdlib_docs.txt").read_text("utf-8")


def _rows_to_text(rows: list[str]) -> str:
    """Join rows as Hugging Face's perplexity guide does for WikiText ("\\n\\n")."""
    return "\n\n".join(rows)


def load_text(
    dataset: str | None = None,
    dataset_config: str | None = None,
    text_file: str | None = None,
    num_samples: int | None = None,
    split: str = "test",
    text_column: str = "text",
) -> tuple[str, str]:
    """(text, description of its source). With no source given, the bundled corpus.

    `num_samples` keeps the first N rows (lines of a text file, records of JSONL/parquet,
    rows of a dataset), as the original script's flag did.
    """
    if dataset and text_file:
        raise DataError("give either --dataset or --text-file, not both")
    if num_samples is not None and num_samples <= 0:
        raise DataError(f"--num-samples must be positive, got {num_samples}")
    if not dataset and not text_file:
        text = bundled_text()
        if num_samples is not None:
            text = _rows_to_text(text.split("\n\n")[:num_samples])
        return text, BUNDLED
    try:
        datasets = require("datasets", "data", "--dataset and --text-file")
    except MissingExtra as error:
        raise DataError(str(error)) from None

    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise DataError(f"--text-file {text_file}: no such file")
        builder = _LOCAL_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise DataError(f"--text-file {text_file}: expected one of "
                            f"{sorted(_LOCAL_BUILDERS)} (text, JSONL or parquet)")
        if builder == "text" and not path.read_text(errors="replace").strip():
            raise DataError(f"--text-file {text_file} is empty")
        load_args: tuple = (builder,)
        load_kwargs = {"data_files": str(path), "split": "train"}
        source = str(path)
    else:
        load_args = (dataset, dataset_config)
        load_kwargs = {"split": split}
        source = f"{dataset}/{dataset_config}:{split}" if dataset_config else f"{dataset}:{split}"
    try:
        rows = datasets.load_dataset(*load_args, **load_kwargs)
    except Exception as error:  # the library raises many kinds; all mean "unreadable"
        raise DataError(f"cannot read {source}: {type(error).__name__}: {error}") from None
    if text_column not in rows.column_names:
        raise DataError(f"{source} has no {text_column!r} column (columns: {rows.column_names})")
    if num_samples is not None:
        rows = rows.select(range(min(num_samples, len(rows))))
    if text_file and load_args[0] == "text":
        return "\n".join(rows[text_column]), source  # a text file's own lines
    return _rows_to_text(rows[text_column]), source
