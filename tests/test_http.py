"""data.common.http, the one HTTP policy layer: Retry-After in both forms, redirects walked once, robots.txt
conventions (RFC 9309), the address classifier and allowlist (ports included), and every client (pages,
images, downloads) sending one user agent through it."""

from __future__ import annotations

import io
import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from support.policies import loopback

from data.acquire.download import download_files
from data.common.http import (
    DEFAULT_USER_AGENT,
    AddressGuard,
    HttpClient,
    HttpError,
    HttpPolicy,
    Redirect,
    RobotsCache,
    classify_address,
    follow_redirects_with,
    parse_retry_after,
)
from data.crawl.fetch import Fetcher, FetchPolicy
from data.harvest import harvest_site


def test_retry_after_both_forms():
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30.0)
    assert parse_retry_after(formatdate(now - 30, usegmt=True), now=now) == 0.0  # already past
    for unreadable in (None, "", "soon", "-5", "1.5"):
        assert parse_retry_after(unreadable) is None


def test_redirect_walker_follows_detects_loops_and_limits():
    chain = {"a": Redirect("b"), "b": Redirect("c"), "c": "done"}
    assert follow_redirects_with("a", chain.__getitem__, max_redirects=5) == "done"
    with pytest.raises(HttpError) as err:
        follow_redirects_with("x", {"x": Redirect("y"), "y": Redirect("x")}.__getitem__, max_redirects=5)
    assert err.value.reason == "redirect_loop"
    hops = []

    def endless(url: str) -> Redirect:
        hops.append(url)
        return Redirect(f"{url}+")

    with pytest.raises(HttpError) as err:
        follow_redirects_with("u", endless, max_redirects=3)
    assert err.value.reason == "too_many_redirects" and len(hops) == 4  # the first request + 3 redirects


def test_proxies_need_the_guard_off():
    with pytest.raises(ValueError, match="guard=False"):
        HttpPolicy(use_env_proxies=True)
    HttpPolicy(guard=False, use_env_proxies=True)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 10)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


