"""A bounded breadth-first crawl of live HTML pages for `<img alt>` pairs."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from protego import Protego
from tqdm.auto import tqdm

from data.common.urls import is_http_url, normalise_for_fetch
from data.crawl.fetch import DEFAULT_USER_AGENT  # one user agent for harvest and crawl
from data.harvest.candidates import rows_frame, write_candidates
from data.harvest.html import (
    HTML_TYPES,
    MAX_PAGE_BYTES,
    page_base,
    page_rows,
    parse_html,
    resolve_url,
)


# ------------------------------------------------------------------------------ crawl
def _host_allowed(url: str, allowed: set[str]) -> bool:
    parts = urlsplit(url)
    # Accept either "host:port" or a bare "host" in allowed_hosts.
    return parts.netloc.lower() in allowed or (parts.hostname or "").lower() in allowed


def _fetch(url: str, timeout: float, user_agent: str) -> tuple[str, str, bytes, str]:
    """GET url -> (final url after redirects, content type, body, charset). Raises on HTTP/network errors."""
    req = urllib.request.Request(url, headers={"User-Agent": user_agent, "Accept": "text/html,*/*;q=0.5"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        ctype = (resp.headers.get_content_type() or "").lower()
        charset = resp.headers.get_content_charset() or "utf-8"
        body = resp.read(MAX_PAGE_BYTES) if ctype in HTML_TYPES else b""
        return resp.geturl(), ctype, body, charset


class _Robots:
    """robots.txt per host (parsed by protego), fetched once with our own timeout and user agent.

    Same conventions as urllib.robotparser.read(): 401/403 => disallow all, other
    errors (404, 5xx, network) => allow all.
    """

    _ALLOW_ALL = ""
    _DISALLOW_ALL = "User-agent: *\nDisallow: /\n"

    def __init__(self, user_agent: str, timeout: float) -> None:
        self.user_agent, self.timeout = user_agent, timeout
        self.parsers: dict[str, Protego] = {}

    def url_for(self, url: str) -> str:
        p = urlsplit(url)
        return f"{p.scheme}://{p.netloc}/robots.txt"

    def allowed(self, url: str) -> bool:
        robots_url = self.url_for(url)
        rp = self.parsers.get(robots_url)
        if rp is None:
            req = urllib.request.Request(robots_url, headers={"User-Agent": self.user_agent})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    text = resp.read(1 << 20).decode("utf-8", errors="replace")
            except urllib.error.HTTPError as err:
                text = self._DISALLOW_ALL if err.code in (401, 403) else self._ALLOW_ALL
            except Exception:  # noqa: BLE001 - no robots.txt reachable: nothing forbids us
                text = self._ALLOW_ALL
            rp = self.parsers[robots_url] = Protego.parse(text)
        return rp.can_fetch(url, self.user_agent)


def _reason(err: BaseException) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code}"
    if isinstance(err, urllib.error.URLError):
        return str(err.reason)
    return f"{type(err).__name__}: {err}"


def harvest_site(
    seed_url: str,
    out_dir: Path,
    *,
    max_pages: int = 200,
    max_depth: int = 10,
    allowed_hosts: list[str] | None = None,
    timeout: float = 10.0,
    user_agent: str = DEFAULT_USER_AGENT,
    respect_robots: bool = True,
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> dict[str, Any]:
    """Breadth-first crawl from seed_url; write out_dir/candidates.parquet (module docstring).

    Only pages on allowed hosts (default: the seed's host:port) are followed; image
    URLs may point anywhere http(s). An <img>'s URL is its largest srcset candidate, else
    src, else data-src (lazy loading) when src is missing or a data: URI. A page that
    fails to load is counted, not fatal, except the seed itself (ConnectionError).
    `max_pages` bounds fetch attempts. Pages disallowed by the host's robots.txt are not
    fetched (PermissionError if that is the seed). With `queries`, pairs are balanced by
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
    robots = _Robots(user_agent, timeout) if respect_robots else None
    if robots is not None and not robots.allowed(seed):
        raise PermissionError(f"seed URL {seed} is disallowed by {robots.url_for(seed)} for {user_agent!r}")
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
                final_url, ctype, body, charset = _fetch(url, timeout, user_agent)
            except Exception as err:  # noqa: BLE001 - any fetch failure is a fault of the world, not ours
                if url == seed:
                    raise ConnectionError(f"seed URL {seed} is unreachable: {_reason(err)}") from err
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

