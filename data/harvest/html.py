"""Reading HTML pages for (image URL, alt text) pairs: `<img>` with srcset / `<picture>` / lazy
loading, `<a href>` links and `<base href>`, with relative URLs resolved against the page.

`parse_page(body, charset, counts)` is what harvest does with every page, live or from a WARC. A page
never ends a harvest: what goes wrong with one is counted on it.

- Decoding. The charset label (from Content-Type) is looked up among Python's codecs. A label that
  is unknown, names no text encoding (`base64`, `rot13`, `zlib`, `uu`, ...) or names a codec no page
  is written in (`undefined`, `idna`, `punycode`, `unicode_escape`, `utf-7`, ...) counts as
  `bad_charset`, and the page is decoded as UTF-8, as a page without a label is: most of the web is
  UTF-8, and a label that is junk says nothing better. Undecodable bytes become U+FFFD.
- Tokenizing. A small tokenizer after the HTML5 tokenizer's states: data, tag open, tag name,
  attribute name and value (double-, single- or unquoted), self-closing `/>`, end tag, comment,
  bogus comment (`<!...>`, `<?...>`, `</ ...>`) and raw text. It is linear in the page's length:
  regular expressions with possessive quantifiers (no backtracking) and `str.find` look at every
  character a bounded number of times, and nothing is scanned again from an earlier position. It
  yields `links` (every `<a href>`), `images` ((the URL `_choose_src` picks, alt) per `<img>`, with
  the enclosing `<picture>`'s `<source srcset>`s) and `base` (the first `<base href>`), as the
  standard library's html.parser did before it (which is quadratic on inputs like `"<a " * n`).
  Where the two differ, this follows HTML5: the first of repeated attributes wins (the old reader
  kept the last); a named character reference in an attribute that lacks its `;` and is followed by `=` or a
  letter or digit stays text (`?a=1&region=2` is not `?a=1®ion=2`); `title` and `textarea` hold
  text, not tags. As in both: tag and attribute names are case-insensitive, attribute values are
  entity-decoded, a `<` inside a tag is an ordinary character and a quoted value may hold `>`.
  A tag, comment or quoted value still open at the end of the page is dropped, and so is everything
  after it (it was inside it). The content of `script`, `style`, `xmp`, `iframe`, `noembed`,
  `noframes`, `title` and `textarea` is not markup and runs to the matching end tag; after
  `<plaintext>` nothing is. `noscript` *is* markup, as for a browser with scripting disabled: its
  fallback `<img>`s are often the real ones on lazy-loading pages.
- Budget. The tokenizer stops after MAX_PARSE_STEPS steps -- a step is one tag, end tag, comment or
  declaration; one attribute read from an `<a>`, `<img>`, `<source>` or `<base>`; one "&" in the
  value of an attribute kept -- and the page counts as `parse_budget_exceeded`. It keeps what was
  read up to there, as a page over MAX_PAGE_BYTES keeps its first MAX_PAGE_BYTES. The budget bounds
  the work on one page whatever its shape (the tokenizer is linear, but what callers do per link and
  per image is not free), and unlike a time limit it cuts every run at the same place, so harvests
  stay reproducible. Of one srcset, the first MAX_SRCSET_CANDIDATES candidates are considered.

What it does not do: no tree construction (no implied end tags, no foster parenting, no
foreign-content rules: `<style>` inside `<svg>` is still raw text and SVG's `<![CDATA[...]]>` ends at
its first `>`), no scripts, no `<meta charset>` or BOM sniffing (the Content-Type label, else UTF-8),
no `<iframe srcdoc>` documents, no NUL or CR/LF normalisation of values, and script's "escaped" states
(`<!--` inside a script) are not modelled: a script ends at its first `</script`.
"""

from __future__ import annotations

import codecs
import math
import re
from dataclasses import dataclass, field
from html import unescape as _unescape
from html.entities import html5 as _ENTITIES
from typing import Any
from urllib.parse import urljoin

