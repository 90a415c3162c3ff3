"""A safe, polite HTTP GET for image downloads: what img2dataset's downloader lacks.

`Fetcher.get(url)` returns the body bytes or raises `FetchError(reason)` (the shared
`data.common.http.HttpError`), where `reason` is a short stable code that the crawl's status table
counts: the shared layer's (`dns_error`, `private_address`, `connection_error`, `tls_error`,
`timeout`, `deadline_exceeded`, `too_large`, `incomplete_body`, `redirect_loop`,
`too_many_redirects`, `http_<status>`, `robots_disallowed`, `robots_unavailable`, `unsupported_url`)
and the Fetcher's own (`x_robots_tag`, `too_many_pixels`, `unidentified_image`).

The shared HTTP layer (`data.common.http`) gives every hop the address guard (resolve once, classify
every address, connect to the checked one), the user agent, robots.txt (RFC 9309) and Retry-After
parsing. On top of it the Fetcher enforces, per image:

- one time budget: `get()` sets ONE deadline (`FetchPolicy.deadline_seconds`) that the robots.txt
  check of every hop (and any robots.txt fetch it triggers), the name lookups, connects, TLS
  handshakes, response heads and bodies of all redirect hops draw from; `timeout` still bounds each
  blocking operation (`timeout` when that ends it, `deadline_exceeded` when the deadline does).
  Queueing is not the server's time and moves the deadline later by what it took: the wait for the
  first hop's connection slot and rate-clock turn, and a Retry-After pause (with the slot wait after
  it). A throttled retry does NOT get a fresh deadline: it continues the same budget, the pause apart.
  Every other wait (a later hop's slot, another thread's robots.txt fetch) is drawn from the budget,
  so at the server's end the hops of one request never span more than the deadline (plus Retry-After
  pauses). `get()` returns within `deadline_seconds` plus its first queueing plus those pauses, each
  at most `max_retry_after`, at most `throttle_retries` of them per hop;
- safety: redirects followed by hand so each hop is checked again; a byte cap (Content-Length checked
  before reading); images fail closed: the body must be an image whose dimensions Pillow reads from
  its header (`unidentified_image` otherwise: formats only the downstream decoder knows, such as
  Radiance HDR, never reach it) and whose pixel count is under the cap (`too_many_pixels`: a
  decompression bomb never reaches the decoder). A truncated body with an intact header passes here;
  the decoder reports it;
- politeness: robots.txt on every hop's origin (`robots_disallowed`; `robots_unavailable` when it
  answers 429/5xx or not at all: the whole origin is off limits until a later retry succeeds),
  `X-Robots-Tag` directives (noai, ...), a per-host connection limit and request rate, 429/503
  `Retry-After` honoured (the whole host pauses, not just one thread) with exponential backoff when
  the header is missing.

State that must be shared between threads (robots cache, per-host semaphores and rate clocks) lives in
the Fetcher; one Fetcher per process. The Fetcher pickles as its policy only, so it can be shipped to
Dask workers.

`get_image(url)` is `get` that also returns the `ImageHeader` the pixel check read (size, format,
bands), so the crawl's decode budget (`data.crawl.decode`) does not parse the header a second time.
"""

from __future__ import annotations

import io
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from data.common.errors import one_line
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
class ImageHeader:
    """What Pillow reads from an image's header alone (nothing decoded)."""

    width: int
    height: int
    format: str | None  # Pillow's name: "JPEG", "PNG", ...
    bands: int  # channels of its mode: 3 for RGB, 4 for RGBA or CMYK
    transparency: bool  # a "transparency" entry (a palette or grey image with a transparent colour)

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_image_header(body: bytes) -> ImageHeader:
    """The header of `body` as Pillow reads it, without decoding. Raises what Pillow raises for a body
    it cannot identify or size (`PIL.UnidentifiedImageError`, `Image.DecompressionBombError`, ...)."""
    from PIL import Image

    with Image.open(io.BytesIO(body)) as image:  # reads the header only
        width, height = image.size
        return ImageHeader(width, height, image.format, len(image.getbands()), "transparency" in image.info)


@dataclass(frozen=True)
class FetchPolicy:
    """Everything that decides how an image is fetched. Per process: the crawl divides the
    per-host limits by the number of worker processes. The defaults are the pipeline's (`crawl`
    section of the config)."""

    timeout: float = 2.0  # per blocking socket operation
    deadline: float | None = None  # whole get(): robots.txt + every hop's connect, headers, body; None: 4 x timeout
    max_bytes: int = 32 << 20
    max_pixels: int = 40_000_000  # width * height from the header, before any decoding
    max_redirects: int = 5
    allowed_addresses: tuple[str, ...] = ()  # exempt from the address guard: HttpPolicy.allowed_addresses
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


