"""The LocalCluster the data stages start listens on loopback only: scheduler, workers, nannies and
the dashboard (which Dask binds to every interface unless told otherwise)."""

from __future__ import annotations

import os

import psutil
import pytest

from data.common.cluster import dask_client

pytestmark = [pytest.mark.integration]


def test_every_endpoint_of_the_local_cluster_binds_loopback():
    with dask_client(None, 2) as client:
        dashboard = client.dashboard_link
        me = psutil.Process(os.getpid())
        processes = [me, *me.children(recursive=True)]
        listening = [c.laddr for p in processes for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN]
    assert len(processes) >= 3 and len(listening) >= 5  # scheduler + dashboard here, 2 nannies + 2 workers
    assert {address.ip for address in listening} == {"127.0.0.1"}, listening
    assert dashboard.startswith("http://127.0.0.1:")
