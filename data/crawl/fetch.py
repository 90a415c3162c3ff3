"""A safe, polite HTTP GET for image downloads: what img2dataset's downloader lacks.

`Fetcher.get(url)` returns the body bytes or raises `FetchError(reason)` (the shared
`data.common.http.HttpError`), where `reason` is a short stable code (`http_404`,
`deadline_exceeded`, `private_address`, ...) that the crawl's status table counts.

The shared HTTP layer (`data.common.http`) gives every hop the address guard (resolve once, classify
every address, connect to the checked one), the user agent, robots.txt and Retry-After parsing. On top
of it the Fetcher enforces, per image:

- safety: redirects followed by hand so each hop is checked again; a byte cap (Content-Length checked
  before reading); a pixel cap read from the image header (decompression bombs never reach the
  decoder); a total deadline per hop covering connect, headers and a body that trickles forever;
- politeness: robots.txt, `X-Robots-Tag` directives (noai, ...), a per-host connection limit and
  request rate, 429/503 `Retry-After` honoured (the whole host pauses, not just one thread) with
  exponential backoff when the header is missing.

State that must be shared between threads (robots cache, per-host semaphores and rate clocks) lives in
the Fetcher; one Fetcher per process. The Fetcher pickles as its policy only, so it can be shipped to
Dask workers.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from data.common.http import (
    DEFAULT_USER_AGENT,
    REDIRECT_STATUSES,
    HttpClient,
    HttpError,
    HttpPolicy,
    Redirect,
    RobotsCache,
    follow_redirects_with,
    parse_retry_after,
    redirect_target,
)

FetchError = HttpError  # what a failed image fetch raises: the shared layer's error, reason codes and all
DEFAULT_X_ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
THROTTLE_STATUSES = (429, 503)


@dataclass(frozen=True)
class FetchPolicy:
    """Everything that decides how an image is fetched. Per process: the crawl divides the
    per-host limits by the number of worker processes. The defaults are the pipeline's (`crawl`
    section of the config)."""

    timeout: float = 2.0  # per blocking socket operation
    deadline: float | None = None  # whole request hop: connect + headers + body; None: 4 x timeout
    max_bytes: int = 32 << 20
    max_pixels: int = 40_000_000  # width * height from the header, before any decoding
    max_redirects: int = 5
    allowed_addresses: tuple[str, ...] = ()  # IPs / CIDRs / host names exempt from the address guard
    user_agent: str = DEFAULT_USER_AGENT
    robots_txt: bool = True
    x_robots_directives: tuple[str, ...] = DEFAULT_X_ROBOTS_DIRECTIVES
    x_robots_agent: str = "witclip"  # `X-Robots-Tag: witclip: noai` targets us too
    max_connections_per_host: int = 16
    max_requests_per_second_per_host: float = 0.0  # 0 = no rate limit
    throttle_retries: int = 2  # extra attempts after 429/503
    max_retry_after: float = 30.0  # a longer Retry-After is a failure, not a wait
    backoff_base: float = 1.0  # seconds; doubles per attempt when Retry-After is missing

    @property
    def deadline_seconds(self) -> float:
        return 4 * self.timeout if self.deadline is None else self.deadline

    def http_policy(self) -> HttpPolicy:
        """The shared layer's part of this policy."""
        return HttpPolicy(timeout=min(self.timeout, self.deadline_seconds), user_agent=self.user_agent,
                          allowed_addresses=self.allowed_addresses, max_redirects=self.max_redirects)


@dataclass
class _HostState:
    slots: threading.BoundedSemaphore
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_time: float = 0.0  # monotonic time of the next allowed request start


