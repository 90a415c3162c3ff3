"""Harvest sources (URL lists, live HTML on loopback, WARC files) into candidates.parquet, and WIT-style
query balancing (data.harvest.queries)."""

from __future__ import annotations

import gzip
import io
import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
from support.policies import loopback
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from data.harvest import (
    CANDIDATE_COLUMNS,
    CANDIDATES_FILE,
    harvest_site,
    harvest_url_list,
    harvest_warc,
    parse_srcset,
    write_candidates,
)
from data.harvest.queries import QueryIndex, balance_by_queries, load_queries, tokens


def _read(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / CANDIDATES_FILE)
    assert tuple(df.columns) == CANDIDATE_COLUMNS
    return df


def _triples(df: pd.DataFrame) -> set[tuple[str, str, str]]:
    return set(zip(df["url"], df["caption"], df["source"]))


# ------------------------------------------------------------------------ loopback site
class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):  # noqa: N802
        self.server.log.append(self.path)
        status, ctype, body = self.server.routes.get(self.path, (404, "text/plain", b"not found"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def serve():
    """serve(routes) -> (base URL, request log); routes: path -> (status, content type, body)."""
    servers = []

    def start(routes: dict[str, tuple[int, str, bytes]]) -> tuple[str, list[str]]:
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        srv.daemon_threads = True
        srv.routes, srv.log = routes, []
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}", srv.log

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _page(body: str, head: str = "") -> tuple[int, str, bytes]:
    html = f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"
    return 200, "text/html; charset=utf-8", html.encode()


# ------------------------------------------------------------------------------ URL lists
LIST_ROWS = [
    ("http://img.example.com/a.jpg", "a red  circle"),  # row 1; whitespace normalised
    ("https://img.example.com/b.jpg#frag", 'two, "quoted" words'),  # row 2; fragment dropped, csv quoting
    ("ftp://img.example.com/c.jpg", "not http"),  # row 3
    ("/relative/d.jpg", "no host"),  # row 4
    ("http://img.example.com/e.jpg", "   "),  # row 5: empty caption
    ("http://img.example.com/a.jpg", "a red circle"),  # row 6: duplicate of row 1 after normalising
    ("HTTP://IMG.Example.com/F.jpg", "Café\tmenu"),  # row 7: scheme/host lower-cased, path kept
    ("", "no url"),  # row 8
    ("http://[::1/unclosed.jpg", "unparseable"),  # row 9
]
LIST_EXPECTED = {
    ("http://img.example.com/a.jpg", "a red circle", 1),
    ("https://img.example.com/b.jpg", 'two, "quoted" words', 2),
    ("http://img.example.com/F.jpg", "Café menu", 7),
}
LIST_COUNTS = dict(files=1, rows=9, non_http_url=4, empty_caption=1, duplicate_candidates=1, candidates=3)


def _write_list(path: Path, fmt: str, rows, url_col: str = "url", caption_col: str = "caption") -> Path:
    df = pd.DataFrame(rows, columns=[url_col, caption_col])
    buf = io.BytesIO()
    if fmt == "parquet":
        df.to_parquet(buf, index=False)
    elif fmt in ("csv", "tsv"):
        buf.write(df.to_csv(index=False, sep="\t" if fmt == "tsv" else ",").encode())
    else:
        buf.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in df.to_dict("records")).encode())
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_url_list_formats(tmp_path, fmt, gz):
    name = f"pairs.{fmt}" + (".gz" if gz else "")
    src = _write_list(tmp_path / name, fmt, LIST_ROWS)
    counts = harvest_url_list(src, tmp_path / "out")
    assert counts == LIST_COUNTS
    df = _read(tmp_path / "out")
    assert _triples(df) == {(u, c, f"{name}:{row}") for u, c, row in LIST_EXPECTED}
    assert df["matched_query"].isna().all()
    assert list(df["source"]) == [f"{name}:1", f"{name}:2", f"{name}:7"]  # input order kept


