"""A deterministic synthetic "web" of captioned images: pages, image entries, faults.

The demo and the tests have no internet, so witclip builds its own little web from a seed: HTML pages
that link to each other and embed `<img alt="...">` tags whose images are rendered scenes
(`scenes.py`) and whose alt texts describe them faithfully. Like the real web it is messy on purpose:
some alt texts are junk, some images are exact or near duplicates, and some URLs fail in the ways a
downloader must survive (404, 500, slow, truncated JPEG, HTML served as JPEG). `SiteSpec.fault_kinds`
can switch on the hostile faults too (`ALL_FAULT_KINDS`: byte drip, redirect loops, redirects to a
private address, endless bodies, a PNG decompression bomb, 429 throttling, robots.txt-disallowed and
`X-Robots-Tag: noai` images, a status line or headers sent a byte at a time, slow redirect chains, a
body no image library but OpenCV reads) for crawler tests. A site with "redirect_private" faults also
links its index to a page that redirects to the private target. `server.py` serves a built site on
loopback.

The same `SiteSpec` always yields the same pages, URLs, captions and image bytes.
"""

from __future__ import annotations

import html
import random
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from data.synthetic.scenes import (
    Scene,
    describe_scene,
    encode_jpeg,
    random_scene,
    render_scene,
)

# The demo's faults: the ones every downloader meets and must merely count.
DEMO_FAULT_KINDS: tuple[str, ...] = ("404", "500", "slow", "truncated", "not_image")
# Hostile and politeness faults for crawler tests; see `Site.response` for what each serves.
EXTRA_FAULT_KINDS: tuple[str, ...] = (
    "drip",  # 200, no Content-Length, then one byte every `drip_interval` seconds
    "redirect_loop",  # 302 between /img/<id>.jpg and /img/<id>.jpg?loop=1, forever
    "redirect_private",  # 302 to <private_target>/img/<id>.jpg (a non-public address)
    "too_large",  # Content-Length: 50 GiB, then zeros until the client leaves
    "bomb",  # a 20000 x 20000 PNG that is tens of KB on the wire
    "429",  # 429 + Retry-After for the first `throttle_times` GETs, then the image
    "robots",  # served under /img-noindex/, which robots.txt disallows
    "noai",  # the image with `X-Robots-Tag: noai`
    "trickle_status",  # a status line that never ends, one byte every `drip_interval` seconds
    "trickle_headers",  # a status line, then header lines one byte every `drip_interval` seconds
    "slow_redirects",  # 5 redirect hops, each answered after `hop_delay_seconds`, then the image
    "unidentified",  # a Radiance HDR body labelled image/jpeg: OpenCV decodes it, Pillow cannot size it
)
ALL_FAULT_KINDS: tuple[str, ...] = DEMO_FAULT_KINDS + EXTRA_FAULT_KINDS
ImageKind = Literal["clean", "noisy", "exact_dup", "near_dup"]


# Junk alt texts: mention no colour or shape, so a caption filter can spot them.
_NOISY_ALTS = (
    "click here",
    "photo",
    "banner",
    "",
    "image",
    "thumbnail",
    "untitled",
    "logo",
    "spacer",
    "see more",
    "advertisement",
    "loading...",
)


def _noisy_alt(rng: random.Random) -> str:
    roll = rng.random()
    if roll < 0.15:
        return f"IMG_{rng.randint(1000, 9999)}.JPG"
    if roll < 0.25:
        return f"DSC{rng.randint(10000, 99999)}.jpg"
    return rng.choice(_NOISY_ALTS)



