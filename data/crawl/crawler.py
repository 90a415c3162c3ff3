"""Download candidate (url, caption) pairs with img2dataset, distributed over Dask.

img2dataset.download() only ships multiprocessing/pyspark/ray distributors, so this
module assembles the same pieces download() builds (Reader -> Resizer -> Downloader
with the webdataset writer) and runs one Dask task per img2dataset shard. The output
directory has exactly img2dataset's layout (00000.tar, 00000.parquet, 00000_stats.json...), written
reproducibly (`data.crawl.writer`): the same candidates from the same web give the same bytes.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

# albumentations (imported by img2dataset's resizer) phones home for updates on import;
# set before any img2dataset import, here and (inherited via env) in Dask worker processes.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pyarrow.parquet as pq  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from data.common.cluster import dask_client  # noqa: E402
from data.common.opencv_limit import run_with_opencv_limit  # noqa: E402
from data.common.urls import redact_url  # noqa: E402
from data.crawl.fetch import Fetcher, FetchError, FetchPolicy, ImageHeader  # noqa: E402
from data.crawl.status import (  # noqa: E402
    STATUS_FILE,
    _reason_counts,
    aggregate_stats,
    write_status_table,
)
from data.crawl.writer import SCRATCH_DIR, OrderedWebDatasetWriter, write_stats  # noqa: E402
from data.shards.format import CRAWL_SHARD_DIGITS, crawl_shard_stem, is_crawl_shard  # noqa: E402

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------------------
# img2dataset's Downloader fetches every image through the module-level function
# img2dataset.downloader.download_image(row, timeout, user_agent_token, directives), looked up
# at call time by download_image_with_retry(). Inside each Dask task we point that name at
# data.crawl.fetch.Fetcher, which adds what img2dataset lacks (address guard, robots.txt, per-host
# limits, Retry-After, byte/pixel caps, a total deadline). Reader, Resizer, the writer and the
# per-shard counts stay img2dataset's own. The error string we return is the Fetcher's reason
# code, so img2dataset's status_dict counts reasons rather than free-form messages. Its stats file is
# written by data.crawl.writer.write_stats instead (same lookup trick), without wall-clock fields.
# --------------------------------------------------------------------------------------
_FETCHERS: dict[FetchPolicy, Fetcher] = {}  # one per policy per worker process: shards share host state


def _fetcher_for(policy: FetchPolicy) -> Fetcher:
    fetcher = _FETCHERS.get(policy)
    if fetcher is None:
        fetcher = _FETCHERS[policy] = Fetcher(policy)
    return fetcher


class FetchedImage(io.BytesIO):
    """A downloaded body as img2dataset's Downloader takes it (a stream), carrying the header the
    fetcher's pixel check read, so the decode budget (`data.crawl.decode`) need not read it again."""

    def __init__(self, body: bytes, header: ImageHeader):
        super().__init__(body)
        self.image_header = header


def make_download_image(fetcher: Fetcher) -> Callable[..., Any]:
    """A drop-in for img2dataset's download_image that fetches through `fetcher`."""

    def download_image(row, timeout, user_agent_token, disallowed_header_directives):  # img2dataset's signature
        key, url = row
        try:
            return key, FetchedImage(*fetcher.get_image(url)), None
        except FetchError as err:
            return key, None, err.reason
        except Exception as err:  # noqa: BLE001 - img2dataset semantics: an error string, never raise
            log.warning("unexpected error fetching %s: %r", redact_url(url), err)
            return key, None, f"unexpected_{type(err).__name__}"

    return download_image