def test_url_list_custom_columns_override_and_several_files(tmp_path):
    a = _write_list(tmp_path / "a.dump", "jsonl", LIST_ROWS[:2], "image_url", "alt")  # extension says nothing
    b = _write_list(tmp_path / "b.dump", "jsonl", [("http://x.org/1.png", "one"), LIST_ROWS[0]], "image_url", "alt")
    counts = harvest_url_list([a, b], tmp_path / "out", url_col="image_url", caption_col="alt", file_format="jsonl")
    assert counts == dict(files=2, rows=4, non_http_url=0, empty_caption=0, duplicate_candidates=1, candidates=3)
    assert _triples(_read(tmp_path / "out")) == {
        ("http://img.example.com/a.jpg", "a red circle", "a.dump:1"),
        ("https://img.example.com/b.jpg", 'two, "quoted" words', "a.dump:2"),
        ("http://x.org/1.png", "one", "b.dump:1"),
    }
    # a directory: its list files in name order; other extensions and hidden files ignored
    lists = tmp_path / "lists"
    lists.mkdir()
    _write_list(lists / "2.jsonl.gz", "jsonl", [("http://x.org/2.png", "two")])
    _write_list(lists / "1.csv", "csv", [("http://x.org/1.png", "one")])
    _write_list(lists / ".partial.csv", "csv", [("http://x.org/3.png", "three")])
    (lists / "README.md").write_text("not a list")
    assert harvest_url_list(lists, tmp_path / "dir")["files"] == 2
    assert list(_read(tmp_path / "dir")["source"]) == ["1.csv:1", "2.jsonl.gz:1"]
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="no URL list files"):
        harvest_url_list(tmp_path / "none", tmp_path / "dir")
    # a csv with extra columns, a byte-order mark and a gzip body under a name without .gz
    c = tmp_path / "c.csv"
    c.write_bytes(gzip.compress("\ufeffid,link,text\n1,http://x.org/2.png,two\n".encode()))
    assert harvest_url_list(c, tmp_path / "c", url_col="link", caption_col="text")["candidates"] == 1


def test_url_list_errors_are_one_line_and_early(tmp_path):
    out = tmp_path / "out"
    good = _write_list(tmp_path / "good.csv", "csv", LIST_ROWS)
    with pytest.raises(FileNotFoundError, match="URL list not found: .*missing.parquet"):
        harvest_url_list(tmp_path / "missing.parquet", out)

    renamed = _write_list(tmp_path / "renamed.tsv.gz", "tsv", LIST_ROWS, "link", "caption")
    with pytest.raises(ValueError) as err:
        harvest_url_list([good, renamed], out)  # the good file is not read first
    msg = str(err.value)
    assert "\n" not in msg
    assert "renamed.tsv.gz" in msg and "no column 'url'" in msg and "'link', 'caption'" in msg and "url_col=" in msg

    pq_file = _write_list(tmp_path / "p.parquet", "parquet", LIST_ROWS, "url", "text")
    with pytest.raises(ValueError, match=r"p\.parquet: no column 'caption' \(columns present: 'url', 'text'\)"):
        harvest_url_list(pq_file, out)

    xml = tmp_path / "pairs.xml"
    xml.write_text("<pairs/>")
    with pytest.raises(ValueError) as err:
        harvest_url_list(xml, out)
    msg = str(err.value)
    assert "pairs.xml" in msg and "format .xml" in msg and ".parquet, .csv, .tsv, .jsonl" in msg
    with pytest.raises(ValueError, match="unknown URL list format 'xlsx'; expected one of parquet, csv, tsv, jsonl"):
        harvest_url_list(good, out, file_format="xlsx")

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"url": "http://x/1.jpg", "caption": "ok"}\n{"url": oops}\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl:2: not valid JSON"):
        harvest_url_list(broken, out)
    notpq = tmp_path / "fake.parquet"
    notpq.write_text("url,caption\n")
    with pytest.raises(ValueError, match=r"fake\.parquet: cannot read as parquet"):
        harvest_url_list(notpq, out)
    assert not (out / CANDIDATES_FILE).exists()


