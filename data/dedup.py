"""Drop duplicate samples from an img2dataset crawl directory (metadata only; no pixels read).

Filters are an ordered list of (reason, fn) where fn(df) -> boolean Series "drop this
row"; each sees only the rows that survived the previous ones. This is the seam for
near-duplicate (perceptual hash / embedding) removal and eval-set decontamination:
append more (reason, fn) pairs via `extra_filters` without touching the exact ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import pyarrow.parquet as pq

KEEP_FILE = "keep.parquet"
REPORT_FILE = "report.json"
KEEP_COLUMNS = ["key", "tar", "url", "caption", "sha256"]

DropFilter = Callable[[pd.DataFrame], pd.Series]


def _duplicate_sha256(df: pd.DataFrame) -> pd.Series:
    # Same image bytes (img2dataset hashes the bytes as downloaded, before resizing).
    return df.duplicated(subset=["sha256"], keep="first")


def _duplicate_url_caption(df: pd.DataFrame) -> pd.Series:
    return df.duplicated(subset=["url", "caption"], keep="first")


EXACT_FILTERS: list[tuple[str, DropFilter]] = [
    ("duplicate_sha256", _duplicate_sha256),
    ("duplicate_url_caption", _duplicate_url_caption),
]


def load_successes(crawl_dir: Path) -> pd.DataFrame:
    """Successful samples' metadata (key, tar, url, caption, sha256) from img2dataset's per-shard parquets, sorted by key."""
    crawl_dir = Path(crawl_dir)
    frames = []
    for p in sorted(crawl_dir.glob("*.parquet")):
        if not p.stem.isdigit():  # only img2dataset shard metadata (00000.parquet), not stray files
            continue
        names = pq.read_schema(p).names
        cols = [c for c in ("key", "url", "caption", "sha256", "status") if c in names]
        df = pq.read_table(p, columns=cols).to_pandas()
        if "caption" not in df:
            df["caption"] = None
        df = df[df["status"] == "success"].drop(columns=["status"])
        df["tar"] = f"{p.stem}.tar"
        frames.append(df)
    if not frames:
        if not crawl_dir.is_dir():
            raise FileNotFoundError(f"crawl directory not found: {crawl_dir}")
        return pd.DataFrame({c: pd.Series(dtype="object") for c in KEEP_COLUMNS})
    out = pd.concat(frames, ignore_index=True)[KEEP_COLUMNS]
    # img2dataset keys are zero-padded shard*10^k + row, so string order == crawl order.
    return out.sort_values("key", kind="stable").reset_index(drop=True)


def dedup(
    crawl_dir: Path,
    out_dir: Path,
    *,
    extra_filters: Sequence[tuple[str, DropFilter]] = (),
) -> dict[str, Any]:
    """Write out_dir/keep.parquet and out_dir/report.json; return counts.

    Counts: input, kept, dropped_<reason> for each filter (exact ones:
    duplicate_sha256, duplicate_url_caption; then any `extra_filters`).
    """
    df = load_successes(crawl_dir)
    n_input = len(df)
    dropped_keys: dict[str, list[str]] = {}
    for reason, fn in [*EXACT_FILTERS, *extra_filters]:
        mask = fn(df).astype(bool) if len(df) else pd.Series([], dtype=bool)
        dropped_keys[reason] = df.loc[mask, "key"].tolist()
        df = df.loc[~mask].reset_index(drop=True)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{KEEP_FILE}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / KEEP_FILE)
    report = {
        "input": n_input,
        "kept": len(df),
        "dropped": {r: len(k) for r, k in dropped_keys.items()},
        "dropped_keys": dropped_keys,
    }
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return {"input": n_input, "kept": len(df), **{f"dropped_{r}": len(k) for r, k in dropped_keys.items()}}
