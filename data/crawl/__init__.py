"""The crawl stage: candidates downloaded by img2dataset on Dask, every image through the guarded,
polite `fetch.Fetcher`; output in img2dataset's layout, written reproducibly (`writer.py`: samples and
rows in key order, no wall clock in the files), plus `status.parquet` (`status.py`)."""

from data.crawl.crawler import (
    crawl,
    make_download_image,
    per_process_policy,
)
from data.crawl.fetch import Fetcher, FetchError, FetchPolicy
from data.crawl.status import (
    STATUS_FILE,
    aggregate_stats,
    shard_parquets,
    write_status_table,
)

__all__ = [
    "crawl", "make_download_image", "per_process_policy", "FetchError", "Fetcher", "FetchPolicy",
    "STATUS_FILE", "aggregate_stats", "shard_parquets", "write_status_table",
]
