"""The crawl against a hostile web, on a real Dask cluster of `dask scheduler` + `dask worker`
processes started by infra/local/dask-cluster.sh.

2,512 URLs found by harvesting the synthetic web (whose index also links a page that redirects to the
private target), 30 % of them faults of 17 kinds, plus 120 URLs of hosts the web cannot serve: a host
whose every answer trickles (its robots.txt too), host names whose resolver never answers, and a
loopback server on another port (where MLflow would listen). The policy is the pipeline's own, built
from the config with the embedded web's exact host:port allowed.

Every URL must end with exactly one status row naming what happened to it; the private target on
127.0.0.2 and the other loopback port must never be contacted, by harvest or by crawl; no request may
outlive its deadline by more than a second; and the whole crawl may take at most 2 x deadline + 30 s
longer than a clean crawl of the same size.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from support.servers import CountingServer, TrickleServer

from data.crawl import STATUS_FILE, crawl
from data.harvest import CANDIDATES_FILE, harvest_site
from data.synthetic import ALL_FAULT_KINDS, SiteSpec, SyntheticWeb
from flows.config import load_config

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.integration]

TIMEOUT, DEADLINE = 1.0, 2.0
# 157 pages x 16 images = 2,512 <img> tags; 30% of them are faults, split evenly over 17 kinds.
SPEC = SiteSpec(
    seed=41, n_pages=157, images_per_page=16, fault_rate=0.30, fault_kinds=ALL_FAULT_KINDS,
    noisy_alt_rate=0.0, exact_duplicate_rate=0.0, near_duplicate_rate=0.0, slow_seconds=2.0,
    drip_interval=0.2, retry_after_seconds=1, hop_delay_seconds=0.8,
)
CLEAN_SPEC = SiteSpec(
    seed=42, n_pages=157, images_per_page=16, fault_rate=0.0, noisy_alt_rate=0.0, exact_duplicate_rate=0.0,
    near_duplicate_rate=0.0,
)
EXTRA_PER_KIND = 40  # URLs of each host kind the synthetic web cannot serve
HANG_SUFFIX = ".hang.test"  # names the workers' resolver never answers (installed by the test)
# What each fault kind must end as in crawl/status.parquet.
EXPECTED_REASON = {
    None: "success",
    "404": "http_404",
    "500": "http_500",
    "slow": "timeout",  # nothing for 2 s; the socket timeout is 1 s
    "truncated": "decode_error",  # when its header is intact: sized, then the decoder fails (_expected_reason)
    "not_image": "unidentified_image",  # HTML labelled image/jpeg: refused before any decoder
    "drip": "deadline_exceeded",
    "redirect_loop": "redirect_loop",
    "redirect_private": "private_address",
    "too_large": "too_large",
    "bomb": "too_many_pixels",
    "429": "success",  # Retry-After: 1 honoured, then served
    "robots": "robots_disallowed",
    "noai": "x_robots_tag",
    "trickle_status": "deadline_exceeded",
    "trickle_headers": "deadline_exceeded",
    "slow_redirects": "deadline_exceeded",  # 5 hops of 0.8 s: each under the timeout, all over the deadline
    "unidentified": "unidentified_image",  # Radiance HDR: OpenCV would decode it, Pillow cannot size it
    "robots_trickle": "robots_unavailable",  # RFC 9309: an unreachable robots.txt means keep out
    "dns_hang": "robots_unavailable",  # its robots.txt is the first request, and cannot resolve either
    "loopback_port": "private_address",  # 127.0.0.1, but not the embedded web's port
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


def _expected_reason(site, url: str, kind: str | None) -> str:
    """A truncated JPEG cut before its frame header is complete cannot be sized: refused undecoded."""
    if kind == "truncated":
        import io

        from PIL import Image, UnidentifiedImageError

        path = urlsplit(url).path
        body = site.image_bytes(path)[: len(site.image_bytes(path)) // 2]
        try:
            Image.open(io.BytesIO(body)).close()
        except (UnidentifiedImageError, OSError, SyntaxError):
            return "unidentified_image"
    return EXPECTED_REASON[kind]


def _policy(web_netloc: str, *extra_allowed: str):
    """The pipeline's fetch policy: config -> FetchPolicy, the embedded web's exact host:port allowed. One
    host serves the whole synthetic web, so its connection limit is every download thread of the cluster
    (2 workers x 16): a real crawl spreads its slow hosts over many hosts' limits."""
    cfg = load_config(None, [f"crawl.timeout={TIMEOUT}", f"crawl.deadline={DEADLINE}",
                             "crawl.max_connections_per_host=32",
                             f"http.allowed_addresses=[{','.join(extra_allowed)}]"])
    return cfg.crawl.fetch_policy(cfg.http, web_netloc)


