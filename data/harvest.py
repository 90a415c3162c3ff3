"""Harvest (image URL, caption) candidates from three kinds of source, into one file format.

- `harvest_site`: a bounded breadth-first crawl of live HTML pages (`<img alt>` texts).
- `harvest_warc`: the same HTML parsing over pages already captured in WARC files.
- `harvest_url_list`: ready-made (url, caption) lists: parquet, csv, tsv or jsonl.

Every source ends in `write_candidates`, which writes `out_dir/candidates.parquet`:

    url            str   absolute http(s) image URL (fragment dropped, scheme/host lower-cased)
    caption        str   whitespace-normalised alt text / caption, never empty
    source         str   where the pair came from: the page URL for HTML (crawl: the page's
                         final URL after redirects; WARC: the record's WARC-Target-URI); for a
                         URL list "<file name>:<row>", row counted from 1 over data rows
    matched_query  str?  the query that selected the pair when query balancing ran
                         (`queries=`, see data.queries), else null

with (url, caption) unique (the first occurrence kept) and, with `queries=`, at most
`query_cap` pairs per query. Network access is pure stdlib (urllib + html.parser), so
the stage has no browser/JS dependency; I/O happens only at the edges.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import urllib.error
import urllib.request
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit, urlunsplit

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from protego import Protego
from tqdm.auto import tqdm

from data.fetch import DEFAULT_USER_AGENT  # one user agent for harvest and crawl

CANDIDATES_FILE = "candidates.parquet"
CANDIDATE_COLUMNS = ("url", "caption", "source", "matched_query")
# Explicit types: an all-null matched_query must still be a string column, not "null".
CANDIDATE_SCHEMA = pa.schema([(c, pa.string()) for c in CANDIDATE_COLUMNS])
URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl")
_MAX_PAGE_BYTES = 8 << 20  # a "page" bigger than this is not worth parsing for alt text
_HTML_TYPES = ("text/html", "application/xhtml+xml")
# <picture><source type=...> variants worth choosing: what the downloader can decode.
_SOURCE_TYPES = ("", "image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif")
_FORMAT_ALIASES = {"ndjson": "jsonl", "jsonlines": "jsonl", "pq": "parquet"}


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


def _parse_html(body: bytes, charset: str) -> _PageParser:
    parser = _PageParser()
    try:
        text = body.decode(charset, errors="replace")
    except LookupError:  # unknown charset label
        text = body.decode("utf-8", errors="replace")
    parser.feed(text)
    parser.close()
    return parser


def _page_rows(parser: _PageParser, page_url: str, counts: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(image URL, raw alt, page) for every <img> with an http(s) URL; relative URLs resolve
    against <base href> (itself relative to the page). Empty alts stay in: write_candidates counts them."""
    base = _page_base(parser, page_url)
    rows: list[tuple[str, str, str]] = []
    for src, alt in parser.images:
        counts["img_tags"] += 1
        if not src:
            continue
        img_url = _resolve(base, src)
        if not _is_http(img_url):  # data:, javascript:, ... can't be downloaded by URL
            counts["non_http_img"] += 1
            continue
        rows.append((img_url, alt or "", page_url))
    return rows


def _page_base(parser: _PageParser, page_url: str) -> str:
    return (_resolve(page_url, parser.base) if parser.base else "") or page_url


def _resolve(base: str, ref: str) -> str:
    """ref made absolute against base and normalised; "" for what urllib cannot parse ("http://[x")."""
    try:
        return _normalise_url(urljoin(base, ref.strip()))
    except ValueError:  # one malformed attribute must not end a crawl
        return ""


def _normalise_url(url: str) -> str:
    """Drop the fragment; lower-case scheme/host; "http://h" == "http://h/" (else pages repeat)."""
    parts = urlsplit(urldefrag(url.strip())[0])
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path or "/", parts.query, ""))


def _is_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _content_type(value: str | None) -> tuple[str, str | None]:
    """'text/html; charset=UTF-8' -> ('text/html', 'UTF-8')."""
    ctype, *params = (value or "").split(";")
    charset = None
    for p in params:
        k, _, v = p.partition("=")
        if k.strip().lower() == "charset" and v.strip():
            charset = v.strip().strip("\"'")
    return ctype.strip().lower(), charset


