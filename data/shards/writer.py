"""Pack kept samples into train/val webdataset shards (training reads them with data/loader.py).

Index the members of img2dataset's tars (headers only), shuffle the kept keys deterministically,
then copy each sample's bytes by seek+read -- memory stays bounded by one sample whatever the
dataset size, and the output order is a true global shuffle.
"""

from __future__ import annotations

import json
import random
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from data.common.files import atomic_path, atomic_write_json, sha256_file
from data.shards.format import (
    CAPTION_EXT,
    METADATA_EXT,
    SHARDS_MANIFEST_FILE,
    SIZES_FILE,
    SPLITS,
    image_ext,
    member_key_ext,
    shard_file_name,
    split_glob,
)

_OPEN_TARS = 64  # LRU of open input tars while copying in shuffled order
_TAR_MTIME = 0  # fixed member mtime => identical inputs give byte-identical shards (stable hashes)

_Member = tuple[str, int, int]  # (tar path, data offset, size)


# ------------------------------------------------------------------------------- writing
def _index_tars(crawl_dir: Path, tars: list[str], wanted: set[str]) -> dict[str, dict[str, _Member]]:
    index: dict[str, dict[str, _Member]] = {}
    for tar_name in tqdm(tars, desc="index crawl tars", unit="tar", leave=False):
        path = str(crawl_dir / tar_name)
        with tarfile.open(path, "r:") as tf:  # uncompressed: offsets are seekable byte positions
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = member_key_ext(m.name)
                if key in wanted:
                    index.setdefault(key, {})[ext] = (path, m.offset_data, m.size)
    return index


class _TarReader:
    """Random-access reads of member bytes, keeping a bounded number of files open."""

    def __init__(self, max_open: int = _OPEN_TARS) -> None:
        self.files: OrderedDict[str, Any] = OrderedDict()
        self.max_open = max_open

    def read(self, member: _Member) -> bytes:
        path, offset, size = member
        f = self.files.pop(path, None) or open(path, "rb")
        self.files[path] = f
        if len(self.files) > self.max_open:
            self.files.popitem(last=False)[1].close()
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def write_shards(
    crawl_dir: Path,
    keep_parquet: Path,
    out_dir: Path,
    *,
    val_fraction: float = 0.05,
    samples_per_shard: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Write train-NNNNNN.tar / val-NNNNNN.tar (jpg, txt, json per sample), shards.json (samples and
    sha256 per shard) and sizes.json (open_clip's). Same inputs + seed give byte-identical shards.

    Kept samples are shuffled with `seed`; val gets round(n * val_fraction) samples,
    at least 1 when n >= 2 (and train keeps at least 1). Returns counts: train, val,
    train_shards, val_shards, missing (kept keys absent from the crawl tars).
    """
    crawl_dir, out_dir = Path(crawl_dir), Path(out_dir)
    if not Path(keep_parquet).is_file():
        raise FileNotFoundError(f"keep file not found: {keep_parquet}")
    if samples_per_shard < 1 or not 0.0 <= val_fraction < 1.0:
        raise ValueError("need samples_per_shard >= 1 and 0 <= val_fraction < 1")
    keep = pd.read_parquet(keep_parquet, columns=["key", "tar"])
    index = _index_tars(crawl_dir, sorted(keep["tar"].unique()), set(keep["key"]))

    keys = [k for k in sorted(keep["key"]) if k in index and image_ext(index[k]) and CAPTION_EXT in index[k]]
    missing = len(keep) - len(keys)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    splits = {"val": keys[:n_val], "train": keys[n_val:]}

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*(p for split in SPLITS for p in out_dir.glob(split_glob(split))), out_dir / SIZES_FILE,
                  out_dir / SHARDS_MANIFEST_FILE]:
        stale.unlink(missing_ok=True)  # a previous run with more shards must not leak into this one

    import webdataset as wds

    sizes: dict[str, int] = {}
    reader = _TarReader()
    try:
        with tqdm(total=n, desc="write shards", unit="sample", leave=False) as bar:
            for split in SPLITS:
                split_keys = splits[split]
                for shard_idx, start in enumerate(range(0, len(split_keys), samples_per_shard)):
                    name = shard_file_name(split, shard_idx)
                    chunk = split_keys[start : start + samples_per_shard]
                    with atomic_path(out_dir / name) as tmp, wds.TarWriter(str(tmp), mtime=_TAR_MTIME) as sink:
                        for key in chunk:
                            members = index[key]
                            img_ext = image_ext(members)
                            sample = {"__key__": key, img_ext: reader.read(members[img_ext])}
                            sample[CAPTION_EXT] = reader.read(members[CAPTION_EXT])
                            if METADATA_EXT in members:
                                sample[METADATA_EXT] = reader.read(members[METADATA_EXT])
                            sink.write(sample)
                            bar.update(1)
                    sizes[name] = len(chunk)
    finally:
        reader.close()

    shards = {name: {"samples": n, "sha256": sha256_file(out_dir / name)} for name, n in sorted(sizes.items())}
    atomic_write_json(out_dir / SHARDS_MANIFEST_FILE, shards)
    # sizes.json last: its presence means the shard set is complete (open_clip's format).
    atomic_write_json(out_dir / SIZES_FILE, sizes, sort_keys=True)
    n_shards = {s: sum(1 for k in sizes if k.startswith(f"{s}-")) for s in ("train", "val")}
    return {
        "train": len(splits["train"]),
        "val": len(splits["val"]),
        "train_shards": n_shards["train"],
        "val_shards": n_shards["val"],
        "missing": missing,
    }


# ------------------------------------------------------------------------------- reading
def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    """Sorted `{split}-*.tar` paths in shard_dir."""
    return sorted(Path(shard_dir).glob(split_glob(split)))


def count_samples(shard_dir: Path, split: str) -> int:
    """Number of samples in a split, from sizes.json."""
    path = Path(shard_dir) / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SIZES_FILE} not found in {shard_dir}")
    sizes = json.loads(path.read_text())
    return sum(int(v) for k, v in sizes.items() if k.startswith(f"{split}-"))
