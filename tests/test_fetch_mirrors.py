"""Benchmark and URL-list fetching from mirrors (data.acquire.download, data.acquire.benchmarks, data.acquire.url_lists,
flows.cli.benchmarks / flows.cli.urls) against loopback HTTP servers started here: a directory laid out like the public
CLIP_benchmark mirror (10-class cifar10 stand-in, 3 tars), served by a handler that honours Range
requests or one that ignores them. Nothing leaves 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pandas as pd
import pytest
from PIL import Image

from data.acquire.benchmarks import FETCH_MANIFEST, PLAIN_TEMPLATE, fetch_benchmarks
from data.acquire.download import DownloadError, HostUnreachable, download_files
from data.acquire.url_lists import fetch_url_lists
from data.eval.registry import get_task, locate
from data.eval.sources import open_task_data
from flows.errors import UserError
from flows.cli.benchmarks import cmd_benchmarks_fetch
from flows.cli.urls import cmd_urls_fetch

REPO = "wds_vtab-cifar10"
SAMPLES = 40
SHARDS = 3
STALL_AFTER = 16384  # bytes of test/1.tar sent before the server stalls (kill test) or hangs up


# ----------------------------------------------------------------------------- the mirror
def _png(rng: random.Random) -> bytes:
    img = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def build_mirror(root: Path) -> Path:
    """<root>/wds_vtab-cifar10/ as CLIP_benchmark publishes it (no dataset_type.txt: classification)."""
    task = get_task("cifar10")
    d = root / REPO
    (d / "test").mkdir(parents=True)
    (d / "classnames.txt").write_text("\n".join(task.classnames) + "\n")
    (d / "zeroshot_classification_templates.txt").write_text("\n".join(task.templates) + "\n")
    (d / "test" / "nshards.txt").write_text(f"{SHARDS}\n")
    rng = random.Random(0)
    per = -(-SAMPLES // SHARDS)
    for s in range(SHARDS):
        with tarfile.open(d / "test" / f"{s}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(s * per, min(SAMPLES, (s + 1) * per)):
                for name, data in ((f"s{i:06d}.png", _png(rng)), (f"s{i:06d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return d


class _MirrorHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_HEAD(self):  # noqa: N802
        self._serve(send_body=False)

    def do_GET(self):  # noqa: N802
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        srv = self.server
        path = unquote(urlsplit(self.path).path)
        rng = self.headers.get("Range")
        with srv.lock:
            srv.log.append((self.command, path, rng))
        hf = re.match(r"^/([^/]+)/resolve/main/(.+)$", path) if srv.hf else None
        if hf:  # Hugging Face style: the file lives on a "CDN"; LFS files (tars) publish their sha256
            file = srv.root / hf.group(1) / hf.group(2)
            if not file.is_file():
                self._head(404, 0)
                return
            extra = {"Location": f"/cdn/{hf.group(1)}/{hf.group(2)}"}
            if file.suffix == ".tar":
                sha = srv.published.get(path) or hashlib.sha256(file.read_bytes()).hexdigest()
                extra.update({"X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(file.stat().st_size)})
            self._head(302, 0, extra)
            return
        path = path.removeprefix("/cdn")
        file = (srv.root / path.lstrip("/")).resolve()
        if not file.is_file() or srv.root not in file.parents:
            self._head(404, 9)
            if send_body:
                self.wfile.write(b"not found")
            return
        data = file.read_bytes()
        etag = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        start = 0
        if rng and srv.ranges and self.headers.get("If-Range", etag) in (etag, srv.last_modified):
            start = int(rng.split("=", 1)[1].split("-", 1)[0])
            if start >= len(data):
                self._head(416, 0, {"Content-Range": f"bytes */{len(data)}"})
                return
        body = data[start:]
        extra = {"ETag": etag, "Last-Modified": srv.last_modified}
        if start:
            extra["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        self._head(206 if start else 200, len(body), extra)
        if not send_body:
            return
        hook = srv.hooks.get(path)
        try:
            if hook is not None and hook(self, body):
                return
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _head(self, status: int, length: int, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        self.end_headers()


class _Mirror(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def handle_error(self, request, client_address):  # clients hanging up is part of the tests
        pass

    def gets(self, path: str) -> int:
        with self.lock:
            return sum(1 for m, p, _ in self.log if m == "GET" and p == path)

    def ranges_seen(self, path: str) -> list[str]:
        with self.lock:
            return [r for m, p, r in self.log if m == "GET" and p == path and r]


@pytest.fixture
def mirror(tmp_path):
    """Start a mirror: mirror(ranges=True) -> (server, base URL); stopped after the test."""
    root = tmp_path / "mirror"
    build_mirror(root)
    started = []

    def start(ranges: bool = True, hf: bool = False):
        srv = _Mirror(("127.0.0.1", 0), _MirrorHandler)
        srv.root, srv.ranges, srv.log, srv.hooks, srv.lock = root.resolve(), ranges, [], {}, threading.Lock()
        srv.hf, srv.published = hf, {}
        srv.last_modified = formatdate(usegmt=True)
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        started.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}"

    start.root = root
    yield start
    for srv in started:
        srv.shutdown()
        srv.server_close()


def _final_files(root: Path) -> list[Path]:
    """Files under their final names (not parts, not the manifest)."""
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".part")
                  and p.name != FETCH_MANIFEST)


def _same_tree(src: Path, dst: Path) -> None:
    for f in src.rglob("*"):
        if f.is_file():
            assert (dst / f.relative_to(src)).read_bytes() == f.read_bytes(), f


# ----------------------------------------------------------------------------- (a) end to end
def test_fetch_end_to_end_then_locate_and_open(mirror, tmp_path):
    srv, base = mirror()
    data_root = tmp_path / "data"
    t0 = time.monotonic()
    result = fetch_benchmarks(["cifar10", "food101"], data_root, mirror=base, url_template=PLAIN_TEMPLATE,
                              progress=False)
    took = time.monotonic() - t0
    r = result["tasks"]["cifar10"]
    assert r["status"] == "fetched" and r["shards"] == SHARDS and r["files"] == 3 + SHARDS
    assert result["tasks"]["food101"]["status"] == "no mirror"
    assert result["tasks"]["food101"]["message"].startswith("no public mirror: ")
    _same_tree(mirror.root / REPO, data_root / REPO)
    assert not list(data_root.rglob("*.part"))
    assert srv.gets(f"/{REPO}/dataset_type.txt") == 1  # optional: 404 recorded, not an error

    loc = locate("cifar10", [data_root])
    assert loc is not None and loc.kind == "wds" and loc.path == data_root / REPO
    data = open_task_data(get_task("cifar10"), loc)
    assert len(data.dataset) == SAMPLES and data.classnames == list(get_task("cifar10").classnames)
    image, label = data.dataset[11]
    assert image.size == (32, 32) and label == 11 % 10

    # again: everything verified from the manifest, not one request
    n_requests = len(srv.log)
    again = fetch_benchmarks(["cifar10"], data_root, mirror=base, url_template=PLAIN_TEMPLATE, progress=False)
    assert again["tasks"]["cifar10"]["status"] == "already complete"
    assert again["tasks"]["cifar10"]["verified"] == 3 + SHARDS
    assert len(srv.log) == n_requests
    print(f"\nfetch cifar10 stand-in ({SHARDS} tars, {r['bytes']} bytes): {took:.2f} s; "
          f"re-run verified in {again['seconds']:.2f} s")


@pytest.mark.slow
def test_fetched_benchmark_evaluates(mirror, tmp_path):
    """The fetched data is what the eval stage scores: a small random model over the suite runner."""
    import torch

    import clip
    from data.eval.suite import evaluate_suite

    _, base = mirror()
    data_root = tmp_path / "data"
    fetch_benchmarks(["cifar10"], data_root, mirror=base, url_template=PLAIN_TEMPLATE, progress=False)
    names = list(get_task("cifar10").classnames)
    tok = clip.train_caption_tokenizer([f"a photo of a {n}." for n in names] * 3, 300)
    torch.manual_seed(0)
    model = clip.create_model("tiny", vocab_size=tok.vocab_size, context_length=24, image_size=32, patch_size=8)
    report = evaluate_suite(model, tok, ["cifar10"], [data_root], tmp_path / "eval", batch_size=16, progress=False)
    t = report["tasks"]["cifar10"]
    assert t["status"] == "ran" and t["layout"] == "wds" and t["n"] == SAMPLES and 0.0 <= t["value"] <= 1.0


def test_cmd_benchmarks_fetch_prints_a_table(mirror, tmp_path, capsys):
    _, base = mirror()
    assert cmd_benchmarks_fetch("cifar10,food101", str(tmp_path / "d"), base, PLAIN_TEMPLATE, 4) == 0
    out = capsys.readouterr().out
    print(out)
    assert "cifar10" in out and "fetched" in out and "wds: " in out
    assert "no mirror" in out and "1 fetched, 0 already complete, 1 without a public mirror, 0 failed" in out
    with pytest.raises(UserError, match="unknown benchmark task 'cifar11'"):
        cmd_benchmarks_fetch("cifar11", str(tmp_path / "d"), base, PLAIN_TEMPLATE, 4)
    with pytest.raises(UserError, match="is not an http"):
        cmd_benchmarks_fetch("cifar10", str(tmp_path / "d"), "ftp://x", PLAIN_TEMPLATE, 4)
    with pytest.raises(UserError, match="no \\{path\\}"):
        cmd_benchmarks_fetch("cifar10", str(tmp_path / "d"), base, "{mirror}/{repo}", 4)
    with pytest.raises(UserError, match="--workers 0"):
        cmd_benchmarks_fetch("cifar10", str(tmp_path / "d"), base, PLAIN_TEMPLATE, 0)


def test_wrong_template_fails_per_task_with_a_hint(mirror, tmp_path):
    _, base = mirror()  # a plain tree addressed the Hugging Face way: every file 404s
    with pytest.raises(UserError) as err:
        cmd_benchmarks_fetch("cifar10", str(tmp_path / "d"), base, "{mirror}/{repo}/resolve/main/{path}", 2)
    msg = str(err.value)
    assert "\n" not in msg and "HTTP 404" in msg and "--url-template '{mirror}/{repo}/{path}'" in msg
    assert _final_files(tmp_path / "d") == []


def test_hugging_face_layout_redirects_and_published_sha256(mirror, tmp_path):
    """The default template against a Hugging Face style server: /resolve/main/ redirects to a CDN path,
    tars publish their sha256 in X-Linked-Etag, which is checked; a mismatch never lands on disk."""
    srv, base = mirror(hf=True)
    data_root = tmp_path / "data"
    r = fetch_benchmarks(["cifar10"], data_root, mirror=base, progress=False)["tasks"]["cifar10"]
    assert r["status"] == "fetched"
    _same_tree(mirror.root / REPO, data_root / REPO)
    assert srv.gets(f"/cdn/{REPO}/test/0.tar") == 1

    srv.published[f"/{REPO}/resolve/main/test/1.tar"] = "0" * 64
    other = tmp_path / "other"
    r = fetch_benchmarks(["cifar10"], other, mirror=base, progress=False, retries=1)["tasks"]["cifar10"]
    assert r["status"] == "failed" and "does not match the published 000000000000" in r["message"]
    assert "/test/1.tar" in r["message"] and "(2 attempts)" in r["message"]
    assert not (other / REPO / "test" / "1.tar").exists() and not (other / REPO / "test" / "1.tar.part").exists()


# ----------------------------------------------------------------------------- (b) interrupted
_CHILD = """
import sys
from data.acquire.benchmarks import PLAIN_TEMPLATE, fetch_benchmarks
fetch_benchmarks(["cifar10"], sys.argv[1], mirror=sys.argv[2], url_template=PLAIN_TEMPLATE, workers=1,
                 progress=False)
