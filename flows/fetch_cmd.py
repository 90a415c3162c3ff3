"""`witclip benchmarks fetch` and `witclip urls fetch`: get benchmark data and URL lists from mirrors.

    witclip benchmarks fetch --tasks cifar10,mnist --data-root /data/bench
    witclip benchmarks fetch --tasks paper --data-root /data/bench \
        --mirror http://mirror.internal/clip-benchmark --url-template '{mirror}/{repo}/{path}'
    witclip urls fetch https://host/cc3m Train_GCC-training.tsv --out lists/
    witclip urls fetch https://host/laion --list index.txt --out lists/

User mistakes and unreachable mirrors raise flows.errors.UserError with one line (the CLI prints
``error: ...`` and exits 2). Functions here print a summary; they return 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.errors import UserError

MAX_WORKERS = 64
# = data.acquire.benchmarks.DEFAULT_MIRROR / HF_TEMPLATE, repeated so building the CLI parser imports nothing
DEFAULT_MIRROR = "https://huggingface.co/datasets/clip-benchmark"
HF_TEMPLATE = "{mirror}/{repo}/resolve/main/{path}"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _check_workers(workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise UserError(f"--workers {workers}: expected 1..{MAX_WORKERS} parallel downloads")


def select_tasks(spec: str) -> list[str]:
    """'all', a group name (paper, shift, retrieval, synthetic) or comma-separated task names."""
    from data.eval.registry import get_task, load_tasks

    tasks = load_tasks()
    groups = {t.group for t in tasks.values()}
    out: list[str] = []
    items = [s.strip() for s in (spec or "").split(",") if s.strip()]
    if not items:
        raise UserError("--tasks is empty; expected all, a group (paper, shift, retrieval) or task names")
    for item in items:
        if item == "all":
            out += list(tasks)
        elif item in groups:
            out += [n for n, t in tasks.items() if t.group == item]
        else:
            try:
                out.append(get_task(item).name)
            except ValueError as err:
                raise UserError(str(err)) from None
    return list(dict.fromkeys(out))


def cmd_benchmarks_fetch(tasks: str, data_root: str, mirror: str, url_template: str, workers: int) -> int:
    """Fetch the selected tasks' CLIP_benchmark webdataset files into data_root; print one row per task."""
    from data.acquire.benchmarks import (
        DEFAULT_MIRROR,
        HF_TEMPLATE,
        PLAIN_TEMPLATE,
        STATUS_FAILED,
        check_mirror,
        fetch_benchmarks,
    )
    from data.acquire.download import DownloadError

    if not data_root:
        raise UserError("benchmarks fetch: --data-root DIR is required (where the datasets go)")
    mirror = mirror or DEFAULT_MIRROR
    url_template = url_template or HF_TEMPLATE
    _check_workers(workers)
    names = select_tasks(tasks)
    try:
        check_mirror(mirror, url_template)
        result = fetch_benchmarks(names, data_root, mirror=mirror, url_template=url_template, workers=workers)
    except (DownloadError, ValueError) as err:  # HostUnreachable, LocalWriteError are DownloadErrors
        raise UserError(str(err)) from None

    rows = [("task", "status", "files", "size", "seconds", "where / note")]
    for name, r in result["tasks"].items():
        note = r.get("message") or ""
        where = r.get("location") or r.get("path") or ""
        detail = where if not note else (f"{where} ({note})" if where and r["status"] != STATUS_FAILED else note)
        files = str(r["files"]) if r.get("files") else "-"
        size = _size(r["bytes"]) if r.get("bytes") else "-"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rows.append((name, r["status"], files, size, secs, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row[:5], widths)))
              + "  " + row[5])
    print(f"{result['fetched']} fetched, {result['complete']} already complete, {result['no_mirror']} without a "
          f"public mirror, {result['failed']} failed; {_size(result['bytes_downloaded'])} downloaded in "
          f"{result['seconds']:.1f} s into {data_root}")
    if result["fetched"] or result["complete"]:
        print(f"evaluate with: witclip eval --data-root {data_root} --tasks {tasks} --model <model dir or URI>")
    if result["failed"]:
        failed = [(n, r["message"]) for n, r in result["tasks"].items() if r["status"] == STATUS_FAILED]
        shown = "; ".join(f"{n}: {m}" for n, m in failed[:2]) + (f"; and {len(failed) - 2} more" if len(failed) > 2 else "")
        hint = ""
        if url_template == HF_TEMPLATE and mirror != DEFAULT_MIRROR and any("HTTP 404" in m for _, m in failed):
            hint = f" (a mirror that is a plain directory tree needs --url-template '{PLAIN_TEMPLATE}')"
        raise UserError(f"{len(failed)} of {len(names)} task(s) failed: {shown}{hint}")
    return 0


