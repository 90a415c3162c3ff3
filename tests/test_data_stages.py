"""Data stages end to end against a loopback HTTP site: harvest -> crawl (img2dataset on a
real Dask LocalCluster) -> dedup -> shards; plus manifest helpers. The training loader: test_loader.py."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image, ImageDraw
from support.policies import loopback

from data.common.files import sha256_file
from data.common.manifest import (
    hash_outputs,
    read_manifest,
    stable_hash,
    write_manifest,
)
from data.crawl import STATUS_FILE, crawl, shard_parquets
from data.crawl.fetch import FetchPolicy
from data.dedup import dedup
from data.harvest import harvest_site
from data.shards import count_samples, shard_paths, write_shards

N_IMAGES = 40
# Tests that need a real crawl: the first one pays a LocalCluster start + img2dataset import
# in each worker (~5 s of imports per process: webdataset pulls in torch, img2dataset wandb).
def SLOW_DASK(fn):  # noqa: N802 - reads as a marker
    return pytest.mark.slow(pytest.mark.integration(fn))

TIMEOUT = 1.0  # crawl socket timeout in these tests; /img/slow.jpg stalls 3x longer
# The site lives on 127.0.0.1, which the crawler's address guard refuses unless allowed.
POLICY = FetchPolicy(timeout=TIMEOUT, deadline=4 * TIMEOUT, allowed_addresses=("127.0.0.1",))


# ---------------------------------------------------------------------------- the site
def _jpeg(i: int, size: tuple[int, int] = (96, 80)) -> bytes:
    img = Image.new("RGB", size, ((i * 6) % 256, (255 - i * 6) % 256, (i * 37) % 256))
    ImageDraw.Draw(img).rectangle([i % 50, i % 30, i % 50 + 30, i % 30 + 30], fill=(255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _caption(i: int) -> str:
    return f"img-{i:02d} a test picture"


def _html(body: str) -> bytes:
    return f"<!doctype html><html><head><title>t</title></head><body>{body}</body></html>".encode()


def _imgs(rng: range, prefix: str) -> str:
    return "".join(f'<img src="{prefix}{i:02d}.jpg" alt="{_caption(i)}">' for i in rng)


BAD = ["missing", "error", "notimage", "truncated", "slow", "trickle", "noai"]


def _site() -> dict[str, tuple[int, dict[str, str], bytes]]:
    pages = {
        "/": _html(
            '<a href="page2.html">two</a> <a href="/sub/page3.html">three</a> <a href="#top">top</a>'
            '<a href="/#x">home</a> <a href="mailto:a@b.c">mail</a> <a href="http://other.invalid/x.html">x</a>'
            '<a href="/nope.html">404</a> <a href="/broken.html">500</a> <a href="/img/00.jpg">raw</a>'
            '<a href="/private/secret.html">robots.txt says no</a>'
            + _imgs(range(0, 14), "img/")
            + '<img src="spacer.gif" alt="   "><img src="/img/01.jpg"><img src="data:image/png;base64,AAAA" alt="inline">'
            + '<img src="/img/02.jpg" alt="  spaced \n  out  ">'  # whitespace-normalised caption
        ),
        "/page2.html": _html(
            '<a href="/">home</a><a href="sub/page3.html">three</a>'
            + _imgs(range(14, 27), "/img/")
            + f'<img src="img/00.jpg" alt="{_caption(0)}">'  # same pair as on / : deduped by harvest
        ),
        "/sub/page3.html": _html(
            '<a href="../page2.html">two</a><a href="page4.html">four</a>'
            + _imgs(range(27, 39), "../img/")
            + '<img src="/mirror/dup.jpg" alt="the same bytes as img-07">'
            + "".join(f'<img src="/img/{b}.jpg" alt="bad {b}">' for b in BAD)
        ),
        "/sub/page4.html": _html(_imgs(range(39, 40), "/img/")),  # depth 2 from the seed
    }
    routes: dict[str, tuple[int, dict[str, str], bytes]] = {
        p: (200, {"Content-Type": "text/html; charset=utf-8"}, b) for p, b in pages.items()
    }
    jpg = {"Content-Type": "image/jpeg"}
    for i in range(N_IMAGES):
        routes[f"/img/{i:02d}.jpg"] = (200, jpg, _jpeg(i))
    routes["/mirror/dup.jpg"] = routes["/img/07.jpg"]
    routes["/broken.html"] = (500, {}, b"boom")
    routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n")
    routes["/private/secret.html"] = (200, {"Content-Type": "text/html"}, _html('<img src="/img/00.jpg" alt="x">'))
    routes["/img/error.jpg"] = (500, {}, b"boom")
    routes["/img/notimage.jpg"] = (200, {"Content-Type": "image/jpeg"}, _html("not an image"))
    big = _jpeg(99, (200, 160))
    routes["/img/truncated.jpg"] = (200, jpg, big[: len(big) * 2 // 3])
    routes["/img/noai.jpg"] = (200, {**jpg, "X-Robots-Tag": "noai"}, _jpeg(98))
    return routes


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802
        srv = self.server
        path = self.path.split("?")[0]
        srv.hits[path] = srv.hits.get(path, 0) + 1
        try:
            if path == "/img/slow.jpg":  # stall before any byte: the socket timeout must fire
                time.sleep(3 * TIMEOUT)
            if path == "/img/trickle.jpg":  # 1 byte / 0.1 s: never trips a per-read timeout
                body = _jpeg(97)
                self._head(200, {"Content-Type": "image/jpeg"}, len(body))
                for b in body:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(0.1)
                return
            if path == "/img/short.jpg":  # promises more bytes than it sends, then hangs up
                body = _jpeg(96)
                self._head(200, {"Content-Type": "image/jpeg"}, len(body) + 100)
                self.wfile.write(body)
                return
            if path == "/kill/victim.jpg" and srv.hits[path] == 1:
                srv.kill_requester(self.client_address[1])
                return
            status, headers, body = srv.routes.get(path, (404, {}, b"not found"))
            if path.startswith("/kill/"):  # distinct images for the killed-worker crawl
                status, headers, body = 200, {"Content-Type": "image/jpeg"}, _jpeg(hash(path) % 200)
            self._head(status, headers, len(body))
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _head(self, status, headers, length):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default listen backlog is 5: a burst of img2dataset connects overflows it,
    # dropped SYNs are retried after 1 s, and the 1 s crawl timeout fires ("<urlopen error timed out>").
    request_queue_size = 128
    worker_pids: list[int] = []

    def handle_error(self, request, client_address):  # clients hanging up on slow routes is expected
        pass

    def kill_requester(self, peer_port: int) -> None:
        """SIGKILL the Dask worker process that owns the client socket (psutil ships with distributed)."""
        import psutil

        for pid in self.worker_pids:
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except psutil.Error:
                continue
            if any(c.laddr and c.laddr.port == peer_port for c in conns):
                os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)
                return


@pytest.fixture(scope="module")
def site():
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.routes, srv.hits, srv.killed = _site(), {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


# ----------------------------------------------------------------------- stage fixtures
@pytest.fixture(scope="module")
def harvested(site, tmp_path_factory):
    _, base = site
    out = tmp_path_factory.mktemp("harvest")
    counts = harvest_site(base, out, policy=loopback(5.0))
    return out, counts


@pytest.fixture(scope="module")
def crawled(harvested, tmp_path_factory):
    out = tmp_path_factory.mktemp("crawl")
    t0 = time.monotonic()
    counts = crawl(harvested[0] / "candidates.parquet", out, shard_size=17, processes=2, threads=8, policy=POLICY)
    counts["_wall_s"] = time.monotonic() - t0
    return out, counts


@pytest.fixture(scope="module")
def deduped(crawled, tmp_path_factory):
    out = tmp_path_factory.mktemp("dedup")
    # exact rules only here: tests/test_dedup.py covers near duplicates and decontamination
    return out, dedup(crawled[0], out, near_duplicates=False)


@pytest.fixture(scope="module")
def sharded(crawled, deduped, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    counts = write_shards(crawled[0], deduped[0] / "keep.parquet", out, val_fraction=0.1, samples_per_shard=10)
    return out, counts


# -------------------------------------------------------------------------------- harvest
def test_harvest_finds_pages_and_candidates(site, harvested):
    _, base = site
    out, counts = harvested
    assert counts == {
        "pages_fetched": 4,  # /, page2, sub/page3, sub/page4 (each once despite #fragments)
        "page_errors": 2,  # /nope.html 404, /broken.html 500
        "page_error_reasons": {"http_404": 1, "http_500": 1},
        "bad_charset": 0,
        "parse_budget_exceeded": 0,
        "non_html": 1,  # a link to a jpg
        "robots_disallowed": 1,  # /private/secret.html
        "img_tags": 53,
        "empty_alt": 2,  # alt="   " and no alt
        "non_http_img": 1,  # data: URI
        "duplicate_candidates": 1,  # (img/00, caption) on two pages
        "candidates": N_IMAGES + 2 + len(BAD),  # + "spaced out" img-02 + the mirror copy
    }
    df = pd.read_parquet(out / "candidates.parquet")
    assert list(df.columns) == ["url", "caption", "source", "matched_query"]
    assert not df.duplicated(["url", "caption"]).any()
    by_url = dict(zip(df["url"], df["caption"]))
    # relative URLs resolved against their page: "../img/27.jpg" on /sub/page3.html
    assert by_url[f"{base}/img/27.jpg"] == _caption(27)
    assert by_url[f"{base}/img/02.jpg"] == "spaced out"
    assert {f"{base}/img/{i:02d}.jpg" for i in range(N_IMAGES)} <= set(df["url"])
    assert df.loc[df["url"] == f"{base}/img/39.jpg", "source"].item() == f"{base}/sub/page4.html"
    assert not any("other.invalid" in p for p in df["source"])
    assert df["matched_query"].isna().all()  # no query balancing asked for


def test_harvest_bounds(site, tmp_path):
    _, base = site
    shallow = harvest_site(base + "/", tmp_path / "a", max_depth=1, policy=loopback())
    assert shallow["pages_fetched"] == 3  # page4 is at depth 2
    one = harvest_site(base, tmp_path / "b", max_pages=1, policy=loopback())
    assert one["pages_fetched"] == 1 and one["candidates"] == 14 + 1  # img 00..13 + "spaced out"


def test_harvest_bad_seeds(site, tmp_path):
    _, base = site
    with pytest.raises(ValueError, match="http"):
        harvest_site("ftp://example.com/", tmp_path)
    with pytest.raises(ValueError, match="http"):
        harvest_site("/just/a/path", tmp_path)
    with pytest.raises(ConnectionError, match=r"refused by the address guard \(127.0.0.1 -> 127.0.0.1 \(loopback\)\)"):
        harvest_site(base, tmp_path)  # the default policy: loopback is not for crawling
    with pytest.raises(ConnectionError, match="unreachable"):
        harvest_site(base + "/nope.html", tmp_path, policy=loopback())
    with pytest.raises(PermissionError, match="robots.txt"):
        harvest_site(base + "/private/secret.html", tmp_path, policy=loopback())
    assert harvest_site(base + "/private/secret.html", tmp_path, respect_robots=False, policy=loopback())["candidates"] == 1
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(ConnectionError, match=f"seed URL http://127.0.0.1:{port}/ is unreachable"):
        harvest_site(f"http://127.0.0.1:{port}", tmp_path, policy=loopback(2))


# ---------------------------------------------------------------------------------- crawl
@SLOW_DASK
def test_crawl_layout_and_counts(crawled):
    out, counts = crawled
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([f"0000{i}{ext}" for i in range(3) for ext in (".parquet", ".tar", "_stats.json")]
                           + [STATUS_FILE])
    assert counts["urls"] == N_IMAGES + 2 + len(BAD) and counts["shards"] == 3
    assert counts["successes"] == N_IMAGES + 2  # img-02 twice + the mirror copy: dedup's job
    # 404, 500, stall, trickle, X-Robots-Tag noai, and the html body: no image header, refused before decoding
    assert counts["failed_to_download"] == 6
    assert counts["failed_to_resize"] == 1  # truncated jpeg: its header is intact, the decoder fails
    assert counts["reasons"] == {
        "success": N_IMAGES + 2, "decode_error": 1, "deadline_exceeded": 1, "http_404": 1, "http_500": 1,
        "timeout": 1, "x_robots_tag": 1, "unidentified_image": 1,
    }
    sd = counts["status_dict"]  # img2dataset's own per-shard counters carry our reason codes
    assert sd["success"] == N_IMAGES + 2 and sd["http_404"] == 1 and sd["Image decoding error"] == 1
    assert counts["success_rate"] == pytest.approx(42 / 49, abs=1e-6)
    json.dumps(counts)
    status = pd.read_parquet(out / STATUS_FILE)
    assert list(status.columns) == ["key", "url", "status", "reason"]
    assert len(status) == counts["urls"] and status["key"].is_unique  # exactly one row per candidate
    assert dict(status["reason"].value_counts()) == counts["reasons"]
    meta = pd.concat(pd.read_parquet(p) for p in shard_parquets(out))
    assert {"key", "url", "caption", "status", "sha256", "width", "height"} <= set(meta.columns)
    ok = meta[meta.status == "success"]
    assert (ok.width == 64).all() and (ok.height == 64).all()
    with tarfile.open(out / "00000.tar") as tf:
        exts = {m.name.split(".", 1)[1] for m in tf}
    assert exts == {"jpg", "txt", "json"}


@SLOW_DASK
def test_crawl_rerun_skips_done_shards(crawled, harvested):
    out, first = crawled
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    t0 = time.monotonic()
    again = crawl(harvested[0] / "candidates.parquet", out, shard_size=17, policy=POLICY)
    assert time.monotonic() - t0 < 10  # no cluster, no downloads
    assert again["shards_downloaded"] == 0 and again["shards_skipped"] == 3
    assert {k: again[k] for k in ("urls", "successes", "status_dict")} == {
        k: first[k] for k in ("urls", "successes", "status_dict")
    }
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@SLOW_DASK
def test_crawl_resumes_a_missing_shard(crawled, harvested, tmp_path):
    # Copy a finished crawl, forget shard 1 (as if the run died mid-way), re-run: only shard 1 runs.
    import shutil

    out = tmp_path / "crawl"
    shutil.copytree(crawled[0], out)
    for p in out.glob("00001*"):
        p.unlink()
    counts = crawl(harvested[0] / "candidates.parquet", out, shard_size=17, processes=1, threads=8, policy=POLICY)
    assert counts["shards_downloaded"] == 1 and counts["shards_skipped"] == 2
    assert counts["successes"] == crawled[1]["successes"] and counts["shards"] == 3
    assert not (out / "_tmp").exists()


def test_download_image_speaks_img2dataset(site):
    """Our drop-in for img2dataset's download_image returns what its Downloader expects:
    (key, stream, None) on success and (key, None, reason code) on failure."""
    from data.crawl import make_download_image
    from data.crawl.fetch import Fetcher

    _, base = site
    download = make_download_image(Fetcher(POLICY))
    key, stream, err = download((7, f"{base}/img/00.jpg"), TIMEOUT, "witclip", ["noai"])
    assert key == 7 and err is None and stream.getvalue() == _jpeg(0)
    assert download((8, f"{base}/img/missing.jpg"), TIMEOUT, "witclip", ["noai"]) == (8, None, "http_404")
    assert download((9, f"{base}/img/noai.jpg"), TIMEOUT, "witclip", ["noai"]) == (9, None, "x_robots_tag")
    guarded = make_download_image(Fetcher(FetchPolicy()))  # no allowlist: 127.0.0.1 is refused
    assert guarded((1, f"{base}/img/00.jpg"), TIMEOUT, "witclip", []) == (1, None, "private_address")


def test_crawl_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="candidates file not found"):
        crawl(tmp_path / "nope.parquet", tmp_path / "out")
    pd.DataFrame({"link": ["http://x/"], "caption": ["c"]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no 'url' column"):
        crawl(tmp_path / "c.parquet", tmp_path / "out")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="not a readable parquet"):
        crawl(tmp_path / "junk.parquet", tmp_path / "out")


def _success_keys_and_duplicates(out: Path) -> tuple[set[str], list[str]]:
    meta = pd.concat(pd.read_parquet(p) for p in shard_parquets(out))
    tar_keys = []
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            tar_keys += [m.name.split(".", 1)[0] for m in tf if m.name.endswith(".jpg")]
    keys = list(meta["key"]) + tar_keys
    dupes = sorted({k for k in keys if keys.count(k) > 2})  # each key: one parquet row + one tar jpg
    return set(meta.loc[meta.status == "success", "key"]), dupes + sorted(
        k for k in set(tar_keys) if tar_keys.count(k) > 1)


@SLOW_DASK
def test_crawl_survives_a_killed_worker(site, tmp_path):
    """A worker SIGKILLed mid-shard (by the server, on the first request for the victim URL):
    Dask reschedules the shard on a fresh worker; the successful keys equal an undisturbed
    run's and no key is written twice."""
    from distributed import Client, LocalCluster

    srv, base = site
    urls = [f"{base}/kill/{i:02d}.jpg" for i in range(24)]
    urls[3] = f"{base}/kill/victim.jpg"
    urls[10] = f"{base}/img/missing.jpg"  # failures must come out the same too
    urls[20] = f"{base}/img/notimage.jpg"
    pd.DataFrame({"url": urls, "caption": [f"k{i}" for i in range(24)]}).to_parquet(tmp_path / "c.parquet")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1",
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        srv.worker_pids = list(client.run(os.getpid).values())
        counts = crawl(
            tmp_path / "c.parquet", tmp_path / "out", shard_size=8, threads=4, policy=POLICY,
            scheduler_address=cluster.scheduler_address,
        )
        assert len(srv.killed) == 1 and srv.hits["/kill/victim.jpg"] >= 2
        calm = crawl(  # the victim URL no longer kills: an undisturbed run of the same list
            tmp_path / "c.parquet", tmp_path / "calm", shard_size=8, threads=4, policy=POLICY,
            scheduler_address=cluster.scheduler_address,
        )
    assert len(srv.killed) == 1
    assert counts["urls"] == 24 and counts["successes"] == 22 and counts["shards"] == 3
    assert counts["reasons"] == calm["reasons"] == {"success": 22, "http_404": 1, "unidentified_image": 1}
    killed_keys, killed_dupes = _success_keys_and_duplicates(tmp_path / "out")
    calm_keys, calm_dupes = _success_keys_and_duplicates(tmp_path / "calm")
    assert killed_keys == calm_keys and len(killed_keys) == 22
    assert killed_dupes == [] and calm_dupes == []