def test_url_list_with_queries(tmp_path):
    rows = [(f"http://x.org/{i}.jpg", cap) for i, cap in enumerate(
        ["a cat", "another cat", "a third Cat!", "category page", "a dog", "cat and dog", "   "]
    )]  # fmt: skip
    src = _write_list(tmp_path / "q.csv", "csv", rows)
    counts = harvest_url_list(src, tmp_path / "out", queries=["cat", "dog", "zebra"], query_cap=2)
    df = _read(tmp_path / "out")
    assert list(zip(df["caption"], df["matched_query"])) == [
        ("a cat", "cat"), ("another cat", "cat"), ("a dog", "dog"), ("cat and dog", "dog"),
    ]  # fmt: skip
    assert counts == dict(
        files=1, rows=7, non_http_url=0, empty_caption=1, duplicate_candidates=0,
        captions_in=6, matched=5, unmatched=1, over_cap=1, kept=4, queries=3, queries_used=2, candidates=4,
    )  # fmt: skip


def test_write_candidates_schema_when_empty(tmp_path):
    counts: dict = {}
    path = write_candidates(pd.DataFrame({"url": [], "caption": []}), tmp_path, counts=counts)
    assert counts == dict(empty_caption=0, duplicate_candidates=0, candidates=0)
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    assert schema.names == list(CANDIDATE_COLUMNS) and all(str(t) == "string" for t in schema.types)
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed, not left behind


# ---------------------------------------------------------------------------------- WARC
def _warc(path: Path, records: list[tuple[str, str, bytes, list[tuple[str, str]] | None, str]]) -> Path:
    """records: (WARC-Type, target URI, payload, HTTP headers or None, HTTP status line)."""
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=path.suffix == ".gz")
        writer.write_record(writer.create_warcinfo_record(path.name, {"software": "witclip tests"}))
        for rec_type, uri, payload, headers, status in records:
            if rec_type == "request":
                http = StatusAndHeaders(status, headers or [], is_http_request=True)
            else:
                http = StatusAndHeaders(status, headers or [], protocol="HTTP/1.1")
            record = writer.create_warc_record(uri, rec_type, payload=io.BytesIO(payload), http_headers=http)
            writer.write_record(record)
    return path


def _html_bytes(body: str, head: str = "", encoding: str = "utf-8") -> bytes:
    return f"<html><head>{head}</head><body>{body}</body></html>".encode(encoding)


HTML = [("Content-Type", "text/html; charset=utf-8")]
P1, P2, P3 = "http://example.com/dir/page1.html", "http://example.com/other/page2.xhtml", "http://example.com/p3"
WARC_RECORDS = [
    ("request", P1, b"", [("Host", "example.com")], "GET /dir/page1.html HTTP/1.1"),
    ("response", P1, _html_bytes(
        '<img src="rel.jpg" alt="relative">'
        '<img src="/root.jpg" alt="root relative">'
        '<img src="https://cdn.example.org/abs.jpg" alt="absolute">'
        '<img src="small.jpg" srcset="small.jpg 480w, large.jpg 1024w, medium.jpg 800w" alt="by width">'
        '<img src="no-alt.jpg">'
        '<img src="data:image/png;base64,AAAA" alt="inline">'
        '<img src="http://[::1/unclosed.jpg" alt="unparseable">'
        '<img src="frag.jpg#x" alt="Caf&eacute; &amp;  bar">'
    ), HTML, "200 OK"),
    ("response", P2, _html_bytes(
        '<img src="img/b.jpg" alt="based"><img srcset="x1.jpg 1x, x2.jpg 2x" alt="by density">',
        head='<base href="http://static.example.net/assets/">',
    ), [("Content-Type", "application/xhtml+xml")], "200 OK"),
    ("response", P3, gzip.compress(_html_bytes(  # latin-1, gzip content-encoding, as captured on the wire
        '<img src="n.jpg" alt="na\xefve"><img src="/dir/rel.jpg" alt="relative">', encoding="latin-1"
    )), [("Content-Type", "text/html; charset=ISO-8859-1"), ("Content-Encoding", "gzip")], "200 OK"),
    ("response", "http://example.com/pic.jpg", b"\xff\xd8\xff jpeg", [("Content-Type", "image/jpeg")], "200 OK"),
    ("response", "http://example.com/gone.html", _html_bytes('<img src="/gone.jpg" alt="gone">'), HTML,
     "404 Not Found"),
    ("response", "http://example.com/moved", _html_bytes('<img src="/m.jpg" alt="moved">'), HTML,
     "301 Moved Permanently"),
    ("metadata", P1, b"outlinks: none", None, "200 OK"),
]  # fmt: skip
WARC_EXPECTED = {
    ("http://example.com/dir/rel.jpg", "relative", P1),
    ("http://example.com/root.jpg", "root relative", P1),
    ("https://cdn.example.org/abs.jpg", "absolute", P1),
    ("http://example.com/dir/large.jpg", "by width", P1),
    ("http://example.com/dir/frag.jpg", "Café & bar", P1),
    ("http://static.example.net/assets/img/b.jpg", "based", P2),
    ("http://static.example.net/assets/x2.jpg", "by density", P2),
    ("http://example.com/n.jpg", "naïve", P3),
}  # (/dir/rel.jpg, "relative") on P3 is a duplicate of P1's


