"""Crawl throughput over many hosts: witclip's crawl at its DEFAULT settings (img2dataset's downloader
on Dask, through the safe and polite Fetcher) vs img2dataset's own `download()` at ITS defaults.

    .venv/bin/python bench/crawl.py [--urls 5000] [--rounds 3] [--server-processes 2]
    .venv/bin/python bench/crawl.py --urls 1000 --rounds 1        # quick mode, for development

The web: a synthetic site (clean images, no faults) served on 32 loopback addresses, 127.0.0.10 to
127.0.0.41 (never 127.0.0.2, which the tests keep as the forbidden target), each bound by its own
listening socket to its own address only (`data.synthetic.server.MultiHostWeb`), so per-host limits
apply per host as on the real web. Image j's URL names host j mod 32; both sides crawl the same URL
list. The servers run in `--server-processes` processes of their own (hosts dealt round-robin), so
neither their GIL nor their CPU sits inside a client's process; each answers robots.txt with
"User-agent: * / Allow: /", which witclip fetches once per host and worker process.

witclip: exactly what the pipeline runs with the default config (`flows.config.PipelineConfig()`):
`data.crawl.crawl(...)` with `crawl.image_size`, `resize_mode`, `shard_size`, `threads`, `retries`,
`cluster.processes`, and the FetchPolicy `crawl.fetch_policy(http, None)` builds, where the only
setting changed from the default is `http.allowed_addresses`: the 32 "ip:port" pairs, since the
address guard refuses loopback otherwise. Politeness (16 connections per host for the whole cluster,
no rate limit), robots.txt, the 2 s timeout and the deadline stay at their defaults.

img2dataset: `download()` with the same processes_count and thread_count as witclip (its own defaults
are 1 and 256), and the settings that define the output equal on both sides: image_size (64),
resize_mode (center_crop), output_format webdataset, encode_format jpg, number_sample_per_shard (1000);
input_format parquet with url_col and caption_col naming the input's columns. Everything else stays at
img2dataset's default: timeout 10 s, retries 0, distributor "multiprocessing", compute_hash "sha256",
extract_exif True, user_agent_token None, disallowed_header_directives None (= its noai, noimageai,
noindex, noimageindex list), encode_quality 95, skip_reencode False, resize_only_if_bigger False,
min_image_size 0, max_image_area and max_aspect_ratio unlimited, subjob_size 1000, oom_shard_count 5,
max_shard_retry 1, incremental_mode "incremental", enable_wandb False.

Timing: wall clock around each whole call, cluster or pool start included; both sides spawn their
worker processes, which import what their tasks need inside that time. One small untimed run of
each warms the disk cache; then rounds alternate between the two, and each side's figure is the
median of its rounds (images/s = URLs / seconds; every URL must succeed). A plain threaded HTTP
client (processes x threads threads in one process, no decode, resize or writing) fetching every URL
once, after a warm-up that renders every image, measures the servers' ceiling. Prints a table, then
one JSON object as the last line: "ratio" = witclip / img2dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Both sides' libraries are imported up front, so neither pays a one-off import inside its timing
# (img2dataset in main(): see there).
import distributed  # noqa: E402,F401
import pandas as pd  # noqa: E402

from data.crawl import crawl  # noqa: E402
from data.crawl.fetch import FetchPolicy  # noqa: E402
from data.synthetic import SiteSpec, build_site  # noqa: E402
from flows.config import PipelineConfig  # noqa: E402

HOSTS = tuple(f"127.0.0.{i}" for i in range(10, 42))  # 32 loopback addresses; 127.0.0.2 stays forbidden
IMAGES_PER_PAGE = 16
CEILING_TIMEOUT = 10.0  # the plain client's socket timeout

# One server process: serves the site on the hosts given, prints their base URLs (one line, spaces),
# and exits when the bench closes its stdin (or kills it), so no server outlives the bench.
SERVER = """
import sys
from data.synthetic import SiteSpec
from data.synthetic.server import MultiHostWeb
seed, n_pages, ipp, hosts = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
web = MultiHostWeb(SiteSpec(seed=seed, n_pages=n_pages, images_per_page=ipp, fault_rate=0.0), hosts)
print(" ".join(web.start()), flush=True)
sys.stdin.read()
web.stop()
"""


def spec_for(n_urls: int, seed: int) -> SiteSpec:
    return SiteSpec(seed=seed, n_pages=-(-n_urls // IMAGES_PER_PAGE), images_per_page=IMAGES_PER_PAGE, fault_rate=0.0)


def start_servers(spec: SiteSpec, n_processes: int) -> tuple[list[subprocess.Popen], list[str]]:
    """Serve the site on HOSTS from `n_processes` processes; the base URLs in the order of HOSTS."""
    groups = [list(range(i, len(HOSTS), n_processes)) for i in range(n_processes)]
    procs: list[subprocess.Popen] = []
    bases: list[str] = [""] * len(HOSTS)
    try:
        for group in groups:
            procs.append(subprocess.Popen(
                [sys.executable, "-c", SERVER, str(spec.seed), str(spec.n_pages), str(spec.images_per_page),
                 ",".join(HOSTS[i] for i in group)],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            ))  # fmt: skip
        for proc, group in zip(procs, groups):
            urls = proc.stdout.readline().split()
            if len(urls) != len(group):
                raise RuntimeError(f"synthetic web did not start (got {urls!r})")
            for i, url in zip(group, urls):
                if not url.startswith(f"http://{HOSTS[i]}:"):
                    raise RuntimeError(f"server for {HOSTS[i]} answered {url!r}")
                bases[i] = url.rstrip("/")
    except BaseException:
        stop_servers(procs)
        raise
    return procs, bases


def stop_servers(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            proc.stdin.close()
            proc.wait(timeout=10)
        except Exception:  # noqa: BLE001 - a server that will not stop is killed
            proc.kill()
            proc.wait()


def plain_client(urls: list[str], threads: int) -> float:
    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=CEILING_TIMEOUT) as r:
            return len(r.read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(get, urls))
    return len(urls) / (time.perf_counter() - t0)


def default_config(bases: list[str]) -> tuple[PipelineConfig, FetchPolicy]:
    """The pipeline's default config with the served addresses allowed, and the FetchPolicy the crawl
    stage builds from it (flows/stages/crawl.py)."""
    cfg = PipelineConfig()
    cfg.http.allowed_addresses = [base.split("://", 1)[1] for base in bases]  # "127.0.0.x:port", validated
    return cfg, cfg.crawl.fetch_policy(cfg.http, None)


def run_witclip(cfg: PipelineConfig, policy: FetchPolicy, candidates: Path, out: Path) -> tuple[float, int]:
    c = cfg.crawl
    t0 = time.perf_counter()
    # the crawl stage's call (flows/stages/crawl.py)
    counts = crawl(
        candidates, out, image_size=c.image_size, resize_mode=c.resize_mode, shard_size=c.shard_size,
        threads=c.threads, retries=c.retries, processes=cfg.cluster.processes,
        scheduler_address=cfg.cluster.scheduler_address, policy=policy,
    )  # fmt: skip
    return time.perf_counter() - t0, counts["successes"]


def run_img2dataset(cfg: PipelineConfig, policy: FetchPolicy, candidates: Path, out: Path) -> tuple[float, int]:
    from img2dataset import download

    c = cfg.crawl
    t0 = time.perf_counter()
    # every setting not named here at img2dataset's default (see the module docstring)
    download(
        url_list=str(candidates), input_format="parquet", url_col="url", caption_col="caption",
        output_folder=str(out), processes_count=cfg.cluster.processes, thread_count=c.threads,
        # the output, as witclip writes it
        image_size=c.image_size, resize_mode=c.resize_mode, output_format="webdataset", encode_format="jpg",
        number_sample_per_shard=c.shard_size,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-processes", type=int, default=2, help="processes serving the 32 hosts")
    args = parser.parse_args()
    # Not at module level: both sides' workers are spawned and re-import this module, and importing
    # img2dataset loads OpenCV, which would then keep its default decode limit instead of the crawl's
    # (data.common.opencv_limit). Workers import what their tasks need, on both sides alike.
    import img2dataset  # noqa: F401

    spec = spec_for(args.urls, seed=11)
    site = build_site(spec)
    paths = list(site.images)[: args.urls]
    captions = [site.images[p].caption for p in paths]
    work = Path(tempfile.mkdtemp(prefix="witclip-bench-crawl-"))
    procs, bases = start_servers(spec, args.server_processes)
    try:
        cfg, policy = default_config(bases)
        processes, threads = cfg.cluster.processes, cfg.crawl.threads
        urls = [bases[j % len(bases)] + p for j, p in enumerate(paths)]  # round-robin over the hosts
        candidates = work / "candidates.parquet"
        pd.DataFrame({"url": urls, "caption": captions}).to_parquet(candidates, index=False)
        plain_client(urls, processes * threads)  # every image rendered once (each server caches its own)
        ceiling = plain_client(urls, processes * threads)  # the servers' best case
        # One small untimed run of each: the first process spawn that imports torch & co. reads them
        # from a cold disk cache, which would otherwise penalise whichever side happens to go first.
        warm = work / "warm.parquet"
        pd.DataFrame({"url": urls[:100], "caption": captions[:100]}).to_parquet(warm, index=False)
        sides: list[tuple[str, Any]] = [("witclip", run_witclip), ("img2dataset", run_img2dataset)]
        for name, fn in sides:
            fn(cfg, policy, warm, work / f"warm-{name}")

        rates: dict[str, list[float]] = {"witclip": [], "img2dataset": []}
        t_all = time.perf_counter()
        for r in range(args.rounds):
            for name, fn in sides if r % 2 == 0 else sides[::-1]:
                out = work / f"{name}-{r}"
                seconds, ok = fn(cfg, policy, candidates, out)
                if ok != len(urls):
                    raise RuntimeError(f"{name} downloaded {ok} of {len(urls)} images in round {r}")
                rates[name].append(len(urls) / seconds)
                print(f"round {r} {name:12s} {seconds:6.1f} s  {rates[name][-1]:7.1f} img/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        stop_servers(procs)
        shutil.rmtree(work, ignore_errors=True)

    ours, peer = statistics.median(rates["witclip"]), statistics.median(rates["img2dataset"])
    print(f"\n{'client':34s} images/s   (median of {args.rounds} rounds, {len(urls)} URLs over {len(HOSTS)} "
          f"hosts, {processes} processes x {threads} threads)")
    print("-" * 72)
    print(f"{'witclip crawl, default config':34s} {ours:8.1f}   "
          f"({policy.max_connections_per_host} connections per host per cluster, robots.txt {policy.robots_txt}, "
          f"timeout {policy.timeout:g} s)")
    print(f"{'img2dataset download(), defaults':34s} {peer:8.1f}")
    print(f"{'plain HTTP client (ceiling)':34s} {ceiling:8.1f}   ({args.server_processes} server processes)")
    print(f"ratio witclip / img2dataset: {ours / peer:.3f}   total {time.perf_counter() - t_all:.0f} s")
    print(json.dumps({
        "bench": "crawl", "urls": len(urls), "hosts": len(HOSTS), "processes": processes, "threads": threads,
        "witclip_max_connections_per_host": policy.max_connections_per_host,
        "witclip_img_s": round(ours, 1), "peer_img_s": round(peer, 1),
        "server_ceiling_img_s": round(ceiling, 1), "server_processes": args.server_processes,
        "ratio": round(ours / peer, 3),
        "witclip_rounds": [round(x, 1) for x in rates["witclip"]],
        "peer_rounds": [round(x, 1) for x in rates["img2dataset"]],
    }))


if __name__ == "__main__":
    main()
