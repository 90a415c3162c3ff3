"""A safe, polite HTTP GET for image downloads: what img2dataset's downloader lacks.

`Fetcher.get(url)` returns the body bytes or raises `FetchError(reason)`, where `reason` is a
short stable code (`http_404`, `deadline_exceeded`, `private_address`, ...) that the crawl's
status table counts. It enforces, per request:

- safety: the host is resolved once, every resolved address is classified, and the connection
  goes to the checked address (no second lookup an attacker's DNS could answer differently);
  private, loopback, link-local, shared (CGNAT), multicast, reserved and cloud-metadata
  addresses are refused unless explicitly allowed; redirects are followed by hand so each hop is
  checked again; a byte cap (Content-Length checked before reading); a pixel cap read from the
  image header (decompression bombs never reach the decoder); a total deadline covering
  connect, headers and a body that trickles forever;
- politeness: robots.txt (protego, cached per host), `X-Robots-Tag` directives (noai, ...),
  a per-host connection limit and request rate, 429/503 `Retry-After` honoured (the whole host
  pauses, not just one thread) with exponential backoff when the header is missing, and a user
  agent that names witclip.

State that must be shared between threads (robots cache, per-host semaphores and rate clocks)
lives in the Fetcher; one Fetcher per process. The Fetcher pickles as its policy only, so it can
be shipped to Dask workers.
"""

from __future__ import annotations

import email.utils
import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urljoin, urlsplit

DEFAULT_USER_AGENT = "witclip/0.1 (+https://github.com/witclip/witclip; image-text dataset crawler)"
DEFAULT_X_ROBOTS_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")

# Addresses that are not private by RFC but are the metadata services of cloud providers:
# an SSRF into them leaks credentials. (169.254.169.254 is link-local anyway; listed for the reason.)
_CLOUD_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IPv6
}
_SHARED_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class FetchError(Exception):
    """A download that failed for a reason of the world; `reason` is a stable short code."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def classify_address(address: str) -> str | None:
    """Why an IP address must not be contacted by default, or None if it is a public address."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if ip in _CLOUD_METADATA:
        return "cloud_metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_multicast:
        return "multicast"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _SHARED_CGNAT:
        return "shared_address_space"
    if ip.is_reserved:  # before is_private, which also covers 240.0.0.0/4
        return "reserved"
    if ip.is_private or not ip.is_global:
        return "private"
    return None


@dataclass(frozen=True)
class FetchPolicy:
    """Everything that decides how an image is fetched. Per process: the crawl divides the
    per-host limits by the number of worker processes."""

    timeout: float = 10.0  # per blocking socket operation
    deadline: float = 30.0  # whole request: connect + headers + body
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