@pytest.mark.parametrize("suffix", [".warc", ".warc.gz"])
def test_warc_harvest_exact_pairs(tmp_path, suffix):
    path = _warc(tmp_path / f"crawl{suffix}", WARC_RECORDS)
    counts = harvest_warc(path, tmp_path / "out")
    df = _read(tmp_path / "out")
    assert _triples(df) == WARC_EXPECTED and len(df) == len(WARC_EXPECTED)
    assert df["matched_query"].isna().all()
    assert counts == dict(
        files=1, records=9, responses=6, non_200=2, non_html=1, html_responses=3, bad_charset=0,
        parse_budget_exceeded=0, img_tags=12, empty_alt=1, non_http_img=2, duplicate_candidates=1, candidates=8,
    )  # fmt: skip


def test_warc_several_files_and_queries(tmp_path):
    a = _warc(tmp_path / "a.warc.gz", WARC_RECORDS[:2])
    b = _warc(tmp_path / "b.warc", WARC_RECORDS[2:4])
    counts = harvest_warc([a, b], tmp_path / "out", queries=["relative", "by"], query_cap=1)
    df = _read(tmp_path / "out")
    assert sorted(zip(df["caption"], df["matched_query"])) == [("by width", "by"), ("relative", "relative")]
    assert counts["files"] == 2 and counts["over_cap"] == 2  # root relative, by density
    # only xhtml wanted: page 1 (text/html) is skipped
    counts = harvest_warc(b, tmp_path / "x", allowed_content_types=["application/xhtml+xml"])
    assert counts["html_responses"] == 1 and counts["non_html"] == 1 and counts["candidates"] == 2


def test_warc_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="WARC file not found: .*nope.warc"):
        harvest_warc([_warc(tmp_path / "ok.warc", WARC_RECORDS[:2]), tmp_path / "nope.warc"], out)
    text = tmp_path / "notes.warc"
    text.write_text("hello, this is not a WARC\n")  # 5 words: warcio alone would read it as an ARC header
    with pytest.raises(ValueError, match=r"notes\.warc: not a WARC file \(record 1 is not a WARC record\)") as err:
        harvest_warc(text, out)
    assert "\n" not in str(err.value)
    gz = tmp_path / "zipped.warc.gz"
    gz.write_bytes(gzip.compress(b"plain text, gzipped\n"))
    with pytest.raises(ValueError, match=r"zipped\.warc\.gz: not a readable WARC file"):
        harvest_warc(gz, out)
    empty = tmp_path / "empty.warc"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.warc: not a WARC file"):
        harvest_warc(empty, out)
    tail = _warc(tmp_path / "tail.warc", WARC_RECORDS[:2])
    tail.write_bytes(tail.read_bytes() + b"garbage after the last record\n")
    with pytest.raises(ValueError, match=r"tail\.warc: not a readable WARC file after 3 records"):
        harvest_warc(tail, out)
    assert not (out / CANDIDATES_FILE).exists()


