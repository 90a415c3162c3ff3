"""Download published image-text URL lists (the metadata shards of CC3M, CC12M, LAION, DataComp...)
so that the harvest stage can start from them (``harvest.source: urls``, ``harvest.urls: [out_dir]``).

    fetch_url_lists("https://host/laion-subset", ["part-00000.parquet", "part-00001.parquet"], out)
    read_list_file("index.txt")  ->  the relative paths it names (one a line, "#" comments)

Each ``{base_url}/{path}`` is saved in out_dir under its path with "/" replaced by "__"
("meta/0001.parquet" -> "meta__0001.parquet"), because harvest reads the files directly in a
directory. Formats: parquet, csv, tsv, jsonl, each optionally .gz (what harvest reads). Downloads
are resumable and verified against out_dir/.witclip-fetch.json (`data.acquire.download`); the manifest
and the ``.part`` files are names harvest skips.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from data.acquire.download import FETCH_MANIFEST, DownloadItem, download_files
from data.harvest.url_lists import format_from_name


def read_list_file(path: str | Path) -> list[str]:
    """Relative paths named in a listing: one a line; blank lines and "#" comments skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"file list {p} does not exist")
    lines = p.read_text(encoding="utf-8-sig").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


def local_name(rel: str) -> str:
    """Where `rel` is saved inside out_dir: its path with "/" -> "__" (harvest reads one directory)."""
    return "__".join(PurePosixPath(rel).parts)


def _check_rel(rel: str) -> str:
    rel = rel.strip()
    if not rel or "://" in rel or rel.startswith("/") or "\\" in rel:
        raise ValueError(f"{rel!r}: expected a path relative to the base URL, like part-00000.parquet")
    parts = PurePosixPath(rel).parts
    if any(p in ("..", ".") for p in parts):
        raise ValueError(f"{rel!r}: '.' and '..' are not allowed in a file path")
    if local_name(rel).startswith("."):
        raise ValueError(f"{rel!r}: a hidden file name (harvest skips those)")
    if format_from_name(rel) is None:
        raise ValueError(f"{rel!r}: not a URL list harvest reads (.parquet, .csv, .tsv, .jsonl, optionally .gz)")
    return rel


def fetch_url_lists(
    base_url: str,
    files: Sequence[str],
    out_dir: str | Path,
    workers: int = 4,
    *,
    progress: bool = True,
    connect_timeout: float = 5.0,
    read_timeout: float = 10.0,
    retries: int = 2,
    url_col: str | None = None,
    caption_col: str | None = None,
) -> dict[str, Any]:
    """Download `{base_url}/{file}` for each file into out_dir (see module doc).

    With `url_col` and `caption_col`, the fetched files are then checked the way the harvest stage
    will read them (format, both columns present; `data.harvest.check_url_lists`).
    Returns download_files' counts plus out_dir and paths (the local files, in the given order).
    Raises ValueError (bad arguments; a checked file lacking a column), and data.acquire.download's
    HostUnreachable / DownloadError / LocalWriteError.
    """
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base URL {base_url!r} is not an http(s) URL")
    if not files:
        raise ValueError("no files to fetch: name them, or give a file list")
    rels = list(dict.fromkeys(_check_rel(f) for f in files))
    names = [local_name(r) for r in rels]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"two listed paths would both be saved as {dup}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a directory")
    base = base_url.rstrip("/")
    items = [DownloadItem(f"{base}/{quote(r, safe='/')}", out / n) for r, n in zip(rels, names)]
    result = download_files(items, workers=workers, manifest=out / FETCH_MANIFEST, progress=progress,
                            connect_timeout=connect_timeout, read_timeout=read_timeout, retries=retries,
                            desc="url lists")
    paths = [it.dest for it in items]
    if url_col is not None and caption_col is not None:
        from data.harvest import check_url_lists

        check_url_lists(paths, url_col=url_col, caption_col=caption_col)
    return {**result, "out_dir": str(out), "paths": [str(p) for p in paths]}
