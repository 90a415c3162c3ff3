"""The HTTP policy layer every request witclip sends goes through: harvest's page requests
(`data.harvest.pages`), the crawl's image fetches (`data.crawl.fetch`) and the downloads of named
files (`data.acquire.download`). Standard library only (`http.client`), no hidden redirects or proxies.

    client = HttpClient(HttpPolicy(timeout=10, allowed_addresses=("127.0.0.1",)))
    deadline = time.monotonic() + 40                      # ONE budget for the whole request
    with client.open(url, headers={"Accept": "text/html"}, deadline=deadline) as response:
        body = client.read_body(response, max_bytes=8 << 20, deadline=deadline)
    robots = RobotsCache(client, deadline_seconds=40)
    robots.check(url, deadline=deadline)                 # HttpError robots_disallowed / robots_unavailable
    robots.allowed(url)                                  # the same as a bool

What an `HttpPolicy` decides, on every hop of every request:

- the address guard: the host is resolved once (`resolve`: getaddrinfo has no timeout of its own, so
  it runs in a helper thread; threads asking for a host whose lookup is already in flight share it,
  so a resolver that never answers costs one thread per host, at most `MAX_PENDING_LOOKUPS`), every
  address it resolves to is classified (`classify_address`; 6to4, Teredo and NAT64 addresses by the
  IPv4 address they carry) and the connection goes to the checked address, so a second lookup an
  attacker's DNS answers differently never happens. Private, loopback, link-local, site-local, shared
  (CGNAT), multicast, reserved and cloud-metadata addresses are refused unless `allowed_addresses`
  lists them: an IP, a CIDR or a host name allows it on any port; `ip:port`, `[v6]:port` or
  `host:port` only on that port. `guard=False` is for files the user named explicitly (a benchmark
  mirror on the company network); only then may `use_env_proxies` send requests through
  `http(s)_proxy`, which the guard could not check.
- the user agent: `DEFAULT_USER_AGENT`, one for harvest, crawl and downloads.
- redirects, followed by hand (each hop guarded again), at most `max_redirects`; a loop is an error.
- time: `timeout` bounds each blocking operation (name lookup, connect and the TLS handshake:
  `connect_timeout`; sending, every read of the status line, headers and body: `timeout`). A caller's
  `deadline` (a `time.monotonic()` instant) is ONE budget that all of them draw from: the lookup, the
  connect, the handshake, the status line and headers (read through a deadline-aware reader, so a
  server trickling one header byte a second gains nothing), the body, every redirect hop of `open`
  and the robots.txt fetch a request triggers. A request ends at its deadline plus at most the
  scheduling slack of one blocking call (milliseconds).
- robots.txt (`RobotsCache`, RFC 9309) and `parse_retry_after` (delta-seconds or an HTTP date) for
  the callers that honour 429/503.

robots.txt, per RFC 9309, one verdict per origin (scheme, host, port) for the life of the cache:

- 2xx: the rules are parsed (at most `ROBOTS_MAX_BYTES`) and applied to our product token, the user
  agent up to its first "/" or space ("witclip"), matched exactly and case-insensitively against each
  group's `User-agent` token (`*` when no group names us): `User-agent: wit` or `dataset` do not apply
  to us. The longest matching pattern wins, Allow wins a tie; `*` and a final `$` are wildcards;
  percent-encoding is normalised on both sides; /robots.txt itself is always allowed.
- 4xx other than 429 ("unavailable"): everything is allowed, 401 and 403 included.
- 429, 5xx, a network error, a timeout or the deadline, a redirect the address guard refuses
  ("unreachable"): the whole origin is disallowed, fetched again after `ROBOTS_BACKOFF_SECONDS`, then
  twice that, ... at most `ROBOTS_RETRIES` times; after that it stays disallowed.
- redirects are followed through the guard, at most `ROBOTS_MAX_REDIRECTS` hops; a longer chain or a
  loop is "unavailable" (RFC 9309 2.3.1.2). A robots.txt whose own host the guard refuses gives no
  verdict (nothing is cached): the request itself meets the guard and fails `private_address`.
- one fetch per origin at a time; other threads wait for it at most until their own deadline.

Failures raise `HttpError`: a stable `reason` code, a `detail` for one-line messages, `where`
(host:port or the proxy) when nothing usable answered there, and `permanent` when retrying cannot
help. The codes:

    unsupported_url, dns_error, dns_busy, private_address, connection_error, tls_error, timeout,
    deadline_exceeded, too_large, incomplete_body, redirect_loop, too_many_redirects, http_<status>,
    robots_disallowed, robots_unavailable

`timeout` is one blocking operation stalling for the per-operation timeout; `deadline_exceeded` is the
request's deadline ending it, whatever it was doing (a trickled status line or headers, a slow chain of
redirects, a body that drips). A name lookup stopped by `connect_timeout` is `dns_error`; one still
pending when the deadline passes is `deadline_exceeded` (its detail says it was the lookup);
`dns_busy` is this process having `MAX_PENDING_LOOKUPS` lookups in flight already.
"""

from __future__ import annotations

