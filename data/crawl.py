"""Download candidate (url, caption) pairs with img2dataset, distributed over Dask.

img2dataset.download() only ships multiprocessing/pyspark/ray distributors, so this
module assembles the same pieces download() builds (Reader -> Resizer -> Downloader
with the webdataset writer) and runs one Dask task per img2dataset shard. The output
directory has exactly img2dataset's layout (00000.tar, 00000.parquet, 00000_stats.json...).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import os
import shutil
import time
import urllib.request
import uuid
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

# albumentations (imported by img2dataset's resizer) phones home for updates on import;
# set before any img2dataset import, here and (inherited via env) in Dask worker processes.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow.parquet as pq  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

log = logging.getLogger(__name__)

OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5 digits (00000.tar)
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]  # img2dataset defaults
MAX_IMAGE_BYTES = 64 << 20  # guard against endless bodies filling worker memory
_I2D_USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{OOM_SHARD_COUNT}d}"


# --------------------------------------------------------------------------------------
# Per-image wall-clock deadline.
#
# img2dataset's download_image() does urlopen(timeout=t) + r.read(). The socket timeout
# bounds each *individual* blocking operation, so a server that stalls is cut off after t
# seconds -- but a server that trickles one byte every < t seconds is never cut off
# (measured: 0.5 s/byte => a 3 kB image takes 25 minutes), and one trickling shard would
# hold the whole crawl. We therefore install, inside the Dask task, a faithful copy of
# img2dataset's download_image (same user agent, same X-Robots-Tag check via img2dataset's
# own is_disallowed, same error strings) that reads with read1() and enforces a total
# deadline and size cap. download_image_with_retry() looks the name up in its module
# globals at call time, so everything else in img2dataset's Downloader is untouched.
# --------------------------------------------------------------------------------------
def _make_bounded_download_image(max_seconds: float, max_bytes: int) -> Callable[..., Any]:
    from img2dataset import downloader as i2d

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):  # img2dataset's signature
        key, url = row
        user_agent = _I2D_USER_AGENT
        if user_agent_token:
            user_agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
        deadline = time.monotonic() + max_seconds
        img_stream = io.BytesIO()
        try:
            request = urllib.request.Request(url, data=None, headers={"User-Agent": user_agent})
            with urllib.request.urlopen(request, timeout=timeout) as r:
                if disallowed_header_directives and i2d.is_disallowed(
                    r.headers, user_agent_token, disallowed_header_directives
                ):
                    return key, None, "Use of image disallowed by X-Robots-Tag directive"
                while True:
                    chunk = r.read1(1 << 16)  # returns as soon as *some* bytes arrive
                    if not chunk:
                        break
                    img_stream.write(chunk)
                    if img_stream.tell() > max_bytes:
                        return key, None, f"image larger than {max_bytes} bytes"
                    if time.monotonic() > deadline:
                        return key, None, f"download exceeded {max_seconds:g}s"
                if r.length:  # read1() doesn't raise on a short body; r.read() would
                    raise http.client.IncompleteRead(img_stream.getvalue(), r.length)
            img_stream.seek(0)
            return key, img_stream, None
        except Exception as err:  # noqa: BLE001 - img2dataset semantics: error string, never raise
            return key, None, str(err)

    return download_image


def _download_shard_task(
    downloader: Any, shard: tuple[int, str], max_image_seconds: float, max_image_bytes: int
) -> tuple[bool, int]:
    """Dask task: download one img2dataset shard. Returns (ok, shard_id)."""
    from img2dataset import downloader as i2d

    shard_id, _ = shard
    # A shard whose stats exist is finished (stats are written last by img2dataset); this can
    # happen when a worker died between writing stats and reporting back.
    if os.path.exists(os.path.join(downloader.output_folder, f"{shard_name(shard_id)}_stats.json")):
        return True, shard_id
    i2d.download_image = _make_bounded_download_image(max_image_seconds, max_image_bytes)
    ok, _ = downloader(shard)  # img2dataset's Downloader.__call__: catches, prints, returns (ok, row)
    return bool(ok), shard_id


@contextmanager
def _dask_client(scheduler_address: str | None, processes: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if scheduler_address:
        with Client(scheduler_address, set_as_default=False) as client:
            yield client
        return
    # threads_per_worker=1: img2dataset's Resizer dup2()s the process's stdout/stderr while
    # decoding, and each shard already runs `threads` download threads of its own.
    with LocalCluster(
        n_workers=processes,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # random port: concurrent crawls must not fight over :8787
        host="127.0.0.1",
        silence_logs=logging.CRITICAL,  # shutdown heartbeat chatter; task errors still reach us
    ) as cluster, Client(cluster, set_as_default=False) as client:
        yield client


def _done_shards(out_dir: Path) -> set[int]:
    done = set()
    for p in out_dir.glob("*_stats.json"):
        head = p.name.split("_")[0]
        if head.isdigit():
            done.add(int(head))
    return done


def _validate_candidates(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"candidates file not found: {path}")
    try:
        names = pq.read_schema(path).names
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"candidates file {path} is not a readable parquet file: {err}") from err
    if "url" not in names:
        raise ValueError(f"candidates file {path} has no 'url' column (columns: {names})")
    return names


def aggregate_stats(crawl_dir: Path) -> dict[str, Any]:
    """Sum img2dataset's per-shard *_stats.json files in crawl_dir."""
    totals = Counter()
    status: Counter[str] = Counter()
    n = 0
    for p in sorted(Path(crawl_dir).glob("*_stats.json")):
        s = json.loads(p.read_text())
        n += 1
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(s.get(k, 0))
        status.update(s.get("status_dict", {}))
    urls = totals["count"]
    return {
        "urls": urls,
        "successes": totals["successes"],
        "failed_to_download": totals["failed_to_download"],
        "failed_to_resize": totals["failed_to_resize"],
        "success_rate": round(totals["successes"] / urls, 6) if urls else 0.0,
        "status_dict": dict(sorted(status.items(), key=lambda kv: (-kv[1], kv[0]))),
        "shards": n,
    }


