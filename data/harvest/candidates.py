"""The file every harvest source ends in: `candidates.parquet` (schema in `data.harvest`), written by
`write_candidates` -- caption normalisation, empty and repeated pairs dropped, optional query balancing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data.common.files import atomic_path

CANDIDATES_FILE = "candidates.parquet"
CANDIDATE_COLUMNS = ("url", "caption", "source", "matched_query")
# Explicit types: an all-null matched_query must still be a string column, not "null".
CANDIDATE_SCHEMA = pa.schema([(c, pa.string()) for c in CANDIDATE_COLUMNS])


# ---------------------------------------------------------------------------- output
def write_candidates(
    df: pd.DataFrame,
    out_dir: Path,
    *,
    counts: dict[str, Any] | None = None,
    empty_key: str = "empty_caption",
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> Path:
    """Write df as out_dir/candidates.parquet (module docstring), atomically; return its path.

    df needs url and caption; source and matched_query are filled with null when absent,
    other columns are dropped. Captions are whitespace-normalised; empty ones are dropped
    (counted under `empty_key`), then repeated (url, caption) pairs (the first kept,
    duplicate_candidates), then, with `queries`, rows are balanced by data.harvest.queries
    (its counts merged in). `counts`, when given, is updated in place with those
    figures and `candidates` (rows written).
    """
    counts = {} if counts is None else counts
    missing = {"url", "caption"} - set(df.columns)
    if missing:
        raise ValueError(f"candidates need columns url and caption; missing {sorted(missing)}")
    df = pd.DataFrame({c: (df[c] if c in df.columns else None) for c in CANDIDATE_COLUMNS}, index=df.index)
    df["caption"] = [" ".join(c.split()) if isinstance(c, str) else "" for c in df["caption"].tolist()]
    nonempty = df["caption"] != ""
    counts[empty_key] = counts.get(empty_key, 0) + int((~nonempty).sum())
    df = df[nonempty]
    n = len(df)
    # Same image + same text seen twice is one training pair; keep the first source.
    df = df.drop_duplicates(subset=["url", "caption"], keep="first").reset_index(drop=True)
    counts["duplicate_candidates"] = counts.get("duplicate_candidates", 0) + n - len(df)
    if queries is not None:
        from data.harvest.queries import balance_by_queries

        df, qcounts = balance_by_queries(df, queries, cap=query_cap)
        counts.update(qcounts)
    counts["candidates"] = len(df)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[list(CANDIDATE_COLUMNS)], schema=CANDIDATE_SCHEMA, preserve_index=False)
    path = out_dir / CANDIDATES_FILE
    with atomic_path(path) as tmp:  # no half-written parquet if we die mid-write
        pq.write_table(table, tmp)
    return path


def rows_frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["url", "caption", "source"])

