"""Serve a synthetic site on loopback: `SyntheticWeb`, with a request log for tests.

    with SyntheticWeb(SiteSpec(seed=1)) as web:
        seed_url = web.url  # http://127.0.0.1:<port>/

`ThreadedServer` is the start/stop/url lifecycle of an HTTP server on a background daemon thread;
`SyntheticWeb` is one, and test-only servers (tests/support) reuse it. `MultiHostWeb` serves one built
site on several loopback addresses (one listening socket each, bound to that address only), so that a
crawler's per-host limits apply per host as on the real web (bench/crawl.py).
"""

from __future__ import annotations

import selectors
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from data.synthetic.site import (
    DEFAULT_PRIVATE_TARGET,
    TOO_LARGE_CHUNK_BYTES,
    TOO_LARGE_CLAIMED_BYTES,
    TOO_LARGE_MAX_BYTES,
    Site,
    SiteSpec,
    build_site,
)

_STREAM_SEND_TIMEOUT = 10.0  # a streaming write blocked this long means the client stopped reading


@dataclass(frozen=True)
class RequestRecord:
    """One request a `SyntheticWeb` handled, for tests to check what a crawler asked for."""

    path: str  # the request target as sent, query string included
    method: str
    status: int  # the status the site answered (or was about to answer when the client left)
    start: float  # time.monotonic() when handling began
    end: float  # time.monotonic() when the handler finished or noticed the client had left
    bytes_sent: int  # body bytes written (headers not counted)
    user_agent: str  # "" when the client sent none
    client_gone: bool  # a write failed or the client hung up mid-response (best effort)


