"""A test-only loopback site with fixed routes, redirects included (never imported by witclip itself).

    with RouteServer({"/": html_page('<a href="/b">b</a>'), "/b": redirect("http://127.0.0.2:9/")}) as site:
        harvest_site(site.url, out, policy=loopback(5))
    assert site.log == ["/robots.txt", "/", "/b"]
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from data.synthetic import ThreadedServer

Route = tuple[int, list[tuple[str, str]], bytes]  # status, headers, body


def html_page(body: str, charset: str | None = "utf-8", *, encoded: bytes | None = None) -> Route:
    """A 200 text/html page around `body` (or exactly `encoded`), labelled with `charset` (None: no label)."""
    ctype = "text/html" + (f"; charset={charset}" if charset is not None else "")
    data = encoded if encoded is not None else f"<!doctype html><html><body>{body}</body></html>".encode()
    return 200, [("Content-Type", ctype)], data


def redirect(location: str, status: int = 302) -> Route:
    return status, [("Location", location), ("Content-Type", "text/plain")], b"moved"


class _Handler(BaseHTTPRequestHandler):
    server: "_RouteHTTPServer"

    def do_GET(self) -> None:  # noqa: N802
        owner = self.server.owner
        with owner._lock:
            owner._log.append(self.path)
        status, headers, body = owner.routes.get(self.path, (404, [("Content-Type", "text/plain")], b"not found"))
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _RouteHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: "RouteServer"):
        self.owner = owner
        super().__init__(address, _Handler)


class RouteServer(ThreadedServer):
    """Answers GET `path` (with its query) from `routes` (path -> (status, headers, body)), 404 otherwise,
    and logs every path asked for. Routes may be added after start (a redirect to a later server)."""

    _thread_name = "route-server"

    def __init__(self, routes: dict[str, Route] | None = None, host: str = "127.0.0.1", port: int = 0):
        self._address = (host, port)
        self.routes: dict[str, Route] = dict(routes or {})
        self._log: list[str] = []
        self._lock = threading.Lock()
        super().__init__()

    @property
    def log(self) -> list[str]:
        with self._lock:
            return list(self._log)

    def _make_server(self) -> _RouteHTTPServer:
        return _RouteHTTPServer(self._address, self)
