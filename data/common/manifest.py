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
ATTEMPT_NAME = ".attempt.json"  # a stage attempt in progress (or failed): its key and status
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


def output_stats(out_dir: str | os.PathLike[str], rel_paths: Iterable[str]) -> dict[str, list[int]]:
    """{relative path: [size in bytes, mtime in ns]}: what `verify_outputs` checks cheaply."""
    root = Path(out_dir)
    stats = {}
    for rel in rel_paths:
        st = (root / rel).stat()
        stats[rel] = [st.st_size, st.st_mtime_ns]
    return stats


def verify_outputs(out_dir: str | os.PathLike[str], manifest: dict[str, Any], *, deep: bool = False) -> str | None:
    """None when every output the manifest lists is still as it was written; otherwise what differs,
    naming the first file that does. Size and mtime always (a hard link or `copy2` keeps both); with
    `deep`, the sha256 of every file too (an edit that kept size and mtime)."""
    root = Path(out_dir)
    outputs: dict[str, str] = manifest.get("outputs") or {}
    stats: dict[str, list[int]] = manifest.get("stats") or {}
    if outputs and not stats:
        return "its manifest predates output checks"
    for rel, digest in outputs.items():
        path = root / rel
        try:
            st = path.stat()
        except FileNotFoundError:
            return f"{path} is missing"
        size, mtime_ns = stats.get(rel, [None, None])
        if st.st_size != size:
            return f"{path} is {st.st_size} bytes, {size} when the stage completed"
        if st.st_mtime_ns != mtime_ns:
            return f"{path} was modified after the stage completed"
        if deep and sha256_file(path) != digest:
            return f"{path} does not match its sha256 in the manifest"
    return None


def enclosing_stage_dir(path: str | os.PathLike[str]) -> Path | None:
    """The stage directory `path` is in or is (one holding a manifest or an attempt), or None. Stage
    outputs may be shared with other runs through hard links: nothing but their stage writes there."""
    p = Path(path).resolve()
    for d in (p, *p.parents):
        if (d / MANIFEST_NAME).is_file() or (d / ATTEMPT_NAME).is_file():
            return d
    return None


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