def crawl(
    candidates_parquet: Path,
    out_dir: Path,
    *,
    image_size: int = 64,
    resize_mode: str = "center_crop",
    shard_size: int = 256,
    processes: int = 2,
    threads: int = 16,
    timeout: float = 2.0,
    retries: int = 0,
    max_shard_retry: int = 1,
    scheduler_address: str | None = None,
    user_agent_token: str = "witclip",
    encode_format: str = "jpg",
    max_image_seconds: float | None = None,
) -> dict[str, Any]:
    """Download candidates into img2dataset webdataset shards in out_dir, one Dask task per shard.

    Shards with an existing `_stats.json` are skipped, so re-running resumes (the shard
    <-> rows mapping assumes the same candidates file and shard_size). `timeout` is
    img2dataset's per-socket-operation timeout; `max_image_seconds` (default 4*timeout)
    bounds each image's total download time. With `scheduler_address` the workers must
    see out_dir on a shared filesystem. Returns aggregated stats over all shards in
    out_dir: urls, successes, failed_to_download, failed_to_resize, success_rate,
    status_dict, shards (+ shards_downloaded, shards_skipped, elapsed_s).
    Raises RuntimeError if shards still fail after max_shard_retry resubmissions.
    """
    t0 = time.monotonic()
    candidates_parquet = Path(candidates_parquet).absolute()
    out_dir = Path(out_dir).absolute()
    columns = _validate_candidates(candidates_parquet)
    if shard_size < 1 or processes < 1 or threads < 1:
        raise ValueError("shard_size, processes and threads must all be >= 1")
    max_image_seconds = float(max_image_seconds if max_image_seconds is not None else 4 * timeout)

    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / "_tmp"
    tmp_dir.mkdir(exist_ok=True)
    done = _done_shards(out_dir)
    caption_col = "caption" if "caption" in columns else None
    extra_cols = ["page"] if "page" in columns else None

    try:
        # The same objects img2dataset.main.download() builds, with its defaults.
        reader = Reader(
            str(candidates_parquet),
            "parquet",
            "url",
            caption_col,
            None,  # verify_hash_col
            None,  # verify_hash_type
            extra_cols,
            shard_size,
            done,
            str(tmp_dir),
            0,  # start_shard_id
        )
        resizer = Resizer(
            image_size=image_size,
            resize_mode=resize_mode,
            resize_only_if_bigger=False,
            upscale_interpolation="lanczos",
            downscale_interpolation="area",
            encode_quality=95,
            encode_format=encode_format,
            skip_reencode=False,
            disable_all_reencoding=False,
            min_image_size=0,
            max_image_area=float("inf"),
            max_aspect_ratio=float("inf"),
            blurrer=None,
        )
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=resizer,
            thread_count=threads,
            save_caption=caption_col is not None,
            extract_exif=True,
            output_folder=str(out_dir),
            column_list=reader.column_list,
            timeout=timeout,
            number_sample_per_shard=shard_size,
            oom_shard_count=OOM_SHARD_COUNT,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=encode_format,
            retries=retries,
            user_agent_token=user_agent_token,
            disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES,
        )
        shards: list[tuple[int, str]] = list(reader)  # writes one arrow file per pending shard to _tmp
        failed: list[tuple[int, str]] = []
        if shards:  # nothing pending (incremental re-run) => don't even start a cluster
            failed = _distribute(
                shards, downloader, scheduler_address, processes, max_shard_retry, max_image_seconds
            )
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    if failed:
        ids = sorted(s for s, _ in failed)
        raise RuntimeError(
            f"{len(ids)} img2dataset shard(s) {ids} in {out_dir} still failed after {max_shard_retry} "
            "retries; re-run crawl to retry them (finished shards are skipped)"
        )
    counts = aggregate_stats(out_dir)
    counts["shards_downloaded"] = len(shards)
    counts["shards_skipped"] = len(done)
    counts["elapsed_s"] = round(time.monotonic() - t0, 3)
    return counts


