"""Build the JSONL files of the local lm-eval tasks from fastpath's bundled text.

Run from the repository root: `python tests/data/lm_eval_tasks/build.py`. The output is
committed; tests/engine/test_lm_eval.py checks that it still matches what this script writes.
Deterministic: no randomness, paragraphs picked by position in the bundled text.

- fastpath_wikitext.jsonl: a few "pages" (runs of consecutive paragraphs), field `page`,
  scored whole by `loglikelihood_rolling` like WikiText.
- fastpath_lambada.jsonl: one-paragraph texts, field `text`; the task predicts the last word.
- fastpath_mc.jsonl: a paragraph's start (`query`), its true ending and three endings of
  other paragraphs (`choices`), the true one at index `gold`.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKITEXT_PAGES = 6
LAMBADA_DOCS = 30
LAMBADA_CUT_WORDS = ("the", "of", "is", "be", "to")
MC_DOCS = 20
MC_ENDING_WORDS = 4


def _paragraphs(text: str) -> list[str]:
    """Paragraphs with their line breaks and runs of spaces folded into single spaces."""
    return [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n") if p.strip()]


def _prose(paragraphs: list[str], min_chars: int, max_chars: int) -> list[str]:
    """Paragraphs of plain sentences (no code, no lists) within the length bounds."""
    keep = []
    for p in paragraphs:
        if not (min_chars <= len(p) <= max_chars) or not p[0].isupper():
            continue
        if any(mark in p for mark in (">>>", "*", "`", "|", "=", "{", "[")):
            continue
        keep.append(p.rstrip(".,;:!? "))
    return keep


def _spread(items: list, n: int) -> list:
    """n items evenly spread over the list (the whole corpus, not only its start)."""
    if len(items) < n:
        raise ValueError(f"need {n} items, the bundled text gives {len(items)}")
    return [items[i * len(items) // n] for i in range(n)]


def wikitext_pages(text: str) -> list[dict]:
    """Pages of consecutive raw paragraphs, about 1,500 characters each (the last 3,000)."""
    raw = [p for p in text.split("\n\n") if p.strip()]
    pages = []
    for n, start in enumerate(_spread(list(range(len(raw) - 40)), WIKITEXT_PAGES)):
        target = 3000 if n == WIKITEXT_PAGES - 1 else 1500
        page, i = "", start
        while len(page) < target:
            page = f"{page}\n\n{raw[i]}" if page else raw[i]
            i += 1
        pages.append({"page": page})
    return pages


def _cut_after(paragraph: str, word: str) -> str | None:
    """The paragraph up to the first `word` at least six words in, or None."""
    words = paragraph.split(" ")
    for i in range(6, len(words)):
        if words[i] == word:
            return " ".join(words[: i + 1])
    return None


def lambada_docs(text: str) -> list[dict]:
    """Half whole paragraphs (a content word last: rarely the model's top-1), half cut after
    a function word (often its top-1), so `acc` (is_greedy) sees both outcomes."""
    pool = _prose(_paragraphs(text), 80, 300)
    whole = _spread(pool, LAMBADA_DOCS // 2)
    cut = []
    for n, p in enumerate(_spread(pool[1:], 4 * LAMBADA_DOCS)):
        doc = _cut_after(p, LAMBADA_CUT_WORDS[n % len(LAMBADA_CUT_WORDS)])
        if doc is not None and len(cut) < LAMBADA_DOCS - len(whole):
            cut.append(doc)
    return [{"text": doc} for pair in zip(whole, cut, strict=True) for doc in pair]


def mc_docs(text: str) -> list[dict]:
    pool = _prose(_paragraphs(text), 80, 300)
    picked = _spread(pool, MC_DOCS)
    docs = []
    for n, p in enumerate(picked):
        words = p.split(" ")
        query, ending = " ".join(words[:-MC_ENDING_WORDS]), " ".join(words[-MC_ENDING_WORDS:])
        others = [picked[(n + k) % MC_DOCS].split(" ")[-MC_ENDING_WORDS:] for k in (3, 7, 11)]
        choices = [" ".join(o) for o in others]
        gold = n % 4
        choices.insert(gold, ending)
        docs.append({"query": query, "choices": choices, "gold": gold})
    return docs


def build() -> dict[str, str]:
    """File name -> JSONL content."""
    sys.path.insert(0, str(HERE.parents[2]))
    from fastpath.data import bundled_text

    text = bundled_text()
    files = {"fastpath_wikitext.jsonl": wikitext_pages(text),
             "fastpath_lambada.jsonl": lambada_docs(text),
             "fastpath_mc.jsonl": mc_docs(text)}
    return {name: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            for name, rows in files.items()}


if __name__ == "__main__":
    for name, content in build().items():
        (HERE / name).write_text(content, encoding="utf-8")
        print(f"wrote {HERE / name} ({content.count(chr(10))} docs)")
