"""Fetch CLIP_benchmark webdataset benchmarks from a mirror into a data root.

    fetch_benchmarks(["cifar10", "mnist"], "/data/benchmarks")      # Hugging Face, clip-benchmark
    fetch_benchmarks(["cifar10"], root, mirror="http://mirror.internal/clip-benchmark",
                     url_template=PLAIN_TEMPLATE)                  # a plain directory tree

For a task whose metadata names a mirror repository (``wds_mirror``, e.g.
"clip-benchmark/wds_vtab-cifar10"), repo = the part after the owner, and the files are

    {url_template}(mirror, repo, path) -> <data_root>/<repo>/<path>
    classnames.txt, zeroshot_classification_templates.txt   (optional for retrieval sets)
    dataset_type.txt                                          (optional, as in CLIP_benchmark)
    test/nshards.txt                                          (says how many tars)
    test/0.tar .. test/<N-1>.tar

which is the layout `data.eval.registry.locate` finds as "wds". test/nshards.txt lands
before the tars, so an interrupted fetch is reported by the reader as "shard missing" instead of
being read as a smaller dataset. Downloads go through `data.acquire.download` (resumable, verified
against `<data_root>/<repo>/.witclip-fetch.json`); a second fetch of a complete set asks nothing
of the network. Tasks without a mirror are reported with their "obtain" text and skipped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from data.acquire.download import (
    FETCH_MANIFEST,
    DownloadError,
    DownloadItem,
    HostUnreachable,
    LocalWriteError,
    download_files,
    forget,
)
from data.eval.registry import Task, get_task, locate

DEFAULT_MIRROR = "https://huggingface.co/datasets/clip-benchmark"
HF_TEMPLATE = "{mirror}/{repo}/resolve/main/{path}"  # Hugging Face dataset repositories
PLAIN_TEMPLATE = "{mirror}/{repo}/{path}"  # a mirror that is a plain directory tree
SPLIT = "test"
MAX_SHARDS = 100_000
TEMPLATE_FIELDS = ("mirror", "repo", "path", "task")

STATUS_FETCHED = "fetched"
STATUS_COMPLETE = "already complete"
STATUS_NO_MIRROR = "no mirror"
STATUS_FAILED = "failed"


def mirror_repo(task: Task) -> str | None:
    """The repository name under the mirror ("wds_vtab-cifar10"), or None when the task has none."""
    if not task.wds_mirror:
        return None
    return task.wds_mirror.rstrip("/").rsplit("/", 1)[-1]


def check_mirror(mirror: str, url_template: str) -> None:
    """ValueError (one line) unless `mirror` is an http(s) URL and `url_template` a usable template."""
    parts = urlsplit(mirror)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"mirror {mirror!r} is not an http(s) URL (e.g. {DEFAULT_MIRROR})")
    try:
        url = url_template.format(mirror="M", repo="R", path="P", task="T")
    except (KeyError, IndexError, ValueError) as err:
        fields = ", ".join("{" + f + "}" for f in TEMPLATE_FIELDS)
        raise ValueError(f"url template {url_template!r} is not usable ({type(err).__name__}: {err}); "
                         f"it may use {fields}") from None
    if "{path}" not in url_template or "P" not in url:
        raise ValueError(f"url template {url_template!r} has no {{path}}, so every file would have the same URL")


def file_url(url_template: str, mirror: str, repo: str, path: str, task: str = "") -> str:
    return url_template.format(mirror=mirror.rstrip("/"), repo=repo, path=path, task=task)


def _read_nshards(path: Path, url: str) -> int:
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if not text.isdigit() or not 1 <= int(text) <= MAX_SHARDS:
        shown = text[:40] + ("..." if len(text) > 40 else "")
        raise DownloadError(f"{url} is not a shard count (got {shown!r}); is the mirror / url template right?")
    return int(text)


def _fetch_task(task: Task, data_root: Path, mirror: str, url_template: str, dl: dict[str, Any]) -> dict[str, Any]:
    repo = mirror_repo(task)
    assert repo is not None
    tdir = data_root / repo
    manifest = tdir / FETCH_MANIFEST

    def item(path: str, optional: bool = False) -> DownloadItem:
        return DownloadItem(file_url(url_template, mirror, repo, path, task.name), tdir / path, optional)

    retrieval = task.type == "retrieval"
    meta = [item("classnames.txt", optional=retrieval),
            item("zeroshot_classification_templates.txt", optional=retrieval),
            item("dataset_type.txt", optional=True),
            item(f"{SPLIT}/nshards.txt")]
    first = download_files(meta, manifest=manifest, desc=f"{repo} (metadata)", **dl)
    nshards_item = meta[-1]
    try:
        n = _read_nshards(nshards_item.dest, nshards_item.url)
    except DownloadError:
        forget(manifest, nshards_item.dest)  # not a shard count: neither keep nor vouch for it
        raise
    tars = [item(f"{SPLIT}/{i}.tar") for i in range(n)]
    second = download_files(tars, manifest=manifest, desc=repo, **dl)

    fetched = sum(r[k] for r in (first, second) for k in ("downloaded", "resumed", "refetched"))
    location = locate(task, [data_root])
    note = ""
    names = tdir / "classnames.txt"
    if task.num_classes and names.is_file():
        count = sum(1 for line in names.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip())
        if count != task.num_classes:
            note = f"classnames.txt lists {count} classes, task {task.name} has {task.num_classes}"
    return {
        "status": STATUS_FETCHED if fetched else STATUS_COMPLETE,
        "path": str(tdir),
        "location": f"{location.kind}: {location.path}" if location else None,
        "shards": n,
        "files": first["files"] - first["missing_optional"] + second["files"],
        "bytes": first["bytes"] + second["bytes"],
        "bytes_downloaded": first["bytes_downloaded"] + second["bytes_downloaded"],
        "downloaded": fetched,
        "resumed": first["resumed"] + second["resumed"],
        "verified": first["verified"] + second["verified"],
        "refetched": first["refetched"] + second["refetched"],
        "message": note,
    }


def fetch_benchmarks(
    task_names: Sequence[str],
    data_root: str | Path,
    *,
    mirror: str = DEFAULT_MIRROR,
    url_template: str = HF_TEMPLATE,
    workers: int = 4,
    progress: bool = True,
    connect_timeout: float = 5.0,
    read_timeout: float = 10.0,
    retries: int = 2,
) -> dict[str, Any]:
    """Fetch each task's CLIP_benchmark wds files under data_root (see module doc).

    Returns {"tasks": {name: {status, path, location, shards, files, bytes, bytes_downloaded,
    seconds, message, ...}}, "fetched", "complete", "no_mirror", "failed", "bytes_downloaded",
    "seconds"}; status is "fetched", "already complete", "no mirror" (message: "no public mirror:
    <how to obtain it>") or "failed" (message: the one-line reason; other tasks still run).
    Raises ValueError for unknown tasks or a bad mirror/template (before any request),
    HostUnreachable when the mirror does not answer (no further task is tried) and
    LocalWriteError when the data root cannot be written.
    """
    t0 = time.monotonic()
    check_mirror(mirror, url_template)
    tasks = [get_task(n) for n in dict.fromkeys(task_names)]
    root = Path(data_root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"data root {root} exists and is not a directory")
    dl = dict(workers=workers, progress=progress, connect_timeout=connect_timeout, read_timeout=read_timeout,
              retries=retries)
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        t1 = time.monotonic()
        if mirror_repo(task) is None:
            out[task.name] = {"status": STATUS_NO_MIRROR, "message": f"no public mirror: {task.obtain}",
                              "files": 0, "bytes": 0, "bytes_downloaded": 0}
            continue
        try:
            result = _fetch_task(task, root, mirror, url_template, dl)
        except (HostUnreachable, LocalWriteError):
            raise  # the same for every task: stop here
        except DownloadError as err:
            result = {"status": STATUS_FAILED, "path": str(root / mirror_repo(task)), "message": str(err),
                      "files": 0, "bytes": 0, "bytes_downloaded": 0}
        result["seconds"] = round(time.monotonic() - t1, 3)
        out[task.name] = result

    def n(status: str) -> int:
        return sum(1 for r in out.values() if r["status"] == status)

    return {"tasks": out, "fetched": n(STATUS_FETCHED), "complete": n(STATUS_COMPLETE),
            "no_mirror": n(STATUS_NO_MIRROR), "failed": n(STATUS_FAILED),
            "bytes_downloaded": sum(r.get("bytes_downloaded", 0) for r in out.values()),
            "seconds": round(time.monotonic() - t0, 3)}
