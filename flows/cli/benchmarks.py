"""`witclip benchmarks list | fetch | convert`: the zero-shot task registry, and getting its data.

    witclip benchmarks list --data-root /data/bench
    witclip benchmarks fetch --tasks cifar10,mnist --data-root /data/bench
    witclip benchmarks fetch --tasks paper --data-root /data/bench \\
        --mirror http://mirror.internal/clip-benchmark --url-template '{mirror}/{repo}/{path}'
    witclip benchmarks convert --folder ./my-images --task cifar10 --out /data/bench/my-set

User mistakes and unreachable mirrors are one-line UserErrors (the CLI prints ``error: ...``, exits 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.cli.paths import writable_out_dir
from flows.errors import UserError

MAX_WORKERS = 64


def human_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def check_workers(workers: int) -> None:
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


def data_roots(roots: list[str] | None) -> list[Path]:
    paths = [Path(r).expanduser() for r in (roots or [])]
    for p in paths:
        if not p.is_dir():
            raise UserError(f"--data-root {p} is not a directory")
    return paths


def cmd_list(args: argparse.Namespace) -> int:
    """Every registry task, and where its data is under the --data-root directories."""
    from data.eval.registry import load_tasks, locate

    roots = data_roots(args.data_root)
    tasks = load_tasks()
    rows = [("task", "group", "type", "metric", "classes", "data")]
    found = 0
    for name, t in tasks.items():
        loc = locate(t, roots) if roots else None
        found += loc is not None
        where = f"{loc.kind}: {loc.path}" if loc else "-"
        rows.append((name, t.group, t.type, t.metric, str(t.num_classes or ""), where))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r[:5], widths)) + "  " + r[5])
    print(f"{len(tasks)} tasks; {found} with data under {', '.join(map(str, roots)) or '(no --data-root given)'}")
    return 0


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
    check_workers(workers)
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
        size = human_size(r["bytes"]) if r.get("bytes") else "-"
        secs = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        rows.append((name, r["status"], files, size, secs, detail))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for row in rows:
        print("  ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row[:5], widths)))
              + "  " + row[5])
    print(f"{result['fetched']} fetched, {result['complete']} already complete, {result['no_mirror']} without a "
          f"public mirror, {result['failed']} failed; {human_size(result['bytes_downloaded'])} downloaded in "
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


def cmd_convert(args: argparse.Namespace) -> int:
    from data.eval.convert import convert_to_wds, imagefolder, load_dataset_object
    from data.eval.registry import get_task

    if bool(args.folder) == bool(args.dataset):
        raise UserError("benchmarks convert: give exactly one of --folder DIR or --dataset module:callable")
    try:
        dataset = imagefolder(args.folder) if args.folder else load_dataset_object(args.dataset)
        task = get_task(args.task) if args.task else None
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    classnames = list(task.classnames) if task and task.classnames else None
    templates = list(task.templates) if task else ["a photo of a {c}."]
    info = convert_to_wds(dataset, writable_out_dir(args.out), classnames=classnames, templates=templates,
                          image_format=args.image_format)
    print(f"wrote {info['samples']} samples, {info['classes']} classes, {info['shards']} shard(s) to {args.out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("benchmarks", help="the zero-shot tasks and where their data is; fetch or convert data")
    actions = b.add_subparsers(dest="action", metavar="{list,fetch,convert}")
    b.set_defaults(fn=cmd_list, data_root=None)  # `witclip benchmarks` alone lists the tasks

    ls = actions.add_parser("list", help="every task, its metric, and where its data is (default action)")
    ls.add_argument("--data-root", action="append", help="where benchmark data lies (repeatable)")
    ls.set_defaults(fn=cmd_list)

    f = actions.add_parser("fetch", help="download tasks' CLIP_benchmark webdataset files from a mirror")
    f.add_argument("--tasks", required=True, help="all, a group (paper, shift, retrieval) or comma-separated task names")
    f.add_argument("--data-root", required=True, help="where the datasets go")
    # defaults filled in when the command runs (data.acquire.benchmarks): building the parser imports nothing
    f.add_argument("--mirror", help="base URL of the CLIP_benchmark mirror (default: clip-benchmark on Hugging Face)")
    f.add_argument("--url-template",
                   help="file URL from {mirror} {repo} {path} (default: Hugging Face's layout); "
                        "'{mirror}/{repo}/{path}' for a plain tree")
    f.add_argument("--workers", type=int, default=4, help="parallel downloads")
    f.set_defaults(fn=lambda a: cmd_benchmarks_fetch(a.tasks, a.data_root, a.mirror, a.url_template, a.workers))

    c = actions.add_parser("convert", help="any labelled image set -> the wds layout eval reads")
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="an image folder (<class>/<image>)")
    src.add_argument("--dataset", help="module:callable returning a dataset (len, [i] -> (image, label), .classes)")
    c.add_argument("--task", help="take class names and templates from this registry task")
    c.add_argument("--out", required=True, help="output directory (CLIP_benchmark wds layout)")
    c.add_argument("--image-format", default="png", choices=["png", "jpg", "webp"])
    c.set_defaults(fn=cmd_convert)
