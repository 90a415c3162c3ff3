"""Pack kept samples into train/val webdataset shards, and stream them back for training.

Writing: index the members of img2dataset's tars (headers only), shuffle the kept keys
deterministically, then copy each sample's bytes by seek+read -- memory stays bounded by
one sample whatever the dataset size, and the output order is a true global shuffle.

Reading: a sample's global index (over the shard list, in order) decides its owner,
`index % world_size == rank`, so ranks and DataLoader workers get disjoint samples even
from a single shard.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

SIZES_FILE = "sizes.json"
SHARDS_MANIFEST_FILE = "shards.json"  # {shard: {"samples": n, "sha256": hex}}
IMAGE_EXTS = ("jpg", "png", "webp")  # img2dataset encode formats
_OPEN_TARS = 64  # LRU of open input tars while copying in shuffled order
_TAR_MTIME = 0  # fixed member mtime => identical inputs give byte-identical shards (stable hashes)
_SHUFFLE_BUFFER = 256

_Member = tuple[str, int, int]  # (tar path, data offset, size)


# ------------------------------------------------------------------------------- writing
def _split_name(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, ext = base.partition(".")  # webdataset convention: key = up to the first dot
    return key, ext


def _index_tars(crawl_dir: Path, tars: list[str], wanted: set[str]) -> dict[str, dict[str, _Member]]:
    index: dict[str, dict[str, _Member]] = {}
    for tar_name in tqdm(tars, desc="index crawl tars", unit="tar", leave=False):
        path = str(crawl_dir / tar_name)
        with tarfile.open(path, "r:") as tf:  # uncompressed: offsets are seekable byte positions
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
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


def _image_ext(members: dict[str, _Member]) -> str | None:
    return next((e for e in IMAGE_EXTS if e in members), None)


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

    keys = [k for k in sorted(keep["key"]) if k in index and _image_ext(index[k]) and "txt" in index[k]]
    missing = len(keep) - len(keys)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    splits = {"val": keys[:n_val], "train": keys[n_val:]}

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*out_dir.glob("train-*.tar"), *out_dir.glob("val-*.tar"), out_dir / SIZES_FILE,
                  out_dir / SHARDS_MANIFEST_FILE]:
        stale.unlink(missing_ok=True)  # a previous run with more shards must not leak into this one

    import webdataset as wds

    sizes: dict[str, int] = {}
    reader = _TarReader()
    try:
        with tqdm(total=n, desc="write shards", unit="sample", leave=False) as bar:
            for split in ("train", "val"):
                split_keys = splits[split]
                for shard_idx, start in enumerate(range(0, len(split_keys), samples_per_shard)):
                    name = f"{split}-{shard_idx:06d}.tar"
                    chunk = split_keys[start : start + samples_per_shard]
                    with wds.TarWriter(str(out_dir / name), mtime=_TAR_MTIME) as sink:
                        for key in chunk:
                            members = index[key]
                            img_ext = _image_ext(members)
                            sample = {"__key__": key, img_ext: reader.read(members[img_ext])}
                            sample["txt"] = reader.read(members["txt"])
                            if "json" in members:
                                sample["json"] = reader.read(members["json"])
                            sink.write(sample)
                            bar.update(1)
                    sizes[name] = len(chunk)
    finally:
        reader.close()

    from data.manifest import file_sha256

    shards = {name: {"samples": n, "sha256": file_sha256(out_dir / name)} for name, n in sorted(sizes.items())}
    (out_dir / SHARDS_MANIFEST_FILE).write_text(json.dumps(shards, indent=2) + "\n")
    # sizes.json last: its presence means the shard set is complete (open_clip's format).
    (out_dir / SIZES_FILE).write_text(json.dumps(sizes, indent=2, sort_keys=True) + "\n")
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
    return sorted(Path(shard_dir).glob(f"{split}-*.tar"))


def count_samples(shard_dir: Path, split: str) -> int:
    """Number of samples in a split, from sizes.json."""
    path = Path(shard_dir) / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{SIZES_FILE} not found in {shard_dir}")
    sizes = json.loads(path.read_text())
    return sum(int(v) for k, v in sizes.items() if k.startswith(f"{split}-"))


def _iter_raw(paths: list[Path], rank: int, world_size: int) -> Iterator[dict[str, bytes]]:
    """Raw {ext: bytes} samples whose global index % world_size == rank; others are skipped unread."""
    idx = -1
    for path in paths:
        with tarfile.open(path, "r:") as tf:
            group_key, group, mine = None, {}, False
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_name(m.name)
                if key != group_key:
                    if mine and group:
                        yield group
                    idx += 1
                    group_key, group, mine = key, {}, idx % world_size == rank
                if mine:
                    f = tf.extractfile(m)
                    group[ext] = f.read() if f else b""
            if mine and group:
                yield group


def _decode(raw: dict[str, bytes]) -> tuple[Image.Image, str]:
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise ValueError(f"sample has no image member (members: {sorted(raw)})")
    img = Image.open(io.BytesIO(raw[ext])).convert("RGB")
    return img, raw.get("txt", b"").decode("utf-8")


def iter_samples(
    paths: list[Path],
    *,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int | None = None,
    buffer_size: int = _SHUFFLE_BUFFER,
) -> Iterator[tuple[Image.Image, str]]:
    """Yield (RGB image, caption) for this rank's disjoint slice of the samples in `paths`.

    With shuffle_seed, the shard order is shuffled (identically on every rank, which keeps
    the partition disjoint) and samples pass through a small per-rank shuffle buffer.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    paths = list(paths)
    if shuffle_seed is None:
        for raw in _iter_raw(paths, rank, world_size):
            yield _decode(raw)
        return
    random.Random(shuffle_seed).shuffle(paths)
    rng = random.Random(f"{shuffle_seed}/{rank}/{world_size}")
    buf: list[dict[str, bytes]] = []  # raw bytes, decoded on the way out: cheaper to hold
    for raw in _iter_raw(paths, rank, world_size):
        if len(buf) < buffer_size:
            buf.append(raw)
            continue
        i = rng.randrange(len(buf))
        buf[i], raw = raw, buf[i]
        yield _decode(raw)
    rng.shuffle(buf)
    for raw in buf:
        yield _decode(raw)