def _parse_allowed(entries: Iterable[str]) -> tuple[list[Any], set[str]]:
    networks, hosts = [], set()
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            hosts.add(entry.lower())
    return networks, hosts


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already-checked IP while sending the original Host header."""

    def __init__(self, host: str, port: int, ip: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._ip = ip

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, ip: str, timeout: float, context: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=context)
        self._ip = ip
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


@dataclass
class _HostState:
    slots: threading.BoundedSemaphore
    lock: threading.Lock = field(default_factory=threading.Lock)
    next_time: float = 0.0  # monotonic time of the next allowed request start


class Fetcher:
    """Thread-safe image fetcher enforcing a FetchPolicy. See the module docstring."""

    def __init__(self, policy: FetchPolicy | None = None):
        self.policy = policy or FetchPolicy()
        self._allowed_networks, self._allowed_hosts = _parse_allowed(self.policy.allowed_addresses)
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostState] = {}
        self._robots: dict[str, Any] = {}
        self._robots_locks: dict[str, threading.Lock] = {}
        self._ssl = ssl.create_default_context()

    def __reduce__(self) -> tuple[Any, ...]:
        return (Fetcher, (self.policy,))  # locks don't pickle; a fresh Fetcher per process

    # ------------------------------------------------------------------ address guard
    def check_host(self, host: str, port: int) -> str:
        """Resolve `host` and return the address to connect to; FetchError('private_address')
        if any resolved address is forbidden (a name must not smuggle in an internal address)."""
        host_l = host.lower().rstrip(".")
        try:
            infos = socket.getaddrinfo(host_l, port, type=socket.SOCK_STREAM)
        except socket.gaierror as err:
            raise FetchError("dns_error", str(err)) from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise FetchError("dns_error", f"no address for {host}")
        if host_l not in self._allowed_hosts:
            for address in addresses:
                why = classify_address(address)
                if why and not any(ipaddress.ip_address(address) in net for net in self._allowed_networks):
                    raise FetchError("private_address", f"{host} -> {address} ({why})")
        return addresses[0]

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

    def robots_allowed(self, url: str) -> bool:
        """robots.txt for our user agent; fetched once per scheme+host through the same guards.
        401/403 mean "keep out"; a missing or broken robots.txt allows everything."""
        from protego import Protego

        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}".lower()
        with self._lock:
            lock = self._robots_locks.setdefault(origin, threading.Lock())
        with lock:  # one fetch per origin even when 16 threads ask at once
            if origin not in self._robots:
                try:
                    body = self._request_following_redirects(origin + "/robots.txt", robots=True)
                    self._robots[origin] = Protego.parse(body[: 512 << 10].decode("utf-8", errors="replace"))
                except FetchError as err:
                    self._robots[origin] = "deny" if err.reason in ("http_401", "http_403") else "allow"
            rules = self._robots[origin]
        if isinstance(rules, str):
            return rules == "allow"
        return rules.can_fetch(url, self.policy.user_agent)

    # ------------------------------------------------------------------ the request
    def get(self, url: str) -> bytes:
        """GET an image; bytes on success, FetchError otherwise."""
        if self.policy.robots_txt and not self.robots_allowed(url):
            raise FetchError("robots_disallowed")
        body = self._request_following_redirects(url, robots=False)
        self._check_pixels(body)
        return body

    def _request_following_redirects(self, url: str, robots: bool) -> bytes:
        seen: set[str] = set()
        for _ in range(self.policy.max_redirects + 1):
            seen.add(url)
            result = self._request_with_throttle_retries(url, robots)
            if isinstance(result, bytes):
                return result
            url = result  # a redirect target, checked again on the next loop
            if url in seen:
                raise FetchError("redirect_loop")
        raise FetchError("too_many_redirects")

    def _request_with_throttle_retries(self, url: str, robots: bool) -> bytes | str:
        parts = urlsplit(url)
        state = self._host_state(parts.netloc.lower())
        attempts = 1 + max(0, self.policy.throttle_retries)
        for attempt in range(attempts):
            try:
                return self._one_request(url, state, robots)
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

    def _one_request(self, url: str, state: _HostState, robots: bool) -> bytes | str:
        policy = self.policy
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("unsupported_url", parts.scheme or url[:20])
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError("unsupported_url", "bad port") from None
        ip = self.check_host(parts.hostname, port)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

        with state.slots:
            self._wait_turn(state)
            deadline = time.monotonic() + policy.deadline
            step = min(policy.timeout, policy.deadline)
            if parts.scheme == "https":
                conn: http.client.HTTPConnection = _PinnedHTTPSConnection(parts.hostname, port, ip, step, self._ssl)
            else:
                conn = _PinnedHTTPConnection(parts.hostname, port, ip, step)
            try:
                conn.connect()
                if conn.sock is not None:  # headers may not take longer than what is left
                    conn.sock.settimeout(max(0.01, min(policy.timeout, deadline - time.monotonic())))
                conn.request("GET", path, headers={"User-Agent": policy.user_agent, "Accept": "image/*,*/*;q=0.8"})
                response = conn.getresponse()
                status = response.status
                if status in (301, 302, 303, 307, 308):
                    location = response.getheader("Location")
                    if not location:
                        raise FetchError(f"http_{status}", "redirect without Location")
                    return urljoin(url, location.strip())
                if status in (429, 503):
                    raise _Throttled(status, _parse_retry_after(response.getheader("Retry-After")))
                if status != 200:
                    raise FetchError(f"http_{status}")
                if not robots and self._x_robots_forbids(response.msg.get_all("X-Robots-Tag") or []):
                    raise FetchError("x_robots_tag")
                length = response.getheader("Content-Length")
                if length and length.strip().isdigit() and int(length) > policy.max_bytes:
                    raise FetchError("too_large", f"Content-Length {int(length)} > {policy.max_bytes}")
                return self._read_body(conn, response, deadline)
            except (socket.timeout, TimeoutError):
                raise FetchError("timeout") from None
            except (ssl.SSLError, ssl.CertificateError) as err:
                raise FetchError("tls_error", type(err).__name__) from None
            except http.client.IncompleteRead:
                raise FetchError("incomplete_body") from None
            except (http.client.HTTPException, ConnectionError, OSError) as err:
                raise FetchError("connection_error", type(err).__name__) from None
            finally:
                conn.close()

    def _read_body(self, conn: http.client.HTTPConnection, response: http.client.HTTPResponse, deadline: float) -> bytes:
        buffer = io.BytesIO()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FetchError("deadline_exceeded", f"{self.policy.deadline:g}s")
            if conn.sock is not None:
                conn.sock.settimeout(min(self.policy.timeout, remaining))  # a stall can't outlive the deadline
            chunk = response.read1(1 << 16)  # returns as soon as *some* bytes arrive
            if not chunk:
                break
            buffer.write(chunk)
            if buffer.tell() > self.policy.max_bytes:
                raise FetchError("too_large", f"body over {self.policy.max_bytes} bytes")
        if response.length:  # read1() does not raise on a short body
            raise FetchError("incomplete_body")
        return buffer.getvalue()

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


class _Throttled(Exception):
    def __init__(self, status: int, retry_after: float | None):
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


def _parse_retry_after(value: str | None) -> float | None:
    """Retry-After is either delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())
