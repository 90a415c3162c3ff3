"""The Dask client every distributed data stage uses: a running scheduler, or a LocalCluster."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def dask_client(scheduler_address: str | None, processes: int) -> Iterator[Any]:
    """A `distributed.Client` on `scheduler_address`, or on a LocalCluster of `processes` worker
    processes (one thread each) bound to 127.0.0.1 that lives as long as the context."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler_address:
        with Client(scheduler_address, set_as_default=False) as client:
            yield client
        return
    # threads_per_worker=1: img2dataset's Resizer dup2()s the process's stdout/stderr while
    # decoding, and each crawl shard already runs its own download threads.
    # Dask's statistical profiler samples every thread's stack every 10 ms; with 16 download threads
    # per worker that costs a measurable share of the GIL (crawl shards ran ~1.4x slower with it on).
    with dask.config.set({"distributed.worker.profile.enabled": False}), LocalCluster(
        n_workers=processes,
        threads_per_worker=1,
        processes=True,
        # a random port (concurrent runs must not fight over :8787), on loopback like every other endpoint
        dashboard_address="127.0.0.1:0",
        host="127.0.0.1",
        silence_logs=logging.CRITICAL,  # shutdown heartbeat chatter; task errors still reach us
    ) as cluster, Client(cluster, set_as_default=False) as client:
        yield client