def _harvest(web: SyntheticWeb, out: Path) -> dict:
    cfg = load_config(None, [f"harvest.timeout={TIMEOUT}"])
    return harvest_site(web.url, out, max_pages=1000, max_depth=1000,
                        policy=cfg.harvest.page_policy(cfg.http, urlsplit(web.url).netloc))


def test_hostile_crawl_on_real_dask_processes(dask_cluster, tmp_path):
    from distributed import Client

    address, _ = dask_cluster

    # defined here, not at module level: the workers get them by value (they cannot import this module)
    def _install_hanging_resolver() -> None:
        """In a worker: getaddrinfo never answers for *.hang.test (gives up after 10 minutes)."""
        import socket
        import threading

        real = getattr(socket, "_witclip_real_getaddrinfo", socket.getaddrinfo)
        never = threading.Event()

        def getaddrinfo(host, *args, **kwargs):
            if str(host).endswith(".hang.test"):
                never.wait(600)
                raise socket.gaierror(socket.EAI_AGAIN, "the test resolver gave up")
            return real(host, *args, **kwargs)

        socket._witclip_real_getaddrinfo = real
        socket.getaddrinfo = getaddrinfo


    def _remove_hanging_resolver() -> None:
        import socket

        socket.getaddrinfo = getattr(socket, "_witclip_real_getaddrinfo", socket.getaddrinfo)

    with CountingServer(host="127.0.0.2") as private, CountingServer(host="127.0.0.1") as mlflow_like, \
            TrickleServer(host="127.0.0.1") as trickler, Client(address, timeout="20s") as client, \
            SyntheticWeb(SPEC, private_target=private.url.rstrip("/")) as web, SyntheticWeb(CLEAN_SPEC) as clean:
        site, base = web.site, web.url.rstrip("/")
        netloc, trickle_netloc = urlsplit(web.url).netloc, urlsplit(trickler.url).netloc
        # harvest: every image of the site found, the page that redirects to 127.0.0.2 counted, not followed
        harvested = _harvest(web, tmp_path / "harvest")
        assert harvested["page_errors"] == 1 and harvested["page_error_reasons"] == {"private_address": 1}
        candidates = pd.read_parquet(tmp_path / "harvest" / CANDIDATES_FILE)
        assert set(candidates["url"]) == {base + p for p in site.images} and len(candidates) == 2512
        assert private.count == private.connections == 0

        extra = {
            "robots_trickle": [f"{trickler.url.rstrip('/')}/img/{i}.jpg" for i in range(EXTRA_PER_KIND)],
            "dns_hang": [f"http://img{i % 4}{HANG_SUFFIX}:{urlsplit(web.url).port}/img/{i}.jpg"
                         for i in range(EXTRA_PER_KIND)],
            "loopback_port": [f"{mlflow_like.url.rstrip('/')}/api/2.0/mlflow/{i}" for i in range(EXTRA_PER_KIND)],
        }
        kind_of = {base + p: e.fault for p, e in site.images.items()}
        kind_of.update({url: kind for kind, urls in extra.items() for url in urls})
        pd.concat([candidates[["url", "caption"]],
                   pd.DataFrame({"url": [u for urls in extra.values() for u in urls], "caption": "extra"})]
                  ).to_parquet(tmp_path / "candidates.parquet", index=False)
        faults = Counter(kind_of.values())
        n_urls = len(kind_of)
        assert n_urls == 2632 and sum(n for k, n in faults.items() if k) >= 0.3 * n_urls
        assert set(faults) - {None} == set(ALL_FAULT_KINDS) | set(extra)

        # a clean crawl of the same size, same policy and cluster: the yardstick for the hostile one
        clean_paths = list(clean.site.images)[:n_urls]
        clean_urls = [clean.url.rstrip("/") + p for p in clean_paths]
        clean_urls += [clean_urls[i % len(clean_urls)] + f"?copy={i}" for i in range(n_urls - len(clean_urls))]
        pd.DataFrame({"url": clean_urls, "caption": "clean"}).to_parquet(tmp_path / "clean.parquet", index=False)
        clean_policy = _policy(urlsplit(clean.url).netloc)
        clean_counts = crawl(tmp_path / "clean.parquet", tmp_path / "clean", shard_size=500, threads=16,
                             policy=clean_policy, scheduler_address=address)
        assert clean_counts["successes"] == n_urls

        client.run(_install_hanging_resolver)
        try:
            policy = _policy(netloc, trickle_netloc)
            started = time.monotonic()
            counts = crawl(tmp_path / "candidates.parquet", tmp_path / "crawl", shard_size=500, threads=16,
                           policy=policy, scheduler_address=address)
            hostile_s = time.monotonic() - started
        finally:
            client.run(_remove_hanging_resolver)

        # every worker decodes under the crawl's pixel cap (set before OpenCV loaded there)
        def opencv_probe(width: int, height: int) -> str:
            import cv2
            import numpy as np

            buf = cv2.imencode(".png", np.zeros((height, width), np.uint8))[1]
            try:
                return "decoded" if cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) is not None else "refused"
            except cv2.error:
                return "refused"

        over = policy.max_pixels // 8000 + 1  # 8000 x this is just over the cap
        assert set(client.run(opencv_probe, 8000, over).values()) == {"refused"}
        assert set(client.run(opencv_probe, 100, 100).values()) == {"decoded"}

        web.wait_idle(timeout=10)
        requests = web.requests()
        private_hits, mlflow_hits = private.count + private.connections, mlflow_like.count + mlflow_like.connections
        trickled = trickler.requests

    # every URL has exactly one status row, and it names what the site did to it
    status = pd.read_parquet(tmp_path / "crawl" / STATUS_FILE)
    assert len(status) == n_urls == counts["urls"] and status["url"].is_unique and status["key"].is_unique
    got = dict(zip(status["url"], status["reason"]))
    want = {url: _expected_reason(site, url, kind) for url, kind in kind_of.items()}
    wrong = {url: (kind_of[url], got[url]) for url in kind_of if got[url] != want[url]}
    assert not wrong, dict(list(wrong.items())[:10])
    expected = Counter(want.values())
    assert counts["reasons"] == dict(expected)
    assert counts["successes"] == expected["success"]

    # safety: nothing reached 127.0.0.2 or the other loopback port; robots.txt-disallowed images and the
    # images of the host whose robots.txt never arrived were never requested
    assert private_hits == 0 and mlflow_hits == 0
    assert not [r for r in requests if r.path.startswith("/img-noindex/")]
    assert trickled and all(r == "GET /robots.txt" for r in trickled)
    # politeness: we named ourselves; throttled URLs were asked exactly twice (429, then 200)
    assert all("witclip" in r.user_agent for r in requests)
    image_of = {r.path: r.path.split("?")[0] for r in requests}
    throttled = Counter(r.path for r in requests if site.images.get(image_of[r.path]) is not None
                        and site.images[image_of[r.path]].fault == "429")
    assert set(throttled.values()) == {2}
    # deadline: no image request, its redirect hops together, held the server longer than the deadline
    # + 1 s (a throttled one's Retry-After pause of 1 s apart)
    spans: dict[str, list[float]] = {}
    for r in requests:
        if image_of[r.path] not in site.images:
            continue  # pages and robots.txt: harvest's, and once per worker process
        span = spans.setdefault(image_of[r.path], [r.start, r.end])
        span[0], span[1] = min(span[0], r.start), max(span[1], r.end)
    longest = max(end - start for p, (start, end) in spans.items() if site.images[p].fault != "429")
    assert longest <= DEADLINE + 1.0, longest
    assert max(end - start for p, (start, end) in spans.items()) <= DEADLINE + 1.0 + SPEC.retry_after_seconds
    for kind in ("drip", "trickle_status", "trickle_headers", "slow_redirects"):
        held = [spans[p][1] - spans[p][0] for p, e in site.images.items() if e.fault == kind and p in spans]
        assert len(held) == faults[kind] and min(held) >= DEADLINE - 0.5, (kind, min(held))
    # and the hostile kinds cost at most 2 x deadline + 30 s over a clean crawl of the same size
    assert hostile_s <= clean_counts["elapsed_s"] + 2 * DEADLINE + 30, (hostile_s, clean_counts["elapsed_s"])
    print(f"\n{n_urls} hostile URLs in {hostile_s:.1f} s, a clean crawl of as many in "
          f"{clean_counts['elapsed_s']:.1f} s; longest request {longest:.2f} s; reasons {counts['reasons']}")