# --- batches for training -----------------------------------------------------------------
def _partition_size(n: int, part: int, parts: int) -> int:
    return len(range(part, n, parts))


def steps_per_epoch(n_samples: int, batch_size: int, world_size: int = 1, num_workers: int = 0) -> int:
    """Full batches every rank can produce (same on all ranks, so DDP collectives never hang)."""
    nw = max(1, num_workers)
    parts = world_size * nw
    per_rank = [
        sum(_partition_size(n_samples, r * nw + w, parts) // batch_size for w in range(nw))
        for r in range(world_size)
    ]
    return min(per_rank) if per_rank else 0


class _Collate:
    """Stack transformed images; tokenize captions as one batch (picklable for DataLoader workers)."""

    def __init__(self, tokenize: Callable[[list[str]], Any]) -> None:
        self.tokenize = tokenize

    def __call__(self, batch: list[tuple[Any, str]]) -> tuple[Any, Any]:
        images, texts = zip(*batch)
        return torch.stack(list(images)), self.tokenize(list(texts))


def _transformed(paths, rank, world_size, shuffle_seed, image_transform):
    for img, txt in iter_samples(paths, rank=rank, world_size=world_size, shuffle_seed=shuffle_seed):
        yield image_transform(img), txt


class _ShardStream(IterableDataset):
    """IterableDataset over this rank's samples; DataLoader workers split it further."""

    def __init__(self, paths, rank, world_size, shuffle_seed, image_transform) -> None:
        super().__init__()
        self.paths, self.rank, self.world_size = paths, rank, world_size
        self.shuffle_seed, self.image_transform = shuffle_seed, image_transform

    def __iter__(self):
        info = get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        # worker w of rank r owns partition r*nw + w of world_size*nw: disjoint everywhere.
        return _transformed(
            self.paths, self.rank * nw + wid, self.world_size * nw, self.shuffle_seed, self.image_transform
        )


def make_batches(
    shard_dir: Path,
    split: str,
    *,
    batch_size: int,
    image_transform: Callable[[Image.Image], Any],
    tokenize: Callable[[list[str]], Any],
    rank: int = 0,
    world_size: int = 1,
    epoch: int = 0,
    seed: int = 0,
    num_workers: int = 0,
) -> Iterator[tuple[Any, Any]]:
    """Yield (images [B,3,H,W], tokens [B,ctx]) batches of this rank's samples.

    train: shuffled per (seed, epoch), last incomplete batch dropped, and capped at
    steps_per_epoch() so every rank yields the same number of batches. Other splits:
    file order, every sample, last batch may be short. num_workers > 0 uses a torch
    DataLoader whose workers read disjoint samples.
    """
    paths = shard_paths(shard_dir, split)
    if not paths:
        raise FileNotFoundError(f"no {split}-*.tar shards in {shard_dir}")
    train = split == "train"
    shuffle_seed = seed * 1_000_003 + epoch if train else None
    collate = _Collate(tokenize)
    max_steps = None
    if train:
        max_steps = steps_per_epoch(count_samples(shard_dir, split), batch_size, world_size, num_workers)

    if num_workers > 0:
        dataset = _ShardStream(paths, rank, world_size, shuffle_seed, image_transform)
        batches: Iterator[Any] = iter(
            DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, drop_last=train)
        )
    else:
        batches = _batched(_transformed(paths, rank, world_size, shuffle_seed, image_transform), batch_size, train, collate)

    for step, batch in enumerate(batches):
        if max_steps is not None and step >= max_steps:
            break
        yield batch


def _batched(samples, batch_size, drop_last, collate):
    batch = []
    for s in samples:
        batch.append(s)
        if len(batch) == batch_size:
            yield collate(batch)
            batch = []
    if batch and not drop_last:
        yield collate(batch)
