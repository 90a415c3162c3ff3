"""One budget per request (data.common.http, data.crawl.fetch): the name lookup, connect, TLS
handshake, status line, headers, body, every redirect hop and the robots.txt fetch a request triggers
all draw from ONE deadline. Against raw-socket servers on 127.0.0.1 that trickle a byte every 0.3 s
(each byte resets a per-read timeout, so only the deadline can end them): every case must end within
deadline + 1 s, with the reason code that says what ended it. The Fetcher's own queueing (the first
hop's wait for a connection slot, a Retry-After pause) is not the server's time and moves its deadline
later; a later hop's wait for a slot or a rate turn is drawn from the deadline."""

from __future__ import annotations

import io
import socket
import threading
import time

import pytest
from PIL import Image
from support.hostile_http import (
    RawServer,
    answer,
    never_answer,
    tls_trickle,
    trickle,
    trickle_headers,
    trickle_status,
)

from data.common.http import HttpClient, HttpError, HttpPolicy
from data.crawl.fetch import Fetcher, FetchPolicy

DEADLINE, TIMEOUT = 2.0, 1.0  # the per-operation timeout alone would never fire: bytes come every 0.3 s
SLACK = 1.0  # what the issue allows past the deadline (we aim for well under)
HOPS = 5


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (20, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg()


def _slow_redirects() -> dict:
    """/hop/0 -> /hop/1 -> ... -> /hop/5 (an image), each 302 sent after 0.8 s (under the 1 s timeout)."""
    routes = {f"/hop/{i}": answer(302, headers={"Location": f"/hop/{i + 1}"}, delay=0.8) for i in range(HOPS)}
    routes[f"/hop/{HOPS}"] = answer(200, JPEG, {"Content-Type": "image/jpeg"})
    return routes


@pytest.fixture(scope="module")
def hostile():
    routes = {
        "/robots.txt": answer(404),
        "/trickle-status": trickle_status(0.3),
        "/trickle-headers": trickle_headers(0.3),
        "/stall": never_answer(),
        **_slow_redirects(),
    }
    with RawServer(routes) as srv:
        yield srv


@pytest.fixture(scope="module")
def robots_trickler():
    """A host whose robots.txt trickles; its image would answer at once if it were ever asked."""
    routes = {"/robots.txt": trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\nUser-agent: *\nAllow: /\n", 0.3),
              "/img.jpg": answer(200, JPEG, {"Content-Type": "image/jpeg"})}
    with RawServer(routes) as srv:
        yield srv


def _client(**overrides) -> HttpClient:
    return HttpClient(HttpPolicy(**{"timeout": TIMEOUT, "allowed_addresses": ("127.0.0.1",), **overrides}))


def _fetcher(**overrides) -> Fetcher:
    return Fetcher(FetchPolicy(**{"timeout": TIMEOUT, "deadline": DEADLINE, "allowed_addresses": ("127.0.0.1",),
                                  **overrides}))


def _timed(call) -> tuple[str, str, float]:
    """(reason, detail, seconds) of a call that must fail."""
    t0 = time.monotonic()
    with pytest.raises(HttpError) as err:
        call()
    elapsed = time.monotonic() - t0
    print(f"{err.value.reason} after {elapsed:.2f}s ({err.value.detail})")  # pytest -s shows the measurements
    return err.value.reason, err.value.detail, elapsed


def _client_get(client: HttpClient, url: str) -> None:
    deadline = time.monotonic() + DEADLINE
    with client.open(url, deadline=deadline) as response:
        client.read_body(response, max_bytes=1 << 20, deadline=deadline)


@pytest.mark.parametrize("path", ["/trickle-status", "/trickle-headers"])
def test_a_trickled_head_ends_at_the_deadline(hostile, path):
    reason, detail, elapsed = _timed(lambda: _client_get(_client(), hostile.url + path))
    assert reason == "deadline_exceeded" and "head" in detail
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + SLACK


def test_a_trickled_head_ends_a_fetch_at_the_deadline(hostile):
    reason, _, elapsed = _timed(lambda: _fetcher().get(hostile.url + "/trickle-headers"))
    assert reason == "deadline_exceeded" and elapsed < DEADLINE + SLACK


def test_a_stalled_head_is_a_timeout_not_the_deadline(hostile):
    reason, _, elapsed = _timed(lambda: _client_get(_client(), hostile.url + "/stall"))
    assert reason == "timeout" and TIMEOUT - 0.05 <= elapsed < TIMEOUT + 0.5


def test_slow_redirect_hops_share_one_deadline(hostile):
    # Each hop alone is well within the per-operation timeout; five of them are not within 2 s.
    before = hostile.hits[f"/hop/{HOPS}"]
    reason, _, elapsed = _timed(lambda: _client_get(_client(), hostile.url + "/hop/0"))
    assert reason == "deadline_exceeded" and elapsed < DEADLINE + SLACK
    assert hostile.hits[f"/hop/{HOPS}"] == before  # the chain's end was never reached


@pytest.mark.slow  # 4 s: the whole chain, once with too little time and once with enough
def test_slow_redirect_hops_share_one_fetch_deadline(hostile):
    before = hostile.hits[f"/hop/{HOPS}"]
    reason, _, elapsed = _timed(lambda: _fetcher().get(hostile.url + "/hop/0"))  # robots.txt (404) + hops
    assert reason == "deadline_exceeded" and elapsed < DEADLINE + SLACK
    assert hostile.hits[f"/hop/{HOPS}"] == before
    assert _fetcher(deadline=10.0).get(hostile.url + "/hop/0") == JPEG  # with time enough it ends


def test_a_trickled_robots_txt_spends_the_requests_deadline(robots_trickler):
    fetcher = _fetcher()
    reason, detail, elapsed = _timed(lambda: fetcher.get(robots_trickler.url + "/img.jpg"))
    assert reason == "robots_unavailable" and "deadline_exceeded" in detail
    assert elapsed < DEADLINE + SLACK
    assert robots_trickler.hits["/img.jpg"] == 0  # unreachable robots.txt: the host is off limits
    reason, _, elapsed = _timed(lambda: fetcher.get(robots_trickler.url + "/img.jpg"))
    assert reason == "robots_unavailable" and elapsed < 0.1  # remembered, not fetched again at once
    assert robots_trickler.hits["/robots.txt"] == 1


def test_a_trickled_tls_handshake_ends_at_the_deadline():
    with RawServer({}, tls_route=tls_trickle(0.3)) as srv:
        url = f"https://127.0.0.1:{srv.port}/img.jpg"
        reason, detail, elapsed = _timed(lambda: _client_get(_client(), url))
    assert reason == "deadline_exceeded" and "connect" in detail
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + SLACK


# ------------------------------------------------------------------------------ name lookups
@pytest.fixture
def silent_resolver(monkeypatch):
    """socket.getaddrinfo that never answers for *.never-answers.test (until the test ends), and
    counts the lookups that reached it."""
    real = socket.getaddrinfo
    release = threading.Event()
    asked: list[str] = []

    def getaddrinfo(host, *args, **kwargs):
        if str(host).endswith(".never-answers.test"):
            asked.append(host)
            release.wait(60)
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield asked
    release.set()  # the helper threads end


def test_a_silent_resolver_ends_at_the_deadline(silent_resolver):
    client = _client(connect_timeout=30.0)  # the lookup's own limit is far away: the deadline ends it
    reason, detail, elapsed = _timed(lambda: _client_get(client, "http://img.never-answers.test/a.jpg"))
    assert reason == "deadline_exceeded" and "name resolution" in detail
    assert DEADLINE - 0.05 <= elapsed < DEADLINE + SLACK


def test_a_silent_resolver_within_the_connect_timeout_is_a_dns_error(silent_resolver):
    client = _client(connect_timeout=0.3)
    reason, detail, elapsed = _timed(lambda: _client_get(client, "http://short.never-answers.test/a.jpg"))
    assert reason == "dns_error" and "timed out" in detail and elapsed < 0.3 + 0.5


def test_a_pending_lookup_is_shared_not_repeated(silent_resolver):
    client = _client(connect_timeout=30.0)
    outcomes: list[tuple[str, float]] = []

    def one() -> None:
        t0 = time.monotonic()
        try:
            _client_get(client, "http://shared.never-answers.test/a.jpg")
        except HttpError as err:
            outcomes.append((err.reason, time.monotonic() - t0))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    print(f"8 lookups of one silent name: {sorted({r for r, _ in outcomes})}, slowest {max(s for _, s in outcomes):.2f}s")
    assert len(outcomes) == 8 and all(r == "deadline_exceeded" and s < DEADLINE + SLACK for r, s in outcomes)
    assert silent_resolver == ["shared.never-answers.test"]  # one helper thread, not eight


def test_a_retry_after_pause_is_not_drawn_from_the_deadline():
    """The Fetcher's own politeness waits (here a 2 s Retry-After, longer than the 1.5 s deadline)
    are ours, not the server's: the retry continues the same budget, moved later by the pause."""
    answered: list[int] = []

    def once_429(conn, server):
        answered.append(429 if not answered else 200)
        status = answered[-1]
        answer(status, JPEG if status == 200 else b"", {"Retry-After": "2"} if status == 429 else None)(conn, server)

    with RawServer({"/robots.txt": answer(404), "/img.jpg": once_429}) as srv:
        t0 = time.monotonic()
        assert _fetcher(deadline=1.5).get(srv.url + "/img.jpg") == JPEG
        elapsed = time.monotonic() - t0
    print(f"success after {elapsed:.2f}s")
    assert answered == [429, 200] and 1.95 <= elapsed < 2 + 1.5


# ------------------------------------------------------------------------------ queueing
@pytest.fixture
def two_hosts():
    """X redirects to Y (another port: another host for the per-host limits); Y serves the image."""
    with RawServer({"/img.jpg": answer(200, JPEG, {"Content-Type": "image/jpeg"})}) as y:
        with RawServer({"/to-y": answer(302, headers={"Location": f"{y.url}/img.jpg"})}) as x:
            yield x, y


def _hold_slot(fetcher: Fetcher, server: RawServer, seconds: float):
    """Take the only connection slot to `server` (as another request would) for `seconds`; returns a
    function that gives it back now (once, whoever is first: it or the timer)."""
    state = fetcher._host_state(f"127.0.0.1:{server.port}")
    state.slots.acquire()
    held = threading.Lock()

    def release() -> None:
        if held.acquire(blocking=False):
            state.slots.release()

    timer = threading.Timer(seconds, release)
    timer.daemon = True
    timer.start()
    return release


def test_waiting_for_the_first_slot_is_queueing_not_the_deadline(two_hosts):
    _, y = two_hosts
    fetcher = _fetcher(deadline=1.0, max_connections_per_host=1, robots_txt=False)
    _hold_slot(fetcher, y, 1.5)
    t0 = time.monotonic()
    assert fetcher.get(f"{y.url}/img.jpg") == JPEG  # 1.5 s queued, then well within its 1 s
    assert time.monotonic() - t0 >= 1.4


def test_a_later_hops_wait_for_a_slot_is_drawn_from_the_deadline(two_hosts):
    x, y = two_hosts
    fetcher = _fetcher(deadline=1.0, max_connections_per_host=1, robots_txt=False)
    release = _hold_slot(fetcher, y, 3.0)
    try:
        reason, detail, elapsed = _timed(lambda: fetcher.get(f"{x.url}/to-y"))
    finally:
        release()
    assert reason == "deadline_exceeded" and "slot" in detail
    assert 0.95 <= elapsed < 1.0 + SLACK and y.hits["/img.jpg"] == 0


def test_a_later_hops_rate_turn_past_the_deadline_fails_at_once(two_hosts):
    x, y = two_hosts
    fetcher = _fetcher(deadline=1.0, robots_txt=False)
    fetcher._pause_host(fetcher._host_state(f"127.0.0.1:{y.port}"), 5.0)  # Y said Retry-After: 5 to another request
    reason, detail, elapsed = _timed(lambda: fetcher.get(f"{x.url}/to-y"))
    assert reason == "deadline_exceeded" and "rate" in detail and elapsed < 0.5
