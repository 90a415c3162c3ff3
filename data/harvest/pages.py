"""A bounded breadth-first crawl of live HTML pages for `<img alt>` pairs (`harvest_site`).

Every request goes through `data.common.http.HttpClient`: the address guard checks every redirect hop
before anything is sent there, no environment proxies, one deadline per page (`page_deadline`: its
robots.txt and all its hops). Only http(s) links are followed, and only to allowed hosts; the seed's
redirect target joins those only after it answered through the guard. A page that fails -- refused
by the guard, unreachable, not 2xx, a bad charset label, markup over the parse budget -- is counted
and the crawl goes on; only the seed's failure ends it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from data.common.http import HttpClient, HttpError, HttpPolicy, Response, RobotsCache
from data.common.urls import is_http_url, normalise_for_fetch, redact_url, redact_urls
from data.harvest.candidates import rows_frame, write_candidates
from data.harvest.html import (
    HTML_TYPES,
    MAX_PAGE_BYTES,
    page_base,
    page_rows,
    parse_content_type,
    parse_page,
    resolve_url,
)


# ------------------------------------------------------------------------------ crawl
def _host_allowed(url: str, allowed: set[str]) -> bool:
    parts = urlsplit(url)
    # Accept either "host:port" or a bare "host" in allowed_hosts.
    return parts.netloc.lower() in allowed or (parts.hostname or "").lower() in allowed


def _fetch_page(client: HttpClient, url: str, deadline: float,
                robots: RobotsCache | None = None) -> tuple[str, str, bytes, str | None, set[str]]:
    """GET url by `deadline` (a time.monotonic() instant) -> (final url after redirects, content type,
    body, charset label or None, the netlocs that answered). Every redirect hop is guarded again and,
    with `robots`, checked against its own origin's robots.txt (the first URL is the caller's to
    check). HttpError for a failed request (a hop the address guard refused included: reason
    private_address, nothing sent there; a hop robots.txt keeps us from: robots_disallowed or
    robots_unavailable) or an answer other than 2xx (reason http_<status>)."""
    answered: set[str] = set()  # hosts a response came from: each one got past the address guard

    def check_robots(hop_url: str) -> None:
        if robots is not None and hop_url != url:
            robots.check(hop_url, deadline=deadline)

    def note(response: Response) -> None:
        answered.add(urlsplit(response.url).netloc.lower())

    with client.open(url, headers={"Accept": "text/html,*/*;q=0.5"}, deadline=deadline,
                     before_hop=check_robots, on_response=note) as response:
        if not 200 <= response.status < 300:
            raise HttpError(f"http_{response.status}", f"HTTP {response.status}")
        ctype, charset = parse_content_type(response.header("Content-Type"))
        body = b""
        if ctype in HTML_TYPES:  # a page over the cap is parsed as far as the cap
            body = client.read_body(response, max_bytes=MAX_PAGE_BYTES, deadline=deadline, truncate=True)
        return response.url, ctype, body, charset, answered


def seed_error(seed: str, err: HttpError) -> ConnectionError:
    """One line saying why the seed page could not be fetched."""
    seed, detail = redact_url(seed), redact_urls(err.detail or err.reason)  # the line reaches logs and MLflow
    if err.reason == "private_address":
        return ConnectionError(f"seed URL {seed} is refused by the address guard ({detail}); "
                               "list its address in http.allowed_addresses to crawl it")
    return ConnectionError(f"seed URL {seed} is unreachable: {detail}")


def page_deadline(policy: HttpPolicy) -> float:
    """Seconds one page request may take in all (its robots.txt when not known yet, and every redirect
    hop's lookup, connect, head and body): 4 x the per-operation timeout."""
    return 4 * policy.timeout


def check_seed(seed_url: str, policy: HttpPolicy) -> None:
    """Fetch the seed page once, as harvest will (same guard, user agent, redirects); HttpError if that
    fails, so a wrong or dead seed is reported before any work."""
    _fetch_page(HttpClient(policy), seed_url, time.monotonic() + page_deadline(policy))


def harvest_site(
    seed_url: str,
    out_dir: Path,
    *,
    max_pages: int = 200,
    max_depth: int = 10,
    allowed_hosts: list[str] | None = None,
    policy: HttpPolicy | None = None,
    respect_robots: bool = True,
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> dict[str, Any]:
    """Breadth-first crawl from seed_url; write out_dir/candidates.parquet (module docstring).

    Only http(s) pages on allowed hosts (default: the seed's host:port, plus the host the seed
    redirected to, once it answered through the address guard) are followed; image
    URLs may point anywhere http(s). An <img>'s URL is its largest srcset candidate, else
    src, else data-src (lazy loading) when src is missing or a data: URI. A page that
    fails to load is counted, not fatal, except the seed itself (ConnectionError).
    `max_pages` bounds fetch attempts. Every request goes through `data.common.http` with
    `policy` (address guard on every redirect hop, user agent, timeouts); one page's request,
    its robots.txt and redirects included, must end by one deadline (`page_deadline`). Pages
    the host's robots.txt disallows are not fetched (PermissionError if that is the seed);
    nor is a page whose robots.txt is unreachable (RFC 9309): a page error, robots_unavailable
    (the seed: ConnectionError). Pages are decoded and tokenized by
    `data.harvest.html.parse_page`: a bogus charset label is read as UTF-8 and counted, markup
    that outruns the parse budget keeps what was read and is counted; neither ends the harvest.
    With `queries`, pairs are balanced by data.harvest.queries. Returns counts: pages_fetched,
    page_errors, page_error_reasons (HttpError reason -> pages, e.g. private_address,
    robots_unavailable, deadline_exceeded, http_404; most frequent first), non_html,
    robots_disallowed, bad_charset, parse_budget_exceeded, img_tags, empty_alt, non_http_img,
    duplicate_candidates, candidates (+ the balancing counts with `queries`).
    """
    seed = normalise_for_fetch(str(seed_url))
    if not is_http_url(seed):
        raise ValueError(f"seed URL must be an absolute http(s):// URL, got {seed_url!r}")
    allowed = {h.lower() for h in (allowed_hosts or [urlsplit(seed).netloc])}

    counts: dict[str, Any] = dict(
        pages_fetched=0, page_errors=0, non_html=0, robots_disallowed=0, bad_charset=0, parse_budget_exceeded=0,
        img_tags=0, empty_alt=0, non_http_img=0,
    )  # fmt: skip
    error_reasons: dict[str, int] = {}
    client = HttpClient(policy or HttpPolicy())
    deadline_seconds = page_deadline(client.policy)
    robots = RobotsCache(client, deadline_seconds=deadline_seconds) if respect_robots else None
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = {seed}
    queue: deque[tuple[str, int]] = deque([(seed, 0)])
    attempts = 0

    with tqdm(total=max_pages, desc="harvest pages", unit="page", leave=False) as bar:
        while queue and attempts < max_pages:
            url, depth = queue.popleft()
            # One deadline for the page: its robots.txt (when that is not known yet) and every redirect hop.
            deadline = time.monotonic() + deadline_seconds
            failure: HttpError | None = None
            if robots is not None:
                try:
                    robots.check(url, deadline=deadline)
                except HttpError as err:
                    if err.reason == "robots_disallowed":
                        if url == seed:
                            raise PermissionError(f"seed URL {redact_url(seed)} is disallowed by "
                                                  f"{redact_url(robots.robots_url(seed))} "
                                                  f"for {client.policy.user_agent!r}") from None
                        counts["robots_disallowed"] += 1
                        continue
                    failure = err  # robots.txt unreachable (RFC 9309: keep out for now), deadline_exceeded
            attempts += 1
            bar.update(1)
            if failure is None:
                try:
                    final_url, ctype, body, charset, answered = _fetch_page(client, url, deadline, robots)
                except HttpError as err:  # a fault of the world (or a hop the guard refused), not ours
                    failure = err
            if failure is not None:
                if url == seed:
                    raise seed_error(seed, failure) from failure
                counts["page_errors"] += 1
                error_reasons[failure.reason] = error_reasons.get(failure.reason, 0) + 1
                continue
            final_url = normalise_for_fetch(final_url)
            final_host = urlsplit(final_url).netloc
            if url == seed and allowed_hosts is None and final_host in answered:
                # Follow the seed's own redirect (http->https, www.). Only a host that answered is
                # added, and every host that answered got past the address guard on its hop: the
                # allowlist never admits an address the guard refused.
                allowed.add(final_host)
            if ctype not in HTML_TYPES:
                counts["non_html"] += 1
                continue
            if final_url != url:  # redirected: stay on allowed hosts, don't parse a page twice
                if (final_url in seen and url != seed) or not _host_allowed(final_url, allowed):
                    continue
                seen.add(final_url)
            counts["pages_fetched"] += 1

            page = parse_page(body, charset, counts)
            rows.extend(page_rows(page, final_url, counts))

            if depth >= max_depth:
                continue
            base = page_base(page, final_url)
            for href in page.links:
                link = resolve_url(base, href)
                # http(s) only: mailto:, javascript:, file:, ftp: ... links are never requested
                if link in seen or not is_http_url(link) or not _host_allowed(link, allowed):
                    continue
                seen.add(link)
                queue.append((link, depth + 1))

    # most frequent first, then by name: the same crawl lists them in the same order
    counts["page_error_reasons"] = dict(sorted(error_reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    write_candidates(
        rows_frame(rows), out_dir, counts=counts, empty_key="empty_alt", queries=queries, query_cap=query_cap
    )
    return counts