class _Throttled(Exception):
    def __init__(self, status: int, retry_after: float | None):
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class Fetcher:
    """Thread-safe image fetcher enforcing a FetchPolicy. See the module docstring."""

    def __init__(self, policy: FetchPolicy | None = None):
        self.policy = policy or FetchPolicy()
        self.client = HttpClient(self.policy.http_policy())
        self.robots = RobotsCache(self.client, deadline_seconds=self.policy.deadline_seconds)
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostState] = {}

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fetcher, (self.policy,))  # locks don't pickle; a fresh Fetcher per process

    def check_host(self, host: str, port: int) -> str:
        """The address to connect to; FetchError('private_address') if the guard refuses `host`."""
        return self.client.check_host(host, port)

    # ------------------------------------------------------------------ politeness
    def _host_state(self, netloc: str) -> _HostState:
        with self._lock:
            state = self._hosts.get(netloc)
            if state is None:
                state = self._hosts[netloc] = _HostState(
                    threading.BoundedSemaphore(max(1, self.policy.max_connections_per_host))
                )
            return state

    def _wait_turn(self, state: _HostState) -> None:
        """Block until the host's rate clock allows one more request start."""
        rate = self.policy.max_requests_per_second_per_host
        with state.lock:
            now = time.monotonic()
            start = max(now, state.next_time)
            if rate > 0:
                state.next_time = start + 1.0 / rate
        if start > now:
            time.sleep(start - now)

    def _pause_host(self, state: _HostState, seconds: float) -> None:
        with state.lock:
            state.next_time = max(state.next_time, time.monotonic() + seconds)

    # ------------------------------------------------------------------ the request
    def get(self, url: str) -> bytes:
        """GET an image; bytes on success, FetchError otherwise."""
        if self.policy.robots_txt and not self.robots.allowed(url):
            raise FetchError("robots_disallowed")
        body = follow_redirects_with(url, self._request_with_throttle_retries, self.policy.max_redirects)
        self._check_pixels(body)
        return body

    def _request_with_throttle_retries(self, url: str) -> bytes | Redirect:
        state = self._host_state(urlsplit(url).netloc.lower())
        attempts = 1 + max(0, self.policy.throttle_retries)
        for attempt in range(attempts):
            try:
                return self._one_hop(url, state)
            except _Throttled as throttled:
                wait = throttled.retry_after
                if wait is None:
                    wait = self.policy.backoff_base * (2**attempt)
                if wait > self.policy.max_retry_after:
                    raise FetchError(f"http_{throttled.status}", f"Retry-After {wait:g}s exceeds the limit") from None
                if attempt == attempts - 1:
                    raise FetchError(f"http_{throttled.status}", "still throttled after retries") from None
                self._pause_host(state, wait)  # every thread waits, not just this one
        raise AssertionError("unreachable")

    def _one_hop(self, url: str, state: _HostState) -> bytes | Redirect:
        """The body, or where the answer redirects to."""
        policy = self.policy
        with state.slots:
            self._wait_turn(state)
            deadline = time.monotonic() + policy.deadline_seconds
            response = self.client.request(url, headers={"Accept": "image/*,*/*;q=0.8"}, deadline=deadline)
            with response:
                status = response.status
                if status in REDIRECT_STATUSES:
                    location = response.header("Location")
                    if not location:
                        raise FetchError(f"http_{status}", "redirect without Location")
                    return Redirect(redirect_target(url, location))
                if status in THROTTLE_STATUSES:
                    raise _Throttled(status, parse_retry_after(response.header("Retry-After")))
                if status != 200:
                    raise FetchError(f"http_{status}")
                if self._x_robots_forbids(response.header_values("X-Robots-Tag")):
                    raise FetchError("x_robots_tag")
                length = response.header("Content-Length")
                if length and length.strip().isdigit() and int(length) > policy.max_bytes:
                    raise FetchError("too_large", f"Content-Length {int(length)} > {policy.max_bytes}")
                return self.client.read_body(response, max_bytes=policy.max_bytes, deadline=deadline)

    def _x_robots_forbids(self, values: list[str]) -> bool:
        directives = {d.lower() for d in self.policy.x_robots_directives}
        agent = self.policy.x_robots_agent.lower()
        for value in values:
            for part in value.split(","):
                words = part.strip().lower()
                if ":" in words:  # "witclip: noai" applies to us; "otherbot: noai" does not
                    target, words = (w.strip() for w in words.split(":", 1))
                    if target != agent:
                        continue
                if words in directives:
                    return True
        return False

    def _check_pixels(self, body: bytes) -> None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(body)) as image:  # reads the header only
                width, height = image.size
        except Image.DecompressionBombError as err:  # PIL's own, far higher, ceiling
            raise FetchError("too_many_pixels", str(err)[:80]) from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return  # not an image we can size: the decoder downstream reports it
        if width * height > self.policy.max_pixels:
            raise FetchError("too_many_pixels", f"{width}x{height} > {self.policy.max_pixels}")
