"""`witclip urls fetch`: published image-text URL lists (the metadata shards of CC3M, CC12M, LAION,
DataComp...) downloaded for the harvest stage (``harvest.source: urls``).

    witclip urls fetch https://host/cc3m Train_GCC-training.tsv --out lists/
    witclip urls fetch https://host/laion --list index.txt --out lists/
"""

from __future__ import annotations

import argparse

from flows.cli.benchmarks import check_workers, human_size
from flows.cli.paths import writable_out_dir
from flows.errors import UserError


def cmd_urls_fetch(base_url: str, files: list[str], list_file: str | None, out: str, workers: int,
                   url_col: str | None = None, caption_col: str | None = None) -> int:
    """Download URL list shards named by `files` and/or `list_file` from base_url into `out`."""
    from data.acquire.download import DownloadError
    from data.acquire.url_lists import fetch_url_lists, read_list_file

    if not out:
        raise UserError("urls fetch: --out DIR is required (where the lists go)")
    check_workers(workers)
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
        r = fetch_url_lists(base_url, names, writable_out_dir(out), workers, url_col=url_col, caption_col=caption_col)
    except (DownloadError, ValueError, FileNotFoundError) as err:
        raise UserError(str(err)) from None
    print(f"{r['files']} file(s) in {out}: {r['downloaded']} downloaded, {r['resumed']} resumed, "
          f"{r['verified']} verified, {r['refetched']} re-fetched (corrupt); {human_size(r['bytes_downloaded'])} "
          f"downloaded in {r['seconds']:.1f} s, {human_size(r['bytes'])} on disk")
    cols = ""
    if url_col is not None:
        cols = f" --set harvest.url_col={url_col} --set harvest.caption_col={caption_col}"
    print(f"harvest them with: witclip run --set web.enabled=false --set harvest.source=urls "
          f"--set 'harvest.urls=[{out}]'{cols}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("urls", help="image-text URL lists (parquet/csv/tsv/jsonl[.gz]) for harvest")
    actions = u.add_subparsers(dest="action", metavar="{fetch}", required=True)
    f = actions.add_parser("fetch", help="download URL list files from a base URL")
    f.add_argument("base_url", help="where the files are, e.g. https://host/cc3m")
    f.add_argument("files", nargs="*", help="paths relative to the base URL, e.g. part-00000.parquet")
    f.add_argument("--list", metavar="FILE", help="a local file naming more relative paths, one a line")
    f.add_argument("--out", required=True, help="directory for the lists (then: harvest.urls: [DIR])")
    f.add_argument("--workers", type=int, default=4, help="parallel downloads")
    f.add_argument("--url-col", help="check the fetched lists have this URL column (with --caption-col)")
    f.add_argument("--caption-col", help="check the fetched lists have this caption column")
    f.set_defaults(fn=lambda a: cmd_urls_fetch(a.base_url, a.files, a.list, a.out, a.workers,
                                               url_col=a.url_col, caption_col=a.caption_col))
