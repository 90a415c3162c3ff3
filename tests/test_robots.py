"""robots.txt per RFC 9309 (data.common.http.RobotsRules and RobotsCache): groups chosen by the exact
product token, longest match, wildcards and percent-encoding; 2xx parsed, 4xx allow, 5xx / 429 /
network failures disallow the origin and are retried after a backoff, redirects followed through the
address guard. Servers listen on 127.0.0.1; 127.0.0.2 is a host the guard must never let us reach."""

from __future__ import annotations

import threading
import time

import pytest
from support.hostile_http import RawServer, answer, never_answer
from support.policies import loopback
from support.servers import CountingServer

from data.common.http import (
    DEFAULT_USER_AGENT,
    ROBOTS_MAX_REDIRECTS,
    HttpClient,
    HttpError,
    RobotsCache,
    RobotsRules,
    product_token,
)
from data.crawl.fetch import Fetcher, FetchPolicy

TOKEN = product_token(DEFAULT_USER_AGENT)


def _allows(robots_txt: str, path: str, token: str = TOKEN) -> bool:
    return RobotsRules.parse(robots_txt).allowed(f"http://example.test{path}", token)


# ------------------------------------------------------------------------------ the matcher
def test_product_token_is_the_user_agent_up_to_its_version():
    assert TOKEN == "witclip"
    assert product_token("WitClip/2.0 (+https://x)") == "witclip"
    assert product_token("  witclip crawler") == "witclip"


@pytest.mark.parametrize("agent", ["dataset", "github", "wit", "clip", "crawler", "image-text"])
def test_groups_for_other_tokens_do_not_apply(agent):
    # Each of these occurs in our full user-agent string; Protego would have applied them to us.
    robots = f"User-agent: {agent}\nDisallow: /\n"
    assert agent in DEFAULT_USER_AGENT.lower()
    assert _allows(robots, "/a.jpg")
    assert not _allows(robots + "\nUser-agent: *\nDisallow: /\n", "/a.jpg")  # the * group applies instead


@pytest.mark.parametrize("agent", ["witclip-images", "witclipbot", "witclip_"])
def test_longer_tokens_starting_with_ours_do_not_apply(agent):
    assert _allows(f"User-agent: {agent}\nDisallow: /\n", "/a.jpg")


@pytest.mark.parametrize("agent", ["witclip", "WitClip", "WITCLIP", "witclip/1.0", "witclip  # us"])
def test_a_group_naming_our_token_applies(agent):
    assert not _allows(f"User-agent: {agent}\nDisallow: /\n", "/a.jpg")


def test_our_group_replaces_the_star_group_and_same_token_groups_merge():
    robots = """User-agent: *
Disallow: /

user-agent: other
User-agent: WITCLIP
Disallow: /private/
Sitemap: https://example.test/sitemap.xml

User-agent: witclip
Disallow: /tmp/
"""
    assert _allows(robots, "/a.jpg")  # not the * group's Disallow: /
    assert not _allows(robots, "/private/a.jpg") and not _allows(robots, "/tmp/a.jpg")
    assert _allows(robots, "/a.jpg", token="other")  # "other" shares only the second group
    assert not _allows(robots, "/private/x", token="other") and _allows(robots, "/tmp/x", token="other")
    assert not _allows(robots, "/a.jpg", token="someone-else")  # falls back to *


def test_longest_match_wins_and_allow_wins_a_tie():
    robots = "User-agent: *\nDisallow: /private/\nAllow: /private/open\nAllow: /same\nDisallow: /same\n"
    assert not _allows(robots, "/private/a.html")
    assert _allows(robots, "/private/open.html")
    assert _allows(robots, "/same/x")  # equal length: the least restrictive
    assert _allows(robots, "/elsewhere")


def test_wildcards_and_end_anchor():
    robots = "User-agent: *\nDisallow: /*.gif$\nDisallow: /*?session=\nDisallow: /a*b*c\nAllow: /*.gif$ok\n"
    assert not _allows(robots, "/img/x.gif")
    assert _allows(robots, "/img/x.gif?w=10")  # $ anchors the end of path+query
    assert not _allows(robots, "/page.html?session=1")
    assert _allows(robots, "/page.html?id=1")
    assert not _allows(robots, "/a-xx-b-yy-c-zz") and _allows(robots, "/a-xx-c-yy-b")
    assert _allows("User-agent: *\nDisallow: /x$\n", "/x/y") and not _allows("User-agent: *\nDisallow: /x$\n", "/x")


def test_percent_encoding_is_normalised():
    assert not _allows("User-agent: *\nDisallow: /%7Euser/\n", "/~user/a.jpg")  # unreserved: unescaped
    assert not _allows("User-agent: *\nDisallow: /~user/\n", "/%7euser/a.jpg")
    assert not _allows("User-agent: *\nDisallow: /café/\n", "/caf%C3%A9/a.jpg")  # non-ASCII: escaped
    assert not _allows("User-agent: *\nDisallow: /caf%c3%a9/\n", "/café/a.jpg")
    assert _allows("User-agent: *\nDisallow: /a/b\n", "/a%2Fb")  # an escaped "/" is not a "/"
    assert not _allows("User-agent: *\nDisallow: /a%2fb\n", "/a%2Fb")


