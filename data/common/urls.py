"""URL normalisers, each named by what it is for. They differ on purpose:

- `normalise_for_fetch`: the form harvest records and visits a URL in (candidates' `url`, the page
  crawl's seen-set). It only removes what never reaches the server -- the fragment -- and what is
  case-insensitive by definition (scheme, host); "http://h" and "http://h/" are one page. Everything
  else, the query's order included, is kept: a server may treat it as meaningful.
- `normalise_for_dedup`: the key under which dedup calls two image URLs the same resource. It goes
  further: the default port is dropped and query parameters are sorted.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urldefrag, urlencode, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalise_for_fetch(url: str) -> str:
    """Drop the fragment; lower-case scheme and host; an empty path is "/"."""
    parts = urlsplit(urldefrag(url.strip())[0])
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))


def normalise_for_dedup(url: str) -> str:
    """Same resource, same string: lower-case scheme and host, no default port, no fragment, query
    parameters sorted."""
    parts = urlsplit(str(url).strip())
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, _DEFAULT_PORTS.get(scheme)) else f"{host}:{port}"
    query = urlencode(sorted(parse_qsl(parts.query, keep_blank_values=True)))
    return urlunsplit((scheme, netloc, parts.path or "/", query, ""))


def is_http_url(url: str) -> bool:
    """An absolute http(s) URL with a host."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)
