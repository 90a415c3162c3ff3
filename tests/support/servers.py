"""Test-only HTTP servers (never imported by witclip itself)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

from data.synthetic import ThreadedServer, encode_jpeg


class _CountingHandler(BaseHTTPRequestHandler):
    server: "_CountingHTTPServer"
    server_version = "witclip-counting/1.0"

    def parse_request(self) -> bool:
        # Count every well-formed request whatever its method, before any do_* runs.
        parsed = super().parse_request()
        if parsed:
            self.server.owner._record(self.command, self.path)
        return parsed

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        body = self.server.owner.body
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _CountingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: "CountingServer"):
        self.owner = owner
        super().__init__(address, _CountingHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.owner._connected()
        return True


class CountingServer(ThreadedServer):
    """A host a crawler must never reach (say, a private address): answers and counts.

    Any GET or HEAD gets 200 with a tiny JPEG, so a crawler that does get through
    "succeeds" and the test sees it in `count` (requests) and `connections` (TCP
    connections accepted, even ones that never sent a request).

    >>> with CountingServer("127.0.0.2") as private:
    ...     web = SyntheticWeb(spec, private_target=private.url)
    """

    def __init__(self, host: str = "127.0.0.2", port: int = 0):
        self._address = (host, port)
        self.body = encode_jpeg(Image.new("RGB", (8, 8), (128, 128, 128)), 90)
        self._paths: list[str] = []
        self._connections = 0
        self._lock = threading.Lock()
        super().__init__()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._paths.append(f"{method} {path}")

    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._paths)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def requests(self) -> list[str]:
        """"METHOD target" of every request so far."""
        with self._lock:
            return list(self._paths)

    _thread_name = "counting-server"

    def _make_server(self) -> "_CountingHTTPServer":
        return _CountingHTTPServer(self._address, self)

