"""Bundled text: the offline default corpus (CPython standard-library docstrings, PSF licence)."""

from functools import cache
from importlib import resources


@cache
def bundled_text() -> str:
    """The bundled corpus, about 250 KB of English prose with code."""
    return resources.files(__package__).joinpath("stdlib_docs.txt").read_text("utf-8")