# ---------------------------------------------------------------------------------- dedup
@SLOW_DASK
def test_dedup_drops_planted_duplicate(site, crawled, deduped):
    _, base = site
    out, counts = deduped
    assert counts == {"input": 42, "kept": 40, "dropped_duplicate_url": 1, "dropped_duplicate_sha256": 1,
                      "dropped_undecodable": 0, "dropped_near_duplicate": 0, "dropped_benchmark_overlap": 0}
    keep = pd.read_parquet(out / "keep.parquet")
    assert list(keep.columns) == ["key", "tar", "url", "caption", "sha256"]
    assert keep["sha256"].is_unique and len(keep) == 40
    assert f"{base}/mirror/dup.jpg" not in set(keep["url"]) and f"{base}/img/07.jpg" in set(keep["url"])
    report = json.loads((out / "report.json").read_text())
    assert report["input"] == 42 and report["kept"] == 40
    assert report["dropped"]["duplicate_url"] == 1 and report["dropped"]["duplicate_sha256"] == 1
    meta = pd.concat(pd.read_parquet(p) for p in shard_parquets(crawled[0])).set_index("key")
    dropped = pd.read_parquet(out / "dropped.parquet").set_index("key")
    # later copies go: img-02's second <img> (same URL, another alt), and the mirror (same bytes as img-07)
    got = sorted((meta.loc[k, "url"], meta.loc[k, "caption"], r, meta.loc[d, "url"])
                 for k, r, d in zip(dropped.index, dropped.reason, dropped.duplicate_of))
    assert got == [(f"{base}/img/02.jpg", "spaced out", "duplicate_url", f"{base}/img/02.jpg"),
                   (f"{base}/mirror/dup.jpg", "the same bytes as img-07", "duplicate_sha256", f"{base}/img/07.jpg")]
    assert keep.loc[keep.url == f"{base}/img/02.jpg", "caption"].tolist() == [_caption(2)]


