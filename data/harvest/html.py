"""Reading HTML pages for (image URL, alt text) pairs: `<img>` with srcset / `<picture>` / lazy
loading, `<a href>` links and `<base href>`, with relative URLs resolved against the page."""

from __future__ import annotations

from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

from data.common.urls import is_http_url, normalise_for_fetch

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_PAGE_BYTES = 8 << 20  # a "page" bigger than this is not worth parsing for alt text
# <picture><source type=...> variants worth choosing: what the downloader can decode.
_SOURCE_TYPES = ("", "image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif")


# ------------------------------------------------------------------------------ HTML
class _PageParser(HTMLParser):
    """Collect <a href>, <img> (with its URL attributes and alt) and <base href> from one page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[str] = []
        # (raw URL chosen from srcset/src/data-src, alt), both as written; see _choose_src
        self.images: list[tuple[str | None, str | None]] = []
        self.base: str | None = None
        self._picture_sources: list[str] | None = None  # srcsets of <source>s in the open <picture>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "a" and a.get("href"):
            self.links.append(a["href"])  # type: ignore[arg-type]
        elif tag == "img":
            self.images.append((_choose_src(a, self._picture_sources or []), a.get("alt")))
        elif tag == "picture":
            self._picture_sources = []
        elif tag == "source" and self._picture_sources is not None:
            srcset = a.get("srcset") or a.get("data-srcset")
            if srcset and (a.get("type") or "").strip().lower() in _SOURCE_TYPES:
                self._picture_sources.append(srcset)
        elif tag == "base" and a.get("href") and self.base is None:
            self.base = a["href"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "picture":
            self._picture_sources = None

    handle_startendtag = handle_starttag  # <img ... /> goes through the same path


def parse_srcset(value: str) -> list[tuple[str, str]]:
    """Split a srcset attribute into (url, descriptor) pairs, after the HTML spec's algorithm.

    Not a plain split on ",": URLs may contain commas ("/c_scale,w_480/a.jpg 480w"); a
    candidate's URL runs to the next whitespace, its descriptor to the next comma.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and (value[i].isspace() or value[i] == ","):
            i += 1
        start = i
        while i < n and not value[i].isspace():
            i += 1
        url = value[start:i]
        descriptor = ""
        if url.endswith(","):  # "a.jpg, b.jpg 2x": no descriptor for a.jpg
            url = url.rstrip(",")
        else:
            start, depth = i, 0
            while i < n and (value[i] != "," or depth):
                if value[i] == "(":
                    depth += 1
                elif value[i] == ")" and depth:
                    depth -= 1
                i += 1
            descriptor = value[start:i].strip()
        if url:
            out.append((url, descriptor))
    return out


def _largest(srcsets: list[str]) -> str | None:
    """The biggest candidate across srcsets: highest width ("800w") if any has one, else highest
    density ("2x", none = 1x). Ties keep the first; data: URIs are never chosen."""
    best_w: tuple[float, str] | None = None
    best_x: tuple[float, str] | None = None
    for srcset in srcsets:
        for url, desc in parse_srcset(srcset):
            if url.lower().startswith("data:"):
                continue
            d = desc.split()[0].lower() if desc else "1x"
            try:
                size = float(d[:-1])
            except ValueError:
                continue  # "h" descriptors or junk: not comparable
            if d.endswith("w") and (best_w is None or size > best_w[0]):
                best_w = (size, url)
            elif d.endswith("x") and (best_x is None or size > best_x[0]):
                best_x = (size, url)
    best = best_w or best_x
    return best[1] if best else None


def _choose_src(a: dict[str, str | None], picture_sources: list[str]) -> str | None:
    """The URL to download for one <img>: the largest srcset candidate (its own srcset or
    data-srcset, plus the enclosing <picture>'s <source srcset>s), else src, else the lazy-loading
    data-src when src is missing or an inline data: URI (which is kept as the last resort, so
    it is counted as non-http)."""
    srcsets = [s for s in (a.get("srcset") or a.get("data-srcset"),) if s] + picture_sources
    best = _largest(srcsets) if srcsets else None
    if best:
        return best.strip()
    src = (a.get("src") or "").strip()
    if src and not src.lower().startswith("data:"):
        return src
    lazy = (a.get("data-src") or "").strip()
    return lazy or src or None


def parse_html(body: bytes, charset: str) -> _PageParser:
    parser = _PageParser()
    try:
        text = body.decode(charset, errors="replace")
    except LookupError:  # unknown charset label
        text = body.decode("utf-8", errors="replace")
    parser.feed(text)
    parser.close()
    return parser


def page_rows(parser: _PageParser, page_url: str, counts: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(image URL, raw alt, page) for every <img> with an http(s) URL; relative URLs resolve
    against <base href> (itself relative to the page). Empty alts stay in: write_candidates counts them."""
    base = page_base(parser, page_url)
    rows: list[tuple[str, str, str]] = []
    for src, alt in parser.images:
        counts["img_tags"] += 1
        if not src:
            continue
        img_url = resolve_url(base, src)
        if not is_http_url(img_url):  # data:, javascript:, ... can't be downloaded by URL
            counts["non_http_img"] += 1
            continue
        rows.append((img_url, alt or "", page_url))
    return rows


def page_base(parser: _PageParser, page_url: str) -> str:
    return (resolve_url(page_url, parser.base) if parser.base else "") or page_url


def resolve_url(base: str, ref: str) -> str:
    """ref made absolute against base and normalised; "" for what urllib cannot parse ("http://[x")."""
    try:
        return normalise_for_fetch(urljoin(base, ref.strip()))
    except ValueError:  # one malformed attribute must not end a crawl
        return ""


def parse_content_type(value: str | None) -> tuple[str, str | None]:
    """'text/html; charset=UTF-8' -> ('text/html', 'UTF-8')."""
    ctype, *params = (value or "").split(";")
    charset = None
    for p in params:
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset" and v.strip():
            charset = v.strip().strip("\"'")
    return ctype.strip().lower(), charset