import base64
import email.utils
import functools
import http.client
import io
import ipaddress
import math
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit
from urllib.request import getproxies, proxy_bypass

from data.common.errors import one_line

DEFAULT_USER_AGENT = "witclip/0.1 (+https://github.com/witclip/witclip; image-text dataset crawler)"
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
CHUNK_BYTES = 1 << 16
MAX_PENDING_LOOKUPS = 256  # name lookups in flight at once (one helper thread each); more: dns_busy

ROBOTS_MAX_BYTES = 512 << 10  # RFC 9309: parse at least 500 KiB
ROBOTS_MAX_REDIRECTS = 5  # RFC 9309: follow at least five consecutive redirects
ROBOTS_RETRIES = 2  # fetches of an unreachable robots.txt after the first, before the origin stays disallowed
ROBOTS_BACKOFF_SECONDS = 4.0  # wait before the first of those; doubles for each further one
ROBOTS_MAX_AGE_SECONDS = 24 * 3600.0  # RFC 9309 2.4: a cached robots.txt is not used for longer than a day
ROBOTS_MAX_ORIGINS = 100_000  # origins a RobotsCache remembers; the oldest are forgotten (fetched again)

# Addresses that are not private by RFC but are the metadata services of cloud providers:
# an SSRF into them leaks credentials. (169.254.169.254 is link-local anyway; listed for the reason.)
_CLOUD_METADATA = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, DigitalOcean
    ipaddress.ip_address("169.254.170.2"),  # AWS ECS task metadata
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IPv6
}
_SHARED_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_SITE_LOCAL = ipaddress.ip_network("fec0::/10")  # deprecated (RFC 3879) but still routed inside some networks
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address reached


class HttpError(Exception):
    """A request that failed for a reason of the world (or a refused address)."""

    def __init__(self, reason: str, detail: str = "", *, where: str | None = None, permanent: bool = False):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason  # stable short code: dns_error, private_address, timeout, http_404, ...
        self.detail = detail
        self.where = where  # host:port (or "proxy host:port") when nothing usable answered there
        self.permanent = permanent


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a transition-mechanism IPv6 address delivers to: 6to4 (2002::/16), Teredo
    (2001::/32: client and server) and NAT64 (64:ff9b::/96). A router on the way unwraps them."""
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        server, client = ip.teredo
        return [client, server]
    if ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def classify_address(address: str) -> str | None:
    """Why an IP address must not be contacted by default, or None if it is a public address.
    Reasons: cloud_metadata, loopback, link_local, site_local, unspecified, multicast,
    shared_address_space, reserved, private. An IPv6 address that carries an IPv4 one (mapped, 6to4,
    Teredo, NAT64) has the reason of the IPv4 address when that one is not public."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        else:
            for inner in _embedded_ipv4(ip):
                why = classify_address(str(inner))
                if why:
                    return why  # 2002:7f00:1:: is 127.0.0.1 for a 6to4 relay next to the target
    if ip in _CLOUD_METADATA:
        return "cloud_metadata"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if isinstance(ip, ipaddress.IPv6Address) and ip in _SITE_LOCAL:
        return "site_local"  # Python calls fec0::/10 global
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
    connect_timeout: float | None = None  # name lookup and connect; None: `timeout`
    user_agent: str = DEFAULT_USER_AGENT
    allowed_addresses: tuple[str, ...] = ()  # IPs / CIDRs / host names (any port), or ip:port / [v6]:port / host:port
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
    """(scheme, host, port, request target) of an http(s) URL; HttpError('unsupported_url') otherwise.
    The request target is sent as ASCII: what a page wrote raw (non-ASCII, spaces, control characters)
    is percent-encoded as UTF-8, existing escapes kept; a non-ASCII host name becomes its IDNA form."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
    except ValueError:  # an unclosed IPv6 bracket, a bracketed name
        raise HttpError("unsupported_url", f"unparsable URL {url[:200]!r}", permanent=True) from None
    if parts.scheme not in ("http", "https") or not hostname:
        raise HttpError("unsupported_url", f"not an http(s) URL: {url[:200]!r}", permanent=True)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise HttpError("unsupported_url", f"bad port in URL {url[:200]!r}", permanent=True) from None
    if not hostname.isascii():
        try:
            hostname = hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise HttpError("unsupported_url", f"host name not valid IDNA in {url[:200]!r}", permanent=True) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, hostname, port, quote(target, safe=_TARGET_SAFE)


_TARGET_SAFE = "!#$%&'()*+,/:;=?@[]~"  # reserved characters and "%": kept as written (quote keeps A-Za-z0-9_.-~)


# ----------------------------------------------------------------------------------- time budget
class _DeadlineExceeded(TimeoutError):
    """The request's deadline passed during (or before) a blocking operation. A TimeoutError, so code
    that only knows socket timeouts (downloads reading `Response.raw`) still treats it as one."""


class _Budget:
    """One request's time: every blocking operation gets at most `per_op` seconds (or the cap it
    names) and all of them end by `deadline`, a time.monotonic() instant (None: no overall limit)."""

    __slots__ = ("per_op", "deadline")

    def __init__(self, per_op: float, deadline: float | None):
        self.per_op = per_op
        self.deadline = deadline

    def slice(self, cap: float | None = None) -> float:
        """Seconds the next blocking operation may take; _DeadlineExceeded when nothing is left."""
        cap = self.per_op if cap is None else cap
        if self.deadline is None:
            return cap
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _DeadlineExceeded
        return min(cap, left)

    def over(self) -> bool:
        """Whether the deadline has passed (what a timeout that just fired was cut short by). The
        10 ms tolerate a timer that fires a hair early."""
        return self.deadline is not None and time.monotonic() >= self.deadline - 0.01

    def tighten(self, deadline: float | None) -> None:
        if deadline is not None:
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)


# ----------------------------------------------------------------------------------- names and guard
class _Lookup:
    """One getaddrinfo call in flight; every thread asking for the same host waits on it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.outcome: Any = None  # getaddrinfo's list, or the exception it raised