def test_dedup_exact_rules_and_order(tmp_path):
    crawl_dir = tmp_path / "crawl"
    crawl_dir.mkdir()
    rows = [  # key, url, caption, sha256, status
        ("000010001", "http://example.com/a?y=2&x=1", "a", "h1", "success"),
        ("000010000", "HTTP://Example.COM:80/a?x=1&y=2#top", "other alt", "h2", "success"),  # same URL, earlier
        ("000010002", "http://example.com/b", "b", "h2", "success"),  # same bytes as 000010000
        ("000010003", "http://example.com/c", "c", None, "failed_to_download"),
        ("000010004", "https://example.com:443/a?x=1&y=2", "d", "h4", "success"),  # https: another URL
    ]
    df = pd.DataFrame(rows, columns=["key", "url", "caption", "sha256", "status"])
    df.to_parquet(crawl_dir / "00001.parquet")
    (crawl_dir / "notes.parquet").write_bytes(b"ignored: not a shard name")
    counts = dedup(crawl_dir, tmp_path / "out", near_duplicates=False)
    assert counts["input"] == 4 and counts["kept"] == 2
    assert counts["dropped_duplicate_url"] == 1 and counts["dropped_duplicate_sha256"] == 1
    keep = pd.read_parquet(tmp_path / "out" / "keep.parquet")
    assert keep["key"].tolist() == ["000010000", "000010004"] and keep["tar"].tolist() == ["00001.tar"] * 2
    dropped = pd.read_parquet(tmp_path / "out" / "dropped.parquet")
    assert dropped[["key", "reason", "duplicate_of"]].values.tolist() == [
        ["000010001", "duplicate_url", "000010000"], ["000010002", "duplicate_sha256", "000010000"]]
    with pytest.raises(FileNotFoundError):
        dedup(tmp_path / "missing", tmp_path / "out2")


