"""Test-only raw-socket HTTP servers on 127.0.0.1 that misbehave on purpose (never imported by witclip
itself): status lines and headers trickled a byte at a time, redirects that take their time, answers
that never come, a TLS handshake that never completes. Each connection is answered by the route its
request path names; `close()` (or leaving the `with`) ends every trickle, closes every connection and
joins every thread.

    with RawServer({"/slow": trickle_status(0.3), "/robots.txt": answer(404)}) as srv:
        client.request(srv.url + "/slow", deadline=time.monotonic() + 2)
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

Route = Callable[[socket.socket, "RawServer"], None]
_REASONS = {200: "OK", 301: "Moved Permanently", 302: "Found", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


def response_bytes(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 response that closes the connection."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Whatever')}", f"Content-Length: {len(body)}",
             "Connection: close", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, delay: float = 0.0) -> Route:
    """Answer `status` in full, after `delay` seconds (cut short when the server stops)."""

    def route(conn: socket.socket, server: RawServer) -> None:
        if delay and not server.idle(conn, delay):
            return
        conn.sendall(response_bytes(status, body, headers))

    return route


def trickle(data: bytes, interval: float) -> Route:
    """Send `data` one byte per `interval` seconds, until it is all sent, the client hangs up or the
    server stops."""

    def route(conn: socket.socket, server: RawServer) -> None:
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            if not server.idle(conn, interval):
                return

    return route


def trickle_status(interval: float) -> Route:
    """A status line (then a short image answer) one byte per `interval`."""
    return trickle(response_bytes(200, b"\xff\xd8\xff", {"Content-Type": "image/jpeg"}), interval)


def trickle_headers(interval: float, lines: int = 90) -> Route:
    """The status line at once, then `lines` header lines (fewer than http.client's 100) one byte per
    `interval`: each byte resets a per-read timeout, only a deadline ends it."""

    def route(conn: socket.socket, server: RawServer) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        pad = b"".join(b"X-Pad-%d: %d\r\n" % (i, i) for i in range(lines))
        trickle(pad + b"Content-Length: 0\r\n\r\n", interval)(conn, server)

    return route


def never_answer() -> Route:
    """Read the request, then say nothing until the client hangs up or the server stops."""

    def route(conn: socket.socket, server: RawServer) -> None:
        server.idle(conn, 3600)

    return route


def tls_trickle(interval: float) -> Route:
    """For an https:// URL: after the ClientHello, a TLS handshake record header announcing 16 KiB,
    then its bytes one per `interval`. The handshake never completes; each byte wakes the client."""

    def route(conn: socket.socket, server: RawServer) -> None:
        trickle(b"\x16\x03\x03\x40\x00" + b"\x02" * 0x4000, interval)(conn, server)

    return route


class RawServer:
    """A TCP server on 127.0.0.1 (or `host`) answering each connection in a thread by `routes[path]`
    (the path without its query tried second; 404 otherwise). Counts `hits` per path and
    `connections`. Routes may be replaced while it runs."""

    def __init__(self, routes: dict[str, Route], host: str = "127.0.0.1", *, tls_route: Route | None = None):
        self.routes = dict(routes)
        self.tls_route = tls_route  # answers every connection before any HTTP is read (ClientHello is not HTTP)
        self.hits: Counter[str] = Counter()
        self.connections = 0
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.05)
        self.host, self.port = self._listener.getsockname()[:2]
        self.url = f"http://{host}:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="raw-server", daemon=True)
        self._acceptor.start()

    # ------------------------------------------------------------------ what routes use
    def idle(self, conn: socket.socket, seconds: float) -> bool:
        """Wait `seconds`; False (early) if the server stops or the client hangs up."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.stopping.is_set():
                return False
            ready, _, _ = select.select([conn], [], [], min(0.05, left))
            if ready:
                try:
                    if not conn.recv(65536):
                        return False  # the client closed its end (anything else it sends is ignored)
                except OSError:
                    return False
        return not self.stopping.is_set()

    # ------------------------------------------------------------------ machinery
    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._conns.add(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name="raw-server-conn", daemon=True)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(5)
            if self.tls_route is not None:
                self.tls_route(conn, self)
                return
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode("latin-1")
            with self._lock:
                self.hits[target] += 1
            route = self.routes.get(target) or self.routes.get(target.split("?")[0]) or answer(404, b"no such path")
            route(conn, self)
        except (OSError, IndexError):
            pass  # the client left, or sent garbage
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def close(self) -> None:
        self.stopping.set()
        self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> "RawServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
