"""WIT-style query balancing: keep (image, text) pairs whose text contains one of a set of
queries, at most `cap` pairs per query.

The CLIP paper builds WIT by searching for pairs "whose text includes one of a set of
500,000 queries" and balancing "by including up to 20,000 (image, text) pairs per query".
Matching here is on whole words, case-insensitively: query and caption are both reduced
to runs of unicode word characters (`\\w+`, casefolded), and a query matches when its
words occur as consecutive words of the caption. So "cat" matches "A Cat." but not
"category", and "new york" matches "New York's skyline".

Speed: one dict lookup per caption n-gram (n up to the longest query, cut short as soon
as the n-gram is no query's prefix), never one regex per query, so the cost grows with
the captions' length and not with the number of queries.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

_WORD = re.compile(r"\w+")


def tokens(text: str) -> tuple[str, ...]:
    """The words matching works on: casefolded `\\w+` runs (casefold: "Straße" == "STRASSE")."""
    return tuple(_WORD.findall(text.casefold()))


def load_queries(path: str | Path) -> list[str]:
    """One query per line (UTF-8, `.gz` accepted); blank lines, word-less lines and repeats
    (same words after normalisation, e.g. "New York" / "new  york!") dropped, first kept."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query file not found: {path}")
    with open(path, "rb") as fh:
        gz = fh.read(2) == b"\x1f\x8b"  # by content, not name: "queries.txt" may well be gzipped
    opener = gzip.open if gz else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
        return _unique(line.strip() for line in fh)


def _unique(queries: Iterable[str]) -> list[str]:
    seen: set[tuple[str, ...]] = set()
    out: list[str] = []
    for q in queries:
        key = tokens(q)
        if key and key not in seen:
            seen.add(key)
            out.append(q)
    return out


class QueryIndex:
    """Queries indexed by their word tuple, for many captions to be matched against.

    Build once (the cost is one tokenisation per query), then `match` each caption.
    Queries with no word characters can never match and are left out; repeats after
    normalisation keep the first spelling.
    """

    def __init__(self, queries: Sequence[str]) -> None:
        self.queries: list[str] = []
        # one-word queries (most of a real query list) get a plain str key: no tuple per lookup
        self._single: dict[str, int] = {}
        self._multi: dict[tuple[str, ...], int] = {}
        # first words of multi-word queries, and their longer proper prefixes: an n-gram that is
        # no prefix ends the scan from that start position early
        self._starts: set[str] = set()
        self._prefixes: set[tuple[str, ...]] = set()
        self.max_words = 0
        for q in queries:
            key = tokens(q)
            if not key:
                continue
            if len(key) == 1:
                if key[0] in self._single:
                    continue
                self._single[key[0]] = len(self.queries)
                self.queries.append(q)
            else:
                if key in self._multi:
                    continue
                self._multi[key] = len(self.queries)
                self.queries.append(q)
                self._starts.add(key[0])
                for n in range(2, len(key)):
                    self._prefixes.add(key[:n])
            self.max_words = max(self.max_words, len(key))

    def __len__(self) -> int:
        return len(self.queries)

    def match(self, text: str) -> list[int]:
        """Indexes (into self.queries) of every query found in text, each once, ascending."""
        words = _WORD.findall(text.casefold())
        single, multi, starts, prefixes = self._single, self._multi, self._starts, self._prefixes
        found: set[int] = set()
        n_words = len(words)
        for i, w in enumerate(words):
            q = single.get(w)
            if q is not None:
                found.add(q)
            if w not in starts:
                continue
            for j in range(i + 2, min(n_words, i + self.max_words) + 1):
                gram = tuple(words[i:j])
                q = multi.get(gram)
                if q is not None:
                    found.add(q)
                if gram not in prefixes:
                    break
        return sorted(found)


def balance_by_queries(
    df: pd.DataFrame,
    queries: Sequence[str] | QueryIndex,
    *,
    cap: int = 20_000,
    caption_col: str = "caption",
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Keep the rows whose caption contains a query, at most `cap` rows per query.

    Rows are taken in order. A row matching several queries goes to the one that still
    has room and holds the fewest rows so far (ties: earlier in `queries`), which spreads
    rows over rare queries instead of filling the common ones; a row whose matching
    queries are all full is dropped (over_cap). The result keeps df's columns and row
    order (new index) and sets `matched_query` to the original query string.
    Counts: captions_in, matched (= kept + over_cap), unmatched, over_cap, kept,
    queries (usable, distinct), queries_used (with at least one kept row).
    """
    if cap < 1:
        raise ValueError(f"query cap must be >= 1, got {cap}")
    if isinstance(queries, str):  # a str is a sequence too: each character would become a query
        raise TypeError("queries must be a list of strings, not one string; read a file with load_queries(path)")
    index = queries if isinstance(queries, QueryIndex) else QueryIndex(queries)
    if not len(index):
        raise ValueError("no usable queries: every query is blank or has no word characters")
    if caption_col not in df.columns:
        raise ValueError(f"no column {caption_col!r} to match queries against (columns: {list(df.columns)})")

    held = [0] * len(index)
    keep_rows: list[int] = []
    keep_query: list[str] = []
    matched = 0
    for row, caption in enumerate(df[caption_col].tolist()):
        hits = index.match(caption) if isinstance(caption, str) else []
        if not hits:
            continue
        matched += 1
        best = -1
        for q in hits:  # ascending index, so strict "<" keeps the earliest query on a tie
            if held[q] < cap and (best < 0 or held[q] < held[best]):
                best = q
        if best < 0:
            continue
        held[best] += 1
        keep_rows.append(row)
        keep_query.append(index.queries[best])

    out = df.iloc[keep_rows].reset_index(drop=True)
    out["matched_query"] = pd.Series(keep_query, dtype=object)
    counts = dict(
        captions_in=len(df),
        matched=matched,
        unmatched=len(df) - matched,
        over_cap=matched - len(keep_rows),
        kept=len(keep_rows),
        queries=len(index),
        queries_used=sum(1 for h in held if h),
    )
    return out, counts
