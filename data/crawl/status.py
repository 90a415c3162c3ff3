"""The crawl's accounting: img2dataset's per-shard parquets and stats summed, and `status.parquet`,
one row per candidate URL (key, url, status, reason) where reason is a stable code."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from data.common.files import atomic_path
from data.shards.format import is_crawl_shard

STATUS_FILE = "status.parquet"  # one row per candidate URL: key, url, status, reason


def shard_parquets(crawl_dir: Path) -> list[Path]:
    """img2dataset's per-shard metadata files (00000.parquet, ...), not our status table."""
    return sorted(p for p in Path(crawl_dir).glob("*.parquet") if is_crawl_shard(p))


def _reason(status: str, error_message: Any) -> str:
    if status == "success":
        return "success"
    message = str(error_message or "")
    if status == "failed_to_resize":
        # img2dataset's resizer reports "Image decoding error" for anything cv2 cannot decode
        return "decode_error" if "decod" in message.lower() else "resize_error"
    return message or "unknown_error"


def write_status_table(crawl_dir: Path) -> tuple[Path, dict[str, int]]:
    """One row per candidate URL (key, url, status, reason) from img2dataset's shard parquets,
    written atomically to crawl_dir/status.parquet; returns the path and counts per reason."""
    import pandas as pd

    frames = [pd.read_parquet(p, columns=["key", "url", "status", "error_message"]) for p in shard_parquets(crawl_dir)]
    if frames:
        table = pd.concat(frames, ignore_index=True)
    else:
        table = pd.DataFrame({c: pd.Series(dtype=str) for c in ("key", "url", "status", "error_message")})
    table["reason"] = [_reason(s, e) for s, e in zip(table["status"], table["error_message"])]
    table = table[["key", "url", "status", "reason"]].sort_values("key", ignore_index=True)
    path = Path(crawl_dir) / STATUS_FILE
    with atomic_path(path) as tmp:
        table.to_parquet(tmp, index=False)
    return path, _reason_counts(table["reason"])


def _reason_counts(reasons: Any) -> dict[str, int]:
    """{reason: count}, most frequent first (a pandas Series of reason codes in)."""
    return {str(k): int(v) for k, v in sorted(reasons.value_counts().items(), key=lambda kv: (-kv[1], kv[0]))}


def aggregate_stats(crawl_dir: Path) -> dict[str, Any]:
    """Sum img2dataset's per-shard *_stats.json files in crawl_dir."""
    totals = Counter()
    status: Counter[str] = Counter()
    n = 0
    for p in sorted(Path(crawl_dir).glob("*_stats.json")):
        s = json.loads(p.read_text())
        n += 1
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(s.get(k, 0))
        status.update(s.get("status_dict", {}))
    urls = totals["count"]
    return {
        "urls": urls,
        "successes": totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "success_rate": round(totals["successes"] / urls, 6) if urls else 0.0,
        "status_dict": dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))),
        "shards": n,
    }