# --------------------------------------------------------------------------------- shards
def _tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf:
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return out


@SLOW_DASK
def test_shards_consistent_with_keep(deduped, sharded, crawled, tmp_path):
    out, counts = sharded
    assert counts == {"train": 36, "val": 4, "train_shards": 4, "val_shards": 1, "missing": 0}
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 10,
                     "train-000003.tar": 6, "val-000000.tar": 4}
    keep = pd.read_parquet(deduped[0] / "keep.parquet").set_index("key")
    seen: dict[str, str] = {}
    for name, n in sizes.items():
        samples = _tar_samples(out / name)
        assert len(samples) == n
        for key, s in samples.items():
            assert set(s) == {"jpg", "txt", "json"}
            assert s["txt"].decode() == keep.loc[key, "caption"]
            assert json.loads(s["json"])["sha256"] == keep.loc[key, "sha256"]
            Image.open(io.BytesIO(s["jpg"])).verify()
            seen[key] = name
    assert sorted(seen) == sorted(keep.index)  # every kept sample exactly once
    assert count_samples(out, "train") == 36 and count_samples(out, "val") == 4
    assert [p.name for p in shard_paths(out, "val")] == ["val-000000.tar"]
    # deterministic: same inputs + seed => byte-identical shards
    again = tmp_path / "again"
    write_shards(crawled[0], deduped[0] / "keep.parquet", again, val_fraction=0.1, samples_per_shard=10)
    assert hash_outputs(again) == hash_outputs(out)
    with pytest.raises(FileNotFoundError):
        write_shards(crawled[0], tmp_path / "nope.parquet", tmp_path / "x")