# ---------------------------------------------------------------------------- output
def write_candidates(
    df: pd.DataFrame,
    out_dir: Path,
    *,
    counts: dict[str, Any] | None = None,
    empty_key: str = "empty_caption",
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> Path:
    """Write df as out_dir/candidates.parquet (module docstring), atomically; return its path.

    df needs url and caption; source and matched_query are filled with null when absent,
    other columns are dropped. Captions are whitespace-normalised; empty ones are dropped
    (counted under `empty_key`), then repeated (url, caption) pairs (the first kept,
    duplicate_candidates), then, with `queries`, rows are balanced by data.queries
    (its counts merged in). `counts`, when given, is updated in place with those
    figures and `candidates` (rows written).
    """
    counts = {} if counts is None else counts
    missing = {"url", "caption"} - set(df.columns)
    if missing:
        raise ValueError(f"candidates need columns url and caption; missing {sorted(missing)}")
    df = pd.DataFrame({c: (df[c] if c in df.columns else None) for c in CANDIDATE_COLUMNS}, index=df.index)
    df["caption"] = [" ".join(c.split()) if isinstance(c, str) else "" for c in df["caption"].tolist()]
    nonempty = df["caption"] != ""
    counts[empty_key] = counts.get(empty_key, 0) + int((~nonempty).sum())
    df = df[nonempty]
    n = len(df)
    # Same image + same text seen twice is one training pair; keep the first source.
    df = df.drop_duplicates(subset=["url", "caption"], keep="first").reset_index(drop=True)
    counts["duplicate_candidates"] = counts.get("duplicate_candidates", 0) + n - len(df)
    if queries is not None:
        from data.queries import balance_by_queries

        df, qcounts = balance_by_queries(df, queries, cap=query_cap)
        counts.update(qcounts)
    counts["candidates"] = len(df)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df[list(CANDIDATE_COLUMNS)], schema=CANDIDATE_SCHEMA, preserve_index=False)
    path = out_dir / CANDIDATES_FILE
    tmp = out_dir / f".{CANDIDATES_FILE}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # no half-written parquet if we die mid-write
    return path


def _rows_frame(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["url", "caption", "source"])


# ------------------------------------------------------------------------- URL lists
def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


# What a malformed list file raises while being read (not our own ValueErrors, which name the file).
_READ_ERRORS = (
    OSError, EOFError, zlib.error, pa.ArrowException, UnicodeError, csv.Error, json.JSONDecodeError,
    pd.errors.ParserError,
)  # fmt: skip


def _one_line(err: BaseException, limit: int = 100) -> str:
    """The exception's first line, printable and short: it goes inside our own one-line message."""
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    first = "".join(c if c.isprintable() else "?" for c in first)
    first = first if len(first) <= limit else first[:limit] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _list_format(path: Path, file_format: str | None) -> str:
    if file_format is not None:
        fmt = _FORMAT_ALIASES.get(file_format.lower().lstrip("."), file_format.lower().lstrip("."))
        if fmt not in URL_LIST_FORMATS:
            raise ValueError(
                f"{path}: unknown URL list format {file_format!r}; expected one of {', '.join(URL_LIST_FORMATS)}"
            )
        return fmt
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    fmt = _FORMAT_ALIASES.get(ext, ext)
    if fmt not in URL_LIST_FORMATS:
        raise ValueError(
            f"{path}: unknown URL list format {('.' + ext) if ext else '(no extension)'}; expected "
            f"{', '.join('.' + f for f in URL_LIST_FORMATS)} (optionally + .gz), or pass file_format="
        )
    return fmt


def _known(path: Path) -> bool:
    try:
        _list_format(path, None)
    except ValueError:
        return False
    return True


def _open_bytes(path: Path) -> io.BufferedIOBase:
    """The file's bytes, gunzipped when the content is gzip (by magic bytes, not by name)."""
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")  # type: ignore[return-value]


def _parquet_source(path: Path) -> Path | io.BytesIO:
    """Parquet needs random access: a gzipped one is inflated into memory (rare; plain is the norm)."""
    if not _is_gzip(path):
        return path
    with gzip.open(path, "rb") as fh:
        return io.BytesIO(fh.read())


def _list_columns(path: Path, fmt: str) -> list[str]:
    """Column names, read cheaply: the parquet schema, the csv/tsv header, the first jsonl object."""
    if fmt == "parquet":
        return list(pq.read_schema(_parquet_source(path)).names)
    # utf-8-sig: a byte-order mark (spreadsheet exports) must not become part of the first column's name
    with _open_bytes(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace", newline="") as fh:
        if fmt in ("csv", "tsv"):
            return next(csv.reader(fh, delimiter="\t" if fmt == "tsv" else ","), [])
        for line in fh:
            if line.strip():
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}: a jsonl URL list needs one JSON object per line, got {line[:60]!r}")
                return list(obj)
        return []