# ---------------------------------------------------------------- live HTML: srcset, robots
def test_parse_srcset():
    assert parse_srcset("a.jpg 1x, b.jpg 2x") == [("a.jpg", "1x"), ("b.jpg", "2x")]
    assert parse_srcset(" /c_scale,w_480/p.jpg 480w,/c_scale,w_960/p.jpg  960w ") == [
        ("/c_scale,w_480/p.jpg", "480w"), ("/c_scale,w_960/p.jpg", "960w"),
    ]  # fmt: skip
    assert parse_srcset("a.jpg, b.jpg 2x") == [("a.jpg", ""), ("b.jpg", "2x")]
    assert parse_srcset("") == []


def test_site_srcset_and_lazy_src(serve, tmp_path):
    gif = "data:image/gif;base64,R0lGODlhAQABAAAAACw="
    routes = {
        "/": _page(
            '<img src="s.jpg" srcset="s.jpg 1x, l.jpg 2x, m.jpg 1.5x" alt="density">'
            '<img src="p.jpg" srcset="/c_scale,w_480/p.jpg 480w, /c_scale,w_1200/p.jpg 1200w" alt="widths">'
            f'<img src="{gif}" data-src="lazy.jpg" alt="lazy">'
            '<img data-src="lazy2.jpg" alt="lazy, no src">'
            f'<img src="{gif}" data-srcset="ls-1.jpg 1x, ls-2.jpg 2x" alt="lazy srcset">'
            '<img src="placeholder.gif" data-src="real.jpg" alt="placeholder src wins">'
            f'<img src="{gif}" alt="inline only">'
            f'<img srcset="{gif} 1x" src="fallback.jpg" alt="data in srcset">'
            '<picture><source type="image/avif" srcset="q.avif 3000w">'
            '<source srcset="q-800.webp 800w, q-1600.webp 1600w" type="image/webp">'
            '<img src="q.jpg" alt="picture"></picture>'
            '<img src="after-picture.jpg" alt="after picture">',
            head='<base href="/static/">',
        )
    }
    base, _ = serve(routes)
    counts = harvest_site(base, tmp_path / "out", policy=loopback(5))
    page = base + "/"
    s = base + "/static/"
    assert _triples(_read(tmp_path / "out")) == {
        (s + "l.jpg", "density", page),
        (base + "/c_scale,w_1200/p.jpg", "widths", page),
        (s + "lazy.jpg", "lazy", page),
        (s + "lazy2.jpg", "lazy, no src", page),
        (s + "ls-2.jpg", "lazy srcset", page),
        (s + "placeholder.gif", "placeholder src wins", page),
        (s + "fallback.jpg", "data in srcset", page),
        (s + "q-1600.webp", "picture", page),
        (s + "after-picture.jpg", "after picture", page),
    }
    assert counts["img_tags"] == 10 and counts["non_http_img"] == 1 and counts["candidates"] == 9


ROBOTS = b"""User-agent: otherbot
Disallow: /

User-agent: *
Disallow: /private/
Allow: /private/open.html
Disallow: /*?session=
"""


def test_site_robots_rules(serve, tmp_path):
    links = ["/private/a.html", "/private/b.html", "/private/open.html", "/public.html?session=1", "/public.html"]
    routes = {
        "/": _page(
            "".join(f'<a href="{u}">x</a>' for u in links)
            + '<a href="http://[::1/unclosed.html">bad</a><img src="/i/0.jpg" alt="home">'
        ),
        "/robots.txt": (200, "text/plain", ROBOTS),
        **{u: _page(f'<img src="/i{u.split("?")[0]}.jpg" alt="{u}">') for u in links},
    }
    base, log = serve(routes)
    counts = harvest_site(base, tmp_path / "out", policy=loopback(5))
    # Google/RFC 9309 semantics: the longest match wins, so Allow beats the shorter Disallow; wildcards work
    assert sorted(log) == sorted(["/robots.txt", "/", "/private/open.html", "/public.html"])
    assert counts["robots_disallowed"] == 3 and counts["pages_fetched"] == 3
    assert set(_read(tmp_path / "out")["caption"]) == {"home", "/private/open.html", "/public.html"}
    with pytest.raises(PermissionError, match="robots.txt"):
        harvest_site(base + "/private/a.html", tmp_path / "x", policy=loopback(5))
    assert log.count("/robots.txt") == 2  # once per harvest, not once per page