from data.common.urls import is_http_url, normalise_for_fetch

HTML_TYPES = ("text/html", "application/xhtml+xml")
MAX_PAGE_BYTES = 8 << 20  # a "page" bigger than this is not worth parsing for alt text
# Tokenizer steps per page (module docstring): room for ~80k <img>s or ~125k <a href>s, far more than a
# page is expected to carry, while a hostile page stops after well under a second of tokenizing and
# leaves its caller ~125k links to resolve (~8 us each in urllib) rather than millions.
MAX_PARSE_STEPS = 250_000
MAX_SRCSET_CANDIDATES = 256  # real srcsets list a handful; more is a hostile page
# <picture><source type=...> variants worth choosing: what the downloader can decode.
_SOURCE_TYPES = ("", "image/jpeg", "image/jpg", "image/png", "image/webp", "image/gif")
# Codecs Python has that no page is encoded in: decoding with them yields garbage or raises.
_NOT_PAGE_CHARSETS = frozenset(
    {"undefined", "idna", "punycode", "unicode_escape", "raw_unicode_escape", "utf_7", "charmap", "mbcs", "oem"}
)


# --------------------------------------------------------------------------- decoding
def page_codec(label: str | None) -> str | None:
    """The Python codec to decode a page labelled `label` with; None for a bad label (module docstring).
    No label at all is UTF-8."""
    if label is None:
        return "utf-8"
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError):  # unknown label; ValueError: a label with a NUL in it
        return None
    # _is_text_encoding is False for the bytes-to-bytes and str-to-str codecs (base64, rot13, ...).
    if not getattr(info, "_is_text_encoding", True) or info.name.replace("-", "_") in _NOT_PAGE_CHARSETS:
        return None
    return info.name


def decode_page(body: bytes, charset: str | None) -> tuple[str, bool]:
    """(text, whether the charset label was bad): `body` decoded by its label, else as UTF-8; undecodable
    bytes become U+FFFD either way."""
    codec = page_codec(charset)
    if codec is not None:
        try:
            return body.decode(codec, errors="replace"), False
        except (LookupError, ValueError):  # UnicodeError is a ValueError; a codec may still refuse
            pass
    return body.decode("utf-8", errors="replace"), True


# ------------------------------------------------------------------------ tokenizing
@dataclass
class ParsedPage:
    """What one page yields (module docstring); `images` holds (raw URL chosen from
    srcset/src/data-src, alt) as written (entity-decoded), alt None when the attribute is absent."""

    links: list[str] = field(default_factory=list)
    images: list[tuple[str | None, str | None]] = field(default_factory=list)
    base: str | None = None
    budget_exceeded: bool = False


_WS = r"\t\n\f\r "  # HTML5's whitespace (a CR is a newline there, after input preprocessing)
# An attribute: its name (anything up to whitespace, "/", "=" or ">"; "<" and quotes included), then
# either "=" and a value (double-, single- or unquoted; empty only right before ">") or no "=" at all.
# A value that cannot be read (a quote never closed, "=" at the end) fails the attribute, and with
# it the whole tag: that is the "end of file inside a tag" case. Every quantifier is possessive.
_NAME = rf"[^{_WS}/>][^{_WS}/=>]*+"
_VALUE = rf"\"[^\"]*+\"|'[^']*+'|[^{_WS}>\"'][^{_WS}>]*+|(?=>)"
_ATTR = rf"{_NAME}[{_WS}]*+(?:=[{_WS}]*+(?:{_VALUE})|(?!=))"
_TAG_BODY = rf"(?:[{_WS}/]++|{_ATTR})*+"
_START_TAG = re.compile(rf"<([a-zA-Z][^{_WS}/>]*+)({_TAG_BODY})>")
_END_TAG = re.compile(rf"</([a-zA-Z][^{_WS}/>]*+){_TAG_BODY}>")
# One attribute of an already matched tag body, with its parts; it starts after separators.
_ATTR_PARTS = re.compile(
    rf"[{_WS}/]*+({_NAME})[{_WS}]*+(?:=[{_WS}]*+(?:\"([^\"]*+)\"|'([^']*+)'|([^{_WS}>\"'][^{_WS}>]*+)|(?=>)))?"
)
# Where markup may start: "<" then a letter, "/", "!" or "?"; any other "<" is text.
_MARKUP = re.compile(r"<[a-zA-Z/!?]")
_COMMENT_END = re.compile(r"--!?>")
_RAW_TEXT = ("script", "style", "xmp", "iframe", "noembed", "noframes", "title", "textarea")
# The end of a raw text element: "</name" then whitespace, "/" or ">" (any case).
_RAW_END = {name: re.compile(rf"</{name}[{_WS}/>]", re.IGNORECASE) for name in _RAW_TEXT}
_TAGS_READ = frozenset({"a", "img", "source", "base"})  # the tags whose attributes we read
_ATTRS_READ = frozenset({"href", "src", "srcset", "data-src", "data-srcset", "alt", "type"})
_LONGEST_ATTR = max(map(len, _ATTRS_READ))


