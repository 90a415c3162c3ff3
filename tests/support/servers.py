"""Test-only HTTP servers (never imported by witclip itself)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
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



class _TrickleHandler(BaseHTTPRequestHandler):
    server: "_TrickleHTTPServer"

    def handle_one_request(self) -> None:
        # Read the request line and headers, then never answer properly: one byte of an endless
        # status line per interval, until the client hangs up (or the server stops).
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline or not self.parse_request():
            return
        owner = self.server.owner
        owner._record(self.command, self.path)
        self.close_connection = True
        pattern, index = b"HTTP/1.1 200 OK", 0
        self.connection.settimeout(5)
        try:
            while not owner.stopping.wait(owner.interval):
                self.wfile.write(pattern[index % len(pattern):index % len(pattern) + 1])
                index += 1
        except OSError:  # the client left
            pass

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TrickleHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: "TrickleServer"):
        self.owner = owner
        super().__init__(address, _TrickleHandler)


class TrickleServer(CountingServer):
    """A host whose every answer, robots.txt included, is a status line sent one byte per `interval`
    seconds that never ends: only a deadline on the whole request frees the client. Counts requests."""

    _thread_name = "trickle-server"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, interval: float = 0.2):
        self.interval = interval
        self.stopping = threading.Event()
        super().__init__(host, port)

    def _make_server(self) -> "_TrickleHTTPServer":
        self.stopping.clear()
        return _TrickleHTTPServer(self._address, self)

    def _before_shutdown(self) -> None:
        self.stopping.set()


@contextmanager
def served_model(model_uri: str, tracking_uri: str, cwd: Path, startup_s: float = 180) -> Iterator[str]:
    """`mlflow models serve` of `model_uri` on a free loopback port, from the venv's own CLI, until the
    block ends (the CLI and its uvicorn workers are stopped together); yields its base URL once /ping
    answers."""
    from flows.stages.train import free_loopback_port

    port = free_loopback_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri,
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # it execs uvicorn from there
    server = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + startup_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()[-3000:]
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=20)
        except ProcessLookupError:
            pass  # already gone
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
