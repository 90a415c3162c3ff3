"""data.common.http, the one HTTP policy layer: Retry-After in both forms, redirects walked once, robots.txt
conventions, and every client (pages, images, downloads) sending one user agent through it."""

from __future__ import annotations

import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data.acquire.download import download_files
from data.common.http import (
    DEFAULT_USER_AGENT,
    HttpClient,
    HttpError,
    HttpPolicy,
    Redirect,
    RobotsCache,
    follow_redirects_with,
    parse_retry_after,
)
from data.crawl.fetch import Fetcher, FetchPolicy
from data.harvest import harvest_site
from support.policies import loopback


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
        return self._send(200, b"\xff\xd8\xff" + b"\0" * 100, "image/jpeg")

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


@pytest.mark.parametrize(("status", "allowed"), [(200, False), (401, False), (403, False), (404, True), (500, True)])
def test_robots_conventions_are_one_rule(server, status, allowed):
    srv, base = server
    srv.robots_status = status
    robots = RobotsCache(HttpClient(loopback(5)), deadline_seconds=5)
    assert robots.allowed(f"{base}/private/a.jpg") is allowed
    assert robots.allowed(f"{base}/public.jpg") is (status not in (401, 403))
    assert [p for p, _ in srv.seen].count("/robots.txt") == 1  # once per origin