@pytest.mark.parametrize("status", [401, 403, 404, 429, 500, 503])
def test_site_robots_status_conventions(serve, tmp_path, status):
    """RFC 9309: a robots.txt answered 4xx (but 429) allows everything; 429 or 5xx is "unreachable", and
    nothing on that origin is fetched -- for the seed, that is the seed's one-line error."""
    base, log = serve({"/": _page('<img src="a.jpg" alt="a">'), "/robots.txt": (status, "text/plain", b"x")})
    if status < 500 and status != 429:
        assert harvest_site(base, tmp_path, policy=loopback(5))["candidates"] == 1
        assert log == ["/robots.txt", "/"]
    else:
        with pytest.raises(ConnectionError, match=rf"^seed URL {base}/ is unreachable: {base}/robots.txt "
                                                  rf"unreachable \(http_{status}\)$"):
            harvest_site(base, tmp_path, policy=loopback(5))
        assert log == ["/robots.txt"]


def test_site_unreachable_robots_is_a_page_error(serve, tmp_path):
    other, other_log = serve({"/robots.txt": (503, "text/plain", b"busy"),
                              "/p.html": _page('<img src="o.jpg" alt="o">')})
    base, log = serve({"/": _page(f'<a href="{other}/p.html">o</a><img src="a.jpg" alt="a">')})
    host = lambda url: url.split("/")[2]  # noqa: E731
    counts = harvest_site(base, tmp_path, policy=loopback(5), allowed_hosts=[host(base), host(other)])
    assert counts["page_errors"] == 1 and counts["page_error_reasons"] == {"robots_unavailable": 1}
    assert counts["candidates"] == 1 and other_log == ["/robots.txt"]  # p.html itself was never asked for


# ------------------------------------------------------------------------ query balancing
def _df(captions: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"url": [f"http://x/{i}.jpg" for i in range(len(captions))], "caption": captions})


def _matches(queries: list[str], caption: str) -> list[str]:
    index = QueryIndex(queries)
    return [index.queries[i] for i in index.match(caption)]


def test_query_matching_words_case_punctuation():
    assert tokens("New York's  skyline!") == ("new", "york", "s", "skyline")
    assert _matches(["cat"], "A Cat.") == ["cat"]
    assert _matches(["cat"], "cat-like eyes") == ["cat"]  # a hyphen is a word boundary
    for caption in ["category", "bobcat", "cats", "concatenate", ""]:
        assert _matches(["cat"], caption) == [], caption
    assert _matches(["new york"], "New York's skyline") == ["new york"]
    assert _matches(["new york"], "NEW-YORK at night") == ["new york"]
    assert _matches(["New York"], "new, york") == ["New York"]  # punctuation between words is ignored
    for caption in ["york new", "new yorker", "a new view of york", "newyork"]:
        assert _matches(["new york"], caption) == [], caption
    assert _matches(["Café", "straße"], "LE CAFÉ, STRASSE 5") == ["Café", "straße"]
    assert _matches(["u.s. army"], "The U.S. Army band") == ["u.s. army"]
    # overlapping and nested queries all match, each once
    assert _matches(["york", "new york", "new york city", "city"], "New York City, new york") == [
        "york", "new york", "new york city", "city",
    ]  # fmt: skip
    # a prefix of a longer query is not a match on its own
    assert _matches(["new york city"], "new york") == []
    assert _matches(["a b c d"], "x a b c a b c d") == ["a b c d"]