def _download_shard_task(downloader_bytes: bytes, shard: tuple[int, str], policy: FetchPolicy) -> tuple[bool, int]:
    """Dask task: download one img2dataset shard with the pickled img2dataset Downloader. Returns
    (ok, shard_id)."""
    from img2dataset import downloader as i2d

    downloader = pickle.loads(downloader_bytes)
    shard_id, _ = shard
    # A shard whose stats exist is finished (stats are written last by img2dataset); this can
    # happen when a worker died between writing stats and reporting back.
    if os.path.exists(os.path.join(downloader.output_folder, f"{crawl_shard_stem(shard_id)}_stats.json")):
        return True, shard_id
    i2d.download_image = make_download_image(_fetcher_for(policy))
    i2d.write_stats = write_stats  # reproducible stats: no start/end times, status counts sorted
    ok, _ = downloader(shard)  # img2dataset's Downloader.__call__: catches, prints, returns (ok, row)
    return bool(ok), shard_id


def _done_shards(out_dir: Path) -> set[int]:
    done = set()
    for p in out_dir.glob("*_stats.json"):
        head = p.name.split("_")[0]
        if is_crawl_shard(head):
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



def crawl(
    candidates_parquet: Path,
    out_dir: Path,
    *,
    image_size: int = 64,
    resize_mode: str = "center_crop",
    shard_size: int = 256,
    processes: int = 2,
    threads: int = 16,
    retries: int = 0,
    max_shard_retry: int = 1,
    scheduler_address: str | None = None,
    encode_format: str = "jpg",
    policy: FetchPolicy | None = None,
) -> dict[str, Any]:
    """Download candidates into img2dataset webdataset shards in out_dir, one Dask task per shard.

    Every image goes through data.crawl.fetch.Fetcher with `policy` (address guard, robots.txt,
    per-host limits, Retry-After, byte and pixel caps, one deadline per request; default
    `FetchPolicy()`). The policy's per-host limits are for the whole cluster and are divided among
    its worker processes. Decoding runs img2dataset's Resizer under a per-process memory budget
    (`data.crawl.decode`), with OpenCV's own pixel limit set to `policy.max_pixels` in every worker
    (`data.common.opencv_limit`).

    Shards with an existing `_stats.json` are skipped, so re-running resumes (the shard
    <-> rows mapping assumes the same candidates file and shard_size). With
    `scheduler_address` the workers must see out_dir on a shared filesystem. Writes
    out_dir/status.parquet (one row per candidate: key, url, status, reason, sorted by key). Every
    file is reproducible: shard members and rows in key order, no wall clock in them
    (`data.crawl.writer`); elapsed_s and images_per_s live in the returned counts only. Returns
    aggregated stats over all shards in out_dir: urls, successes, failed_to_download,
    failed_to_resize, success_rate, status_dict, reasons, shards (+ shards_downloaded,
    shards_skipped, elapsed_s, images_per_s).
    Raises RuntimeError if shards still fail after max_shard_retry resubmissions.
    """
    t0 = time.monotonic()
    candidates_parquet = Path(candidates_parquet).absolute()
    out_dir = Path(out_dir).absolute()
    columns = _validate_candidates(candidates_parquet)
    if shard_size < 1 or processes < 1 or threads < 1:
        raise ValueError("shard_size, processes and threads must all be >= 1")
    policy = policy or FetchPolicy()

    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader

    from data.crawl.decode import BoundedResizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir / SCRATCH_DIR
    tmp_dir.mkdir(exist_ok=True)
    done = _done_shards(out_dir)
    caption_col = "caption" if "caption" in columns else None
    extra_cols = [c for c in ("source", "matched_query", "page") if c in columns] or None

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
        resizer = BoundedResizer(  # img2dataset's, under a per-process decode-memory budget
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
            # img2dataset's webdataset writer, but samples in key order and no wall clock in the tar
            sample_writer_class=OrderedWebDatasetWriter,
            resizer=resizer,
            thread_count=threads,
            save_caption=caption_col is not None,
            extract_exif=True,
            output_folder=str(out_dir),
            column_list=reader.column_list,
            timeout=policy.timeout,
            number_sample_per_shard=shard_size,
            oom_shard_count=CRAWL_SHARD_DIGITS,
            compute_hash="sha256",
            verify_hash_type=None,
            encode_format=encode_format,
            retries=retries,
            user_agent_token="witclip",  # unused: our Fetcher sends policy.user_agent
            disallowed_header_directives=list(policy.x_robots_directives),
        )
        shards: list[tuple[int, str]] = list(reader)  # writes one arrow file per pending shard to _tmp
        failed: list[tuple[int, str]] = []
        if shards:  # nothing pending (incremental re-run) => don't even start a cluster
            sizes = _shard_sizes(candidates_parquet, shard_size)
            failed = _distribute(shards, downloader, scheduler_address, processes, max_shard_retry, policy, sizes)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    if failed:
        ids = sorted(s for s, _ in failed)
        raise RuntimeError(
            f"{len(ids)} img2dataset shard(s) {ids} in {out_dir} still failed after {max_shard_retry} "
            "retries; re-run crawl to retry them (finished shards are skipped)"
        )
    counts = aggregate_stats(out_dir)
    if shards or not (out_dir / STATUS_FILE).exists():
        _, counts["reasons"] = write_status_table(out_dir)
    else:  # nothing downloaded: the table on disk is current, leave it untouched
        import pandas as pd

        counts["reasons"] = _reason_counts(pd.read_parquet(out_dir / STATUS_FILE, columns=["reason"])["reason"])
    counts["shards_downloaded"] = len(shards)
    counts["shards_skipped"] = len(done)
    counts["elapsed_s"] = round(time.monotonic() - t0, 3)
    downloaded = sum(sizes.get(s, 0) for s, _ in shards) if shards else 0
    counts["images_per_s"] = round(downloaded / counts["elapsed_s"], 1) if shards else 0.0
    return counts