class _Clock:
    """One `get()`'s deadline (a time.monotonic() instant). Queueing is not the server's time: the
    wait for the first hop's connection slot and rate-clock turn, and the wait after a Retry-After
    pause, push the deadline later by what they took. Every other wait (a later hop's slot or turn,
    another thread's robots.txt fetch) is drawn from it and ends at it, so at the server's end the hops
    of one request never span longer than the deadline (Retry-After pauses apart)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.sent = False  # whether a hop of this request has been sent yet

    def waited(self, seconds: float) -> None:
        self.deadline += max(0.0, seconds)


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
        # matched against every image's X-Robots-Tag: built once, not per response
        self._x_directives = frozenset(d.lower() for d in self.policy.x_robots_directives)
        self._x_agent = self.policy.x_robots_agent.lower()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fetcher, (self.policy,))  # locks don't pickle; a fresh Fetcher per process

    def check_host(self, host: str, port: int) -> str:
        """The address to connect to; FetchError('private_address') if the guard refuses `host`."""
        return self.client.check_host(host, port)

    # ------------------------------------------------------------------ politeness
    def _host_state(self, netloc: str) -> _HostState:
        state = self._hosts.get(netloc)  # a dict read is atomic: the lock only guards creation
        if state is not None:
            return state
        with self._lock:
            state = self._hosts.get(netloc)
            if state is None:
                state = self._hosts[netloc] = _HostState(
                    threading.BoundedSemaphore(max(1, self.policy.max_connections_per_host))
                )
            return state

    def _wait_turn(self, state: _HostState, latest: float | None = None) -> None:
        """Block until the host's rate clock allows one more request start; FetchError
        ('deadline_exceeded') at once, taking no turn, if that start would come after `latest`."""
        rate = self.policy.max_requests_per_second_per_host
        if rate <= 0:
            # No rate clock to advance: only a Retry-After pause (next_time in the future) can make us
            # wait, so the common case takes no lock. A pause set a moment after this read is missed
            # exactly as if this request had taken the lock just before it.
            now = time.monotonic()
            if state.next_time <= now:
                if latest is not None and now >= latest:
                    raise FetchError("deadline_exceeded", "the host's request rate leaves no turn before the deadline")
                return
        with state.lock:
            now = time.monotonic()
            start = max(now, state.next_time)
            if latest is not None and start >= latest:
                raise FetchError("deadline_exceeded", "the host's request rate leaves no turn before the deadline")
            if rate > 0:
                state.next_time = start + 1.0 / rate
        if start > now:
            time.sleep(start - now)

    def _pause_host(self, state: _HostState, seconds: float) -> None:
        with state.lock:
            state.next_time = max(state.next_time, time.monotonic() + seconds)

    # ------------------------------------------------------------------ the request
    def get(self, url: str) -> bytes:
        """GET an image; bytes on success, FetchError otherwise. One deadline for all of it (see the
        module docstring)."""
        return self.get_image(url)[0]

    def get_image(self, url: str) -> tuple[bytes, ImageHeader]:
        """`get`, with the header the pixel check read from the body."""
        clock = _Clock(self.policy.deadline_seconds)
        body = follow_redirects_with(url, lambda hop_url: self._hop(hop_url, clock), self.policy.max_redirects)
        return body, self._check_pixels(body)

    def _hop(self, url: str, clock: _Clock) -> bytes | Redirect:
        if self.policy.robots_txt:  # every hop: a redirect may lead to another origin with its own rules
            self.robots.check(url, deadline=clock.deadline)
        return self._request_with_throttle_retries(url, clock)

    def _request_with_throttle_retries(self, url: str, clock: _Clock) -> bytes | Redirect:
        state = self._host_state(urlsplit(url).netloc.lower())
        attempts = 1 + max(0, self.policy.throttle_retries)
        for attempt in range(attempts):
            try:
                return self._one_hop(url, state, clock, after_pause=attempt > 0)
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

    def _one_hop(self, url: str, state: _HostState, clock: _Clock, *, after_pause: bool = False) -> bytes | Redirect:
        """The body, or where the answer redirects to."""
        policy = self.policy
        queueing = not clock.sent or after_pause  # not the server's time (see _Clock)
        queued = time.monotonic()
        if not state.slots.acquire(timeout=None if queueing else max(0.0, clock.deadline - queued)):
            raise FetchError("deadline_exceeded", "no free connection slot to the host before the deadline")
        try:
            self._wait_turn(state, latest=None if queueing else clock.deadline)
            if queueing:  # after a 429/503 the Retry-After pause was waited in _wait_turn
                clock.waited(time.monotonic() - queued)
            clock.sent = True
            response = self.client.request(url, headers={"Accept": "image/*,*/*;q=0.8"}, deadline=clock.deadline)
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
                return self.client.read_body(response, max_bytes=policy.max_bytes, deadline=clock.deadline)
        finally:
            state.slots.release()

    def _x_robots_forbids(self, values: list[str]) -> bool:
        directives, agent = self._x_directives, self._x_agent
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

    def _check_pixels(self, body: bytes) -> ImageHeader:
        """Fail closed: the body must be an image Pillow can size from its header alone, within the
        pixel cap. Anything else (HTML, an unknown or exotic format OpenCV would still decode, such
        as Radiance HDR up to 2^30 pixels) is refused before any decoder sees it. Returns the header."""
        from PIL import Image

        try:
            header = read_image_header(body)
        except Image.DecompressionBombError as err:  # PIL's own, far higher, ceiling
            raise FetchError("too_many_pixels", str(err)[:80]) from None
        except Exception as err:  # noqa: BLE001 - UnidentifiedImageError and any plugin's header error
            raise FetchError("unidentified_image", one_line(err, 80)) from None
        if header.pixels > self.policy.max_pixels:
            raise FetchError("too_many_pixels", f"{header.width}x{header.height} > {self.policy.max_pixels}")
        return header
