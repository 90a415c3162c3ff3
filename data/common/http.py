"""The HTTP policy layer every request witclip sends goes through: harvest's page requests
(`data.harvest.pages`), the crawl's image fetches (`data.crawl.fetch`) and the downloads of named
files (`data.acquire.download`). Standard library only (`http.client`), no hidden redirects or proxies.

    client = HttpClient(HttpPolicy(timeout=10, allowed_addresses=("127.0.0.1",)))
    with client.open(url, headers={"Accept": "text/html"}) as response:   # redirects followed, each hop guarded
        body = client.read_body(response, max_bytes=8 << 20, deadline=time.monotonic() + 40)
    robots = RobotsCache(client, deadline_seconds=40)
    robots.allowed(url)

What an `HttpPolicy` decides, on every hop of every request:

- the address guard: the host is resolved once (`getaddrinfo` bounded by the connect timeout, in a
  helper thread, since it has no timeout of its own), every address it resolves to is classified
  (`classify_address`) and the connection goes to the checked address, so a second lookup an attacker's
  DNS answers differently never happens. Private, loopback, link-local, shared (CGNAT), multicast,
  reserved and cloud-metadata addresses are refused unless `allowed_addresses` lists them (IPs, CIDRs or
  host names). `guard=False` is for files the user named explicitly (a benchmark mirror on the company
  network); only then may `use_env_proxies` send requests through `http(s)_proxy`, which the guard
  could not check.
- the user agent: `DEFAULT_USER_AGENT`, one for harvest, crawl and downloads.
- redirects, followed by hand (each hop guarded again), at most `max_redirects`; a loop is an error.
- time: `timeout` bounds each blocking socket operation (connect, the response head, each body read);
  a caller's `deadline` (a `time.monotonic()` instant) caps the connect, the head and the body read of
  a hop whatever the per-operation timeout.
- robots.txt (`RobotsCache`, one fetch per origin through the same client) and `parse_retry_after`
  (delta-seconds or an HTTP date) for the callers that honour 429/503.

Failures raise `HttpError`: a stable `reason` code (what the crawl's status table counts), a `detail`
for one-line messages, `where` (host:port or the proxy) when nothing usable answered there, and
`permanent` when retrying cannot help.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

from data.common.errors import one_line

DEFAULT_USER_AGENT = "witclip/0.1 (+https://github.com/witclip/witclip; image-text dataset crawler)"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
ROBOTS_MAX_BYTES = 512 << 10  # RFC 9309: parse at least 500 KiB
CHUNK_BYTES = 1 << 16

# Addresses that are not private by RFC but are the metadata services of cloud providers:
# an SSRF into them leaks credentials. (169.254.169.254 is link-local anyway; listed for the reason.)
_CLOUD_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IPv6
}
_SHARED_CGNAT = ipaddress.ip_network("100.64.0.0/10")


class HttpError(Exception):
    """A request that failed for a reason of the world (or a refused address)."""

    def __init__(self, reason: str, detail: str = "", *, where: str | None = None, permanent: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # stable short code: dns_error, private_address, timeout, http_404, ...
        self.detail = detail
        self.where = where  # host:port (or "proxy host:port") when nothing usable answered there
        self.permanent = permanent


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
class HttpPolicy:
    """How requests are made; see the module docstring. Frozen and hashable: it pickles to Dask workers."""

    timeout: float = 10.0  # seconds per blocking socket operation
    connect_timeout: float | None = None  # None: `timeout`
    user_agent: str = DEFAULT_USER_AGENT
    allowed_addresses: tuple[str, ...] = ()  # IPs / CIDRs / host names exempt from the address guard
    guard: bool = True
    use_env_proxies: bool = False
    max_redirects: int = 5

    def __post_init__(self) -> None:
        if self.guard and self.use_env_proxies:
            raise ValueError("a proxy resolves hosts itself, out of the address guard's reach: "
                             "use_env_proxies needs guard=False")

    @property
    def connect_seconds(self) -> float:
        return self.timeout if self.connect_timeout is None else self.connect_timeout


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an http(s) URL; HttpError('unsupported_url') otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError("unsupported_url", f"not an http(s) URL: {url[:200]!r}", permanent=True)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise HttpError("unsupported_url", f"bad port in URL {url[:200]!r}", permanent=True) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port, target


def resolve(host: str, port: int, timeout: float) -> list[str]:
    """The addresses `host` resolves to, in getaddrinfo's order. getaddrinfo has no timeout of its own:
    it runs in a helper thread given `timeout` seconds. HttpError('dns_error') on failure."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            outcome.append(err)

    thread = threading.Thread(target=lookup, name=f"resolve-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    where = hostport(host, port)
    if not outcome:
        raise HttpError("dns_error", f"name resolution timed out after {timeout:g}s", where=where)
    if isinstance(outcome[0], BaseException):
        err = outcome[0]
        detail = f"name resolution failed: {err.strerror or one_line(err, with_type=False)}" \
            if isinstance(err, socket.gaierror) else one_line(err)
        raise HttpError("dns_error", detail, where=where)
    addresses = list(dict.fromkeys(info[4][0] for info in outcome[0]))
    if not addresses:
        raise HttpError("dns_error", f"no address for {host}", where=where)
    return addresses


class AddressGuard:
    """Resolves a host and refuses it when any address it resolves to is not public, unless allowed."""

    def __init__(self, allowed: Iterable[str]):
        self.networks: list[Any] = []
        self.hosts: set[str] = set()
        for entry in allowed:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.hosts.add(entry.lower().rstrip("."))

    def check(self, host: str, port: int, timeout: float) -> str:
        """The address to connect to; HttpError('private_address') if any resolved address is forbidden
        (a name must not smuggle in an internal address next to a public one)."""
        host_l = host.lower().rstrip(".")
        addresses = resolve(host_l, port, timeout)
        if host_l not in self.hosts:
            for address in addresses:
                why = classify_address(address)
                if why and not any(ipaddress.ip_address(address) in net for net in self.networks):
                    raise HttpError("private_address", f"{host} -> {address} ({why})", permanent=True)
        return addresses[0]


def proxy_for(scheme: str, host: str) -> tuple[str, int, dict[str, str]] | None:
    """(proxy host, port, extra headers) from the environment (`http_proxy`, `https_proxy`, `no_proxy`),
    or None for a direct connection; loopback hosts always go direct."""
    if host.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    proxy = getproxies().get(scheme)
    if not proxy or proxy_bypass(host):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    p = urlsplit(proxy)
    if not p.hostname:
        return None
    headers = {}
    if p.username:
        token = base64.b64encode(f"{unquote(p.username)}:{unquote(p.password or '')}".encode()).decode()
        headers["Proxy-Authorization"] = f"Basic {token}"
    return p.hostname, p.port or 80, headers


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds ("120") or an HTTP date; None when
    absent or unreadable. A date in the past is 0."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
class Response:
    """One hop's response: read it with `HttpClient.read_body` (or `raw.read1`), then close it."""

    conn: http.client.HTTPConnection
    raw: http.client.HTTPResponse
    url: str  # the URL this response answers (after the redirects `open` followed)

    @property
    def status(self) -> int:
        return self.raw.status

    def header(self, name: str) -> str | None:
        return self.raw.getheader(name)

    def header_values(self, name: str) -> list[str]:
        return self.raw.msg.get_all(name) or []

    def set_timeout(self, seconds: float) -> None:
        if self.conn.sock is not None:
            self.conn.sock.settimeout(max(0.01, seconds))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _remaining(deadline: float | None, cap: float) -> float:
    return cap if deadline is None else max(0.01, min(cap, deadline - time.monotonic()))


def _connect_error(err: BaseException, where: str, timeout: float) -> HttpError:
    if isinstance(err, ConnectionRefusedError):
        return HttpError("connection_error", "connection refused", where=where)
    if isinstance(err, (socket.timeout, TimeoutError)):
        return HttpError("timeout", f"connect timeout after {timeout:g}s", where=where)
    if isinstance(err, OSError) and err.strerror:
        return HttpError("connection_error", err.strerror.lower(), where=where)
    return HttpError("connection_error", one_line(err, with_type=False), where=where)


class HttpClient:
    """Requests under one `HttpPolicy`. Thread-safe: it holds no per-request state."""

    def __init__(self, policy: HttpPolicy | None = None):
        self.policy = policy or HttpPolicy()
        self.guard = AddressGuard(self.policy.allowed_addresses) if self.policy.guard else None
        self._ssl = ssl.create_default_context()

    def check_host(self, host: str, port: int) -> str:
        """The address a request to host:port would connect to (HttpError if the guard refuses it)."""
        if self.guard is None:
            return resolve(host, port, self.policy.connect_seconds)[0]
        return self.guard.check(host, port, self.policy.connect_seconds)

    def _connect(self, url: str, deadline: float | None) -> tuple[http.client.HTTPConnection, str, dict[str, str], str]:
        scheme, host, port, target = split_url(url)
        connect_timeout = _remaining(deadline, self.policy.connect_seconds)
        proxy = proxy_for(scheme, host) if self.policy.use_env_proxies else None
        headers: dict[str, str] = {}
        conn: http.client.HTTPConnection
        if proxy is None:
            where = hostport(host, port)
            ip = self.check_host(host, port)
            if scheme == "https":
                conn = _PinnedHTTPSConnection(host, port, ip, connect_timeout, self._ssl)
            else:
                conn = _PinnedHTTPConnection(host, port, ip, connect_timeout)
        else:
            phost, pport, proxy_headers = proxy
            where = f"proxy {hostport(phost, pport)}"
            resolve(phost, pport, connect_timeout)  # a dead proxy name fails within the timeout too
            if scheme == "https":
                conn = http.client.HTTPSConnection(phost, pport, timeout=connect_timeout, context=self._ssl)
                conn.set_tunnel(host, port, headers=proxy_headers)
            else:
                conn = http.client.HTTPConnection(phost, pport, timeout=connect_timeout)
                target = url  # a plain-HTTP proxy takes the absolute URL
                headers.update(proxy_headers)
        try:
            conn.connect()
        except ssl.SSLCertVerificationError as err:
            conn.close()
            raise HttpError("tls_error", f"TLS certificate of {hostport(host, port)} not accepted "
                                         f"({err.verify_message or one_line(err, with_type=False)})",
                            permanent=True) from None
        except ssl.SSLError as err:
            conn.close()
            raise HttpError("tls_error", f"TLS handshake with {hostport(host, port)} failed "
                                         f"({one_line(err, with_type=False)})") from None
        except OSError as err:  # refused, timeout, unreachable network, proxy tunnel refused
            conn.close()
            raise _connect_error(err, where, connect_timeout) from None
        return conn, target, headers, hostport(host, port)

    def request(self, url: str, method: str = "GET", headers: dict[str, str] | None = None, *,
                deadline: float | None = None) -> Response:
        """One hop: connect (guarded), send, read the response head. Redirects are the caller's."""
        conn, target, extra, where = self._connect(url, deadline)
        head_timeout = _remaining(deadline, self.policy.timeout)
        if conn.sock is not None:  # the head may not take longer than what is left
            conn.sock.settimeout(head_timeout)
        try:
            conn.request(method, target, headers={"User-Agent": self.policy.user_agent, **(headers or {}), **extra})
            raw = conn.getresponse()
        except (socket.timeout, TimeoutError):
            conn.close()
            raise HttpError("timeout", f"no HTTP response within {head_timeout:g}s", where=where) from None
        except (http.client.HTTPException, OSError) as err:
            conn.close()
            raise HttpError("connection_error", f"connection closed without an HTTP response "
                                                f"({one_line(err, with_type=False)})", where=where) from None
        return Response(conn, raw, url)

    def open(self, url: str, method: str = "GET", headers: dict[str, str] | None = None, *,
             follow_redirects: bool = True, deadline: float | None = None,
             on_response: Callable[[Response], None] | None = None) -> Response:
        """`request`, following redirects (each hop guarded again) when `follow_redirects`.
        `on_response` sees every hop's response before it is followed (e.g. to read a header that
        only the first hop carries)."""

        def hop(hop_url: str) -> Response | Redirect:
            response = self.request(hop_url, method, headers, deadline=deadline)
            if on_response is not None:
                on_response(response)
            if not follow_redirects or response.status not in REDIRECT_STATUSES:
                return response
            location = response.header("Location")
            response.close()
            if not location:
                raise HttpError(f"http_{response.status}", "redirect without Location")
            return Redirect(redirect_target(hop_url, location))

        return follow_redirects_with(url, hop, self.policy.max_redirects)

    def read_body(self, response: Response, *, max_bytes: int, deadline: float | None = None,
                  truncate: bool = False) -> bytes:
        """The body, at most `max_bytes` (more: 'too_large', or the first `max_bytes` when `truncate`);
        each read bounded by the policy's timeout and all of them by `deadline`."""
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    raise HttpError("deadline_exceeded")
                response.set_timeout(_remaining(deadline, self.policy.timeout))  # a stall can't outlive the deadline
                chunk = response.raw.read1(CHUNK_BYTES)  # returns as soon as *some* bytes arrive
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    if truncate:
                        return b"".join(chunks)[:max_bytes]
                    raise HttpError("too_large", f"body over {max_bytes} bytes")
        except (socket.timeout, TimeoutError):
            raise HttpError("timeout", f"no data for {self.policy.timeout:g}s") from None
        except http.client.IncompleteRead:
            raise HttpError("incomplete_body") from None
        except (http.client.HTTPException, OSError) as err:
            raise HttpError("connection_error", one_line(err)) from None
        if response.raw.length:  # read1() does not raise on a short body
            raise HttpError("incomplete_body")
        return b"".join(chunks)


def redirect_target(url: str, location: str) -> str:
    """Where a redirect from `url` with this Location header points (relative ones resolved)."""
    return urljoin(url, location.strip())


@dataclass(frozen=True)
class Redirect:
    """What a hop returns to `follow_redirects_with` when the answer is a redirect."""

    target: str


def follow_redirects_with(url: str, hop: Callable[[str], Any], max_redirects: int) -> Any:
    """Call `hop(url)`, then `hop` on every `Redirect` target it returns, at most `max_redirects`
    times; the first other value is the result. A loop or a longer chain is an HttpError."""
    seen: set[str] = set()
    for _ in range(max_redirects + 1):
        seen.add(url)
        result = hop(url)
        if not isinstance(result, Redirect):
            return result
        url = result.target  # checked again by the next hop
        if url in seen:
            raise HttpError("redirect_loop", permanent=True)
    raise HttpError("too_many_redirects", f"more than {max_redirects} redirects", permanent=True)


class RobotsCache:
    """robots.txt per origin (scheme + host + port), fetched once through `client` and parsed by
    Protego; thread-safe, one fetch per origin even when many threads ask at once. A 401/403 answer
    means keep out; any other failure (404, 5xx, network) allows everything."""

    _ALLOW, _DENY = "allow", "deny"

    def __init__(self, client: HttpClient, *, deadline_seconds: float):
        self.client = client
        self.deadline_seconds = deadline_seconds
        self._lock = threading.Lock()
        self._rules: dict[str, Any] = {}
        self._locks: dict[str, threading.Lock] = {}

    @staticmethod
    def robots_url(url: str) -> str:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}/robots.txt".lower()

    def allowed(self, url: str) -> bool:
        """Whether our user agent may fetch `url`."""
        robots_url = self.robots_url(url)
        with self._lock:
            lock = self._locks.setdefault(robots_url, threading.Lock())
        with lock:
            if robots_url not in self._rules:
                self._rules[robots_url] = self._fetch(robots_url)
            rules = self._rules[robots_url]
        if isinstance(rules, str):
            return rules == self._ALLOW
        return rules.can_fetch(url, self.client.policy.user_agent)

    def _fetch(self, robots_url: str) -> Any:
        from protego import Protego

        deadline = time.monotonic() + self.deadline_seconds
        try:
            with self.client.open(robots_url, deadline=deadline) as response:
                if response.status in (401, 403):
                    return self._DENY
                if response.status != 200:
                    return self._ALLOW
                body = self.client.read_body(response, max_bytes=ROBOTS_MAX_BYTES, deadline=deadline, truncate=True)
        except HttpError:
            return self._ALLOW
        return Protego.parse(body.decode("utf-8", errors="replace"))