def _shard_sizes(candidates_parquet: Path, shard_size: int) -> dict[int, int]:
    rows = pq.ParquetFile(candidates_parquet).metadata.num_rows
    return {i: min(shard_size, rows - i * shard_size) for i in range((rows + shard_size - 1) // shard_size)}


def per_process_policy(policy: FetchPolicy, n_processes: int) -> FetchPolicy:
    """The policy's per-host limits hold for the whole cluster: each process gets its share."""
    import dataclasses
    import math

    n = max(1, n_processes)
    return dataclasses.replace(
        policy,
        max_connections_per_host=max(1, math.ceil(policy.max_connections_per_host / n)),
        max_requests_per_second_per_host=policy.max_requests_per_second_per_host / n,
    )


def _distribute(
    shards: list[tuple[int, str]],
    downloader: Any,
    scheduler_address: str | None,
    processes: int,
    max_shard_retry: int,
    policy: FetchPolicy,
    sizes: dict[int, int],
) -> list[tuple[int, str]]:
    """Dask distributor: one task per shard, resubmitting failures. Returns shards that never succeeded."""
    from distributed import as_completed

    run_id = uuid.uuid4().hex[:8]  # unique task keys when several crawls share one scheduler
    pending = list(shards)
    total = sum(sizes.get(s, 0) for s, _ in shards)
    with dask_client(scheduler_address, processes) as client, tqdm(
        total=total, desc="crawl", unit="img", unit_scale=True
    ) as bar:
        n_workers = len(client.scheduler_info().get("workers", {})) or processes
        worker_policy = per_process_policy(policy, n_workers)
        downloader_bytes = pickle.dumps(downloader)  # once: every task's payload embeds the same bytes
        for attempt in range(max_shard_retry + 1):
            if not pending:
                break
            if attempt:
                log.warning("retrying %d failed shard(s), attempt %d", len(pending), attempt)
            futures = {
                client.submit(
                    # OpenCV's own pixel limit is set in the worker before the task's objects load it
                    run_with_opencv_limit,
                    policy.max_pixels,
                    pickle.dumps((_download_shard_task, (downloader_bytes, shard, worker_policy))),
                    key=f"img2dataset-shard-{crawl_shard_stem(shard[0])}-{run_id}-try{attempt}",
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
                    bar.update(sizes.get(shard[0], 0))
                else:
                    failed.append(shard)
            pending = failed
    return pending