class _Handler(BaseHTTPRequestHandler):
    """/page.html, /img.jpg, /file.bin (503 with an HTTP-date Retry-After once), /robots.txt (status from
    the server's robots_status); records (path, user agent)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        srv = self.server
        srv.seen.append((self.path, self.headers.get("User-Agent", "")))
        if self.path == "/robots.txt":
            return self._send(srv.robots_status, b"User-agent: *\nDisallow: /private/\n", "text/plain")
        if self.path == "/page.html":
            return self._send(200, b'<html><body><img src="/img.jpg" alt="a red circle"></body></html>', "text/html")
        if self.path == "/file.bin":
            srv.file_gets += 1
            if srv.file_gets == 1:
                self.send_response(503)
                self.send_header("Retry-After", formatdate(time.time() + 2, usegmt=True))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            return self._send(200, b"x" * 1000, "application/octet-stream")
        return self._send(200, JPEG, "image/jpeg")  # a real image: the Fetcher refuses what Pillow cannot size

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.seen, srv.file_gets, srv.robots_status = [], 0, 200
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv, f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()


def test_downloads_honour_an_http_date_retry_after(server, tmp_path):
    srv, base = server
    t0 = time.monotonic()
    result = download_files([(f"{base}/file.bin", tmp_path / "f.bin")], retries=1, progress=False)
    assert result["downloaded"] == 1 and srv.file_gets == 2
    assert time.monotonic() - t0 >= 0.9  # waited until the date the server named (1-2 s away)


def test_pages_images_and_downloads_share_the_user_agent(server, tmp_path):
    srv, base = server
    harvest_site(f"{base}/page.html", tmp_path / "h", policy=loopback(5))
    Fetcher(FetchPolicy(allowed_addresses=("127.0.0.1",))).get(f"{base}/img.jpg")
    download_files([(f"{base}/img.jpg", tmp_path / "d.jpg")], progress=False)
    assert {path for path, _ in srv.seen} >= {"/robots.txt", "/page.html", "/img.jpg"}
    assert {agent for _, agent in srv.seen} == {DEFAULT_USER_AGENT}


# RFC 9309: 4xx (401 and 403 too) means no robots.txt, everything allowed; 5xx means keep out for now.
@pytest.mark.parametrize(("status", "private_allowed", "public_allowed"),
                         [(200, False, True), (401, True, True), (403, True, True), (404, True, True),
                          (500, False, False), (503, False, False)])
def test_robots_conventions_are_one_rule(server, status, private_allowed, public_allowed):
    srv, base = server
    srv.robots_status = status
    robots = RobotsCache(HttpClient(loopback(5)), deadline_seconds=5)
    assert robots.allowed(f"{base}/private/a.jpg") is private_allowed
    assert robots.allowed(f"{base}/public.jpg") is public_allowed
    assert [p for p, _ in srv.seen].count("/robots.txt") == 1  # once per origin (5xx: not again within the backoff)


@pytest.mark.parametrize(
    "address, expected",
    [
        ("fec0::1", "site_local"), ("feff:ffff::1", "site_local"),  # deprecated site-local, fec0::/10
        ("2002:0a00:0001::1", "private"),  # 6to4 of 10.0.0.1
        ("2002:7f00:0001::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "cloud_metadata"),  # 6to4 of 169.254.169.254
        ("2002:6440:0001::1", "shared_address_space"),  # 6to4 of 100.64.0.1
        ("2002:0808:0808::1", None),  # 6to4 of 8.8.8.8: public
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo, client 10.0.0.1 (obfuscated)
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1
        ("2001:0:7f00:1:8000:63bf:f7f7:f7f7", "loopback"),  # Teredo, server 127.0.0.1, client 8.8.8.8
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b::7f00:1", "loopback"),  # NAT64 of 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "cloud_metadata"),  # NAT64 of 169.254.169.254
        ("::ffff:127.0.0.1", "loopback"), ("::1", "loopback"), ("fd12::1", "private"),
        ("2606:4700:4700::1111", None), ("8.8.8.8", None),
    ],
)
def test_classifier_sees_through_ipv6_wrappers(address, expected):
    assert classify_address(address) == expected


def test_allowlist_entries_with_a_port_allow_only_that_port():
    guard = AddressGuard(["127.0.0.1:8080", "[::1]:9000", "localhost:7000", "10.0.0.0/8", "[fd00::/8]:443",
                          "192.168.0.0/16:8443"])
    assert guard.check("127.0.0.1", 8080, 1) == "127.0.0.1"
    with pytest.raises(HttpError, match="private_address") as err:
        guard.check("127.0.0.1", 8081, 1)
    assert "allowed on port 8080 only" in err.value.detail
    assert guard.check("::1", 9000, 1) == "::1"
    with pytest.raises(HttpError, match="private_address"):
        guard.check("::1", 80, 1)
    assert guard.check("10.1.2.3", 1, 1) == guard.check("10.1.2.3", 65535, 1) == "10.1.2.3"  # no port: any
    assert guard.check("fd00::5", 443, 1) == "fd00::5"
    with pytest.raises(HttpError, match="private_address"):
        guard.check("fd00::5", 80, 1)
    assert guard.check("192.168.1.1", 8443, 1) == "192.168.1.1"
    with pytest.raises(HttpError, match="private_address"):
        guard.check("192.168.1.1", 443, 1)
    guard.check("localhost", 7000, 5)  # the name, on its port, whatever it resolves to
    with pytest.raises(HttpError, match="private_address"):
        guard.check("localhost", 7001, 5)
    with pytest.raises(HttpError, match="private_address"):
        guard.check("127.0.0.2", 8080, 1)  # the port is allowed on 127.0.0.1 only


def test_plain_allowlist_entries_mean_any_port():
    guard = AddressGuard(["127.0.0.1", "::1", "[::2]"])
    assert guard.check("127.0.0.1", 1, 1) == guard.check("127.0.0.1", 8080, 1) == "127.0.0.1"
    assert guard.check("::1", 443, 1) == "::1" and guard.check("::2", 80, 1) == "::2"


@pytest.mark.parametrize("entry", ["127.0.0.1:0", "127.0.0.1:70000", "host name", "10.0.0.0/40", "[::1]:x"])
def test_malformed_allowlist_entries_are_refused(entry):
    with pytest.raises(ValueError, match="allowed_addresses|expected"):
        AddressGuard([entry])


def test_urls_a_page_wrote_raw_are_sent_as_ascii_or_refused_as_unsupported():
    """A non-ASCII path or host, or a Location urllib cannot parse, must end as a reason code, never as
    an exception of http.client's that escapes the crawl."""
    from data.common.http import redirect_target, split_url

    assert split_url("http://a/caf\u00e9 x?q=\u00e9&b=%20") == ("http", "a", 80, "/caf%C3%A9%20x?q=%C3%A9&b=%20")
    assert split_url("http://caf\u00e9.example/x")[1] == "xn--caf-dma.example"
    for bad in ("http://[x/", "http://[example.com]/"):
        with pytest.raises(HttpError, match="unsupported_url"):
            split_url(bad)
    with pytest.raises(HttpError, match="unsupported_url"):
        redirect_target("http://a/", "http://[x/")