"""


def _stall(release: threading.Event):
    def hook(handler, body):
        if handler.server.gets(handler.path) > 1:
            return False  # only the first GET stalls
        handler.wfile.write(body[:STALL_AFTER])
        handler.wfile.flush()
        release.wait(30)
        return True

    return hook


@pytest.mark.slow
def test_killed_fetch_resumes_with_range(mirror, tmp_path):
    srv, base = mirror()
    release = threading.Event()
    srv.hooks[f"/{REPO}/test/1.tar"] = _stall(release)
    data_root = tmp_path / "data"
    part = data_root / REPO / "test" / "1.tar.part"
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(data_root), base], cwd=Path(__file__).parents[1])
    try:
        deadline = time.monotonic() + 30
        while not (part.is_file() and part.stat().st_size >= STALL_AFTER):
            assert child.poll() is None and time.monotonic() < deadline, "child ended before stalling"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        release.set()
        if child.poll() is None:
            child.kill()
    assert not (data_root / REPO / "test" / "1.tar").exists()  # never under its final name half-written
    assert (data_root / REPO / "test" / "0.tar").is_file()

    before = {p: srv.gets(f"/{REPO}/{p}") for p in ("classnames.txt", "zeroshot_classification_templates.txt",
                                                     "dataset_type.txt", "test/nshards.txt", "test/0.tar",
                                                     "test/1.tar", "test/2.tar")}
    assert before["test/2.tar"] == 0 and before["test/1.tar"] == 1
    result = fetch_benchmarks(["cifar10"], data_root, mirror=base, url_template=PLAIN_TEMPLATE, progress=False)
    r = result["tasks"]["cifar10"]
    assert r["status"] == "fetched" and r["resumed"] == 1
    for p, n in before.items():
        expected = {"test/1.tar": 1, "test/2.tar": 1}.get(p, 0)
        assert srv.gets(f"/{REPO}/{p}") - n == expected, p  # finished files are not asked for again
    assert srv.ranges_seen(f"/{REPO}/test/1.tar") == [f"bytes={STALL_AFTER}-"]
    src = mirror.root / REPO / "test" / "1.tar"
    assert r["bytes_downloaded"] == (src.stat().st_size - STALL_AFTER) + (mirror.root / REPO / "test/2.tar").stat().st_size
    _same_tree(mirror.root / REPO, data_root / REPO)
    assert len(open_task_data(get_task("cifar10"), locate("cifar10", [data_root])).dataset) == SAMPLES


def _hang_up_once(handler, body):
    if handler.server.gets(handler.path) > 1:
        return False
    handler.wfile.write(body[:STALL_AFTER])  # then the handler returns and HTTP/1.0 closes: a short body
    return True


@pytest.mark.parametrize("ranges", [True, False], ids=["server-resumes", "server-ignores-range"])
def test_short_body_is_retried_with_range(mirror, tmp_path, ranges):
    srv, base = mirror(ranges=ranges)
    srv.hooks[f"/{REPO}/test/1.tar"] = _hang_up_once
    data_root = tmp_path / "data"
    r = fetch_benchmarks(["cifar10"], data_root, mirror=base, url_template=PLAIN_TEMPLATE,
                         progress=False)["tasks"]["cifar10"]
    assert r["status"] == "fetched"
    assert srv.gets(f"/{REPO}/test/1.tar") == 2
    assert srv.ranges_seen(f"/{REPO}/test/1.tar") == [f"bytes={STALL_AFTER}-"]
    assert r["resumed"] == (1 if ranges else 0)  # a 200 answer to the Range: the whole file again
    _same_tree(mirror.root / REPO, data_root / REPO)


def test_stalled_transfer_times_out_and_resumes(mirror, tmp_path):
    srv, base = mirror()
    release = threading.Event()
    path = f"/{REPO}/test/1.tar"
    srv.hooks[path] = _stall(release)
    dest = tmp_path / "1.tar"
    try:
        t0 = time.monotonic()
        r = download_files([(base + path, dest)], read_timeout=0.5, manifest=tmp_path / "m.json", progress=False)
        took = time.monotonic() - t0
    finally:
        release.set()
    assert r["status"] == {str(dest): "resumed"} and took < 5
    assert srv.ranges_seen(path) == [f"bytes={STALL_AFTER}-"]
    assert dest.read_bytes() == (mirror.root / path.lstrip("/")).read_bytes()


# ----------------------------------------------------------------------------- (c) corrupted
def test_corrupt_file_is_detected_and_fetched_again(mirror, tmp_path):
    srv, base = mirror()
    data_root = tmp_path / "data"
    fetch_benchmarks(["cifar10"], data_root, mirror=base, url_template=PLAIN_TEMPLATE, progress=False)
    tar0 = data_root / REPO / "test" / "0.tar"
    raw = bytearray(tar0.read_bytes())
    raw[5000] ^= 0xFF  # same size, one byte different
    tar0.write_bytes(bytes(raw))
    (data_root / REPO / "test" / "2.tar").write_bytes(b"truncated")
    gets = {p: srv.gets(f"/{REPO}/test/{p}") for p in ("0.tar", "1.tar", "2.tar")}
    r = fetch_benchmarks(["cifar10"], data_root, mirror=base, url_template=PLAIN_TEMPLATE,
                         progress=False)["tasks"]["cifar10"]
    assert r["status"] == "fetched" and r["refetched"] == 2 and r["verified"] == 4
    assert {p: srv.gets(f"/{REPO}/test/{p}") - n for p, n in gets.items()} == {"0.tar": 1, "1.tar": 0, "2.tar": 1}
    _same_tree(mirror.root / REPO, data_root / REPO)


def test_download_files_contract(mirror, tmp_path):
    """The generic downloader: optional 404s, non-optional 404s, no manifest, and bad input."""
    srv, base = mirror()
    out = tmp_path / "out"
    r = download_files([(f"{base}/{REPO}/classnames.txt", out / "c.txt"),
                        (f"{base}/{REPO}/nope.txt", out / "nope.txt", True)], manifest=None, progress=False)
    assert (r["downloaded"], r["missing_optional"]) == (1, 1) and not (out / "nope.txt").exists()
    r = download_files([(f"{base}/{REPO}/classnames.txt", out / "c.txt")], manifest=None, progress=False)
    assert r["present"] == 1  # without a manifest, a file under its final name is complete
    with pytest.raises(DownloadError, match=r"cannot fetch http://127\.0\.0\.1:\d+/missing\.txt: HTTP 404") as e:
        download_files([(f"{base}/missing.txt", out / "m.txt")], manifest=out / "m.json", progress=False)
    assert not isinstance(e.value, HostUnreachable) and not (out / "m.txt").exists()
    with pytest.raises(ValueError, match="not an http"):
        download_files([("file:///etc/passwd", out / "x")], progress=False)


def test_proxy_from_environment(mirror, tmp_path, monkeypatch):
    """http_proxy is used for non-loopback hosts (here the mirror server plays the proxy, so the
    made-up host is never resolved); loopback hosts and no_proxy entries go direct."""
    from data.common.http import proxy_for

    srv, base = mirror()
    for var in ("no_proxy", "NO_PROXY", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("http_proxy", base)
    monkeypatch.setenv("https_proxy", "http://user:pw@proxy.example:3128")
    host, port, headers = proxy_for("https", "huggingface.co")
    assert (host, port, headers["Proxy-Authorization"]) == ("proxy.example", 3128, "Basic dXNlcjpwdw==")
    assert proxy_for("http", "127.0.0.1") is None and proxy_for("http", "localhost") is None
    r = download_files([(f"http://mirror.example/{REPO}/classnames.txt", tmp_path / "c.txt")], progress=False)
    assert r["downloaded"] == 1 and (tmp_path / "c.txt").read_bytes() == (mirror.root / REPO / "classnames.txt").read_bytes()
    assert srv.gets(f"/{REPO}/classnames.txt") == 1
    monkeypatch.setenv("no_proxy", "huggingface.co")
    assert proxy_for("https", "huggingface.co") is None


# ----------------------------------------------------------------------------- (d) unreachable
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _assert_fails_fast(tmp_path, base: str, port_text: str, reason: str) -> float:
    data_root = tmp_path / "data"
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        cmd_benchmarks_fetch("cifar10,mnist", str(data_root), base, PLAIN_TEMPLATE, 4)
    took = time.monotonic() - t0
    msg = str(err.value)
    print(f"\n{took:.2f} s: error: {msg}")
    assert took < 15
    assert "\n" not in msg and msg.startswith(f"cannot reach {port_text} ({reason}") and "while fetching " in msg
    assert not data_root.exists() or _final_files(data_root) == []
    return took


def test_closed_port_fails_fast(tmp_path):
    port = _closed_port()
    took = _assert_fails_fast(tmp_path, f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", "connection refused")
    assert took < 3


def test_silent_server_fails_fast(tmp_path):
    silent = socket.socket()  # accepts connections (the kernel does) and never reads or writes
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    port = silent.getsockname()[1]
    try:
        _assert_fails_fast(tmp_path, f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", "no HTTP response within 5s")
    finally:
        silent.close()


def test_connect_timeout_fails_fast(tmp_path):
    """A listener whose accept queue is full drops new SYNs (Linux): the connect itself times out."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.2)
        t0 = time.monotonic()
        with pytest.raises(HostUnreachable) as err:
            download_files([(f"http://127.0.0.1:{port}/x.tar", tmp_path / "x.tar")], connect_timeout=1.0,
                           progress=False)
        took = time.monotonic() - t0
        print(f"\n{took:.2f} s: error: {err.value}")
        assert took < 5 and str(err.value).startswith(f"cannot reach 127.0.0.1:{port} (")
        assert "(connect timeout after 1s)" in str(err.value) or "(connection refused)" in str(err.value)
        assert list(tmp_path.iterdir()) == []
    finally:
        for c in fillers:
            c.close()
        srv.close()