# ------------------------------------------------------------------------------- manifest
def test_manifest_atomic_and_hashes(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"\0" * 10)
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "scratch").write_text("x")
    assert read_manifest(tmp_path) is None
    h1 = hash_outputs(tmp_path)
    assert list(h1) == ["a.txt", "sub/b.bin"] and h1["a.txt"] == sha256_file(tmp_path / "a.txt")
    m = {"stage": "crawl", "outputs": h1, "params": {"b": 1, "a": [1, 2]}}
    path = write_manifest(tmp_path, m)
    assert path == tmp_path / "manifest.json" and read_manifest(tmp_path) == m
    assert hash_outputs(tmp_path) == h1  # manifest.json excluded; stable across calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_tmp", "a.txt", "manifest.json", "sub"]
    # a failing write leaves the previous manifest intact and no temp files behind
    bad = {"x": 1}
    bad["self"] = bad  # circular => json raises mid-write
    with pytest.raises(ValueError):
        write_manifest(tmp_path, bad)
    assert read_manifest(tmp_path) == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_tmp", "a.txt", "manifest.json", "sub"]
    (tmp_path / "manifest.json").write_text("{truncated")
    assert read_manifest(tmp_path) is None
    write_manifest(tmp_path, {"status": "running"}, name=".attempt.json")  # flows' attempt marker
    assert read_manifest(tmp_path, name=".attempt.json") == {"status": "running"}
    (tmp_path / ".x.json.abc.tmp").write_text("in-flight atomic write")
    assert list(hash_outputs(tmp_path, exclude=("manifest.json", ".attempt.json"))) == ["a.txt", "sub/b.bin"]
    (tmp_path / "a.txt").write_text("changed")
    assert hash_outputs(tmp_path)["a.txt"] != h1["a.txt"]
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"p": Path("/x")}) == stable_hash({"p": "/x"})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})


@SLOW_DASK
def test_crawl_timing_report(crawled, capsys):
    """Not an assertion of speed: prints throughput for the record (pytest -s)."""
    _, counts = crawled
    with capsys.disabled():
        print(f"\n[crawl] {counts['urls']} urls, {counts['successes']} ok in {counts['_wall_s']:.1f}s wall "
              f"(incl. LocalCluster start); {counts['urls'] / counts['_wall_s']:.1f} urls/s")