_LOOKUPS: dict[str, _Lookup] = {}
_LOOKUPS_LOCK = threading.Lock()


def _shared_lookup(host: str, port: int) -> _Lookup:
    """The lookup of `host` already in flight, or a new one in a helper thread. getaddrinfo cannot
    be cancelled: sharing it means a resolver that never answers holds one thread per host name, not
    one per request."""
    with _LOOKUPS_LOCK:
        lookup = _LOOKUPS.get(host)
        if lookup is not None:
            return lookup
        if len(_LOOKUPS) >= MAX_PENDING_LOOKUPS:
            raise HttpError("dns_busy", f"{len(_LOOKUPS)} name lookups still pending; {host} not tried",
                            where=hostport(host, port))
        lookup = _LOOKUPS[host] = _Lookup()

    def run() -> None:
        try:
            lookup.outcome = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as err:  # noqa: BLE001 - handed to the waiting callers
            lookup.outcome = err
        finally:
            with _LOOKUPS_LOCK:
                if _LOOKUPS.get(host) is lookup:
                    del _LOOKUPS[host]  # the next request asks the resolver afresh (TTLs are its business)
            lookup.done.set()

    threading.Thread(target=run, name=f"resolve-{host}", daemon=True).start()
    return lookup


def resolve(host: str, port: int, timeout: float, *, deadline: float | None = None) -> list[str]:
    """The addresses `host` resolves to, in getaddrinfo's order, waiting at most `timeout` seconds and
    not past `deadline`. HttpError('dns_error') on failure or when `timeout` runs out;
    HttpError('deadline_exceeded') when the deadline is what ends the wait."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    where = hostport(host, port)
    wait = timeout
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HttpError("deadline_exceeded", f"no time left to resolve {host}", where=where)
        wait = min(wait, left)
    lookup = _shared_lookup(host.lower(), port)
    if not lookup.done.wait(wait):
        if wait < timeout:
            raise HttpError("deadline_exceeded", f"name resolution of {host} still pending at the deadline",
                            where=where)
        raise HttpError("dns_error", f"name resolution timed out after {timeout:g}s", where=where)
    outcome = lookup.outcome
    if isinstance(outcome, BaseException):
        detail = f"name resolution failed: {outcome.strerror or one_line(outcome, with_type=False)}" \
            if isinstance(outcome, socket.gaierror) else one_line(outcome)
        raise HttpError("dns_error", detail, where=where)
    addresses = list(dict.fromkeys(info[4][0] for info in outcome))
    if not addresses:
        raise HttpError("dns_error", f"no address for {host}", where=where)
    return addresses


_WITH_PORT = re.compile(r"^(?:\[(?P<v6>[^\]]+)\]|(?P<plain>[^:\[\]]+)):(?P<port>\d{1,5})$")


def parse_allowed_address(entry: str) -> tuple[Any, int | None]:
    """(ip_network or lower-case host name, port or None for any) of one `allowed_addresses` entry."""
    text = entry.strip()
    try:
        return ipaddress.ip_network(text, strict=False), None  # "10.0.0.0/8", "::1", "fd00::/8"
    except ValueError:
        pass
    port = None
    match = _WITH_PORT.match(text)
    if match:
        text, port = match["v6"] or match["plain"], int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"allowed_addresses entry {entry!r}: port {port} out of range")
    elif text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return ipaddress.ip_network(text, strict=False), port
    except ValueError:
        if not text or any(c in text for c in "/[]: *"):  # "*.example.com" would never match: refused
            raise ValueError(f"allowed_addresses entry {entry!r} is not an IP, CIDR, host name or "
                             "one of them with :port") from None
        return text.lower().rstrip("."), port


class AddressGuard:
    """Resolves a host and refuses it when any address it resolves to is not public, unless allowed.
    `allowed` entries: an IP, CIDR or host name (any port), or `ip:port`, `[v6]:port`, `host:port`
    (that port only)."""

    def __init__(self, allowed: Iterable[str]):
        self.networks: list[tuple[Any, int | None]] = []
        self.hosts: list[tuple[str, int | None]] = []
        for entry in allowed:
            target, port = parse_allowed_address(entry)
            (self.hosts if isinstance(target, str) else self.networks).append((target, port))

    def _host_allowed(self, host: str, port: int) -> bool:
        return any(name == host and allowed_port in (None, port) for name, allowed_port in self.hosts)

    def _address_allowed(self, address: str, port: int) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net and allowed_port in (None, port) for net, allowed_port in self.networks
                   if ip.version == net.version)

    def check(self, host: str, port: int, timeout: float, *, deadline: float | None = None) -> str:
        """The address to connect to; HttpError('private_address') if any resolved address is forbidden
        (a name must not smuggle in an internal address next to a public one). `timeout` bounds the
        name lookup, and so does `deadline`."""
        host_l = host.lower().rstrip(".")
        addresses = resolve(host_l, port, timeout, deadline=deadline)
        if not self._host_allowed(host_l, port):
            for address in addresses:
                why = classify_address(address)
                if why and not self._address_allowed(address, port):
                    other_ports = sorted({p for net, p in self.networks if p is not None and p != port
                                          and ipaddress.ip_address(address) in net}
                                         | {p for name, p in self.hosts if name == host_l and p is not None})
                    if other_ports:
                        why += f"; allowed on port {', '.join(map(str, other_ports))} only"
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


# ----------------------------------------------------------------------------------- connections
class _BudgetedReader(io.RawIOBase):
    """The socket as http.client reads it (status line, headers, body): before every recv the socket
    timeout is set to what the budget grants, so neither a stalled nor a trickling server outlives it."""

    def __init__(self, sock: socket.socket, budget: _Budget):
        self._sock = sock
        # socket.makefile's SocketIO keeps the descriptor open when HTTPConnection.close() hands a
        # `will_close` connection over to its response, as it does for its own makefile.
        self._io = sock.makefile("rb", buffering=0)
        self._budget = budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        self._sock.settimeout(self._budget.slice())
        try:
            return self._io.readinto(buffer)
        except TimeoutError:
            if self._budget.over():
                raise _DeadlineExceeded from None
            raise

    def fileno(self) -> int:
        return self._io.fileno()

    def close(self) -> None:
        if not self.closed:
            self._io.close()
        super().close()


class _BudgetedSocket:
    """What HTTPResponse is handed instead of the socket: its makefile() reads through the budget."""

    def __init__(self, sock: socket.socket, budget: _Budget):
        self._sock = sock
        self._budget = budget

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_BudgetedReader(self._sock, self._budget))


class _BudgetedResponse(http.client.HTTPResponse):
    def __init__(self, sock: socket.socket, debuglevel: int = 0, method: str | None = None,
                 url: str | None = None, *, budget: _Budget):
        super().__init__(_BudgetedSocket(sock, budget), debuglevel, method, url)  # type: ignore[arg-type]


def _handshake(sock: ssl.SSLSocket, budget: _Budget, cap: float) -> None:
    """The TLS handshake, each wait for the server bounded by `cap` and all of them by the deadline
    (a server that dribbles its certificate gains nothing)."""
    sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        while True:
            try:
                sock.do_handshake()
                break
            except ssl.SSLWantReadError:
                events = selectors.EVENT_READ
            except ssl.SSLWantWriteError:
                events = selectors.EVENT_WRITE
            selector.register(sock, events)
            ready = selector.select(budget.slice(cap))
            selector.unregister(sock)
            if not ready:
                raise (_DeadlineExceeded if budget.over() else socket.timeout)("TLS handshake timed out")
    sock.setblocking(True)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an already-checked IP while sending the original Host header; every blocking step
    (connect, handshake, the response) draws from the request's budget."""

    def __init__(self, host: str, port: int, ip: str, budget: _Budget, connect_cap: float):
        super().__init__(host, port, timeout=connect_cap)
        self._ip = ip
        self._budget = budget
        self._cap = connect_cap
        self.response_class = functools.partial(_BudgetedResponse, budget=budget)  # type: ignore[assignment]

    def connect(self) -> None:
        self.sock = socket.create_connection((self._ip, self.port), self._budget.slice(self._cap))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = http.client.HTTPS_PORT

    def __init__(self, host: str, port: int, ip: str, budget: _Budget, connect_cap: float,
                 context: ssl.SSLContext):
        super().__init__(host, port, ip, budget, connect_cap)
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self._budget.slice(self._cap))
        try:
            tls = self._ctx.wrap_socket(sock, server_hostname=self.host, do_handshake_on_connect=False)
        except BaseException:
            sock.close()
            raise
        try:
            _handshake(tls, self._budget, self._cap)  # part of connecting: the connect timeout
        except BaseException:
            tls.close()
            raise
        self.sock = tls