def test_parsing_edges():
    assert _allows("Disallow: /\nUser-agent: *\nAllow: /\n", "/x")  # a rule before any group is ignored
    assert _allows("\ufeffUser-agent: *\nDisallow:\n", "/x")  # BOM; an empty Disallow allows all
    assert not _allows("\ufeffUser-agent: * # everyone\nDisallow: /x # no\n", "/x/1")
    assert _allows("User-agent: *\nDisallow: /\n", "/robots.txt")  # always allowed
    assert _allows("<html><body>Not found</body></html>", "/x")  # garbage: no rules
    assert not _allows("User-agent: *\nDissallow: /x\n", "/x")  # a common misspelling is read


def test_a_hostile_pattern_cannot_make_matching_slow():
    robots = "User-agent: *\nDisallow: /" + "*a" * 2000 + "*b\n"
    t0 = time.monotonic()
    assert _allows(robots, "/" + "a" * 20000)
    assert time.monotonic() - t0 < 0.5


# ------------------------------------------------------------------------------ fetching it
IMAGE = answer(200, b"img", {"Content-Type": "image/jpeg"})
RULES = b"User-agent: *\nDisallow: /private/\n"


def _cache(*, timeout: float = 2.0, deadline_seconds: float = 3.0, backoff: float = 0.2,
           retries: int = 2) -> RobotsCache:
    client = HttpClient(loopback(timeout))  # 127.0.0.1 allowed, 127.0.0.2 not
    return RobotsCache(client, deadline_seconds=deadline_seconds, retries=retries, backoff_seconds=backoff)


def _reason(robots: RobotsCache, url: str, deadline: float | None = None) -> str:
    try:
        robots.check(url, deadline=deadline)
    except HttpError as err:
        return err.reason
    return "allowed"


@pytest.fixture
def server():
    with RawServer({"/a.jpg": IMAGE, "/private/a.jpg": IMAGE}) as srv:
        yield srv


def test_200_rules_are_applied_once_per_origin(server):
    server.routes["/robots.txt"] = answer(200, RULES, {"Content-Type": "text/plain"})
    robots = _cache()
    assert _reason(robots, server.url + "/private/a.jpg") == "robots_disallowed"
    assert _reason(robots, server.url + "/a.jpg") == "allowed"
    assert robots.allowed(server.url + "/a.jpg") and not robots.allowed(server.url + "/private/b.jpg")
    assert server.hits["/robots.txt"] == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
def test_4xx_allows_everything(server, status):
    server.routes["/robots.txt"] = answer(status, RULES)  # the body of an error page is not robots.txt
    robots = _cache()
    assert _reason(robots, server.url + "/private/a.jpg") == "allowed"
    assert server.hits["/robots.txt"] == 1


@pytest.mark.parametrize("status", [429, 500, 503])
def test_5xx_and_429_disallow_the_origin_then_retry_after_backoff(server, status):
    server.routes["/robots.txt"] = answer(status)
    robots = _cache(backoff=0.3)
    assert _reason(robots, server.url + "/a.jpg") == "robots_unavailable"
    assert _reason(robots, server.url + "/a.jpg") == "robots_unavailable"  # within the backoff: not asked again
    assert server.hits["/robots.txt"] == 1
    time.sleep(0.35)
    server.routes["/robots.txt"] = answer(200, RULES)  # it recovered
    assert _reason(robots, server.url + "/a.jpg") == "allowed"
    assert _reason(robots, server.url + "/private/a.jpg") == "robots_disallowed"
    assert server.hits["/robots.txt"] == 2


def test_unreachable_robots_txt_is_retried_a_bounded_number_of_times(server):
    server.routes["/robots.txt"] = answer(503)
    robots = _cache(backoff=0.1, retries=2)
    for _ in range(6):  # backoffs of 0.1 s, then 0.2 s, then never again
        assert _reason(robots, server.url + "/a.jpg") == "robots_unavailable"
        time.sleep(0.22)
    assert server.hits["/robots.txt"] == 3  # the first fetch and two retries
    with pytest.raises(HttpError) as err:
        robots.check(server.url + "/a.jpg")
    assert "http_503" in err.value.detail


