"""data.crawl.fetch: the address guard, caps, deadline and politeness of the image fetcher, against a
loopback server on 127.0.0.1 (allowed) and a counting server on 127.0.0.2 (forbidden)."""

from __future__ import annotations

import io
import pickle
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from data.common.http import classify_address
from data.crawl.fetch import Fetcher, FetchError, FetchPolicy


def _jpeg(size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _noisy_jpeg_cut_after_header() -> bytes:
    """A JPEG whose header (up to the start of scan) is intact but whose scan data is cut short."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 48), bytes((i * 37) % 251 for i in range(64 * 48 * 3))).save(buf, "JPEG")
    data = buf.getvalue()
    return data[: data.index(b"\xff\xda") + 200]


TRUNCATED_JPEG = _noisy_jpeg_cut_after_header()
# Radiance HDR: OpenCV decodes it (up to 2^30 pixels), Pillow cannot even read its size.
RADIANCE_HDR = b"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y 8 +X 8\n" + bytes([128, 64, 32, 129]) * 64


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64


def _serve(host: str, handler: type) -> tuple[_Server, str]:
    srv = _Server((host, 0), handler)
    srv.hits = Counter()  # type: ignore[attr-defined]
    srv.busy = []  # type: ignore[attr-defined]
    srv.starts = []  # type: ignore[attr-defined]
    srv.lock = threading.Lock()  # type: ignore[attr-defined]
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return srv, f"http://{host}:{srv.server_address[1]}"


class _Private(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(JPEG)))
        self.end_headers()
        self.wfile.write(JPEG)

    def log_message(self, *args) -> None:
        pass


class _Public(BaseHTTPRequestHandler):
    private_base = ""

    def log_message(self, *args) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, ctype="image/jpeg"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        srv = self.server
        path = self.path
        with srv.lock:
            srv.hits[path] += 1
            n = srv.hits[path]
            srv.starts.append((path, time.monotonic()))
        try:
            self._route(path, n)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _route(self, path: str, n: int) -> None:
        if path == "/robots.txt":
            return self._send(200, b"User-agent: *\nDisallow: /private/\n", ctype="text/plain")
        if path.startswith("/slowish"):
            began = time.monotonic()
            time.sleep(0.2)
            # Stamped before the body goes out: the client holds its connection slot for at
            # least [began, now], so overlaps of these intervals are a lower bound on its concurrency.
            with self.server.lock:
                self.server.busy.append((began, time.monotonic()))
            return self._send(200, JPEG)
        if path.startswith(("/ok", "/private/")):
            return self._send(200, JPEG)
        if path == "/to-private":
            return self._send(302, headers={"Location": f"{self.private_base}/stolen.jpg"})
        if path == "/hop-to-private":
            return self._send(302, headers={"Location": "/to-private"})
        if path in ("/loop-a", "/loop-b"):
            return self._send(302, headers={"Location": "/loop-b" if path == "/loop-a" else "/loop-a"})
        if path.startswith("/chain/"):
            return self._send(302, headers={"Location": f"/chain/{int(path.rsplit('/', 1)[1]) + 1}"})
        if path == "/relative-redirect":
            return self._send(301, headers={"Location": "ok-after-redirect.jpg"})
        if path == "/429-once":
            if n == 1:
                return self._send(429, b"slow down", {"Retry-After": "1"}, ctype="text/plain")
            return self._send(200, JPEG)
        if path == "/503-backoff":
            if n <= 2:
                return self._send(503, b"busy", ctype="text/plain")
            return self._send(200, JPEG)
        if path == "/429-forever":
            return self._send(429, b"no", {"Retry-After": "3600"}, ctype="text/plain")
        if path == "/huge-length":
            self._send(200, b"", {"Content-Length": str(50 << 30)})
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
            return None
        if path == "/huge-body":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(64):
                self.wfile.write(b"\0" * 65536)
            return None
        if path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.end_headers()
            for _ in range(600):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.1)
            return None
        if path == "/stall":
            time.sleep(5)
            return self._send(200, JPEG)
        if path == "/short":
            self._send(200, JPEG[:100], {"Content-Length": str(len(JPEG))})
            self.close_connection = True
            return None
        if path == "/big-pixels.png":
            buf = io.BytesIO()
            Image.new("L", (200, 200)).save(buf, "PNG")
            return self._send(200, buf.getvalue(), ctype="image/png")
        if path == "/html-as-jpeg":
            return self._send(200, b"<!doctype html><h1>Image temporarily unavailable</h1>")
        if path == "/radiance.hdr":
            return self._send(200, RADIANCE_HDR, ctype="image/vnd.radiance")
        if path == "/truncated.jpg":
            return self._send(200, TRUNCATED_JPEG)
        if path == "/noai":
            return self._send(200, JPEG, {"X-Robots-Tag": "noai"})
        if path == "/noai-for-us":
            return self._send(200, JPEG, {"X-Robots-Tag": "otherbot: noindex, witclip: noimageai"})
        if path == "/noai-for-others":
            return self._send(200, JPEG, {"X-Robots-Tag": "otherbot: noai"})
        if path == "/gone":
            return self._send(404, b"nope", ctype="text/html")
        return self._send(500, b"?", ctype="text/html")


@pytest.fixture(scope="module")
def servers():
    private, private_base = _serve("127.0.0.2", _Private)
    handler = type("Handler", (_Public,), {"private_base": private_base})
    public, base = _serve("127.0.0.1", handler)
    yield public, base, private
    for srv in (public, private):
        srv.shutdown()
        srv.server_close()


def _fetcher(**overrides) -> Fetcher:
    defaults = dict(timeout=1.0, deadline=2.0, allowed_addresses=("127.0.0.1",), backoff_base=0.2)
    return Fetcher(FetchPolicy(**{**defaults, **overrides}))


def _reason(fetcher: Fetcher, url: str) -> str:
    try:
        fetcher.get(url)
    except FetchError as err:
        return err.reason
    return "success"


@pytest.mark.parametrize(
    "address, expected",
    [
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"), ("127.0.0.2", "loopback"), ("::1", "loopback"),
        ("169.254.169.254", "cloud_metadata"), ("169.254.170.2", "cloud_metadata"),
        ("100.100.100.200", "cloud_metadata"), ("fd00:ec2::254", "cloud_metadata"),
        ("169.254.1.1", "link_local"), ("fe80::1", "link_local"), ("100.64.0.1", "shared_address_space"),
        ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"), ("fc00::1", "private"),
        ("::ffff:10.0.0.1", "private"), ("240.0.0.1", "reserved"), ("192.0.2.1", "private"),
        ("fec0::1", "site_local"), ("2002:a00:1::1", "private"), ("64:ff9b::7f00:1", "loopback"),
        ("8.8.8.8", None), ("1.1.1.1", None), ("2606:4700:4700::1111", None),
    ],
)
def test_classify_address(address, expected):
    assert classify_address(address) == expected


def test_check_host_guard_and_allowlist():
    guarded = Fetcher(FetchPolicy())
    for host in ("127.0.0.1", "127.0.0.2", "10.0.0.1", "169.254.169.254"):
        with pytest.raises(FetchError) as err:
            guarded.check_host(host, 80)  # numeric hosts: no DNS traffic, nothing is contacted
        assert err.value.reason == "private_address"
    assert Fetcher(FetchPolicy(allowed_addresses=("127.0.0.0/8",))).check_host("127.0.0.2", 80) == "127.0.0.2"
    assert Fetcher(FetchPolicy(allowed_addresses=("127.0.0.1",))).check_host("127.0.0.1", 80) == "127.0.0.1"
    with pytest.raises(FetchError, match="private_address"):
        Fetcher(FetchPolicy(allowed_addresses=("127.0.0.1",))).check_host("127.0.0.2", 80)


def test_allowlist_entry_with_a_port_allows_that_port_only(servers):
    public, base, _ = servers
    port = public.server_address[1]
    assert _fetcher(allowed_addresses=(f"127.0.0.1:{port}",)).get(f"{base}/ok.jpg") == JPEG
    assert _reason(_fetcher(allowed_addresses=(f"127.0.0.1:{port + 1}",)), f"{base}/ok.jpg") == "private_address"


def test_success_redirects_and_http_errors(servers):
    public, base, private = servers
    f = _fetcher()
    assert f.get(f"{base}/ok.jpg") == JPEG
    assert f.get(f"{base}/relative-redirect") == JPEG  # Location resolved against the request URL
    assert _reason(f, f"{base}/gone") == "http_404"
    assert _reason(f, f"{base}/broken") == "http_500"
    assert _reason(f, f"{base}/loop-a") == "redirect_loop"
    assert _reason(f, f"{base}/chain/0") == "too_many_redirects"
    assert public.hits["/chain/5"] == 1 and public.hits["/chain/6"] == 0  # max_redirects=5
    assert _reason(f, "ftp://127.0.0.1/x.jpg") == "unsupported_url"


def test_private_address_is_refused_directly_and_after_redirects(servers):
    public, base, private = servers
    f = _fetcher()
    private_url = f"http://127.0.0.2:{private.server_address[1]}/direct.jpg"
    assert _reason(f, private_url) == "private_address"
    assert _reason(f, f"{base}/to-private") == "private_address"
    assert _reason(f, f"{base}/hop-to-private") == "private_address"  # checked again on every hop
    assert sum(private.hits.values()) == 0
    assert public.hits["/to-private"] >= 1  # the public hop itself was fetched


def test_caps_and_deadline(servers):
    public, base, _ = servers
    f = _fetcher(max_bytes=1 << 20, max_pixels=10_000)
    assert _reason(f, f"{base}/huge-length") == "too_large"  # refused on the header, body unread
    assert _reason(f, f"{base}/huge-body") == "too_large"
    assert _reason(f, f"{base}/big-pixels.png") == "too_many_pixels"  # 200x200 > 10,000 pixels
    assert _reason(f, f"{base}/short") == "incomplete_body"
    assert _reason(f, f"{base}/html-as-jpeg") == "unidentified_image"  # images fail closed
    assert _reason(f, f"{base}/radiance.hdr") == "unidentified_image"  # no decoder Pillow cannot size
    assert f.get(f"{base}/truncated.jpg") == TRUNCATED_JPEG  # header intact: the decoder reports the rest
    t0 = time.monotonic()
    assert _reason(f, f"{base}/drip") == "deadline_exceeded"  # 1 byte / 0.1 s: never a socket timeout
    assert time.monotonic() - t0 < 2.0 + 0.5
    t0 = time.monotonic()
    assert _reason(f, f"{base}/stall") == "timeout"
    assert time.monotonic() - t0 < 1.0 + 0.5


def test_robots_txt_and_x_robots_tag(servers):
    public, base, _ = servers
    robots_before = public.hits["/robots.txt"]
    f = _fetcher()
    assert _reason(f, f"{base}/private/a.jpg") == "robots_disallowed"
    assert public.hits["/private/a.jpg"] == 0
    assert _reason(f, f"{base}/noai") == "x_robots_tag"
    assert _reason(f, f"{base}/noai-for-us") == "x_robots_tag"
    assert f.get(f"{base}/noai-for-others") == JPEG
    f.get(f"{base}/ok.jpg")
    assert public.hits["/robots.txt"] == robots_before + 1  # fetched once per host by a Fetcher
    assert _fetcher(robots_txt=False).get(f"{base}/private/b.jpg") == JPEG
    assert _fetcher(x_robots_directives=()).get(f"{base}/noai") == JPEG


def test_retry_after_and_backoff(servers):
    public, base, _ = servers
    f = _fetcher()
    t0 = time.monotonic()
    assert f.get(f"{base}/429-once") == JPEG
    assert time.monotonic() - t0 >= 0.95  # waited the 1 s it was asked to
    assert public.hits["/429-once"] == 2
    assert f.get(f"{base}/503-backoff") == JPEG  # no Retry-After: 0.2 s, then 0.4 s
    assert public.hits["/503-backoff"] == 3
    t0 = time.monotonic()
    assert _reason(f, f"{base}/429-forever") == "http_429"  # Retry-After 3600 > max_retry_after
    assert time.monotonic() - t0 < 1


def test_per_host_concurrency_and_rate(servers):
    public, base, _ = servers
    f = _fetcher(max_connections_per_host=2)
    threads = [threading.Thread(target=f.get, args=(f"{base}/slowish/{i}.jpg",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = sorted([(a, 1) for a, _ in public.busy] + [(b, -1) for _, b in public.busy])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert len(public.busy) == 8 and peak == 2

    f = _fetcher(max_requests_per_second_per_host=10.0)
    f.get(f"{base}/ok.jpg")  # robots.txt fetched first, outside the measurement
    public.starts.clear()
    threads = [threading.Thread(target=f.get, args=(f"{base}/ok-rate/{i}.jpg",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    starts = sorted(t for p, t in public.starts if p.startswith("/ok-rate"))
    assert len(starts) == 6 and starts[-1] - starts[0] >= 0.45  # 6 starts at <= 10/s span >= 0.5 s


def test_fetcher_pickles_as_its_policy(servers):
    _, base, _ = servers
    f = _fetcher(max_connections_per_host=3)
    f.get(f"{base}/ok.jpg")
    g = pickle.loads(pickle.dumps(f))
    assert g.policy == f.policy and g.get(f"{base}/ok.jpg") == JPEG