class _RequestLog:
    # A record lands just after its response went out, so a client can finish before the
    # server has logged it; counting handlers in flight lets a test wait for the log to settle.
    def __init__(self) -> None:
        self._records: list[RequestRecord] = []
        self._in_flight = 0
        self._changed = threading.Condition()

    def begin(self) -> None:
        with self._changed:
            self._in_flight += 1

    def append(self, record: RequestRecord) -> None:
        with self._changed:
            self._records.append(record)
            self._in_flight -= 1
            self._changed.notify_all()

    def snapshot(self) -> list[RequestRecord]:
        with self._changed:
            return list(self._records)

    def clear(self) -> None:
        with self._changed:
            self._records.clear()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    server: "_SiteServer"
    server_version = "witclip-synthetic-web/1.0"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        started = time.monotonic()
        self._sent, self._gone = 0, False
        status = 0
        self.server.log.begin()
        try:
            target = urlsplit(self.path)
            response = self.server.site.response(
                unquote(target.path), target.query, method=self.command, private_target=self.server.private_target
            )
            status = response.status
            if send_body and response.delay_seconds > 0:
                time.sleep(response.delay_seconds)  # delay before headers, so client timeouts fire
            if response.mode in ("trickle_status", "trickle_headers"):
                # no proper head ever: a client without a deadline on the head waits as long as we like
                self.close_connection = True
                if response.mode == "trickle_headers":
                    self._write(f"HTTP/1.1 200 OK\r\nContent-Type: {response.content_type}\r\n".encode())
                self.wfile.flush()
                self._drip(response.body)
                return
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            if response.mode == "plain":
                self.send_header("Content-Length", str(len(response.body)))
            elif response.mode == "too_large":
                self.send_header("Content-Length", str(TOO_LARGE_CLAIMED_BYTES))
            for name, value in response.headers:
                self.send_header(name, value)
            if response.mode != "plain":
                self.send_header("Connection", "close")
            self.end_headers()
            if send_body:
                if response.mode == "drip":
                    self._drip(response.body)
                elif response.mode == "too_large":
                    self._stream_zeros()
                else:
                    self._write(response.body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client gave up (timed out on a slow image, stopped reading a stream): routine.
            self._gone = True
        finally:
            if self._gone:
                self.close_connection = True
            self.server.log.append(
                RequestRecord(
                    path=self.path,
                    method=self.command,
                    status=status,
                    start=started,
                    end=time.monotonic(),
                    bytes_sent=self._sent,
                    user_agent=self.headers.get("User-Agent", ""),
                    client_gone=self._gone,
                )
            )

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self._sent += len(data)

    def _drip(self, body: bytes) -> None:
        # A client that never hangs up must not stall forever on a write either.
        self.connection.settimeout(_STREAM_SEND_TIMEOUT)
        spec = self.server.site.spec
        deadline = time.monotonic() + spec.drip_max_seconds
        index = 0
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            self._write(body[index % len(body) : index % len(body) + 1])
            index += 1
            if self._hung_up_within(spec.drip_interval):
                self._gone = True
                return

    def _stream_zeros(self) -> None:
        # A client that stops reading (but stays connected) makes the write time out.
        self.connection.settimeout(_STREAM_SEND_TIMEOUT)
        chunk = bytes(TOO_LARGE_CHUNK_BYTES)
        while self._sent < TOO_LARGE_MAX_BYTES and not self.server.stopping.is_set():
            self._write(chunk)

    def _hung_up_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the client has closed its end.

        Watching the socket (rather than sleeping and waiting for a write to fail, which
        takes two writes after a close) notices a hang-up within milliseconds.
        """
        # selectors, not select.select: a busy test process can have fds above FD_SETSIZE.
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            if not selector.select(seconds):
                return False
        try:
            peeked = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        if not peeked:
            return True  # EOF: the client closed
        time.sleep(seconds)  # it sent more bytes: not a hang-up, just wait the interval out
        return False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one stderr line per request would drown the pipeline logs


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must never keep the process alive
    # The default listen backlog (5) drops connection attempts when a crawler opens dozens at once; the
    # client's SYN retry then lands after its timeout and a healthy image counts as a failure.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], site: Site, log: _RequestLog, private_target: str):
        self.site = site
        self.log = log
        self.private_target = private_target
        self.stopping = threading.Event()  # streaming responses end when it is set
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # disconnects are routine for a web server
        super().handle_error(request, client_address)


class ThreadedServer:
    """Start/stop/url/context-manager for an HTTP server served from a background daemon thread.
    Subclasses set `_address` and implement `_make_server()`."""

    _thread_name = "http-server"
    _address: tuple[str, int]

    def __init__(self) -> None:
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> Any:
        raise NotImplementedError

    def _before_shutdown(self) -> None:
        """Hook: unblock handlers that would otherwise hold shutdown."""

    def start(self) -> str:
        """Start serving (port 0 = chosen by the OS) and return the base URL."""
        if self._server is None:
            self._server = self._make_server()
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=self._thread_name, daemon=True
            )
            self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._before_shutdown()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class SyntheticWeb(ThreadedServer):
    """Serve a built site on 127.0.0.1 from a background daemon thread.

    `private_target` is the base URL (e.g. a `CountingServer`'s) that "redirect_private"
    faults redirect to; by default `DEFAULT_PRIVATE_TARGET`, where nothing listens.

    >>> with SyntheticWeb(SiteSpec(seed=1)) as web:
    ...     seed_url = web.url  # http://127.0.0.1:<port>/
    """

    def __init__(
        self,
        spec: SiteSpec | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        private_target: str | None = None,
        site: Site | None = None,
    ):
        # `site`: an already built site (of `spec`) to serve, so several servers share its render cache
        self.spec = site.spec if site is not None else (spec or SiteSpec())
        self.site = site if site is not None else build_site(self.spec)
        self.private_target = private_target or DEFAULT_PRIVATE_TARGET
        self._address = (host, port)
        self._log = _RequestLog()  # outlives stop(), so a test can read it afterwards
        super().__init__()

    _thread_name = "synthetic-web"

    def _make_server(self) -> "_SiteServer":
        return _SiteServer(self._address, self.site, self._log, self.private_target)

    def _before_shutdown(self) -> None:
        self._server.stopping.set()  # ends drips and endless bodies still being written

    def requests(self) -> list[RequestRecord]:
        """Every request handled so far, in the order they finished (a copy).

        A request appears once its handler is done, a moment after the client got the
        response; call `wait_idle` first to be sure every finished exchange is in.
        """
        return self._log.snapshot()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled; False if `timeout` seconds passed first.

        A drip or endless body still held open by a client keeps the server busy.
        """
        return self._log.wait_idle(timeout)

    def reset_requests(self) -> None:
        self._log.clear()


class MultiHostWeb:
    """One built site served on several addresses, each by its own `SyntheticWeb` bound to that
    address only (never 0.0.0.0), all sharing the site and so its render cache.

    >>> with MultiHostWeb(SiteSpec(seed=1), ["127.0.0.10", "127.0.0.11"]) as web:
    ...     web.urls  # ["http://127.0.0.10:<port>/", "http://127.0.0.11:<port>/"]

    `port` 0 lets the OS pick one per address; a fixed port is used on every address.
    """

    def __init__(
        self, spec: SiteSpec, hosts: Sequence[str], *, port: int = 0, private_target: str | None = None
    ):
        if not hosts:
            raise ValueError("expected at least one host address")
        if any(h in ("0.0.0.0", "::", "") for h in hosts):
            raise ValueError("each server binds one address; a wildcard would expose the site beyond loopback")
        self.site = build_site(spec)
        self.webs = [
            SyntheticWeb(host=h, port=port, private_target=private_target, site=self.site) for h in hosts
        ]

    def start(self) -> list[str]:
        """Start every server; their base URLs, in the order of `hosts`."""
        try:
            return [web.start() for web in self.webs]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for web in self.webs:
            web.stop()

    @property
    def urls(self) -> list[str]:
        return [web.url for web in self.webs]

    def requests(self) -> list[RequestRecord]:
        """Every request handled so far by any of the servers (see `SyntheticWeb.requests`)."""
        return [record for web in self.webs for record in web.requests()]

    def __enter__(self) -> "MultiHostWeb":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