class _BudgetSpent(Exception):
    """Raised inside the tokenizer when the page's steps are spent."""


def parse_markup(text: str, max_steps: int = MAX_PARSE_STEPS) -> ParsedPage:
    """Tokenize one decoded page and collect its links, images and base (module docstring)."""
    page = ParsedPage()
    steps = 0
    picture: _SrcsetBest | None = None  # the best <source srcset> candidates of the open <picture>
    n = len(text)
    i = 0
    try:
        while True:
            m = _MARKUP.search(text, i)
            if m is None:
                break
            lt = m.start()
            steps += 1
            if steps > max_steps:
                raise _BudgetSpent
            c = text[lt + 1]
            if c == "!" or c == "?":
                if text.startswith("<!--", lt):
                    end = _comment_end(text, lt + 4)
                else:  # <!DOCTYPE ...>, <![CDATA[...]> (in HTML), <?...>: all end at the first ">"
                    end = text.find(">", lt + 2) + 1
                if end <= 0:
                    break  # open to the end of the page
                i = end
            elif c == "/":
                if lt + 2 >= n:
                    break  # "</" at the very end is text
                if text[lt + 2] == ">":  # "</>" is dropped
                    i = lt + 3
                    continue
                if not text[lt + 2].isascii() or not text[lt + 2].isalpha():
                    end = text.find(">", lt + 2) + 1  # "</ ...>", "</3>": a bogus comment
                    if end <= 0:
                        break
                    i = end
                    continue
                t = _END_TAG.match(text, lt)
                if t is None:
                    break  # an end tag never closed: it runs to the end of the page
                if t.group(1).lower() == "picture":
                    picture = None
                i = t.end()
            else:
                t = _START_TAG.match(text, lt)
                if t is None:
                    break  # a tag never closed: HTML5 drops it (and the rest of the page was inside it)
                name = t.group(1).lower()
                i = t.end()
                if name in _TAGS_READ:
                    attrs, steps = _attributes(text, t.start(2), t.end(2), steps, max_steps)
                    if name == "a":
                        if attrs.get("href"):
                            page.links.append(attrs["href"])
                    elif name == "img":
                        page.images.append((_choose_src(attrs, picture), attrs.get("alt")))
                    elif name == "source":
                        srcset = attrs.get("srcset") or attrs.get("data-srcset")
                        if picture is not None and srcset and attrs.get("type", "").strip().lower() in _SOURCE_TYPES:
                            picture.add(srcset)
                    elif attrs.get("href") and page.base is None:
                        page.base = attrs["href"]
                elif name == "picture":
                    picture = _SrcsetBest()
                elif name in _RAW_END:
                    end_tag = _RAW_END[name].search(text, i)
                    if end_tag is None:
                        break  # the rest of the page is its text
                    i = end_tag.start()  # the end tag itself is read by the next round
                elif name == "plaintext":
                    break
    except _BudgetSpent:
        page.budget_exceeded = True
    return page



