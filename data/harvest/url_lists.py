"""Ready-made (url, caption) lists: parquet, csv, tsv or jsonl files (optionally gzipped)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.common.errors import one_line
from data.common.urls import is_http_url
from data.harvest.candidates import write_candidates
from data.harvest.html import resolve_url

URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl")
_FORMAT_ALIASES = {"ndjson": "jsonl", "jsonlines": "jsonl", "pq": "parquet"}


# ------------------------------------------------------------------------- URL lists
def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


# What a malformed list file raises while being read (not our own ValueErrors, which name the file).
_READ_ERRORS = (
    OSError, EOFError, zlib.error, pa.ArrowException, UnicodeError, csv.Error, json.JSONDecodeError,
    pd.errors.ParserError,
)  # fmt: skip



def format_from_name(name: str) -> str | None:
    """The URL list format a file name implies (a trailing .gz looked through), or None."""
    suffixes = [s.lower() for s in PurePosixPath(name).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    fmt = _FORMAT_ALIASES.get(ext, ext)
    return fmt if fmt in URL_LIST_FORMATS else None


def _list_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        fmt = _FORMAT_ALIASES.get(file_format.lower().lstrip("."), file_format.lower().lstrip("."))
        if fmt not in URL_LIST_FORMATS:
            raise ValueError(
                f"{path}: unknown URL list format {file_format!r}; expected one of {', '.join(URL_LIST_FORMATS)}"
            )
        return fmt
    fmt = format_from_name(path.name)
    if fmt is None:
        suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
        ext = suffixes[-1].lstrip(".") if suffixes else ""
        raise ValueError(
            f"{path}: unknown URL list format {('.' + ext) if ext else '(no extension)'}; expected "
            f"{', '.join('.' + f for f in URL_LIST_FORMATS)} (optionally + .gz), or pass file_format="
        )
    return fmt


def _known(path: Path) -> bool:
    return format_from_name(path.name) is not None


def _open_bytes(path: Path) -> io.BufferedIOBase:
    """The file's bytes, gunzipped when the content is gzip (by magic bytes, not by name)."""
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")  # type: ignore[return-value]


def _parquet_source(path: Path) -> Path | io.BytesIO:
    """Parquet needs random access: a gzipped one is inflated into memory (rare; plain is the norm)."""
    if not _is_gzip(path):
        return path
    with gzip.open(path, "rb") as fh:
        return io.BytesIO(fh.read())


def _list_columns(path: Path, fmt: str) -> list[str]:
    """Column names, read cheaply: the parquet schema, the csv/tsv header, the first jsonl object."""
    if fmt == "parquet":
        return list(pq.read_schema(_parquet_source(path)).names)
    # utf-8-sig: a byte-order mark (spreadsheet exports) must not become part of the first column's name
    with _open_bytes(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as fh:
        if fmt in ("csv", "tsv"):
            return next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), [])
        for line in fh:
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}: a jsonl URL list needs one JSON object per line, got {line[:60]!r}")
                return list(obj)
        return []


def _read_list(path: Path, fmt: str, url_col: str, caption_col: str) -> tuple[list[Any], list[Any]]:
    if fmt == "parquet":
        table = pq.read_table(_parquet_source(path), columns=[url_col, caption_col])
        return table.column(url_col).to_pylist(), table.column(caption_col).to_pylist()
    with _open_bytes(path) as raw:
        if fmt in ("csv", "tsv"):
            # all text, no "NA" -> NaN guessing: a caption reading "None" is a caption
            df = pd.read_csv(
                raw,
                sep="\t" if fmt == "tsv" else ",",
                usecols=[url_col, caption_col],
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                encoding_errors="replace",
            )
            return df[url_col].tolist(), df[caption_col].tolist()
        urls: list[Any] = []
        caps: list[Any] = []
        for i, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from None
            get = obj.get if isinstance(obj, dict) else {}.get
            urls.append(get(url_col))
            caps.append(get(caption_col))
        return urls, caps


def check_url_lists(
    path: str | Path | Sequence[str | Path],
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    file_format: str | None = None,
) -> list[tuple[Path, str]]:
    """The (file, format) pairs `harvest_url_list` would read, after checking that every file
    exists, has a known format and has both columns (reads headers/schemas only). Raises
    FileNotFoundError or ValueError with one line naming the file."""
    given = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    paths: list[Path] = []
    for p in given:
        if p.is_dir():  # its list files, in name order (hidden files and other extensions skipped)
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _known(f))
            if not found:
                raise FileNotFoundError(f"no URL list files (.parquet, .csv, .tsv, .jsonl, optionally .gz) in {p}")
            paths.extend(found)
        elif not p.is_file():
            raise FileNotFoundError(f"URL list not found: {p}")
        else:
            paths.append(p)
    if not paths:
        raise ValueError("no URL list files given")
    plan: list[tuple[Path, str]] = []
    for p in paths:
        fmt = _list_format(p, file_format)
        try:
            present = _list_columns(p, fmt)
        except _READ_ERRORS as err:
            raise ValueError(f"{p}: cannot read as {fmt}: {one_line(err)}") from None
        for col, arg in ((url_col, "url_col"), (caption_col, "caption_col")):
            if col not in present:
                raise ValueError(
                    f"{p}: no column {col!r} (columns present: {', '.join(map(repr, present)) or 'none'}); "
                    f"set {arg}= to the right one"
                )
        plan.append((p, fmt))

    return plan


def harvest_url_list(
    path: str | Path | Sequence[str | Path],
    out_dir: Path,
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    file_format: str | None = None,
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> dict[str, Any]:
    """Read (url, caption) rows from one or more URL list files; write out_dir/candidates.parquet.

    `path` is a file, a directory (its files with a known extension, in name order) or a
    list of either. Formats: parquet, csv, tsv, jsonl, from the extension (a trailing .gz
    is looked through; gzip itself is detected from the content) unless `file_format`
    names one for all files. Every file is checked (exists, format known, both columns
    present) before any is read in full. URLs are normalised like crawled ones; rows whose URL is missing
    or not http(s) are dropped. source = "<file name>:<row>" (1-based over data rows).
    With `queries`, rows are balanced by data.harvest.queries (at most `query_cap` per query).
    Returns counts: files, rows, non_http_url, empty_caption, duplicate_candidates,
    candidates (+ the balancing counts with `queries`).
    """
    plan = check_url_lists(path, url_col=url_col, caption_col=caption_col, file_format=file_format)
    counts: dict[str, Any] = dict(files=len(plan), rows=0, non_http_url=0)
    frames: list[pd.DataFrame] = []
    for p, fmt in plan:
        try:
            urls, caps = _read_list(p, fmt, url_col, caption_col)
        except _READ_ERRORS as err:
            raise ValueError(f"{p}: cannot read as {fmt}: {one_line(err)}") from None
        counts["rows"] += len(urls)
        keep_url, keep_cap, keep_src = [], [], []
        for row, (u, c) in enumerate(zip(urls, caps), 1):
            u = resolve_url("", u) if isinstance(u, str) else ""
            if not is_http_url(u):
                counts["non_http_url"] += 1
                continue
            keep_url.append(u)
            keep_cap.append(c if isinstance(c, str) else ("" if c is None else str(c)))
            keep_src.append(f"{p.name}:{row}")
        frames.append(pd.DataFrame({"url": keep_url, "caption": keep_cap, "source": keep_src}))
    df = pd.concat(frames, ignore_index=True)
    write_candidates(df, out_dir, counts=counts, empty_key="empty_caption", queries=queries, query_cap=query_cap)
    return counts

