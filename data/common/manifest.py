"""Content hashes and manifest I/O used by the orchestration layer for skip/resume.

A stage directory is "done" when its manifest.json exists and matches the stage's
parameters/input hashes; manifest.json is therefore always the LAST file written
(atomically), so a crash mid-stage never leaves a directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from data.common.files import atomic_write_json, is_temp_name, sha256_file

MANIFEST_NAME = "manifest.json"
_SKIP_DIRS = {"_tmp"}  # img2dataset scratch space; never part of a stage's outputs


def hash_outputs(
    out_dir: str | os.PathLike[str], exclude: Iterable[str] = (MANIFEST_NAME,)
) -> dict[str, str]:
    """{relative posix path: sha256} for every file under out_dir, sorted by path.

    `exclude` entries match either the relative path or the bare file name.
    Directories named `_tmp` are skipped.
    """
    root = Path(out_dir)
    excluded = set(exclude)
    hashes: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if name in excluded or rel in excluded or is_temp_name(name):
                continue
            hashes[rel] = sha256_file(full)
    return dict(sorted(hashes.items()))


def _canonical_json(obj: Any) -> str:
    # sort_keys + fixed separators => same object, same bytes, same hash across runs/machines.
    # default=str so Paths and similar scalars in parameter dicts hash by their text.
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON encoding of obj (dict key order doesn't matter)."""
    return hashlib.sha256(_canonical_json(obj).encode("utf-8")).hexdigest()


def write_manifest(
    out_dir: str | os.PathLike[str], manifest: dict[str, Any], *, name: str = MANIFEST_NAME
) -> Path:
    """Atomically write out_dir/<name> (`data.common.files.atomic_write_json`): readers see the old or
    the new manifest, never half of one."""
    return atomic_write_json(Path(out_dir) / name, manifest, sort_keys=True, default=str)


def read_manifest(out_dir: str | os.PathLike[str], *, name: str = MANIFEST_NAME) -> dict[str, Any] | None:
    """The parsed out_dir/<name> (default manifest.json), or None if missing or not a JSON object."""
    path = Path(out_dir) / name
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