@dataclass
class Response:
    """One hop's response: read it with `HttpClient.read_body` (or `raw.read1`), then close it."""

    conn: http.client.HTTPConnection
    raw: http.client.HTTPResponse
    url: str  # the URL this response answers (after the redirects `open` followed)
    budget: _Budget = field(repr=False)  # the request's time, shared with `raw`'s reader

    @property
    def status(self) -> int:
        return self.raw.status

    def header(self, name: str) -> str | None:
        return self.raw.getheader(name)

    def header_values(self, name: str) -> list[str]:
        return self.raw.msg.get_all(name) or []

    def set_timeout(self, seconds: float) -> None:
        """The per-read timeout from now on (the request's deadline still holds)."""
        self.budget.per_op = max(0.01, seconds)

    def close(self) -> None:
        self.raw.close()  # a `will_close` response owns the socket: the connection already let go of it
        self.conn.close()

    def __enter__(self) -> "Response":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


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

    def check_host(self, host: str, port: int, *, deadline: float | None = None) -> str:
        """The address a request to host:port would connect to (HttpError if the guard refuses it)."""
        if self.guard is None:
            return resolve(host, port, self.policy.connect_seconds, deadline=deadline)[0]
        return self.guard.check(host, port, self.policy.connect_seconds, deadline=deadline)

    def _connect(self, url: str, budget: _Budget) -> tuple[http.client.HTTPConnection, str, dict[str, str], str]:
        scheme, host, port, target = split_url(url)
        cap = self.policy.connect_seconds
        proxy = proxy_for(scheme, host) if self.policy.use_env_proxies else None
        headers: dict[str, str] = {}
        conn: http.client.HTTPConnection
        if proxy is None:
            where = hostport(host, port)
            ip = self.check_host(host, port, deadline=budget.deadline)
            if scheme == "https":
                conn = _PinnedHTTPSConnection(host, port, ip, budget, cap, self._ssl)
            else:
                conn = _PinnedHTTPConnection(host, port, ip, budget, cap)
        else:
            phost, pport, proxy_headers = proxy
            where = f"proxy {hostport(phost, pport)}"
            resolve(phost, pport, cap, deadline=budget.deadline)  # a dead proxy name fails within the timeout too
            try:
                granted = budget.slice(cap)
            except _DeadlineExceeded:
                raise HttpError("deadline_exceeded", "no time left to connect", where=where) from None
            if scheme == "https":
                conn = http.client.HTTPSConnection(phost, pport, timeout=granted, context=self._ssl)
                conn.set_tunnel(host, port, headers=proxy_headers)
            else:
                conn = http.client.HTTPConnection(phost, pport, timeout=granted)
                target = url  # a plain-HTTP proxy takes the absolute URL
                headers.update(proxy_headers)
            conn.response_class = functools.partial(_BudgetedResponse, budget=budget)  # type: ignore[assignment]
        try:
            conn.connect()
        except _DeadlineExceeded:
            conn.close()
            raise HttpError("deadline_exceeded", f"connecting to {hostport(host, port)}", where=where) from None
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
            if isinstance(err, TimeoutError) and budget.over():
                raise HttpError("deadline_exceeded", f"connecting to {hostport(host, port)}", where=where) from None
            raise _connect_error(err, where, cap) from None
        return conn, target, headers, hostport(host, port)

    def request(self, url: str, method: str = "GET", headers: dict[str, str] | None = None, *,
                deadline: float | None = None) -> Response:
        """One hop: resolve and connect (guarded), send, read the response head, all of it before
        `deadline`. Redirects are the caller's. The response's body reads draw from the same budget."""
        budget = _Budget(self.policy.timeout, deadline)
        conn, target, extra, where = self._connect(url, budget)
        try:
            conn.sock.settimeout(budget.slice())  # sending: sendall's timeout is its total
            conn.request(method, target, headers={"User-Agent": self.policy.user_agent, **(headers or {}), **extra})
            raw = conn.getresponse()
        except _DeadlineExceeded:
            conn.close()
            raise HttpError("deadline_exceeded", "no complete response head before the deadline", where=where) from None
        except TimeoutError:
            conn.close()
            if budget.over():
                raise HttpError("deadline_exceeded", "no complete response head before the deadline",
                                where=where) from None
            raise HttpError("timeout", f"no HTTP response within {self.policy.timeout:g}s",
                            where=where) from None
        except (http.client.HTTPException, OSError) as err:
            conn.close()
            raise HttpError("connection_error", f"connection closed without an HTTP response "
                                                f"({one_line(err, with_type=False)})", where=where) from None
        except ValueError as err:  # a header value http.client refuses to send (non-ASCII, a line break)
            conn.close()
            raise HttpError("unsupported_url", f"request not sendable ({one_line(err)})", permanent=True) from None
        return Response(conn, raw, url, budget)

    def open(self, url: str, method: str = "GET", headers: dict[str, str] | None = None, *,
             follow_redirects: bool = True, deadline: float | None = None,
             on_response: Callable[[Response], None] | None = None,
             before_hop: Callable[[str], None] | None = None) -> Response:
        """`request`, following redirects (each hop guarded again) when `follow_redirects`, every hop
        drawing from the one `deadline`. `before_hop` sees every hop's URL before it is requested and
        may refuse it by raising HttpError (e.g. its origin's robots.txt); `on_response` sees every
        hop's response before it is followed (e.g. to read a header that only the first hop carries)."""

        def hop(hop_url: str) -> Response | Redirect:
            if before_hop is not None:
                before_hop(hop_url)
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
        each read bounded by the policy's timeout and all of them by the request's deadline (and by
        `deadline`, when it is sooner)."""
        response.budget.tighten(deadline)
        chunks: list[bytes] = []
        size = 0
        try:
            while True:
                if deadline is not None and time.monotonic() >= deadline:
                    raise HttpError("deadline_exceeded", "body not complete before the deadline")
                chunk = response.raw.read1(CHUNK_BYTES)  # returns as soon as *some* bytes arrive
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    if truncate:
                        return b"".join(chunks)[:max_bytes]
                    raise HttpError("too_large", f"body over {max_bytes} bytes")
        except _DeadlineExceeded:
            raise HttpError("deadline_exceeded", "body not complete before the deadline") from None
        except TimeoutError:
            raise HttpError("timeout", f"no data for {self.policy.timeout:g}s") from None
        except http.client.IncompleteRead:
            raise HttpError("incomplete_body") from None
        except (http.client.HTTPException, OSError) as err:
            raise HttpError("connection_error", one_line(err)) from None
        if response.raw.length:  # read1() does not raise on a short body
            raise HttpError("incomplete_body")
        return b"".join(chunks)


def redirect_target(url: str, location: str) -> str:
    """Where a redirect from `url` with this Location header points (relative ones resolved);
    HttpError('unsupported_url') for a Location urllib cannot parse ("http://[x/")."""
    try:
        return urljoin(url, location.strip())
    except ValueError:
        raise HttpError("unsupported_url", f"unparsable redirect Location {location[:200]!r}",
                        permanent=True) from None


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


# ----------------------------------------------------------------------------------- robots.txt
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_URI_CHARS = _UNRESERVED | frozenset(":/?#[]@!$&'()*+,;=")  # what a URI may hold unescaped
_HEX = frozenset("0123456789abcdefABCDEF")
_AGENT_TOKEN = re.compile(r"[A-Za-z_-]+")  # RFC 9309 2.2.1: the product token's characters
_USER_AGENT_KEYS = frozenset({"user-agent", "useragent", "user agent"})
# RFC 9309 2.2.4 lets a parser accept misspellings; these are the ones robots.txt files carry.
_DISALLOW_KEYS = frozenset({"disallow", "dissallow", "dissalow", "disalow", "diasllow", "disallaw"})


def product_token(user_agent: str) -> str:
    """The token robots.txt groups are matched against: the user agent up to its first "/" or
    whitespace, lower-case ("witclip/0.1 (+https://...)" -> "witclip")."""
    return re.split(r"[/\s]", user_agent.strip(), maxsplit=1)[0].lower()


def _normalise_path(text: str) -> str:
    """`text` with its percent-encoding normalised as RFC 9309 2.2.2 asks, the same for a pattern and
    a URL: an escaped unreserved character is unescaped (%7E -> ~), other escapes are kept with
    upper-case hex (%2f -> %2F: an escaped "/" is not a "/"), and what a URI cannot hold unescaped
    (non-ASCII, spaces, controls, a lone "%") is escaped as UTF-8."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        escape = text[i + 1:i + 3]
        if ch == "%" and len(escape) == 2 and set(escape) <= _HEX:
            decoded = chr(int(escape, 16))
            out.append(decoded if decoded in _UNRESERVED else f"%{escape.upper()}")
            i += 3
            continue
        out.append(ch if ch in _URI_CHARS else "".join(f"%{b:02X}" for b in ch.encode("utf-8", "replace")))
        i += 1
    return "".join(out)