def test_unresolvable_host_fails_fast(tmp_path, monkeypatch):
    real = socket.getaddrinfo

    def fake(host, *args, **kwargs):  # no DNS traffic: the lookup fails here
        if host == "mirror.invalid":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    _assert_fails_fast(tmp_path, "http://mirror.invalid:8080", "mirror.invalid:8080", "name resolution failed")


# ----------------------------------------------------------------------------- (e) URL lists
def _url_lists(web_base: str, images: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows = [(web_base.rstrip("/") + path, e.caption) for path, e in images.items() if e.fault is None]
    half = len(rows) // 2
    return (pd.DataFrame(rows[:half], columns=["url", "caption"]),
            pd.DataFrame(rows[half:], columns=["url", "caption"]))


@pytest.mark.slow
@pytest.mark.integration
def test_url_lists_feed_harvest_and_crawl(mirror, tmp_path, capsys):
    from data.crawl import crawl
    from data.crawl.fetch import FetchPolicy
    from data.harvest import harvest_url_list
    from data.synthetic import SiteSpec, SyntheticWeb

    srv, base = mirror()
    lists = mirror.root / "lists"
    with SyntheticWeb(SiteSpec(seed=3, n_pages=2, images_per_page=10, fault_rate=0.0)) as web:
        first, second = _url_lists(web.url, web.site.images)
        (lists / "meta").mkdir(parents=True)
        first.to_parquet(lists / "meta" / "part-00000.parquet", index=False)
        with gzip.open(lists / "cc.tsv.gz", "wt", encoding="utf-8") as fh:
            second.to_csv(fh, sep="\t", index=False)
        (tmp_path / "index.txt").write_text("# shards\nmeta/part-00000.parquet\n\ncc.tsv.gz\n")

        out = tmp_path / "lists"
        assert cmd_urls_fetch(f"{base}/lists", [], str(tmp_path / "index.txt"), str(out), 2,
                              url_col="url", caption_col="caption") == 0
        printed = capsys.readouterr().out
        assert "2 file(s)" in printed and "2 downloaded" in printed and "harvest.urls=" in printed
        assert sorted(p.name for p in out.iterdir()) == [FETCH_MANIFEST, "cc.tsv.gz", "meta__part-00000.parquet"]
        assert (out / "cc.tsv.gz").read_bytes() == (lists / "cc.tsv.gz").read_bytes()
        again = fetch_url_lists(f"{base}/lists", ["meta/part-00000.parquet", "cc.tsv.gz"], out, progress=False)
        assert again["verified"] == 2 and again["bytes_downloaded"] == 0

        counts = harvest_url_list([out], tmp_path / "harvest", url_col="url", caption_col="caption")
        cands = pd.read_parquet(tmp_path / "harvest" / "candidates.parquet")
        expected = pd.concat([first, second])
        assert counts["files"] == 2 and counts["rows"] == len(expected)
        assert set(zip(cands.url, cands.caption)) == set(zip(expected.url, expected.caption))

        policy = FetchPolicy(timeout=2.0, deadline=8.0, allowed_addresses=("127.0.0.1",))
        t0 = time.monotonic()
        crawled = crawl(tmp_path / "harvest" / "candidates.parquet", tmp_path / "crawl", shard_size=64,
                        processes=1, threads=4, policy=policy)
        print(f"\ncrawl of {len(cands)} candidates from fetched lists: {time.monotonic() - t0:.1f} s, "
              f"successes={crawled['successes']}")
        assert crawled["successes"] == len(cands)


def test_urls_fetch_rejects_bad_paths(tmp_path):
    for bad, match in (("../x.parquet", "not allowed"), ("/abs.parquet", "relative"),
                       ("README.txt", "not a URL list"), ("http://h/x.parquet", "relative")):
        with pytest.raises(UserError, match=match):
            cmd_urls_fetch("http://127.0.0.1:9", [bad], None, str(tmp_path / "o"), 2)
    with pytest.raises(UserError, match="no files named"):
        cmd_urls_fetch("http://127.0.0.1:9", [], None, str(tmp_path / "o"), 2)
    with pytest.raises(UserError, match="does not exist"):
        cmd_urls_fetch("http://127.0.0.1:9", [], str(tmp_path / "none.txt"), str(tmp_path / "o"), 2)
    with pytest.raises(UserError, match="not an http"):
        cmd_urls_fetch("127.0.0.1:9", ["a.parquet"], None, str(tmp_path / "o"), 2)


def test_urls_and_benchmarks_fetch_are_subcommands_with_their_own_flags(capsys):
    from flows.cli import build_parser

    p = build_parser()
    args = p.parse_args(["urls", "fetch", "http://h/x", "a.parquet", "b.tsv.gz", "--out", "o", "--workers", "2"])
    assert (args.command, args.action, args.base_url, args.files, args.out, args.workers, args.list) == (
        "urls", "fetch", "http://h/x", ["a.parquet", "b.tsv.gz"], "o", 2, None)
    args = p.parse_args(["benchmarks", "fetch", "--tasks", "cifar10", "--data-root", "d", "--mirror", "http://127.0.0.1:9"])
    assert (args.tasks, args.data_root, args.mirror, args.url_template, args.workers) == (
        "cifar10", "d", "http://127.0.0.1:9", None, 4)  # None: the command fills in bf.HF_TEMPLATE
    for wrong in (["benchmarks", "fetch", "--data-root", "d"],  # --tasks is required
                  ["benchmarks", "list", "--tasks", "cifar10"],  # a fetch flag on list
                  ["benchmarks", "convert", "--folder", "f", "--mirror", "m", "--out", "o"],
                  ["urls", "fetch", "http://h/x", "--data-root", "d", "--out", "o"]):
        with pytest.raises(SystemExit) as exit_:
            p.parse_args(wrong)
        assert exit_.value.code == 2, wrong
    assert "usage:" in capsys.readouterr().err