def test_balance_cap_and_spreading():
    captions = ["dog and cat", "dog and cat", "dog and cat", "a dog", "a cat", "CAT", "bird", "the catalogue"]
    out, counts = balance_by_queries(_df(captions), ["dog", "cat", "fish"], cap=2)
    # row 0: tie 0/0 -> dog (first in list); row 1: cat has fewer; row 2: tie 1/1 -> dog;
    # row 3: dog full -> over cap; row 4: cat (2nd); row 5: cat full -> over cap
    assert list(zip(out["caption"], out["matched_query"])) == [
        ("dog and cat", "dog"), ("dog and cat", "cat"), ("dog and cat", "dog"), ("a cat", "cat"),
    ]  # fmt: skip
    assert list(out["url"]) == ["http://x/0.jpg", "http://x/1.jpg", "http://x/2.jpg", "http://x/4.jpg"]
    assert counts == dict(
        captions_in=8, matched=6, unmatched=2, over_cap=2, kept=4, queries=3, queries_used=2
    )
    again, counts2 = balance_by_queries(_df(captions), ["dog", "cat", "fish"], cap=2)
    pd.testing.assert_frame_equal(out, again)
    assert counts2 == counts
    # duplicates after normalisation count once and keep the first spelling
    out, counts = balance_by_queries(_df(["A Dog"]), ["Dog!", "dog", "  DOG "], cap=5)
    assert list(out["matched_query"]) == ["Dog!"] and counts["queries"] == 1


def test_balance_errors_and_nulls():
    with pytest.raises(ValueError, match="cap"):
        balance_by_queries(_df(["a"]), ["a"], cap=0)
    with pytest.raises(TypeError, match="load_queries"):
        balance_by_queries(_df(["a"]), "queries.txt")
    with pytest.raises(ValueError, match="no usable queries"):
        balance_by_queries(_df(["a"]), ["", "!!!", "  "])
    df = pd.DataFrame({"url": ["http://x/1", "http://x/2"], "caption": [None, "a cat"]})
    out, counts = balance_by_queries(df, ["cat"])
    assert list(out["caption"]) == ["a cat"] and counts["unmatched"] == 1


def test_load_queries(tmp_path):
    text = "cat\n\nNew York\n  new  york! \n!!!\nDOG\ncat\n  hot dog  \n"
    plain = tmp_path / "q.txt"
    plain.write_text(text, encoding="utf-8")
    zipped = tmp_path / "q.txt.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    assert load_queries(plain) == load_queries(zipped) == ["cat", "New York", "DOG", "hot dog"]
    with pytest.raises(FileNotFoundError, match="query file not found"):
        load_queries(tmp_path / "nope.txt")


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("bcdfghjklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))


@pytest.mark.slow
def test_balance_scale_500k_queries_100k_captions():
    rng = random.Random(1234)
    vocab = list(dict.fromkeys(_word(rng) for _ in range(300_000)))
    common = ["the", "a photo", "red car", "new york"]  # these bind the cap
    queries = set(vocab[:250_000])
    while len(queries) < 500_000 - len(common):
        queries.add(f"{rng.choice(vocab)} {rng.choice(vocab)}")
    queries = common + sorted(queries)
    filler = ["the", "a", "photo", "red", "car", "in", "new", "york", "with", "of"]
    captions = [
        " ".join(rng.choice(vocab) if rng.random() < 0.3 else rng.choice(filler) for _ in range(rng.randint(5, 16)))
        .capitalize() + "."
        for _ in range(100_000)
    ]  # fmt: skip
    df = _df(captions)
    cap = 40

    t0 = time.perf_counter()
    index = QueryIndex(queries)
    t1 = time.perf_counter()
    out, counts = balance_by_queries(df, index, cap=cap)
    t2 = time.perf_counter()
    print(f"\n500k queries x 100k captions: index {t1 - t0:.2f} s, match + balance {t2 - t1:.2f} s, counts {counts}")

    per_query = out["matched_query"].value_counts()
    assert per_query.max() <= cap
    assert all(per_query.get(q, 0) == cap for q in common)  # the common queries did hit the cap
    assert counts["over_cap"] > 0 and counts["queries"] == 500_000
    assert counts["kept"] == len(out) == counts["matched"] - counts["over_cap"]
    assert counts["captions_in"] == counts["matched"] + counts["unmatched"] == 100_000
    # spot-check assignments against a brute-force word match
    for caption, q in list(zip(out["caption"], out["matched_query"]))[:: max(1, len(out) // 200)]:
        qt, ct = tokens(q), tokens(caption)
        assert any(ct[i : i + len(qt)] == qt for i in range(len(ct))), (q, caption)
    assert t2 - t0 < 60  # generous sanity bound, not a benchmark