def _match_target(url: str) -> str:
    """What robots.txt rules are matched against: the URL's path and query, normalised."""
    before_fragment = url.partition("#")[0]
    parts = urlsplit(before_fragment)
    path = parts.path or "/"
    if "?" in before_fragment:
        path += f"?{parts.query}"
    return _normalise_path(path)


class _Rule:
    """One Allow or Disallow line: a path prefix where `*` matches any run of characters and a
    final `$` anchors the end."""

    __slots__ = ("allow", "pattern", "_parts", "_anchored")

    def __init__(self, allow: bool, value: str):
        self.allow = allow
        self.pattern = _normalise_path(value)
        body = self.pattern
        self._anchored = body.endswith("$")
        self._parts = (body[:-1] if self._anchored else body).split("*")

    def matches(self, target: str) -> bool:
        # Leftmost placement of every literal piece is optimal for `*`-only patterns, so this is
        # linear in the URL: a robots.txt full of `*a*a*a*` cannot make it backtrack.
        first, *rest = self._parts
        if not rest:
            return target == first if self._anchored else target.startswith(first)
        if not target.startswith(first):
            return False
        pos = len(first)
        *middle, last = rest
        for piece in middle:
            found = target.find(piece, pos)
            if found < 0:
                return False
            pos = found + len(piece)
        if self._anchored:
            return len(target) - len(last) >= pos and target.endswith(last)
        return target.find(last, pos) >= 0