# --------------------------------------------------------------------------------------
# Site
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteSpec:
    """Everything that determines a synthetic site; equal specs give identical sites. The defaults are
    the demo's web (the pipeline's `web` config section takes them from here)."""

    seed: int = 0
    n_pages: int = 450
    images_per_page: int = 16
    links_per_page: int = 4
    image_size: int = 64
    noisy_alt_rate: float = 0.08
    exact_duplicate_rate: float = 0.04
    near_duplicate_rate: float = 0.04
    fault_rate: float = 0.05
    slow_seconds: float = 8.0  # 4 x the crawl timeout: a "slow" image fails however loaded the machine is
    jpeg_quality: int = 90
    # New fields go last so positional construction keeps working.
    fault_kinds: tuple[str, ...] = DEMO_FAULT_KINDS  # faults are split evenly over these
    drip_interval: float = 0.2  # seconds between bytes of a "drip" body
    drip_max_seconds: float = 120.0  # server-side cap on one drip, in case the client never leaves
    throttle_times: int = 1  # GETs of a "429" URL answered 429 before the image is served
    retry_after_seconds: int = 1  # the Retry-After value those 429s carry
    hop_delay_seconds: float = 0.8  # each hop of a "slow_redirects" chain: under a timeout, over a deadline

    def __post_init__(self) -> None:
        # Accept any sequence but store a tuple: the spec must stay hashable.
        object.__setattr__(self, "fault_kinds", tuple(self.fault_kinds))
        unknown = [kind for kind in self.fault_kinds if kind not in ALL_FAULT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; expected a subset of {list(ALL_FAULT_KINDS)}")
        if len(set(self.fault_kinds)) != len(self.fault_kinds):
            raise ValueError(f"fault_kinds has duplicates: {list(self.fault_kinds)}")
        if self.fault_rate > 0 and not self.fault_kinds:
            raise ValueError("fault_rate > 0 needs at least one fault kind")
        if self.drip_interval <= 0 or self.drip_max_seconds < 0:
            raise ValueError("drip_interval must be > 0 and drip_max_seconds >= 0")
        if self.throttle_times < 0 or self.retry_after_seconds < 0 or self.hop_delay_seconds < 0:
            raise ValueError("throttle_times, retry_after_seconds and hop_delay_seconds must be >= 0")


@dataclass(frozen=True)
class ImageEntry:
    """One `<img>` on the site and the ground truth behind it."""

    path: str  # "/img/<id>.jpg"; "/img-noindex/<id>.jpg" for the "robots" fault
    page: str  # the page that embeds it
    scene: Scene
    caption: str  # the alt text as served
    kind: ImageKind
    fault: str | None  # one of ALL_FAULT_KINDS, or None
    duplicate_of: str | None  # source image path for exact_dup / near_dup
    render_seed: int
    jpeg_quality: int


ResponseMode = Literal["plain", "drip", "too_large", "trickle_status", "trickle_headers"]


@dataclass(frozen=True)
class Response:
    """What the server sends for one request.

    `mode` "plain" sends `body` with its Content-Length. The streaming modes are written
    by the handler piece by piece: "drip" cycles through `body` one byte at a time with no
    Content-Length; "too_large" announces `TOO_LARGE_CLAIMED_BYTES` and sends zeros;
    "trickle_status" and "trickle_headers" send no proper head at all but cycle through `body`
    one byte at a time in place of the status line, or after a status line in place of the headers.
    """

    status: int
    content_type: str
    body: bytes
    delay_seconds: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()  # extra headers: Location, Retry-After, X-Robots-Tag
    mode: ResponseMode = "plain"


# Where "redirect_private" points when the server was given no target: a loopback
# address other than the server's own and the discard port, so nothing real answers.
DEFAULT_PRIVATE_TARGET = "http://127.0.0.2:9"
NOINDEX_PREFIX = "/img-noindex/"  # robots.txt disallows it; "robots" faults live there
MOVED_PAGE = "/moved/index.html"  # sites with "redirect_private" faults link it; it redirects there too
REDIRECT_HOPS = 5  # a "slow_redirects" chain: the image after this many redirects (a crawler's usual limit)
TRICKLED_STATUS_LINE = b"HTTP/1.1 200 OK"  # cycled without a line end: the status line never ends
TRICKLED_HEADER_LINE = b"X-Trickle: one byte at a time\r\n"
TOO_LARGE_CLAIMED_BYTES = 50 * 2**30  # the Content-Length a "too_large" response announces
TOO_LARGE_CHUNK_BYTES = 64 * 2**10
TOO_LARGE_MAX_BYTES = 256 * 2**20  # what it actually sends at most, if the client keeps reading
BOMB_SIDE = 20000  # pixels per side of the "bomb" PNG

_ROBOTS_TXT = "User-agent: *\nAllow: /\n"
# Only sites that have "robots" faults get the Disallow line, so the demo's robots.txt is unchanged.
_ROBOTS_TXT_NOINDEX = f"User-agent: *\nDisallow: {NOINDEX_PREFIX}\nAllow: /\n"
_FILLER_WORDS = (
    "gallery archive collection notes weekly update samples studio sketches set "
    "uploads from our latest batch of drawings more below thanks for visiting"
).split()


class Site:
    """The built site: HTML pages plus image entries whose bytes are rendered lazily."""

    def __init__(self, spec: SiteSpec, pages: dict[str, str], images: dict[str, ImageEntry]):
        self.spec = spec
        self.pages = pages  # path -> html, including the index "/"
        self.images = images  # path -> entry, in page order
        has_noindex = any(entry.fault == "robots" for entry in images.values())
        self.robots_txt = _ROBOTS_TXT_NOINDEX if has_noindex else _ROBOTS_TXT
        self._image_bytes: dict[str, bytes] = {}
        self._throttled: dict[str, int] = {}  # "429" path -> GETs answered 429 so far
        self._lock = threading.Lock()

    def image_bytes(self, path: str) -> bytes:
        """The intact JPEG for an image path (faults are applied in `response`)."""
        entry = self.images[path]
        if entry.kind == "exact_dup":
            return self.image_bytes(entry.duplicate_of)  # type: ignore[arg-type]
        # One lock for the whole cache: renders take ~1 ms, contention is irrelevant.
        with self._lock:
            cached = self._image_bytes.get(path)
            if cached is None:
                image = render_scene(entry.scene, self.spec.image_size, random.Random(entry.render_seed))
                cached = self._image_bytes[path] = encode_jpeg(image, entry.jpeg_quality)
            return cached

    def response(
        self, path: str, query: str = "", *, method: str = "GET", private_target: str = DEFAULT_PRIVATE_TARGET
    ) -> Response:
        """What the server sends for `method` on `path` (query string separate, without "?").

        Only "429" faults are stateful: each GET of such a path (HEAD does not count) uses
        up one of its `spec.throttle_times` refusals. `private_target` is the base URL
        that "redirect_private" faults send the client to.
        """
        if path in ("/", "/index.html") or path in self.pages:
            html_text = self.pages["/" if path == "/index.html" else path]
            return Response(200, "text/html; charset=utf-8", html_text.encode("utf-8"))
        if path == "/robots.txt":
            return Response(200, "text/plain; charset=utf-8", self.robots_txt.encode("utf-8"))
        if path == MOVED_PAGE and "redirect_private" in self.spec.fault_kinds:
            return _redirect(private_target.rstrip("/") + path)
        entry = self.images.get(path)
        if entry is None:
            return _error_page(404, "Not Found")
        if entry.fault == "404":
            return _error_page(404, "Not Found")
        if entry.fault == "500":
            return _error_page(500, "Internal Server Error")
        if entry.fault == "not_image":
            # A soft error page mislabelled as a JPEG: the downloader must check bytes.
            body = b"<!doctype html><html><body><h1>Image temporarily unavailable</h1></body></html>"
            return Response(200, "image/jpeg", body)
        if entry.fault == "redirect_loop":
            # A -> A?loop=1 -> A -> ...: only a redirect limit ends it.
            looped = "1" in parse_qs(query).get("loop", [])
            return _redirect(path if looped else f"{path}?loop=1")
        if entry.fault == "redirect_private":
            # Same image path on another host: a crawler must refuse to follow it there.
            return _redirect(private_target.rstrip("/") + path)
        if entry.fault == "too_large":
            return Response(200, "image/jpeg", b"", mode="too_large")
        if entry.fault == "bomb":
            return Response(200, "image/png", bomb_png())
        if entry.fault == "trickle_status":
            return Response(200, "image/jpeg", TRICKLED_STATUS_LINE, mode="trickle_status")
        if entry.fault == "trickle_headers":
            return Response(200, "image/jpeg", TRICKLED_HEADER_LINE, mode="trickle_headers")
        if entry.fault == "slow_redirects":
            hop = parse_qs(query).get("hop", ["0"])[0]
            hop_n = int(hop) if hop.isdigit() else 0
            if hop_n < REDIRECT_HOPS:
                moved = _redirect(f"{path}?hop={hop_n + 1}")
                return Response(moved.status, moved.content_type, moved.body, self.spec.hop_delay_seconds,
                                moved.headers)
        if entry.fault == "unidentified":
            return Response(200, "image/jpeg", radiance_hdr())
        if entry.fault == "429" and self._throttle(path, count=method == "GET"):
            body = b"429 Too Many Requests: slow down\n"
            retry_after = (("Retry-After", str(self.spec.retry_after_seconds)),)
            return Response(429, "text/plain; charset=utf-8", body, headers=retry_after)
        data = self.image_bytes(path)
        if entry.fault == "truncated":
            return Response(200, "image/jpeg", data[: len(data) // 2])
        if entry.fault == "slow":
            return Response(200, "image/jpeg", data, delay_seconds=self.spec.slow_seconds)
        if entry.fault == "drip":
            return Response(200, "image/jpeg", data, mode="drip")
        if entry.fault == "noai":
            return Response(200, "image/jpeg", data, headers=(("X-Robots-Tag", "noai"),))
        # Clean images, and "robots" ones: served if asked, robots.txt is the client's business.
        return Response(200, "image/jpeg", data)

    def _throttle(self, path: str, count: bool) -> bool:
        """Whether this request of a "429" path gets refused; a refused GET uses one up."""
        with self._lock:
            refused = self._throttled.get(path, 0)
            if refused >= self.spec.throttle_times:
                return False
            if count:
                self._throttled[path] = refused + 1
            return True

    def reset_throttles(self) -> None:
        """Let every "429" path refuse `spec.throttle_times` GETs again."""
        with self._lock:
            self._throttled.clear()

    def expected_status(self, path_or_url: str) -> str:
        """The fault kind an image URL (or path) was built with, or "ok" for everything else served.

        Raises KeyError for paths the site does not have.
        """
        path = unquote(urlsplit(path_or_url).path)
        if path in self.images:
            return self.images[path].fault or "ok"
        if path in ("/", "/index.html", "/robots.txt") or path in self.pages:
            return "ok"
        raise KeyError(f"not a path of this site: {path_or_url!r}")

    def stats(self) -> dict[str, Any]:
        entries = list(self.images.values())
        faults = {kind: sum(e.fault == kind for e in entries) for kind in self.spec.fault_kinds}
        return {
            "seed": self.spec.seed,
            "n_pages": self.spec.n_pages,  # gallery pages; `pages` also holds the index "/"
            "n_image_refs": len(entries),
            "n_faults": faults,
            "n_faulty": sum(faults.values()),
            "n_clean": sum(e.kind == "clean" for e in entries),
            "n_noisy": sum(e.kind == "noisy" for e in entries),
            "n_exact_dup": sum(e.kind == "exact_dup" for e in entries),
            "n_near_dup": sum(e.kind == "near_dup" for e in entries),
        }


def _error_page(status: int, reason: str) -> Response:
    body = f"<!doctype html><html><body><h1>{status} {reason}</h1></body></html>".encode()
    return Response(status, "text/html; charset=utf-8", body)


def _redirect(location: str) -> Response:
    body = f'<!doctype html><html><body><a href="{html.escape(location)}">moved</a></body></html>'.encode()
    return Response(302, "text/html; charset=utf-8", body, headers=(("Location", location),))


_bomb_lock = threading.Lock()
_bomb_cache: bytes | None = None


def radiance_hdr(side: int = 8) -> bytes:
    """The "unidentified" fault's body: a flat grey Radiance HDR (RGBE) image. OpenCV decodes the format,
    Pillow cannot identify it: a downloader that sizes images with Pillow and lets the rest through
    hands OpenCV a body it never checked."""
    head = f"#?RADIANCE\nFORMAT=32-bit_rle_rgbe\n\n-Y {side} +X {side}\n".encode()
    return head + bytes((128, 128, 128, 128)) * (side * side)


def bomb_png() -> bytes:
    """The "bomb" fault's body: a valid all-black `BOMB_SIDE`-square 1-bit PNG, ~50 KB.

    Its header claims 400 million pixels (PIL refuses to open it by default); decoding it
    would inflate ~50 MB of scanlines. Built once per process, on first use.
    """
    global _bomb_cache
    with _bomb_lock:
        if _bomb_cache is None:
            _bomb_cache = _build_zero_png(BOMB_SIDE, BOMB_SIDE)
        return _bomb_cache


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _build_zero_png(width: int, height: int) -> bytes:
    # IHDR: bit depth 1, colour type 0 (greyscale), deflate, adaptive filtering, no interlace.
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    # Each scanline is a filter byte (0 = None) plus width bits; all zero, so the whole
    # image is one run of zeros, fed to the compressor a block of rows at a time.
    row_bytes = 1 + (width + 7) // 8
    rows_per_block = 512
    compressor = zlib.compressobj(9)
    block = bytes(row_bytes * rows_per_block)
    parts = []
    for first_row in range(0, height, rows_per_block):
        rows = min(rows_per_block, height - first_row)
        parts.append(compressor.compress(block if rows == rows_per_block else bytes(row_bytes * rows)))
    parts.append(compressor.flush())
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )


def build_site(spec: SiteSpec) -> Site:
    """Build pages, image entries and captions deterministically from `spec`.

    Kind counts are exact (round(rate * n_image_refs)) rather than sampled, so stats are
    predictable. Faults only hit clean images and are dealt round-robin over
    `spec.fault_kinds`; duplicates always copy an earlier, fault-free clean image.
    """
    if spec.n_pages < 1 or spec.images_per_page < 0 or spec.links_per_page < 1:
        raise ValueError(f"invalid site spec: {spec}")
    rng = random.Random(spec.seed)
    n_refs = spec.n_pages * spec.images_per_page

    # Assign kinds to ref indices. Index 0 stays clean and fault-free so that every
    # duplicate has an earlier source to copy.
    special = list(range(1, n_refs))
    rng.shuffle(special)
    take = iter(special)
    n_exact, n_near, n_noisy, n_fault = (
        min(round(rate * n_refs), len(special))
        for rate in (spec.exact_duplicate_rate, spec.near_duplicate_rate, spec.noisy_alt_rate, spec.fault_rate)
    )
    kind_of: dict[int, ImageKind] = {}
    for kind, how_many in (("exact_dup", n_exact), ("near_dup", n_near), ("noisy", n_noisy)):
        for _ in range(how_many):
            index = next(take, None)
            if index is not None:
                kind_of[index] = kind  # type: ignore[assignment]
    clean_candidates = [i for i in special if i not in kind_of]
    fault_of: dict[int, str] = {}
    for k, index in enumerate(rng.sample(clean_candidates, min(n_fault, len(clean_candidates)))):
        fault_of[index] = spec.fault_kinds[k % len(spec.fault_kinds)]  # split evenly among kinds

    # Image entries in page order.
    images: dict[str, ImageEntry] = {}
    sources: list[ImageEntry] = []  # clean, fault-free: eligible to be duplicated
    for index in range(n_refs):
        page = f"/page/{index // spec.images_per_page}.html"
        path = _unique_image_path(rng, images, noindex=fault_of.get(index) == "robots")
        kind = kind_of.get(index, "clean")
        render_seed = rng.getrandbits(63)
        duplicate_of = None
        quality = spec.jpeg_quality
        if kind in ("exact_dup", "near_dup"):
            source = rng.choice(sources)
            duplicate_of, scene = source.path, source.scene
            if kind == "exact_dup":
                # Same bytes under a new URL; the alt text may or may not be copied too.
                caption = source.caption if rng.random() < 0.5 else describe_scene(scene, rng)
                render_seed, quality = source.render_seed, source.jpeg_quality
            else:
                # Same scene, new jitter and a different JPEG quality: different bytes.
                caption = describe_scene(scene, rng)
                quality = max(50, spec.jpeg_quality - rng.randint(3, 12))
        else:
            scene = random_scene(rng)
            caption = _noisy_alt(rng) if kind == "noisy" else describe_scene(scene, rng)
        entry = ImageEntry(
            path=path,
            page=page,
            scene=scene,
            caption=caption,
            kind=kind,
            fault=fault_of.get(index),
            duplicate_of=duplicate_of,
            render_seed=render_seed,
            jpeg_quality=quality,
        )
        images[path] = entry
        if kind == "clean" and entry.fault is None:
            sources.append(entry)

    pages = {"/": _index_html(spec, rng)}
    by_page: dict[str, list[ImageEntry]] = {}
    for entry in images.values():
        by_page.setdefault(entry.page, []).append(entry)
    for i in range(spec.n_pages):
        path = f"/page/{i}.html"
        pages[path] = _page_html(spec, i, by_page.get(path, []), rng)
    if "redirect_private" in spec.fault_kinds:  # after every draw: the other pages do not move
        pages["/"] = pages["/"].replace("</ul>", f'<li><a href="{MOVED_PAGE}">Moved gallery</a></li>\n</ul>', 1)
    return Site(spec, pages, images)


def _unique_image_path(rng: random.Random, taken: dict[str, ImageEntry], noindex: bool = False) -> str:
    # The same draws whatever the prefix, so adding "robots" faults moves no other URL;
    # ids stay unique across both prefixes.
    while True:
        image_id = f"{rng.getrandbits(48):012x}.jpg"
        if f"/img/{image_id}" not in taken and f"{NOINDEX_PREFIX}{image_id}" not in taken:
            return f"{NOINDEX_PREFIX}{image_id}" if noindex else f"/img/{image_id}"


def _page_link(target: int, rng: random.Random) -> str:
    # Mixed href forms so a crawler has to resolve relative URLs properly.
    return rng.choice([f"/page/{target}.html", f"{target}.html", f"./{target}.html"])


def _filler(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_FILLER_WORDS) for _ in range(n_words)]
    return " ".join(words).capitalize() + "."


def _index_html(spec: SiteSpec, rng: random.Random) -> str:
    targets = [0] + rng.sample(range(1, spec.n_pages), min(spec.links_per_page - 1, spec.n_pages - 1))
    links = "\n".join(
        f'<li><a href="{"/page/%d.html" % t if rng.random() < 0.5 else "page/%d.html" % t}">Gallery {t}</a></li>'
        for t in targets
    )
    return (
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>witclip synthetic web</title></head>\n"
        f"<body><h1>Shapes gallery</h1>\n<p>{html.escape(_filler(rng, 12))}</p>\n<ul>\n{links}\n</ul>\n"
        "</body></html>\n"
    )


def _page_html(spec: SiteSpec, index: int, entries: list[ImageEntry], rng: random.Random) -> str:
    # A ring (i -> i+1) guarantees every page is reachable from page 0; extra random
    # links make the graph look less like a list.
    targets = [(index + 1) % spec.n_pages] if spec.n_pages > 1 else []
    others = [t for t in range(spec.n_pages) if t != index and t not in targets]
    targets += rng.sample(others, min(spec.links_per_page - len(targets), len(others)))
    nav = " | ".join(f'<a href="{_page_link(t, rng)}">page {t}</a>' for t in targets)
    body = []
    for entry in entries:
        src = entry.path if rng.random() < 0.5 else ".." + entry.path  # "/img/x.jpg" or "../img/x.jpg"
        body.append(
            f'<div class="item"><img src="{src}" alt="{html.escape(entry.caption, quote=True)}" '
            f'width="{spec.image_size}" height="{spec.image_size}"></div>'
        )
        if rng.random() < 0.3:
            body.append(f"<p>{html.escape(_filler(rng, rng.randint(5, 15)))}</p>")
    return (
        f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>Gallery {index}</title></head>\n"
        f'<body><a id="top"></a><h1>Gallery {index}</h1>\n<p>{html.escape(_filler(rng, 10))}</p>\n'
        + "\n".join(body)
        + f'\n<nav><a href="/">home</a> | {nav} | <a href="#top">back to top</a></nav>\n</body></html>\n'
    )