def _read_list(path: Path, fmt: str, url_col: str, caption_col: str) -> tuple[list[Any], list[Any]]:
    if fmt == "parquet":
        table = pq.read_table(_parquet_source(path), columns=[url_col, caption_col])
        return table.column(url_col).to_pylist(), table.column(caption_col).to_pylist()
    with _open_bytes(path) as raw:
        if fmt in ("csv", "tsv"):
            # all text, no "NA" -> NaN guessing: a caption reading "None" is a caption
            df = pd.read_csv(
                raw,
                sep="\t" if fmt == "tsv" else ",",
                usecols=[url_col, caption_col],
                dtype=str,
                keep_default_na=False,
                encoding="utf-8-sig",
                encoding_errors="replace",
            )
            return df[url_col].tolist(), df[caption_col].tolist()
        urls: list[Any] = []
        caps: list[Any] = []
        for i, line in enumerate(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{i}: not valid JSON ({err.msg})") from None
            get = obj.get if isinstance(obj, dict) else {}.get
            urls.append(get(url_col))
            caps.append(get(caption_col))
        return urls, caps


def check_url_lists(
    path: str | Path | Sequence[str | Path],
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    file_format: str | None = None,
) -> list[tuple[Path, str]]:
    """The (file, format) pairs `harvest_url_list` would read, after checking that every file
    exists, has a known format and has both columns (reads headers/schemas only). Raises
    FileNotFoundError or ValueError with one line naming the file."""
    given = [Path(path)] if isinstance(path, (str, Path)) else [Path(p) for p in path]
    paths: list[Path] = []
    for p in given:
        if p.is_dir():  # its list files, in name order (hidden files and other extensions skipped)
            found = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith(".") and _known(f))
            if not found:
                raise FileNotFoundError(f"no URL list files (.parquet, .csv, .tsv, .jsonl, optionally .gz) in {p}")
            paths.extend(found)
        elif not p.is_file():
            raise FileNotFoundError(f"URL list not found: {p}")
        else:
            paths.append(p)
    if not paths:
        raise ValueError("no URL list files given")
    plan: list[tuple[Path, str]] = []
    for p in paths:
        fmt = _list_format(p, file_format)
        try:
            present = _list_columns(p, fmt)
        except _READ_ERRORS as err:
            raise ValueError(f"{p}: cannot read as {fmt}: {_one_line(err)}") from None
        for col, arg in ((url_col, "url_col"), (caption_col, "caption_col")):
            if col not in present:
                raise ValueError(
                    f"{p}: no column {col!r} (columns present: {', '.join(map(repr, present)) or 'none'}); "
                    f"set {arg}= to the right one"
                )
        plan.append((p, fmt))

    return plan