class RobotsRules:
    """One parsed robots.txt (RFC 9309): groups of product tokens with their Allow/Disallow rules.
    Our own matcher, because group selection must be an exact token match (Protego matches a group
    whose token merely occurs in the user-agent string)."""

    def __init__(self, groups: list[tuple[list[str], list[_Rule]]]):
        self._groups = groups
        self._by_token: dict[str, list[_Rule]] = {}

    @classmethod
    def parse(cls, text: str) -> "RobotsRules":
        """Groups start at a User-agent line that follows a rule; rules before any User-agent line
        are ignored; other lines (Sitemap, Crawl-delay, unknown) neither start nor end a group. A
        group's token is the leading run of product-token characters of its User-agent value
        ("WitClip/2.0" -> "witclip"), or "*"."""
        groups: list[tuple[list[str], list[_Rule]]] = []
        agents: list[str] | None = None
        rules: list[_Rule] = []
        reading_agents = False
        for raw in text.lstrip("\ufeff").splitlines():
            key, sep, value = raw.split("#", 1)[0].partition(":")
            if not sep:
                continue
            key = " ".join(key.lower().split())
            value = value.strip()
            if key in _USER_AGENT_KEYS:
                if not reading_agents:
                    agents, rules = [], []
                    groups.append((agents, rules))
                    reading_agents = True
                match = _AGENT_TOKEN.match(value)
                if value.startswith("*"):
                    agents.append("*")  # type: ignore[union-attr]
                elif match:
                    agents.append(match.group(0).lower())  # type: ignore[union-attr]
            elif key == "allow" or key in _DISALLOW_KEYS:
                reading_agents = False
                if agents is not None and value:  # an empty "Disallow:" allows everything: no rule
                    rules.append(_Rule(key == "allow", value))
        return cls(groups)

    def rules_for(self, token: str) -> list[_Rule]:
        """The rules of every group naming `token` exactly (case-insensitive), merged; those of the
        `*` groups when none does."""
        token = token.lower()
        found = self._by_token.get(token)
        if found is None:
            named = [rules for agents, rules in self._groups if token in agents]
            if not named:
                named = [rules for agents, rules in self._groups if "*" in agents]
            found = self._by_token[token] = [rule for rules in named for rule in rules]
        return found

    def allowed(self, url: str, token: str) -> bool:
        """Whether `token` may fetch `url`: the longest matching pattern decides, Allow on a tie."""
        target = _match_target(url)
        if target == "/robots.txt":
            return True
        best: tuple[int, bool] | None = None
        for rule in self.rules_for(token):
            key = (len(rule.pattern), rule.allow)
            if (best is None or key > best) and rule.matches(target):
                best = key
        return best is None or best[1]