def _distribute(
    shards: list[tuple[int, str]],
    downloader: Any,
    scheduler_address: str | None,
    processes: int,
    max_shard_retry: int,
    max_image_seconds: float,
) -> list[tuple[int, str]]:
    """Dask distributor: one task per shard, resubmitting failures. Returns shards that never succeeded."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]  # unique task keys when several crawls share one scheduler
    pending = list(shards)
    with _dask_client(scheduler_address, processes) as client, tqdm(
        total=len(shards), desc="crawl shards", unit="shard"
    ) as bar:
        for attempt in range(max_shard_retry + 1):
            if not pending:
                break
            if attempt:
                log.warning("retrying %d failed shard(s), attempt %d", len(pending), attempt)
            futures = {
                client.submit(
                    _download_shard_task,
                    downloader,
                    shard,
                    max_image_seconds,
                    MAX_IMAGE_BYTES,
                    key=f"img2dataset-shard-{shard_name(shard[0])}-{run_id}-try{attempt}",
                    pure=False,
                    # Dask already reschedules a task whose worker died (allowed-failures);
                    # what survives that lands in our resubmission loop below.
                ): shard
                for shard in pending
            }
            failed = []
            for fut in as_completed(futures, loop=client.loop):
                shard = futures[fut]
                try:
                    ok, _ = fut.result()
                except Exception as err:  # noqa: BLE001 - e.g. KilledWorker: retry the shard
                    log.warning("shard %s raised %s: %s", shard[0], type(err).__name__, err)
                    ok = False
                if ok:
                    bar.update(1)
                else:
                    failed.append(shard)
            pending = failed
    return pending
