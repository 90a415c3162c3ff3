"""A bounded breadth-first crawl of live HTML pages for `<img alt>` pairs."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm.auto import tqdm

from data.common.http import HttpClient, HttpError, HttpPolicy, RobotsCache
from data.common.urls import is_http_url, normalise_for_fetch
from data.harvest.candidates import rows_frame, write_candidates
from data.harvest.html import (
    HTML_TYPES,
    MAX_PAGE_BYTES,
    page_base,
    page_rows,
    parse_content_type,
    parse_html,
    resolve_url,
)


# ------------------------------------------------------------------------------ crawl
def _host_allowed(url: str, allowed: set[str]) -> bool:
    parts = urlsplit(url)
    # Accept either "host:port" or a bare "host" in allowed_hosts.
    return parts.netloc.lower() in allowed or (parts.hostname or "").lower() in allowed


def _fetch_page(client: HttpClient, url: str, deadline_seconds: float) -> tuple[str, str, bytes, str]:
    """GET url -> (final url after redirects, content type, body, charset). HttpError for a failed
    request or an answer other than 2xx (reason http_<status>)."""
    deadline = time.monotonic() + deadline_seconds
    with client.open(url, headers={"Accept": "text/html,*/*;q=0.5"}, deadline=deadline) as response:
        if not 200 <= response.status < 300:
            raise HttpError(f"http_{response.status}", f"HTTP {response.status}")
        ctype, charset = parse_content_type(response.header("Content-Type"))
        body = b""
        if ctype in HTML_TYPES:  # a page over the cap is parsed as far as the cap
            body = client.read_body(response, max_bytes=MAX_PAGE_BYTES, deadline=deadline, truncate=True)
        return response.url, ctype, body, charset or "utf-8"


def seed_error(seed: str, err: HttpError) -> ConnectionError:
    """One line saying why the seed page could not be fetched."""
    if err.reason == "private_address":
        return ConnectionError(f"seed URL {seed} is refused by the address guard ({err.detail}); "
                               "list its address in http.allowed_addresses to crawl it")
    return ConnectionError(f"seed URL {seed} is unreachable: {err.detail or err.reason}")


def page_deadline(policy: HttpPolicy) -> float:
    """Seconds one page request may take in all (connect, head and body): 4 x the per-operation timeout."""
    return 4 * policy.timeout


def check_seed(seed_url: str, policy: HttpPolicy) -> None:
    """Fetch the seed page once, as harvest will (same guard, user agent, redirects); HttpError if that
    fails, so a wrong or dead seed is reported before any work."""
    _fetch_page(HttpClient(policy), seed_url, page_deadline(policy))


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

    Only pages on allowed hosts (default: the seed's host:port) are followed; image
    URLs may point anywhere http(s). An <img>'s URL is its largest srcset candidate, else
    src, else data-src (lazy loading) when src is missing or a data: URI. A page that
    fails to load is counted, not fatal, except the seed itself (ConnectionError).
    `max_pages` bounds fetch attempts. Every request goes through `data.common.http` with
    `policy` (address guard, user agent, guarded redirects, timeouts; a page's deadline is
    `page_deadline`). Pages disallowed by the host's robots.txt are not fetched (PermissionError
    if that is the seed). With `queries`, pairs are balanced by
    data.harvest.queries. Returns counts: pages_fetched, page_errors, non_html,
    robots_disallowed, img_tags, empty_alt, non_http_img, duplicate_candidates,
    candidates (+ the balancing counts with `queries`).
    """
    seed = normalise_for_fetch(str(seed_url))
    if not is_http_url(seed):
        raise ValueError(f"seed URL must be an absolute http(s):// URL, got {seed_url!r}")
    allowed = {h.lower() for h in (allowed_hosts or [urlsplit(seed).netloc])}

    counts: dict[str, Any] = dict(
        pages_fetched=0, page_errors=0, non_html=0, robots_disallowed=0, img_tags=0, empty_alt=0, non_http_img=0
    )
    client = HttpClient(policy or HttpPolicy())
    deadline_seconds = page_deadline(client.policy)
    robots = RobotsCache(client, deadline_seconds=deadline_seconds) if respect_robots else None
    if robots is not None and not robots.allowed(seed):
        raise PermissionError(f"seed URL {seed} is disallowed by {robots.robots_url(seed)} "
                              f"for {client.policy.user_agent!r}")
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = {seed}
    queue: deque[tuple[str, int]] = deque([(seed, 0)])
    attempts = 0

    with tqdm(total=max_pages, desc="harvest pages", unit="page", leave=False) as bar:
        while queue and attempts < max_pages:
            url, depth = queue.popleft()
            if robots is not None and not robots.allowed(url):
                counts["robots_disallowed"] += 1
                continue
            attempts += 1
            bar.update(1)
            try:
                final_url, ctype, body, charset = _fetch_page(client, url, deadline_seconds)
            except HttpError as err:  # a fault of the world, not ours
                if url == seed:
                    raise seed_error(seed, err) from err
                counts["page_errors"] += 1
                continue
            final_url = normalise_for_fetch(final_url)
            if url == seed and allowed_hosts is None:
                allowed.add(urlsplit(final_url).netloc)  # follow the seed's own redirect (http->https, www.)
            if ctype not in HTML_TYPES:
                counts["non_html"] += 1
                continue
            if final_url != url:  # redirected: stay on allowed hosts, don't parse a page twice
                if (final_url in seen and url != seed) or not _host_allowed(final_url, allowed):
                    continue
                seen.add(final_url)
            counts["pages_fetched"] += 1

            parser = parse_html(body, charset)
            rows.extend(page_rows(parser, final_url, counts))

            if depth >= max_depth:
                continue
            base = page_base(parser, final_url)
            for href in parser.links:
                link = resolve_url(base, href)
                if link in seen or not is_http_url(link) or not _host_allowed(link, allowed):
                    continue
                seen.add(link)
                queue.append((link, depth + 1))

    write_candidates(
        rows_frame(rows), out_dir, counts=counts, empty_key="empty_alt", queries=queries, query_cap=query_cap
    )
    return counts