def test_a_robots_txt_that_never_answers_disallows(server):
    server.routes["/robots.txt"] = never_answer()
    robots = _cache(timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(HttpError) as err:
        robots.check(server.url + "/a.jpg")
    assert err.value.reason == "robots_unavailable" and "timeout" in err.value.detail
    assert time.monotonic() - t0 < 0.3 + 0.5


def test_redirects_are_followed(server):
    server.routes["/robots.txt"] = answer(301, headers={"Location": "/moved/robots.txt"})
    server.routes["/moved/robots.txt"] = answer(302, headers={"Location": "/moved/again.txt"})
    server.routes["/moved/again.txt"] = answer(200, RULES)
    robots = _cache()
    assert _reason(robots, server.url + "/private/a.jpg") == "robots_disallowed"
    assert _reason(robots, server.url + "/a.jpg") == "allowed"


def test_too_many_redirects_is_unavailable_so_allowed(server):
    for i in range(ROBOTS_MAX_REDIRECTS + 2):
        server.routes[f"/r{i}.txt"] = answer(302, headers={"Location": f"/r{i + 1}.txt"})
    server.routes["/robots.txt"] = answer(302, headers={"Location": "/r0.txt"})
    assert _reason(_cache(), server.url + "/private/a.jpg") == "allowed"  # RFC 9309 2.3.1.2
    assert server.hits[f"/r{ROBOTS_MAX_REDIRECTS - 1}.txt"] == 1 and server.hits[f"/r{ROBOTS_MAX_REDIRECTS}.txt"] == 0


def test_a_redirect_to_a_forbidden_address_is_unreachable(server):
    with CountingServer("127.0.0.2") as private:
        private.start()
        server.routes["/robots.txt"] = answer(302, headers={"Location": f"{private.url}/robots.txt"})
        robots = _cache()
        with pytest.raises(HttpError) as err:
            robots.check(server.url + "/a.jpg")
        assert err.value.reason == "robots_unavailable" and "private_address" in err.value.detail
        assert private.connections == 0 and private.count == 0


def test_a_forbidden_origin_gets_no_verdict_and_no_connection():
    with CountingServer("127.0.0.2") as private:
        private.start()
        robots = _cache()
        # No verdict cached: the request is refused for the guard's reason, and its robots.txt never asked
        assert _reason(robots, f"{private.url}/a.jpg") == "private_address"
        assert not robots._entries[robots.robots_url(f"{private.url}/a.jpg")].verdict
        fetcher = Fetcher(FetchPolicy(timeout=1.0, deadline=2.0, allowed_addresses=("127.0.0.1",)))
        with pytest.raises(HttpError) as err:
            fetcher.get(f"{private.url}/a.jpg")
        assert err.value.reason == "private_address"
        assert private.connections == 0


def test_waiting_for_another_threads_fetch_ends_at_ones_own_deadline(server):
    server.routes["/robots.txt"] = answer(200, RULES, delay=1.0)
    robots = _cache()
    first: list[str] = []
    fetching = threading.Thread(target=lambda: first.append(_reason(robots, server.url + "/a.jpg")))
    fetching.start()
    time.sleep(0.1)  # the first thread is fetching robots.txt now
    t0 = time.monotonic()
    # not known by its deadline is not known: kept out, as the fetching thread would be on a failure
    assert _reason(robots, server.url + "/a.jpg", deadline=time.monotonic() + 0.3) == "robots_unavailable"
    assert time.monotonic() - t0 < 0.3 + 0.2
    fetching.join(5)
    assert first == ["allowed"] and server.hits["/robots.txt"] == 1
    assert _reason(robots, server.url + "/private/a.jpg", deadline=time.monotonic() + 0.01) == "robots_disallowed"


def test_the_fetcher_refuses_an_origin_whose_robots_txt_is_unreachable(server):
    server.routes["/robots.txt"] = answer(503)
    fetcher = Fetcher(FetchPolicy(timeout=1.0, deadline=2.0, allowed_addresses=("127.0.0.1",)))
    with pytest.raises(HttpError) as err:
        fetcher.get(server.url + "/a.jpg")
    assert err.value.reason == "robots_unavailable"
    assert server.hits["/a.jpg"] == 0


def test_unsupported_urls_are_not_robots_questions():
    with pytest.raises(HttpError, match="unsupported_url"):
        _cache().check("ftp://127.0.0.1/a.jpg")
    assert RobotsCache.robots_url("HTTP://Example.TEST:80/a/b?c") == "http://example.test/robots.txt"
    assert RobotsCache.robots_url("https://[::1]:8443/x") == "https://[::1]:8443/robots.txt"


def test_a_request_short_of_time_does_not_keep_the_origin_out_for_others(server):
    """A redirect hop late in its request's budget may not finish the robots.txt fetch; that says
    nothing about the origin: this request is refused, nothing is cached, the next one fetches again."""
    server.routes["/robots.txt"] = answer(200, RULES, delay=1.0)
    robots = _cache()
    assert _reason(robots, server.url + "/a.jpg", deadline=time.monotonic() + 0.3) == "robots_unavailable"
    assert robots._entries[robots.robots_url(server.url + "/a.jpg")].verdict is None
    assert _reason(robots, server.url + "/a.jpg") == "allowed" and server.hits["/robots.txt"] == 2
