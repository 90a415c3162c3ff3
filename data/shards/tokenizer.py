"""Preparation for training that belongs to the data: the caption tokenizer, trained on the train split."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from pathlib import Path

from data.common.files import atomic_path
from data.shards import shard_paths


def iter_captions(shard_dir: Path, split: str = "train") -> Iterator[str]:
    """Every caption (`.txt` member) of a split's webdataset shards, without decoding images."""
    for path in shard_paths(shard_dir, split):
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".txt"):
                    f = tar.extractfile(member)
                    if f is not None:
                        yield f.read().decode("utf-8", errors="replace")


def train_tokenizer(shard_dir: Path, out_path: Path, *, vocab_size: int) -> dict:
    """Train the byte-level BPE tokenizer on the train captions; returns its path and real vocab size."""
    from clip.tokenizer import train_caption_tokenizer

    captions = list(iter_captions(shard_dir, "train"))
    if not captions:
        raise ValueError(f"no captions found in {shard_dir} train shards: nothing to train a tokenizer on")
    tokenizer = train_caption_tokenizer(captions, vocab_size=vocab_size)
    with atomic_path(out_path) as tmp:
        tokenizer.save(tmp)
    return {"path": str(out_path), "vocab_size": tokenizer.vocab_size, "captions": len(captions)}