def _comment_end(text: str, start: int) -> int:
    """The index after the comment opened by the "<!--" ending at `start`; 0 if it never closes.
    HTML5 closes "<!-->" and "<!--->" at once, else at the first "-->" or "--!>" (whose dashes may be
    the ones right after "<!--": "<!---->" is an empty comment)."""
    if text.startswith(">", start):
        return start + 1
    if text.startswith("->", start):
        return start + 2
    m = _COMMENT_END.search(text, start)
    return m.end() if m else 0


def _attributes(text: str, start: int, end: int, steps: int, max_steps: int) -> tuple[dict[str, str], int]:
    """The attributes we read (_ATTRS_READ) of the tag body text[start:end] (end: its ">"), names
    lower-cased, values entity-decoded, the first of repeated names kept; and the steps used so far."""
    attrs: dict[str, str] = {}
    pos = start
    while pos < end:
        m = _ATTR_PARTS.match(text, pos, end + 1)  # + 1: an empty value is one right before the ">"
        if m is None:
            break  # only separators left
        steps += 1
        if steps > max_steps:
            raise _BudgetSpent
        pos = m.end()
        name = m.group(1)
        if len(name) > _LONGEST_ATTR:
            continue
        name = name.lower()
        if name in _ATTRS_READ and name not in attrs:
            value = m.group(2)
            if value is None:
                value = m.group(3)
                if value is None:
                    value = m.group(4) or ""
            refs = value.count("&")  # each character reference is Python work: a step
            if refs:
                steps += refs
                if steps > max_steps:
                    raise _BudgetSpent
                value = unescape_attribute(value)
            attrs[name] = value
    return attrs, steps