@dataclass(frozen=True)
class _RobotsVerdict:
    rules: RobotsRules | None = None  # None (and reachable): everything allowed
    unreachable: HttpError | None = None  # why the origin is disallowed for now


_ALLOW_ALL = _RobotsVerdict()


@dataclass
class _RobotsEntry:
    lock: threading.Lock = field(default_factory=threading.Lock)  # held by the thread fetching it
    verdict: _RobotsVerdict | None = None
    failures: int = 0  # unreachable fetches in a row
    retry_at: float = math.inf  # monotonic time from which an unreachable robots.txt is fetched again
    fetched_at: float = 0.0  # monotonic time of the fetch the verdict came from


class RobotsCache:
    """robots.txt per origin, fetched through `client` and judged per RFC 9309 (see the module
    docstring); thread-safe, one fetch per origin at a time. An unreachable robots.txt is fetched
    again `backoff_seconds` later, then after twice that, ..., `retries` times in all."""

    def __init__(self, client: HttpClient, *, deadline_seconds: float, retries: int = ROBOTS_RETRIES,
                 backoff_seconds: float = ROBOTS_BACKOFF_SECONDS):
        self.client = client
        self.deadline_seconds = deadline_seconds  # a robots.txt fetch's own limit, when the caller has none sooner
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.token = product_token(client.policy.user_agent)
        self._lock = threading.Lock()
        self._entries: dict[str, _RobotsEntry] = {}

    @staticmethod
    def robots_url(url: str) -> str:
        """The robots.txt URL of `url`'s origin (HttpError('unsupported_url') for non-http(s) URLs)."""
        scheme, host, port, _ = split_url(url)
        netloc = f"[{host}]" if ":" in host else host
        if port != (443 if scheme == "https" else 80):
            netloc += f":{port}"
        return f"{scheme}://{netloc}/robots.txt"

    def check(self, url: str, *, deadline: float | None = None) -> None:
        """Nothing if our product token may fetch `url`; otherwise HttpError: robots_disallowed (the
        rules say no), robots_unavailable (robots.txt unreachable, or still being fetched by another
        thread at `deadline`), deadline_exceeded (`deadline` passed before the check), unsupported_url. A fetch of robots.txt this
        call makes draws from `deadline` (and never runs past `deadline_seconds`)."""
        robots_url = self.robots_url(url)
        verdict = self._verdict(robots_url, deadline)
        if verdict.unreachable is not None:
            cause = verdict.unreachable
            why = f"{cause.reason}: {cause.detail}" if cause.detail else cause.reason
            raise HttpError("robots_unavailable", f"{robots_url} unreachable ({why})", where=cause.where)
        if verdict.rules is not None and not verdict.rules.allowed(url, self.token):
            raise HttpError("robots_disallowed", f"{robots_url} disallows {_match_target(url)[:200]}",
                            permanent=True)

    def allowed(self, url: str, *, deadline: float | None = None) -> bool:
        """Whether our product token may fetch `url` now: `check` as a bool (any refusal is False)."""
        try:
            self.check(url, deadline=deadline)
        except HttpError:
            return False
        return True

    def _entry(self, robots_url: str) -> _RobotsEntry:
        with self._lock:
            entry = self._entries.get(robots_url)
            if entry is None:
                while len(self._entries) >= ROBOTS_MAX_ORIGINS:  # a worker crawling many hosts stays bounded
                    del self._entries[next(iter(self._entries))]  # the oldest; a thread using it keeps its own
                entry = self._entries[robots_url] = _RobotsEntry()
            return entry

    @staticmethod
    def _due(entry: _RobotsEntry) -> bool:
        now = time.monotonic()
        return (entry.verdict is None or now - entry.fetched_at >= ROBOTS_MAX_AGE_SECONDS
                or (entry.verdict.unreachable is not None and now >= entry.retry_at))

    def _verdict(self, robots_url: str, deadline: float | None) -> _RobotsVerdict:
        entry = self._entry(robots_url)
        if not self._due(entry):
            return entry.verdict  # type: ignore[return-value]
        wait = -1.0
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0:
                raise HttpError("deadline_exceeded", f"no time left to fetch {robots_url}")
        if not entry.lock.acquire(timeout=wait):
            # not known in time is not known: keep out, under the reason the fetching request gets too
            raise HttpError("robots_unavailable", f"{robots_url} still being fetched by another request "
                                                  "at this request's deadline")
        try:
            if self._due(entry):
                fetched = self._fetch(robots_url, deadline)
                entry.fetched_at = time.monotonic()
                if fetched.unreachable is None:
                    entry.failures, entry.retry_at = 0, math.inf
                else:
                    entry.failures += 1
                    entry.retry_at = (time.monotonic() + self.backoff_seconds * 2 ** (entry.failures - 1)
                                      if entry.failures <= self.retries else math.inf)
                entry.verdict = fetched
            return entry.verdict  # type: ignore[return-value]
        finally:
            entry.lock.release()

    def _fetch(self, robots_url: str, deadline: float | None) -> _RobotsVerdict:
        """The verdict of one fetch (its redirects followed), to be cached. Raises instead, caching
        nothing, when the failure says nothing about the origin: the address guard refuses the
        robots.txt's own host (private_address: the request that asked is refused for that reason),
        this process has too many name lookups pending (dns_busy), or the asking request's own
        deadline, shorter than a robots.txt fetch may take, ran out (robots_unavailable for that
        request only: a redirect hop late in its budget must not keep a CDN out for the crawl)."""
        own = time.monotonic() + self.deadline_seconds
        # a request that asks first thing has (about) a whole fetch's time; one with under 90 % left of it
        # was cut short by its own earlier work, and its timeout says nothing about the origin
        caller_bound = deadline is not None and deadline < own - 0.1 * self.deadline_seconds
        deadline = own if deadline is None else min(deadline, own)
        hops = 0

        def hop(url: str) -> _RobotsVerdict | Redirect:
            nonlocal hops
            hops += 1
            with self.client.request(url, headers={"Accept": "text/plain, */*;q=0.5"}, deadline=deadline) as response:
                status = response.status
                if status in REDIRECT_STATUSES:
                    location = response.header("Location")
                    if not location:
                        return _RobotsVerdict(unreachable=HttpError(f"http_{status}", "redirect without Location"))
                    return Redirect(redirect_target(url, location))
                if 200 <= status < 300:
                    body = self.client.read_body(response, max_bytes=ROBOTS_MAX_BYTES, deadline=deadline,
                                                 truncate=True)
                    return _RobotsVerdict(rules=RobotsRules.parse(body.decode("utf-8", errors="replace")))
                if 400 <= status < 500 and status != 429:
                    return _ALLOW_ALL  # "unavailable": RFC 9309 2.3.1.3, 401 and 403 included
                return _RobotsVerdict(unreachable=HttpError(f"http_{status}"))  # 429, 5xx, 1xx/3xx oddities

        try:
            return follow_redirects_with(robots_url, hop, ROBOTS_MAX_REDIRECTS)
        except HttpError as err:
            if err.reason in ("too_many_redirects", "redirect_loop"):
                return _ALLOW_ALL  # RFC 9309 2.3.1.2: more than five redirects may be taken as unavailable
            if (err.reason == "private_address" and hops == 1) or err.reason == "dns_busy":
                raise
            if err.reason == "deadline_exceeded" and caller_bound:
                raise HttpError("robots_unavailable", f"{robots_url} not fetched within this request's deadline",
                                where=err.where) from None
            return _RobotsVerdict(unreachable=err)
