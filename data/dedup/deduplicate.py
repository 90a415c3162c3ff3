"""Drop duplicate and benchmark-contaminated samples from an img2dataset crawl directory.

In order, each step seeing only what the previous ones kept (the first-crawled copy, i.e. the
smallest key, is always the one kept):

1. exact: the same normalised image URL; the same image bytes (img2dataset's sha256 of the bytes as
   downloaded);
2. decontamination: a 64-bit perceptual hash per image (`data.dedup.phash`) is computed by a Dask pass over
   the crawl's tar shards and over the test images of the given benchmarks; training images within
   `max_distance` bits of any test image (and of similar colour: the hash is greyscale) are dropped, and an overlap index and report per benchmark
   are written so evaluation can score All / Clean / Overlap subsets (CLIP paper, section 5);
3. near duplicates: the remaining images within `max_distance` bits form clusters (a sub-quadratic
   multi-index search) and each cluster keeps one representative.

Outputs in out_dir: keep.parquet (key, tar, url, caption, sha256, phash), dropped.parquet (key,
reason, duplicate_of, distance: every dropped sample and the kept sample or benchmark image it
duplicates), phash.parquet (key, phash for every successful sample), overlap.parquet (benchmark,
test_key, train_key, distance), report.json.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data.common.files import atomic_path, atomic_write_json
from data.common.urls import normalise_for_dedup
from data.dedup.phash import DEFAULT_MAX_DISTANCE
from data.shards.format import IMAGE_EXTS, is_crawl_shard, member_key_ext

KEEP_FILE = "keep.parquet"
DROPPED_FILE = "dropped.parquet"
PHASH_FILE = "phash.parquet"
OVERLAP_FILE = "overlap.parquet"
REPORT_FILE = "report.json"
KEEP_COLUMNS = ["key", "tar", "url", "caption", "sha256"]


def load_successes(crawl_dir: Path) -> pd.DataFrame:
    """Successful samples' metadata (key, tar, url, caption, sha256) from img2dataset's per-shard parquets, sorted by key."""
    crawl_dir = Path(crawl_dir)
    frames = []
    for p in sorted(crawl_dir.glob("*.parquet")):
        if not is_crawl_shard(p):  # only img2dataset shard metadata (00000.parquet), not stray files
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


# ----------------------------------------------------------------------------- hashing
COLOUR_TOLERANCE = 16.0  # mean |difference| per 4x4 RGB thumbnail value (0-255) for a near duplicate


def image_signature(data: bytes) -> tuple[int | None, bytes | None]:
    """(64-bit perceptual hash, 4x4 RGB thumbnail) of encoded image bytes; (None, None) if undecodable.

    The perceptual hash is computed on greyscale, so on its own it calls a red circle and a blue
    circle in the same place duplicates; the thumbnail is the colour check that confirms a pair."""
    from PIL import Image

    from data.dedup.phash import phash_bytes

    h = phash_bytes(data)
    if h is None:
        return None, None
    with Image.open(io.BytesIO(data)) as image:
        thumb = image.convert("RGB").resize((4, 4), Image.Resampling.BOX).tobytes()
    return h, thumb


def hash_tar_images(tar_path: str) -> list[tuple[str, int | None, bytes | None]]:
    """(key, perceptual hash, colour thumbnail) for every image member of a tar (None, None if undecodable)."""
    out = []
    with tarfile.open(tar_path) as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, ext = member_key_ext(member.name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
            out.append((key, *image_signature(data)))
    return out


def hash_tars(tars: list[Path], client: Any | None) -> pd.DataFrame:
    """Perceptual hashes of every image in `tars`: one Dask task per tar (or in-process without a client)."""
    if client is None:
        results = [hash_tar_images(str(t)) for t in tars]
    else:
        futures = client.map(hash_tar_images, [str(t) for t in tars], pure=False)
        results = client.gather(futures)
    rows = [row for part in results for row in part]
    df = pd.DataFrame(rows, columns=["key", "phash", "colour"])
    df["phash"] = df["phash"].astype("UInt64")
    return df


def _confirmed(pairs: np.ndarray, hashes_a: np.ndarray, colours_a: list[bytes], hashes_b: np.ndarray,
               colours_b: list[bytes]) -> np.ndarray:
    """Keep the Hamming-close pairs whose colours agree too, and drop pairs involving a
    low-information hash (flat images hash to 0 or 1 << 63; a normal hash has 32 bits set)."""
    from data.dedup.phash import popcount64

    if not len(pairs):
        return pairs
    ok = (popcount64(hashes_a[pairs[:, 0]]) == 32) & (popcount64(hashes_b[pairs[:, 1]]) == 32)
    a = np.frombuffer(b"".join(colours_a[i] for i in pairs[:, 0]), np.uint8).reshape(len(pairs), -1)
    b = np.frombuffer(b"".join(colours_b[i] for i in pairs[:, 1]), np.uint8).reshape(len(pairs), -1)
    ok &= np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=1) <= COLOUR_TOLERANCE
    return pairs[ok]


def benchmark_tars(root: Path, split: str = "test") -> list[Path]:
    """The shards of a CLIP_benchmark-layout benchmark split."""
    tars = sorted((Path(root) / split).glob("*.tar"), key=lambda p: (len(p.name), p.name))
    if not tars:
        raise FileNotFoundError(f"benchmark {root} has no {split}/*.tar shards")
    return tars


# ----------------------------------------------------------------------------- dedup
DASK_SEARCH_MIN = 1_000_000  # hashes; below this the in-process search takes well under a second


def dedup(
    crawl_dir: Path,
    out_dir: Path,
    *,
    near_duplicates: bool = True,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    benchmark_roots: Mapping[str, Path] | None = None,
    scheduler_address: str | None = None,
    processes: int = 2,
) -> dict[str, Any]:
    """Write keep.parquet, dropped.parquet, phash.parquet, overlap.parquet and report.json to out_dir.

    Returns counts: input, kept, dropped_<reason> (duplicate_url, duplicate_sha256, undecodable,
    near_duplicate, benchmark_overlap), and per benchmark overlap_<name> (test images with a
    near copy in the crawl) and overlap_<name>_fraction.
    """
    from data.common.cluster import dask_client

    if not 0 <= max_distance <= 32:
        raise ValueError(f"max_distance must be between 0 and 32 bits, got {max_distance}")
    benchmark_roots = dict(benchmark_roots or {})
    bench_tars = {name: benchmark_tars(root) for name, root in benchmark_roots.items()}  # fail early
    if not crawl_dir or not Path(crawl_dir).is_dir():
        raise FileNotFoundError(f"crawl directory not found: {crawl_dir}")
    if not (near_duplicates or benchmark_roots):
        return _dedup(Path(crawl_dir), Path(out_dir), near_duplicates, max_distance, bench_tars, None)
    with dask_client(scheduler_address, processes) as client:  # hashing, and the search at scale
        return _dedup(Path(crawl_dir), Path(out_dir), near_duplicates, max_distance, bench_tars, client)


def _search(hashes: np.ndarray, max_distance: int, client: Any | None, queries: np.ndarray | None = None) -> np.ndarray:
    """Pairs within max_distance: in-process below DASK_SEARCH_MIN hashes, on Dask above."""
    from data.dedup.phash import near_duplicate_pairs, near_duplicate_pairs_dask

    if client is not None and len(hashes) + (0 if queries is None else len(queries)) >= DASK_SEARCH_MIN:
        return near_duplicate_pairs_dask(hashes, max_distance, client, queries=queries)
    return near_duplicate_pairs(hashes, max_distance, queries=queries)


def _dedup(crawl_dir: Path, out_dir: Path, near_duplicates: bool, max_distance: int,
           bench_tars: dict[str, list[Path]], client: Any | None) -> dict[str, Any]:
    from data.dedup.phash import cluster_representatives, popcount64

    df = load_successes(crawl_dir)
    n_input = len(df)
    dropped: list[pd.DataFrame] = []

    def drop(mask: np.ndarray, reason: str, duplicate_of: list[str], distance: list[int]) -> None:
        nonlocal df
        dropped.append(pd.DataFrame({
            "key": df.loc[mask, "key"].to_numpy(), "reason": reason,
            "duplicate_of": duplicate_of, "distance": pd.array(distance, dtype="Int64"),
        }))
        df = df.loc[~mask].reset_index(drop=True)

    # 1. exact
    for reason, key_of in (("duplicate_url", lambda d: d["url"].map(normalise_for_dedup)),
                           ("duplicate_sha256", lambda d: d["sha256"])):
        column = key_of(df)  # of the rows the previous step kept
        first = df.groupby(column, sort=False)["key"].transform("first")
        mask = column.duplicated(keep="first").to_numpy()
        drop(mask, reason, first[mask].tolist(), [0 if reason == "duplicate_sha256" else None] * int(mask.sum()))

    # 2 + 3 need pixels: hash every surviving image and every benchmark test image, on Dask
    hashes = pd.DataFrame({"key": pd.Series(dtype=str), "phash": pd.Series(dtype="UInt64"),
                           "colour": pd.Series(dtype=object)})
    bench_hashes: dict[str, pd.DataFrame] = {}
    tars = sorted({Path(crawl_dir) / t for t in df["tar"]})
    if client is not None:
        hashes = hash_tars(tars, client)
        for name, paths in bench_tars.items():
            bench_hashes[name] = hash_tars(paths, client)
    hashed = client is not None  # hashes exist only when near duplicates or benchmarks asked for them
    if hashed:
        df = (df.merge(hashes, on="key", how="left") if len(hashes) else
              df.assign(phash=pd.array([None] * len(df), dtype="UInt64"), colour=None))
    undecodable = df["phash"].isna().to_numpy() if hashed else np.zeros(len(df), dtype=bool)
    if undecodable.any():
        drop(undecodable, "undecodable", [None] * int(undecodable.sum()), [None] * int(undecodable.sum()))

    # 2. decontamination against every benchmark's test images (before near-dup clustering, so
    #    every copy of a test image counts as overlap, not just one per cluster)
    overlap_rows: list[pd.DataFrame] = []
    overlap_counts: dict[str, Any] = {}
    contaminated = np.zeros(len(df), dtype=bool)
    closest: dict[int, tuple[int, str]] = {}
    train_values = df["phash"].to_numpy(dtype=np.uint64) if hashed and len(df) else np.zeros(0, np.uint64)
    for name, bh in bench_hashes.items():
        bh = bh.dropna(subset=["phash"]).reset_index(drop=True)
        test_values = bh["phash"].to_numpy(dtype=np.uint64)
        pairs = _search(train_values, max_distance, client, queries=test_values) if len(df) else np.zeros((0, 2), np.int64)
        pairs = _confirmed(pairs, test_values, list(bh["colour"]), train_values, list(df["colour"]))
        dist = popcount64(test_values[pairs[:, 0]] ^ train_values[pairs[:, 1]]).astype(int) if len(pairs) else np.zeros(0, int)
        overlap_rows.append(pd.DataFrame({
            "benchmark": name, "test_key": bh["key"].to_numpy()[pairs[:, 0]],
            "train_key": df["key"].to_numpy()[pairs[:, 1]], "distance": dist,
        }))
        n_overlap = int(len(np.unique(pairs[:, 0])))
        overlap_counts[f"overlap_{name}"] = n_overlap
        overlap_counts[f"overlap_{name}_fraction"] = round(n_overlap / len(bh), 6) if len(bh) else 0.0
        for (t, i), d in zip(pairs.tolist(), dist.tolist()):
            contaminated[i] = True
            if i not in closest or d < closest[i][0]:
                closest[i] = (d, f"{name}/{bh['key'].iat[t]}")
    if contaminated.any():
        idx = np.flatnonzero(contaminated)
        drop(contaminated, "benchmark_overlap", [closest[i][1] for i in idx], [closest[i][0] for i in idx])

    # 3. near duplicates: one representative (the earliest key) per cluster
    if near_duplicates and len(df) > 1:
        values = df["phash"].to_numpy(dtype=np.uint64)
        pairs = _search(values, max_distance, client)
        colours = list(df["colour"])
        pairs = _confirmed(pairs, values, colours, values, colours)
        rep = cluster_representatives(len(df), pairs)  # df is sorted by key: smallest index = earliest
        mask = rep != np.arange(len(df))
        dist = popcount64(values[mask] ^ values[rep[mask]]).astype(int).tolist()
        drop(mask, "near_duplicate", df["key"].to_numpy()[rep[mask]].tolist(), dist)

    # write
    out_dir.mkdir(parents=True, exist_ok=True)
    keep = df[[*KEEP_COLUMNS, "phash"]] if "phash" in df else df[KEEP_COLUMNS]  # colour stays in phash.parquet
    dropped_df = (pd.concat(dropped, ignore_index=True) if dropped else
                  pd.DataFrame({"key": [], "reason": [], "duplicate_of": [], "distance": pd.array([], dtype="Int64")}))
    dropped_df = dropped_df.astype({"key": str, "reason": str, "duplicate_of": object})
    overlap = (pd.concat(overlap_rows, ignore_index=True) if overlap_rows else
               pd.DataFrame({"benchmark": [], "test_key": [], "train_key": [], "distance": []}))
    overlap = overlap.sort_values(["benchmark", "test_key", "train_key"], ignore_index=True)
    _write_parquet(keep, out_dir / KEEP_FILE)
    _write_parquet(dropped_df, out_dir / DROPPED_FILE)
    _write_parquet(hashes.sort_values("key", ignore_index=True), out_dir / PHASH_FILE)  # + colour thumbnails
    _write_parquet(overlap, out_dir / OVERLAP_FILE)

    reasons = ["duplicate_url", "duplicate_sha256", "undecodable", "near_duplicate", "benchmark_overlap"]
    by_reason = {r: int((dropped_df["reason"] == r).sum()) for r in reasons}
    report = {
        "input": n_input,
        "kept": len(keep),
        "max_distance": max_distance if hashed else None,
        "dropped": by_reason,
        "overlap": {
            name: {"test_images": int(len(bench_hashes[name])), "overlapping": overlap_counts[f"overlap_{name}"],
                   "fraction": overlap_counts[f"overlap_{name}_fraction"]}
            for name in bench_hashes
        },
    }
    atomic_write_json(out_dir / REPORT_FILE, report)
    return {"input": n_input, "kept": len(keep), **{f"dropped_{r}": n for r, n in by_reason.items()}, **overlap_counts}


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:  # readers never see half a file
        df.to_parquet(tmp, index=False)