def cmd_urls_fetch(base_url: str, files: list[str], list_file: str | None, out: str, workers: int,
                   url_col: str | None = None, caption_col: str | None = None) -> int:
    """Download URL list shards named by `files` and/or `list_file` from base_url into `out`."""
    from data.acquire.download import DownloadError
    from data.acquire.url_lists import fetch_url_lists, read_list_file

    if not out:
        raise UserError("urls fetch: --out DIR is required (where the lists go)")
    _check_workers(workers)
    names = list(files or [])
    if list_file:
        try:
            names += read_list_file(list_file)
        except (OSError, UnicodeError) as err:
            raise UserError(f"--list {list_file}: {err}") from None
    if not names:
        raise UserError("urls fetch: no files named; give relative paths after the base URL or --list FILE")
    if (url_col is None) != (caption_col is None):
        raise UserError("urls fetch: give both --url-col and --caption-col (or neither)")
    try:
        r = fetch_url_lists(base_url, names, Path(out), workers, url_col=url_col, caption_col=caption_col)
    except (DownloadError, ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    print(f"{r['files']} file(s) in {out}: {r['downloaded']} downloaded, {r['resumed']} resumed, "
          f"{r['verified']} verified, {r['refetched']} re-fetched (corrupt); {_size(r['bytes_downloaded'])} "
          f"downloaded in {r['seconds']:.1f} s, {_size(r['bytes'])} on disk")
    cols = ""
    if url_col is not None:
        cols = f" --set harvest.url_col={url_col} --set harvest.caption_col={caption_col}"
    print(f"harvest them with: witclip run --set web.enabled=false --set harvest.source=urls "
          f"--set 'harvest.urls=[{out}]'{cols}")
    return 0


def _urls_main(args: argparse.Namespace) -> int:
    return cmd_urls_fetch(args.base_url, args.files, args.list, args.out, args.workers,
                          url_col=args.url_col, caption_col=args.caption_col)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `urls fetch BASE_URL [FILE ...] [--list FILE] --out DIR [--workers N]` to the CLI's subparsers."""
    u = sub.add_parser("urls", help="download public image-text URL lists (parquet/csv/tsv/jsonl[.gz]) for harvest")
    u.add_argument("action", choices=["fetch"])
    u.add_argument("base_url", help="where the files are, e.g. https://host/cc3m")
    u.add_argument("files", nargs="*", help="paths relative to the base URL, e.g. part-00000.parquet")
    u.add_argument("--list", metavar="FILE", help="a local file naming more relative paths, one a line")
    u.add_argument("--out", required=True, help="directory for the lists (then: harvest.urls: [DIR])")
    u.add_argument("--workers", type=int, default=4, help="parallel downloads")
    u.add_argument("--url-col", help="check the fetched lists have this URL column (with --caption-col)")
    u.add_argument("--caption-col", help="check the fetched lists have this caption column")
    u.set_defaults(fn=_urls_main)


def benchmarks_fetch_args(args: argparse.Namespace) -> int:
    """Adapter for the `benchmarks` parser's action "fetch" (see add_benchmarks_fetch_options)."""
    if not args.tasks:
        raise UserError("benchmarks fetch: --tasks is required (all, a group such as paper, or task names)")
    roots = args.data_root or []
    if len(roots) != 1:
        raise UserError("benchmarks fetch: give exactly one --data-root DIR (where the datasets go)")
    return cmd_benchmarks_fetch(args.tasks, roots[0], args.mirror, args.url_template, args.workers)


def add_benchmarks_fetch_options(b: argparse.ArgumentParser) -> None:
    """Options of `benchmarks fetch`, for the existing `benchmarks` parser (whose action gets "fetch")."""
    b.add_argument("--tasks", help="fetch: all, a group (paper, shift, retrieval) or comma-separated task names")
    b.add_argument("--mirror", default=DEFAULT_MIRROR, help="fetch: base URL of the CLIP_benchmark mirror")
    b.add_argument("--url-template", default=HF_TEMPLATE,
                   help="fetch: file URL from {mirror} {repo} {path}; '{mirror}/{repo}/{path}' for a plain tree")
    b.add_argument("--workers", type=int, default=4, help="fetch: parallel downloads")
