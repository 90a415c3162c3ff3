"""Harvest (image URL, alt-text) candidates by a bounded breadth-first crawl of HTML pages.

Pure stdlib on the network side (urllib + html.parser) so the stage has no
browser/JS dependency; I/O happens only at the edges (HTTP in, one parquet out).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections import deque
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

import pandas as pd
from tqdm.auto import tqdm

DEFAULT_USER_AGENT = "witclip/0.1 (+https://github.com/witclip/witclip)"
CANDIDATES_FILE = "candidates.parquet"
_MAX_PAGE_BYTES = 8 << 20  # a "page" bigger than this is not worth parsing for alt text
_HTML_TYPES = ("text/html", "application/xhtml+xml")


class _PageParser(HTMLParser):
    """Collect <a href>, <img src alt> and <base href> from one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        self.images: list[tuple[str | None, str | None]] = []  # (src, alt) as written
        self.base: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])  # type: ignore[arg-type]
        elif tag == "img":
            self.images.append((a.get("src"), a.get("alt")))
        elif tag == "base" and a.get("href") and self.base is None:
            self.base = a["href"]

    handle_startendtag = handle_starttag  # <img ... /> goes through the same path


def _normalise_url(url: str) -> str:
    """Drop the fragment; lower-case scheme/host; "http://h" == "http://h/" (else pages repeat)."""
    parts = urlsplit(urldefrag(url.strip())[0])
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))


def _is_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


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
        body = resp.read(_MAX_PAGE_BYTES) if ctype in _HTML_TYPES else b""
        return resp.geturl(), ctype, body, charset


class _Robots:
    """robots.txt per host, fetched once with our own timeout and user agent.

    Same conventions as urllib.robotparser.read(): 401/403 => disallow all, other
    errors (404, 5xx, network) => allow all.
    """

    def __init__(self, user_agent: str, timeout: float) -> None:
        self.user_agent, self.timeout = user_agent, timeout
        self.parsers: dict[str, RobotFileParser] = {}

    def url_for(self, url: str) -> str:
        p = urlsplit(url)
        return f"{p.scheme}://{p.netloc}/robots.txt"

    def allowed(self, url: str) -> bool:
        robots_url = self.url_for(url)
        rp = self.parsers.get(robots_url)
        if rp is None:
            rp = self.parsers[robots_url] = RobotFileParser(robots_url)
            req = urllib.request.Request(robots_url, headers={"User-Agent": self.user_agent})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    rp.parse(resp.read(1 << 20).decode("utf-8", errors="replace").splitlines())
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    rp.disallow_all = True
                else:
                    rp.allow_all = True
            except Exception:  # noqa: BLE001 - no robots.txt reachable: nothing forbids us
                rp.allow_all = True
        return rp.can_fetch(self.user_agent, url)


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
) -> dict[str, Any]:
    """Breadth-first crawl from seed_url; write out_dir/candidates.parquet (url, caption, page).

    Only pages on allowed hosts (default: the seed's host:port) are followed; image
    URLs may point anywhere http(s). A page that fails to load is counted, not fatal,
    except the seed itself (ConnectionError). `max_pages` bounds fetch attempts.
    Pages disallowed by the host's robots.txt are not fetched (PermissionError if
    that is the seed). Returns counts: pages_fetched, page_errors, non_html,
    robots_disallowed, img_tags, empty_alt, non_http_img, duplicate_candidates,
    candidates.
    """
    seed = _normalise_url(str(seed_url))
    if not _is_http(seed):
        raise ValueError(f"seed URL must be an absolute http(s):// URL, got {seed_url!r}")
    allowed = {h.lower() for h in (allowed_hosts or [urlsplit(seed).netloc])}
    out_dir = Path(out_dir)

    counts = dict(
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
            final_url = _normalise_url(final_url)
            if url == seed and allowed_hosts is None:
                allowed.add(urlsplit(final_url).netloc)  # follow the seed's own redirect (http->https, www.)
            if ctype not in _HTML_TYPES:
                counts["non_html"] += 1
                continue
            if final_url != url:  # redirected: stay on allowed hosts, don't parse a page twice
                if (final_url in seen and url != seed) or not _host_allowed(final_url, allowed):
                    continue
                seen.add(final_url)
            counts["pages_fetched"] += 1

            parser = _PageParser()
            try:
                parser.feed(body.decode(charset, errors="replace"))
                parser.close()
            except LookupError:  # unknown charset label
                parser.feed(body.decode("utf-8", errors="replace"))
            base = urljoin(final_url, parser.base) if parser.base else final_url

            for src, alt in parser.images:
                counts["img_tags"] += 1
                if not src:
                    continue
                img_url = _normalise_url(urljoin(base, src.strip()))
                if not _is_http(img_url):  # data:, javascript:, ... can't be downloaded by URL
                    counts["non_http_img"] += 1
                    continue
                caption = " ".join((alt or "").split())
                if not caption:
                    counts["empty_alt"] += 1
                    continue
                rows.append((img_url, caption, final_url))

            if depth >= max_depth:
                continue
            for href in parser.links:
                link = _normalise_url(urljoin(base, href.strip()))
                if link in seen or not _is_http(link) or not _host_allowed(link, allowed):
                    continue
                seen.add(link)
                queue.append((link, depth + 1))

    df = pd.DataFrame(rows, columns=["url", "caption", "page"])
    n_raw = len(df)
    # Same image + same text seen on several pages is one training pair; keep the first page.
    df = df.drop_duplicates(subset=["url", "caption"], keep="first").reset_index(drop=True)
    counts["duplicate_candidates"] = n_raw - len(df)
    counts["candidates"] = len(df)

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{CANDIDATES_FILE}.tmp"
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / CANDIDATES_FILE)  # no half-written parquet if we die mid-write
    return counts
