"""Writing files so that no reader ever sees half of one, and hashing them.

    with atomic_path(out / "keep.parquet") as tmp:   # any writer that takes a path
        df.to_parquet(tmp)
    atomic_write(out / "report.json", text)           # bytes or str
    atomic_write_json(out / "sizes.json", sizes)

A temp file lives next to its final name (same filesystem, so the rename is atomic), is named
`.<name>.<pid>.<random>.tmp` -- unique per writer, so two processes or threads writing the same file
never share one -- and is fsynced before `os.replace` puts it in place; on any failure it is removed
and the final name keeps its old content (or stays absent). `is_temp_name` recognises such names, so
output hashing skips a write still in flight.

`clip/` is the one exception: a standalone model library that imports nothing of witclip's pipeline,
it keeps its own fsync-and-rename with the same temp names (`clip.checkpoint.write_atomically`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")  # a sha256 written out; use fullmatch ("$" lets a newline through)

def is_temp_name(name: str) -> bool:
    """True for the temp names `atomic_path` uses (an interrupted or in-flight write, never an output)."""
    return name.startswith(".") and name.endswith(".tmp")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `final`; when the block ends without error, fsync it and rename it
    to `final` (creating the parent directory first). On error the temp file is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes | str, *, encoding: str = "utf-8") -> Path:
    """Write `data` (str is encoded) to `path` atomically; returns the path."""
    payload = data.encode(encoding) if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Any = None) -> Path:
    """`obj` as JSON (UTF-8, trailing newline) written atomically to `path`."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=False)
    return atomic_write(path, text + "\n")


def sha256_hasher(path: str | os.PathLike[str], *, limit: int | None = None) -> "hashlib._Hash":
    """A sha256 object fed with the file's bytes (its first `limit` bytes when given), read in chunks so
    big tars never load into memory; a resumed download keeps feeding it what arrives next."""
    h = hashlib.sha256()
    left = limit
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(CHUNK_BYTES if left is None else min(CHUNK_BYTES, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    return h


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file."""
    return sha256_hasher(path).hexdigest()
