"""The crawl against a hostile web: 5,000 URLs, 30% of them faults of 13 kinds, on a real Dask
cluster of `dask scheduler` + `dask worker` processes started by infra/local/dask-cluster.sh.

Every URL must end with exactly one status row naming what happened to it, the private target on
127.0.0.2 must never be contacted, and no request may outlive its deadline by more than 2 s.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from support.servers import CountingServer

from data.crawl import STATUS_FILE, crawl
from data.crawl.fetch import FetchPolicy
from data.synthetic import ALL_FAULT_KINDS, SiteSpec, SyntheticWeb

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.integration]

TIMEOUT, DEADLINE = 1.0, 3.0
# 313 pages x 16 images = 5,008 <img> tags; 30% of them are faults, split evenly over 13 kinds.
SPEC = SiteSpec(
    seed=41, n_pages=313, images_per_page=16, fault_rate=0.30, fault_kinds=ALL_FAULT_KINDS,
    noisy_alt_rate=0.0, exact_duplicate_rate=0.0, near_duplicate_rate=0.0, slow_seconds=2.0,
    drip_interval=0.2, retry_after_seconds=1,
)
# What each fault kind must end as in crawl/status.parquet.
EXPECTED_REASON = {
    None: "success",
    "404": "http_404",
    "500": "http_500",
    "slow": "timeout",  # nothing for 2 s; the socket timeout is 1 s
    "truncated": "decode_error",
    "not_image": "decode_error",
    "drip": "deadline_exceeded",
    "redirect_loop": "redirect_loop",
    "redirect_private": "private_address",
    "too_large": "too_large",
    "bomb": "too_many_pixels",
    "429": "success",  # Retry-After: 1 honoured, then served
    "robots": "robots_disallowed",
    "noai": "x_robots_tag",
}


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A real scheduler + worker processes, via the script users run (infra/local/dask-cluster.sh)."""
    state = tmp_path_factory.mktemp("dask-local")
    script = REPO / "infra" / "local" / "dask-cluster.sh"
    env = {**os.environ, "PYTHON": str(Path(os.sys.executable))}
    started = subprocess.run([str(script), "start", str(state), "2"], capture_output=True, text=True, env=env,
                             timeout=180, cwd=REPO)
    assert started.returncode == 0, started.stderr
    address = started.stdout.strip().splitlines()[-1]
    assert address.startswith("tcp://127.0.0.1:")
    try:
        yield address, state
    finally:
        stopped = subprocess.run([str(script), "stop", str(state)], capture_output=True, text=True, env=env,
                                 timeout=60, cwd=REPO)
        assert stopped.returncode == 0, stopped.stderr
        assert not (state / "scheduler.pid").exists()


def test_cluster_script_runs_real_processes(dask_cluster):
    from distributed import Client

    address, state = dask_cluster
    with Client(address, timeout="20s") as client:
        pids = client.run(os.getpid)
    assert len(pids) == 2 and os.getpid() not in pids.values()
    scheduler_pid = int((state / "scheduler.pid").read_text())
    assert os.path.exists(f"/proc/{scheduler_pid}")  # a separate `dask scheduler` process


def test_hostile_crawl_on_real_dask_processes(dask_cluster, tmp_path):
    address, _ = dask_cluster
    with CountingServer(host="127.0.0.2") as private, SyntheticWeb(SPEC, private_target=private.url.rstrip("/")) as web:
        site = web.site
        base = web.url.rstrip("/")
        paths = list(site.images)
        pd.DataFrame({
            "url": [base + p for p in paths],
            "caption": [site.images[p].caption for p in paths],
        }).to_parquet(tmp_path / "candidates.parquet", index=False)
        faults = Counter(site.images[p].fault for p in paths)
        assert len(paths) == 5008 and sum(n for k, n in faults.items() if k) == round(0.3 * 5008)
        assert set(faults) - {None} == set(ALL_FAULT_KINDS)

        policy = FetchPolicy(timeout=TIMEOUT, deadline=DEADLINE, allowed_addresses=("127.0.0.1",))
        counts = crawl(tmp_path / "candidates.parquet", tmp_path / "crawl", shard_size=500, threads=16,
                       policy=policy, scheduler_address=address)
        web.wait_idle(timeout=10)
        requests = web.requests()
        private_hits = private.count

    # every URL has exactly one status row, and it names what the site did to it
    status = pd.read_parquet(tmp_path / "crawl" / STATUS_FILE)
    assert len(status) == len(paths) == counts["urls"] and status["url"].is_unique and status["key"].is_unique
    got = dict(zip(status["url"], status["reason"]))
    wrong = {p: (site.images[p].fault, got[base + p]) for p in paths
             if got[base + p] != EXPECTED_REASON[site.images[p].fault]}
    assert not wrong, dict(list(wrong.items())[:10])
    expected = Counter(EXPECTED_REASON[site.images[p].fault] for p in paths)
    assert counts["reasons"] == dict(expected)
    assert counts["successes"] == expected["success"]

    # safety: nothing reached 127.0.0.2; robots.txt-disallowed images were never requested
    assert private_hits == 0
    assert not [r for r in requests if r.path.startswith("/img-noindex/")]
    # politeness: we named ourselves; throttled URLs were asked exactly twice (429, then 200)
    assert all("witclip" in r.user_agent for r in requests)
    throttled = Counter(r.path for r in requests if site.images.get(r.path.split("?")[0]) is not None
                        and site.images[r.path.split("?")[0]].fault == "429")
    assert set(throttled.values()) == {2}
    # deadline: no request held the server longer than the deadline + 2 s (the drips included)
    longest = max(r.end - r.start for r in requests)
    drips = [r.end - r.start for r in requests if site.images.get(r.path, None) is not None
             and site.images[r.path].fault == "drip"]
    assert len(drips) == faults["drip"] and min(drips) >= DEADLINE - 0.5
    assert longest <= DEADLINE + 2.0, longest
    print(f"\n5008 URLs in {counts['elapsed_s']:.1f} s ({counts['images_per_s']} img/s); "
          f"longest request {longest:.2f} s; reasons {counts['reasons']}")