# Character references as html.unescape finds them: numeric, or up to 32 name characters.
_CHARREF = re.compile(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\f <&#;]{1,32};?)")


def unescape_attribute(value: str) -> str:
    """An attribute value with its character references decoded, after HTML5's rule for attributes: a
    named reference that does not end in ";" and is followed by "=" or an ASCII letter or digit is text
    ("&region=1" stays). Otherwise as html.unescape (numeric references, legacy names without ";")."""
    if "&" not in value:
        return value
    return _CHARREF.sub(_decode_charref, value)


def _decode_charref(m: re.Match[str]) -> str:
    ref = m.group(1)
    if ref[0] == "#":  # numeric: html.unescape's handling (invalid code points, C1 remapping)
        digits = ref[2:] if ref[1:2] in ("x", "X") else ref[1:]
        if len(digits.rstrip(";").lstrip("0")) > 8:  # past U+10FFFF, and int() refuses 4,300+ digits
            return "\ufffd"
        return _unescape(m.group(0))
    if ref in _ENTITIES:  # "amp;", "eacute;" and the legacy ones without ";" ("amp", "copy")
        if ref.endswith(";"):
            return _ENTITIES[ref]
        after = m.string[m.end() : m.end() + 1]
        return m.group(0) if after == "=" or (after.isascii() and after.isalnum()) else _ENTITIES[ref]
    # the longest legacy name the reference starts with ("&copyx" -> "©x"), unless "=" or an
    # alphanumeric follows that name, which is then text
    for k in range(min(len(ref) - 1, 6), 1, -1):  # legacy names are 2 ("lt") to 6 ("middot") long
        if ref[:k] in _ENTITIES:
            after = ref[k]
            if after == "=" or (after.isascii() and after.isalnum()):
                return m.group(0)
            return _ENTITIES[ref[:k]] + ref[k:]
    return m.group(0)


# ----------------------------------------------------------------------- choosing src
def parse_srcset(value: str, limit: int | None = None) -> list[tuple[str, str]]:
    """Split a srcset attribute into (url, descriptor) pairs, after the HTML spec's algorithm; at most
    `limit` pairs.

    Not a plain split on ",": URLs may contain commas ("/c_scale,w_480/a.jpg 480w"); a
    candidate's URL runs to the next whitespace, its descriptor to the next comma.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n and (limit is None or len(out) < limit):
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


class _SrcsetBest:
    """The biggest candidate so far across srcsets: highest width ("800w"), and highest density ("2x",
    none = 1x); ties keep the first; data: URIs are never chosen. A <picture> keeps one, so each of its
    <img>s costs its own srcset only, not all the picture's sources again."""

    def __init__(self) -> None:
        self.w: tuple[float, str] | None = None
        self.x: tuple[float, str] | None = None

    def add(self, srcset: str) -> None:
        for url, desc in parse_srcset(srcset, MAX_SRCSET_CANDIDATES):
            if url.lower().startswith("data:"):
                continue
            d = desc.split()[0].lower() if desc else "1x"
            try:
                size = float(d[:-1])
            except ValueError:
                continue  # "h" descriptors or junk: not comparable
            if not (math.isfinite(size) and size > 0):
                continue  # "nanw", "infx", "0w": no real size, and "nan" would never be beaten
            if d.endswith("w") and (self.w is None or size > self.w[0]):
                self.w = (size, url)
            elif d.endswith("x") and (self.x is None or size > self.x[0]):
                self.x = (size, url)

    def url(self, then: _SrcsetBest | None = None) -> str | None:
        """The chosen URL from these candidates followed by `then`'s: a width beats any density."""
        w, x = self.w, self.x
        if then is not None:  # `then` came later: it wins only when strictly bigger
            w = then.w if then.w is not None and (w is None or then.w[0] > w[0]) else w
            x = then.x if then.x is not None and (x is None or then.x[0] > x[0]) else x
        best = w or x
        return best[1] if best else None


def _choose_src(a: dict[str, str], picture: _SrcsetBest | None) -> str | None:
    """The URL to download for one <img>: the largest srcset candidate (its own srcset or
    data-srcset, plus the enclosing <picture>'s <source srcset>s), else src, else the lazy-loading
    data-src when src is missing or an inline data: URI (which is kept as the last resort, so
    it is counted as non-http)."""
    own = _SrcsetBest()
    srcset = a.get("srcset") or a.get("data-srcset")
    if srcset:
        own.add(srcset)
    best = own.url(picture)
    if best:
        return best.strip()
    src = (a.get("src") or "").strip()
    if src and not src.lower().startswith("data:"):
        return src
    lazy = (a.get("data-src") or "").strip()
    return lazy or src or None


# ------------------------------------------------------------------------------ pages
def parse_page(body: bytes, charset: str | None, counts: dict[str, Any]) -> ParsedPage:
    """Decode and tokenize one page (module docstring); counts `bad_charset` and `parse_budget_exceeded`."""
    text, bad = decode_page(body, charset)
    if bad:
        counts["bad_charset"] += 1
    page = parse_markup(text)
    if page.budget_exceeded:
        counts["parse_budget_exceeded"] += 1
    return page


def page_rows(page: ParsedPage, page_url: str, counts: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(image URL, raw alt, page) for every <img> with an http(s) URL; relative URLs resolve
    against <base href> (itself relative to the page). Empty alts stay in: write_candidates counts them."""
    base = page_base(page, page_url)
    rows: list[tuple[str, str, str]] = []
    for src, alt in page.images:
        counts["img_tags"] += 1
        if not src:
            continue
        img_url = resolve_url(base, src)
        if not is_http_url(img_url):  # data:, javascript:, ... can't be downloaded by URL
            counts["non_http_img"] += 1
            continue
        rows.append((img_url, alt or "", page_url))
    return rows


def page_base(page: ParsedPage, page_url: str) -> str:
    return (resolve_url(page_url, page.base) if page.base else "") or page_url


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