def harvest_url_list(
    path: str | Path | Sequence[str | Path],
    out_dir: Path,
    *,
    url_col: str = "url",
    caption_col: str = "caption",
    file_format: str | None = None,
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> dict[str, Any]:
    """Read (url, caption) rows from one or more URL list files; write out_dir/candidates.parquet.

    `path` is a file, a directory (its files with a known extension, in name order) or a
    list of either. Formats: parquet, csv, tsv, jsonl, from the extension (a trailing .gz
    is looked through; gzip itself is detected from the content) unless `file_format`
    names one for all files. Every file is checked (exists, format known, both columns
    present) before any is read in full. URLs are normalised like crawled ones; rows whose URL is missing
    or not http(s) are dropped. source = "<file name>:<row>" (1-based over data rows).
    With `queries`, rows are balanced by data.queries (at most `query_cap` per query).
    Returns counts: files, rows, non_http_url, empty_caption, duplicate_candidates,
    candidates (+ the balancing counts with `queries`).
    """
    plan = check_url_lists(path, url_col=url_col, caption_col=caption_col, file_format=file_format)
    counts: dict[str, Any] = dict(files=len(plan), rows=0, non_http_url=0)
    frames: list[pd.DataFrame] = []
    for p, fmt in plan:
        try:
            urls, caps = _read_list(p, fmt, url_col, caption_col)
        except _READ_ERRORS as err:
            raise ValueError(f"{p}: cannot read as {fmt}: {_one_line(err)}") from None
        counts["rows"] += len(urls)
        keep_url, keep_cap, keep_src = [], [], []
        for row, (u, c) in enumerate(zip(urls, caps), 1):
            u = _resolve("", u) if isinstance(u, str) else ""
            if not _is_http(u):
                counts["non_http_url"] += 1
                continue
            keep_url.append(u)
            keep_cap.append(c if isinstance(c, str) else ("" if c is None else str(c)))
            keep_src.append(f"{p.name}:{row}")
        frames.append(pd.DataFrame({"url": keep_url, "caption": keep_cap, "source": keep_src}))
    df = pd.concat(frames, ignore_index=True)
    write_candidates(df, out_dir, counts=counts, empty_key="empty_caption", queries=queries, query_cap=query_cap)
    return counts


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
        body = resp.read(_MAX_PAGE_BYTES) if ctype in _HTML_TYPES else b""
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
    data.queries. Returns counts: pages_fetched, page_errors, non_html,
    robots_disallowed, img_tags, empty_alt, non_http_img, duplicate_candidates,
    candidates (+ the balancing counts with `queries`).
    """
    seed = _normalise_url(str(seed_url))
    if not _is_http(seed):
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

            parser = _parse_html(body, charset)
            rows.extend(_page_rows(parser, final_url, counts))

            if depth >= max_depth:
                continue
            base = _page_base(parser, final_url)
            for href in parser.links:
                link = _resolve(base, href)
                if link in seen or not _is_http(link) or not _host_allowed(link, allowed):
                    continue
                seen.add(link)
                queue.append((link, depth + 1))

    write_candidates(
        _rows_frame(rows), out_dir, counts=counts, empty_key="empty_alt", queries=queries, query_cap=query_cap
    )
    return counts


# ------------------------------------------------------------------------------- WARC
def _warc_records(path: Path) -> Iterator[Any]:
    """warcio's records of one WARC file; a damaged or non-WARC file is one ValueError naming it."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    n = 0
    with open(path, "rb") as fh:
        records = iter(ArchiveIterator(fh))
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            # Only next() is guarded: warcio fails on damaged input in several ways (a file cut inside
            # a record's headers trips an AttributeError in its parser), none of them our bug.
            except (ArchiveLoadFailed, zlib.error, EOFError, OSError, AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: not a readable WARC file after {n} records ({_one_line(err)})") from None
            if record.format != "warc":  # warcio also takes any 5-word line for an ARC header
                raise ValueError(f"{path}: not a WARC file (record {n + 1} is not a WARC record)")
            n += 1
            yield record
    if n == 0:
        raise ValueError(f"{path}: not a WARC file (no WARC records in it)")


def harvest_warc(
    paths: str | Path | Sequence[str | Path],
    out_dir: Path,
    *,
    allowed_content_types: Sequence[str] = _HTML_TYPES,
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> dict[str, Any]:
    """Harvest <img> URL + alt pairs from the HTML pages captured in WARC files (gzipped or not).

    Each `response` record with HTTP status 200 and a content type in
    `allowed_content_types` is parsed like a crawled page: image URLs resolve against the
    record's WARC-Target-URI and the page's <base href>, and source is the target URI.
    Other record types (request, warcinfo, metadata, revisit, ...) are only counted.
    A missing file is a FileNotFoundError (all are checked before any is read); a file
    that is not a WARC (ARC files included), or breaks off into garbage, a ValueError naming
    it (found while reading; a WARC truncated at a record boundary is not detectable). Returns
    counts: files, records, responses, non_200, non_html, html_responses, img_tags,
    empty_alt, non_http_img, duplicate_candidates, candidates (+ the balancing counts
    with `queries`).
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("no WARC files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"WARC file not found: {f}")
    wanted = {t.lower() for t in allowed_content_types}
    counts: dict[str, Any] = dict(
        files=len(files), records=0, responses=0, non_200=0, non_html=0, html_responses=0,
        img_tags=0, empty_alt=0, non_http_img=0,
    )  # fmt: skip
    rows: list[tuple[str, str, str]] = []
    for f in files:
        for record in _warc_records(f):
            counts["records"] += 1
            if record.rec_type != "response":
                continue
            counts["responses"] += 1
            http = record.http_headers
            # dns:, whois: ... responses carry no HTTP headers
            if http is None or http.get_statuscode() != "200":
                counts["non_200"] += 1
                continue
            ctype, charset = _content_type(http.get_header("Content-Type"))
            if ctype not in wanted:
                counts["non_html"] += 1
                continue
            target = (record.rec_headers.get_header("WARC-Target-URI") or "").strip().strip("<>")
            page = _resolve("", target)
            if not _is_http(page):
                counts["non_html"] += 1
                continue
            counts["html_responses"] += 1
            body = record.content_stream().read(_MAX_PAGE_BYTES)  # de-chunked and decompressed by warcio
            rows.extend(_page_rows(_parse_html(body, charset or "utf-8"), page, counts))

    write_candidates(
        _rows_frame(rows), out_dir, counts=counts, empty_key="empty_alt", queries=queries, query_cap=query_cap
    )
    return counts
