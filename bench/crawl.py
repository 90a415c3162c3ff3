"""Crawl throughput: witclip's crawl (img2dataset's downloader on Dask, through the safe and polite
Fetcher) vs img2dataset's own `download()` with its multiprocessing distributor.

    .venv/bin/python bench/crawl.py [--urls 5000] [--rounds 3]

Both crawl the same URL list (clean images of a synthetic web, no faults) from the same loopback
server, which runs in its own process so its GIL does not compete with the clients. Both use the
same processes, threads per process, shard size, image size, resize mode and output format, and
both are timed wall-clock around the whole call, cluster or pool start included. One small untimed
run of each warms the disk cache; then rounds alternate between the two. A plain threaded HTTP client fetching the same URLs (no decode, no resize, no
writing) measures the server's ceiling. Prints a table, then one JSON object as the last line.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

# Both sides' libraries are imported up front, so neither pays a one-off import inside its timing.
import distributed  # noqa: E402,F401
import img2dataset  # noqa: E402,F401
import pandas as pd  # noqa: E402

from data.crawl import crawl  # noqa: E402
from data.crawl.fetch import FetchPolicy  # noqa: E402
from data.synthetic import SiteSpec, build_site  # noqa: E402

PROCESSES, THREADS, SHARD_SIZE, IMAGE_SIZE, TIMEOUT = 2, 16, 1000, 64, 10.0
IMAGES_PER_PAGE = 16

SERVER = """
import sys, time
from data.synthetic import SiteSpec, SyntheticWeb
spec = SiteSpec(seed=int(sys.argv[1]), n_pages=int(sys.argv[2]), images_per_page={ipp}, fault_rate=0.0)
web = SyntheticWeb(spec)
print(web.start(), flush=True)
while True:
    time.sleep(3600)
"""


def spec_for(n_urls: int, seed: int) -> SiteSpec:
    return SiteSpec(seed=seed, n_pages=-(-n_urls // IMAGES_PER_PAGE), images_per_page=IMAGES_PER_PAGE, fault_rate=0.0)


def start_server(spec: SiteSpec) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(ipp=spec.images_per_page), str(spec.seed), str(spec.n_pages)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    base = proc.stdout.readline().strip().rstrip("/")
    if not base.startswith("http://127.0.0.1:"):
        proc.kill()
        raise RuntimeError(f"synthetic web did not start (got {base!r})")
    return proc, base


def plain_client(urls: list[str]) -> float:
    def get(url: str) -> int:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as r:
            return len(r.read())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(PROCESSES * THREADS) as pool:
        list(pool.map(get, urls))
    return len(urls) / (time.perf_counter() - t0)


def run_witclip(candidates: Path, out: Path) -> tuple[float, int]:
    # Same concurrency as the peer: PROCESSES x THREADS connections to the one host.
    policy = FetchPolicy(timeout=TIMEOUT, deadline=4 * TIMEOUT, allowed_addresses=("127.0.0.1",),
                         max_connections_per_host=PROCESSES * THREADS)
    t0 = time.perf_counter()
    counts = crawl(candidates, out, image_size=IMAGE_SIZE, shard_size=SHARD_SIZE, processes=PROCESSES,
                   threads=THREADS, policy=policy)
    return time.perf_counter() - t0, counts["successes"]


def run_img2dataset(candidates: Path, out: Path) -> tuple[float, int]:
    from img2dataset import download

    t0 = time.perf_counter()
    download(
        url_list=str(candidates), input_format="parquet", url_col="url", caption_col="caption",
        output_format="webdataset", output_folder=str(out), processes_count=PROCESSES, thread_count=THREADS,
        image_size=IMAGE_SIZE, resize_mode="center_crop", number_sample_per_shard=SHARD_SIZE, timeout=TIMEOUT,
        retries=0, encode_format="jpg", compute_hash="sha256", distributor="multiprocessing",
        enable_wandb=False, user_agent_token="witclip-bench",
    )
    seconds = time.perf_counter() - t0
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return seconds, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    spec = spec_for(args.urls, seed=11)
    site = build_site(spec)
    paths = list(site.images)[: args.urls]
    captions = [site.images[p].caption for p in paths]
    work = Path(tempfile.mkdtemp(prefix="witclip-bench-crawl-"))
    proc, base = start_server(spec)
    try:
        urls = [base + p for p in paths]
        candidates = work / "candidates.parquet"
        pd.DataFrame({"url": urls, "caption": captions}).to_parquet(candidates, index=False)
        plain_client(urls[:200])  # warm the server's render cache path
        ceiling = plain_client(urls)  # every image rendered once now: the server's best case
        # One small untimed run of each: the first process spawn that imports torch & co. reads them
        # from a cold disk cache, which would otherwise penalise whichever side happens to go first.
        warm = work / "warm.parquet"
        pd.DataFrame({"url": urls[:100], "caption": captions[:100]}).to_parquet(warm, index=False)
        for name, fn in (("witclip", run_witclip), ("img2dataset", run_img2dataset)):
            fn(warm, work / f"warm-{name}")

        rates: dict[str, list[float]] = {"witclip": [], "img2dataset": []}
        t_all = time.perf_counter()
        for r in range(args.rounds):
            order = [("witclip", run_witclip), ("img2dataset", run_img2dataset)]
            if r % 2:
                order.reverse()
            for name, fn in order:
                out = work / f"{name}-{r}"
                seconds, ok = fn(candidates, out)
                if ok != len(urls):
                    raise RuntimeError(f"{name} downloaded {ok} of {len(urls)} images in round {r}")
                rates[name].append(len(urls) / seconds)
                print(f"round {r} {name:12s} {seconds:6.1f} s  {rates[name][-1]:7.1f} img/s", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(work, ignore_errors=True)

    ours, peer = statistics.median(rates["witclip"]), statistics.median(rates["img2dataset"])
    print(f"\n{'client':28s} images/s   (median of {args.rounds} rounds, {len(urls)} URLs, "
          f"{PROCESSES} processes x {THREADS} threads)")
    print("-" * 60)
    print(f"{'witclip crawl (Dask)':28s} {ours:8.1f}")
    print(f"{'img2dataset multiprocessing':28s} {peer:8.1f}")
    print(f"{'plain HTTP client (ceiling)':28s} {ceiling:8.1f}")
    print(f"ratio witclip / img2dataset: {ours / peer:.3f}   total {time.perf_counter() - t_all:.0f} s")
    print(json.dumps({
        "bench": "crawl", "urls": len(urls), "witclip_img_s": round(ours, 1), "peer_img_s": round(peer, 1),
        "server_ceiling_img_s": round(ceiling, 1), "ratio": round(ours / peer, 3),
        "witclip_rounds": [round(x, 1) for x in rates["witclip"]],
        "peer_rounds": [round(x, 1) for x in rates["img2dataset"]],
    }))


if __name__ == "__main__":
    main()
