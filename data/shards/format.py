"""The webdataset tar layouts witclip writes and reads, in one place.

Two layouts of training data:

- img2dataset's crawl output: `00000.tar` (5-digit shard id), `00000.parquet`, `00000_stats.json`;
  member keys are shard id x 10^k + index.
- the shard stage's output: `train-000000.tar`, `val-000000.tar`, plus `shards.json` (samples and
  sha256 per shard) and open_clip's `sizes.json` (samples per shard).

In both, a sample is the tar members sharing a key: one image (`IMAGE_EXTS`, the first present wins),
its caption (`CAPTION_EXT`) and img2dataset's metadata (`METADATA_EXT`). The key is a member's base
name up to its first dot (webdataset's convention), the extension what follows.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path, PurePosixPath

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # open_clip reads "jpg;png;webp"; "jpeg" is the same format
CAPTION_EXT = "txt"
METADATA_EXT = "json"
SPLITS = ("train", "val")
SIZES_FILE = "sizes.json"  # {shard file name: samples}, open_clip's
SHARDS_MANIFEST_FILE = "shards.json"  # {shard file name: {"samples": n, "sha256": hex}}
CRAWL_SHARD_DIGITS = 5  # img2dataset's default oom_shard_count


def shard_file_name(split: str, index: int) -> str:
    """`train-000003.tar`: the shard stage's name for shard `index` of `split`."""
    return f"{split}-{index:06d}.tar"


def split_glob(split: str) -> str:
    """Glob pattern of a split's shards in a shard directory."""
    return f"{split}-*.tar"


def crawl_shard_stem(shard_id: int) -> str:
    """`00003`: img2dataset's file stem for crawl shard `shard_id`."""
    return f"{shard_id:0{CRAWL_SHARD_DIGITS}d}"


def is_crawl_shard(path: str | Path) -> bool:
    """An img2dataset shard file (`00000.tar`, `00000.parquet`): an all-digit stem."""
    return Path(path).stem.isdigit()


def member_key_ext(member_name: str) -> tuple[str, str]:
    """(key, extension) of a tar member: the base name split at its first dot."""
    key, _, ext = PurePosixPath(member_name).name.partition(".")
    return key, ext


def image_ext(exts: Iterable[str]) -> str | None:
    """The image extension a sample with these member extensions is read from, or None."""
    present = set(exts)
    return next((e for e in IMAGE_EXTS if e in present), None)
