"""A deterministic synthetic "web" of captioned images, served on loopback.

The demo and the tests have no internet, so witclip builds its own little web from a
seed: HTML pages that link to each other and embed `<img alt="...">` tags whose images
are simple rendered scenes (N coloured shapes on a neutral background) and whose alt
texts describe them faithfully. Like the real web it is messy on purpose: some alt
texts are junk, some images are exact or near duplicates, and some URLs fail in the
ways a downloader must survive (404, 500, slow, truncated JPEG, HTML served as JPEG).
`SiteSpec.fault_kinds` can switch on the hostile faults too (`ALL_FAULT_KINDS`: byte drip,
redirect loops, redirects to a private address, endless bodies, a PNG decompression bomb,
429 throttling, robots.txt-disallowed and `X-Robots-Tag: noai` images) for crawler tests;
`SyntheticWeb.requests()` then tells a test exactly what the crawler asked for.

The same generator (`random_scene`, `render_scene`) also makes the held-out zero-shot
benchmarks in `data.benchmarks.synthetic`, so a tiny CLIP trained on the crawl can be
scored on colour, shape and count without ever having seen those images.

Everything is driven by explicit `random.Random` instances (never the global RNG), so
the same `SiteSpec` always yields the same pages, URLs, captions and image bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import html
import io
import json
import math
import random
import selectors
import socket
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from PIL import Image, ImageDraw

# --------------------------------------------------------------------------------------
# Scene vocabulary
# --------------------------------------------------------------------------------------

# Saturated and far apart in RGB so that colour is unambiguous even after JPEG.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 215, 20),
    "purple": (140, 45, 185),
    "orange": (250, 135, 10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COUNTS: tuple[int, ...] = (1, 2, 3, 4)
SIZES: tuple[str, ...] = ("small", "large")
# Neutral only: a background must never be mistaken for an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (200, 200, 200),
    "dark grey": (70, 70, 70),
    "black": (10, 10, 10),
}
# Only meaningful for a single object; scenes with count > 1 have position None.
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")

NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}

# The demo's faults: the ones every downloader meets and must merely count.
DEMO_FAULT_KINDS: tuple[str, ...] = ("404", "500", "slow", "truncated", "not_image")
FAULT_KINDS = DEMO_FAULT_KINDS  # the old name, kept for code that imports it
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
)
ALL_FAULT_KINDS: tuple[str, ...] = DEMO_FAULT_KINDS + EXTRA_FAULT_KINDS
ImageKind = Literal["clean", "noisy", "exact_dup", "near_dup"]

# Bounding radius of one object as a fraction of the image side. Tuned so a 64 px
# render keeps even a small star ~18 px across and four large objects still fit.
_SIZE_RADIUS = {"small": 0.14, "large": 0.21}
_SUPERSAMPLE = 4  # draw big, then downsample: cheap anti-aliasing
_POSITION_ANCHORS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "centre": (0.5, 0.5),
}


@dataclass(frozen=True)
class Scene:
    """What one image shows: `count` copies of one shape in one colour."""

    shape: str
    colour: str
    count: int
    size: str
    background: str
    position: str | None  # None when count > 1

    def __post_init__(self) -> None:
        _check_choice("shape", self.shape, SHAPES)
        _check_choice("colour", self.colour, tuple(COLOURS))
        _check_choice("count", self.count, COUNTS)
        _check_choice("size", self.size, SIZES)
        _check_choice("background", self.background, tuple(BACKGROUNDS))
        if self.count == 1:
            _check_choice("position", self.position, POSITIONS)
        elif self.position is not None:
            raise ValueError(f"position is only defined for a single object, got count={self.count}")


def _check_choice(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"invalid {field} {value!r}; expected one of {list(allowed)}")


def random_scene(rng: random.Random, **fixed: Any) -> Scene:
    """A uniformly random scene; any attribute can be pinned, e.g. `colour="red"`.

    Pinning `position` implies a single object (count=1).
    """
    unknown = set(fixed) - {f.name for f in dataclasses.fields(Scene)}
    if unknown:
        raise TypeError(f"unknown scene attributes: {sorted(unknown)}")
    if fixed.get("position") is not None and "count" not in fixed:
        fixed["count"] = 1
    # Draw every attribute even when pinned so the stream of RNG draws (and therefore
    # every later scene) does not depend on which attributes were pinned.
    values = {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "count": rng.choice(COUNTS),
        "size": rng.choice(SIZES),
        "background": rng.choice(list(BACKGROUNDS)),
        "position": rng.choice(POSITIONS),
    }
    values.update(fixed)
    if values["count"] != 1 and "position" not in fixed:
        values["position"] = None
    return Scene(**values)


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def render_scene(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """Draw the scene as an RGB image of `image_size` px square.

    Objects never overlap; position, size, rotation and tint are jittered slightly so
    that no two renders of the same scene are identical.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px, got {image_size}")
    side = image_size * _SUPERSAMPLE
    background = _jitter_rgb(BACKGROUNDS[scene.background], rng, 6)
    colour = _jitter_rgb(COLOURS[scene.colour], rng, 12)
    image = Image.new("RGB", (side, side), background)
    draw = ImageDraw.Draw(image)

    # Crowded scenes get slightly smaller objects so four large ones still fit.
    crowd_scale = 0.85 if scene.count >= 3 else 1.0
    base_radius = _SIZE_RADIUS[scene.size] * crowd_scale * side
    radii = [base_radius * rng.uniform(0.9, 1.1) for _ in range(scene.count)]
    centres = _place_objects(scene, radii, side, rng)
    for (cx, cy), radius in zip(centres, radii):
        _draw_shape(draw, scene.shape, cx, cy, radius, rng, colour)
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def _jitter_rgb(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _place_objects(
    scene: Scene, radii: list[float], side: int, rng: random.Random
) -> list[tuple[float, float]]:
    """Centres for non-overlapping objects (bounding circles stay `gap` apart)."""
    pad, gap = 0.02 * side, 0.04 * side

    def clamp(value: float, radius: float) -> float:
        return min(side - radius - pad, max(radius + pad, value))

    if scene.count == 1:
        ax, ay = _POSITION_ANCHORS[scene.position]  # type: ignore[index]
        jitter = 0.05 * side
        r = radii[0]
        x = clamp(ax * side + rng.uniform(-jitter, jitter), r)
        y = clamp(ay * side + rng.uniform(-jitter, jitter), r)
        return [(x, y)]

    # Rejection sampling gives the most varied layouts; a few restarts usually suffice.
    for _ in range(30):
        centres: list[tuple[float, float]] = []
        for r in radii:
            for _ in range(60):
                x = rng.uniform(r + pad, side - r - pad)
                y = rng.uniform(r + pad, side - r - pad)
                if all(math.hypot(x - px, y - py) >= r + pr + gap for (px, py), pr in zip(centres, radii)):
                    centres.append((x, y))
                    break
            else:
                break
        if len(centres) == len(radii):
            return centres

    # Fallback for tight packings: one object per cell of a 2x2 grid, lightly jittered.
    cells = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)]
    rng.shuffle(cells)
    centres = []
    for (fx, fy), r in zip(cells, radii):
        slack = max(0.0, 0.25 * side - r - gap / 2)
        centres.append((fx * side + rng.uniform(-slack, slack), fy * side + rng.uniform(-slack, slack)))
    return centres


def _regular_points(cx: float, cy: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    """Polygon vertices evenly spaced in angle, starting straight up, alternating radii."""
    n = len(radii)
    return [
        (cx + r * math.sin(rotation + 2 * math.pi * i / n), cy - r * math.cos(rotation + 2 * math.pi * i / n))
        for i, r in enumerate(radii)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    rng: random.Random,
    colour: tuple[int, int, int],
) -> None:
    # Rotations stay small so a square never turns into a "diamond" and a triangle
    # keeps pointing up: the caption must stay true.
    rotation = math.radians(rng.uniform(-12, 12))
    if shape == "circle":
        r = 0.9 * radius
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        # Circumradius = radius; start at 45 degrees so the sides are axis-aligned.
        draw.polygon(_regular_points(cx, cy, [radius] * 4, rotation + math.pi / 4), fill=colour)
    elif shape == "triangle":
        # Shift down a little so the triangle's visual centre sits on (cx, cy).
        draw.polygon(_regular_points(cx, cy + 0.12 * radius, [radius] * 3, rotation), fill=colour)
    elif shape == "star":
        draw.polygon(_regular_points(cx, cy, [radius, 0.45 * radius] * 5, rotation), fill=colour)
    else:  # pragma: no cover - Scene validates shapes
        raise ValueError(f"unknown shape {shape!r}")


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """JPEG bytes with fixed settings, so equal pixels always give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=2)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------

_POSITION_PHRASES = {
    "left": ("on the left", "at the left", "on the left side", "to the left"),
    "right": ("on the right", "at the right", "on the right side", "to the right"),
    "top": ("near the top", "at the top", "at the top of the frame", "up top"),
    "bottom": ("near the bottom", "at the bottom", "at the bottom of the frame", "down at the bottom"),
    "centre": ("in the centre", "in the middle", "in the center", "right in the middle"),
}
_BACKGROUND_FORMS = (
    " on a {bg} background",
    " on {bg}",
    " against a {bg} background",
    " over a {bg} backdrop",
    " on a plain {bg} background",
)


def _plural(shape: str, count: int) -> str:
    return shape if count == 1 else shape + "s"


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1] in "aeiou" else "a ") + phrase


def describe_scene(scene: Scene, rng: random.Random) -> str:
    """A natural-sounding caption that names colour, shape and count.

    Size, background and position (single objects) are mentioned often but not always;
    one of many templates is used so that a text encoder cannot key on phrasing.
    """
    n, colour, shape = scene.count, scene.colour, scene.shape
    noun = _plural(shape, n)
    word = NUMBER_WORDS[n]
    adjectives = f"{scene.size} {colour}" if rng.random() < 0.5 else colour
    bg = rng.choice(_BACKGROUND_FORMS).format(bg=scene.background) if rng.random() < 0.5 else ""
    bg_name = scene.background
    pos = ""
    if scene.position is not None and rng.random() < 0.6:
        pos = " " + rng.choice(_POSITION_PHRASES[scene.position])

    def counted(adj: str) -> str:
        """'three small red circles' / 'an orange star' / '1 blue square'."""
        if n == 1:
            how = rng.choices(["a", "one", "1", "a single"], weights=[30, 35, 20, 15])[0]
            return _with_article(f"{adj} {noun}") if how == "a" else f"{how} {adj} {noun}"
        return f"{rng.choice([word, word, str(n)])} {adj} {noun}"

    be = "is" if n == 1 else "are"
    templates = [
        lambda: f"{counted(adjectives)}{pos}{bg}",
        lambda: f"a photo of {counted(adjectives)}{pos}{bg}",
        lambda: f"an image of {counted(adjectives)}{pos}",
        lambda: f"a picture showing {counted(adjectives)}{bg}",
        lambda: f"there {be} {counted(adjectives)}{pos}{bg}",
        lambda: f"a simple drawing of {counted(adjectives)}{pos}{bg}",
        lambda: f"clip art: {counted(colour)}",
        lambda: f"{counted(colour)}",
        lambda: f"{_with_article(bg_name)} background with {counted(adjectives)}{pos}",
        lambda: f"{counted(adjectives)} drawn on {bg_name}",
        lambda: f"{word} {colour} shape{'s' if n > 1 else ''}, {'all ' + noun if n > 1 else 'a ' + shape}{bg}",
        lambda: f"{colour} {noun}: {rng.choice([word, str(n)])}{bg}",
        lambda: (
            f"{_with_article(colour)} object: {counted(scene.size)}"
            if n == 1
            else f"{colour} objects: {counted(scene.size)}"
        ),
        lambda: f"something {colour}: {counted(scene.size)}{pos}",
        lambda: f"{counted(scene.size)} in {colour}{bg}",
        lambda: (
            f"{adjectives} {noun}, {word} of them{',' if bg else ''}{bg}"
            if n > 1
            else f"{_with_article(adjectives)} {shape}, just one{pos}"
        ),
        lambda: f"{adjectives} {noun} ({word})",
        lambda: f"{counted(adjectives)} seen from above{bg}",
    ]
    caption = rng.choice(templates)()
    # Alt texts on the web are not consistently cased; the tokenizer lower-cases anyway.
    return caption[0].upper() + caption[1:] if rng.random() < 0.2 else caption


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
    """Everything that determines a synthetic site; equal specs give identical sites."""

    seed: int = 0
    n_pages: int = 40
    images_per_page: int = 8
    links_per_page: int = 4
    image_size: int = 64
    noisy_alt_rate: float = 0.08
    exact_duplicate_rate: float = 0.04
    near_duplicate_rate: float = 0.04
    fault_rate: float = 0.08
    slow_seconds: float = 3.0
    jpeg_quality: int = 90
    # New fields go last so positional construction keeps working.
    fault_kinds: tuple[str, ...] = DEMO_FAULT_KINDS  # faults are split evenly over these
    drip_interval: float = 0.2  # seconds between bytes of a "drip" body
    drip_max_seconds: float = 120.0  # server-side cap on one drip, in case the client never leaves
    throttle_times: int = 1  # GETs of a "429" URL answered 429 before the image is served
    retry_after_seconds: int = 1  # the Retry-After value those 429s carry

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
        if self.throttle_times < 0 or self.retry_after_seconds < 0:
            raise ValueError("throttle_times and retry_after_seconds must be >= 0")


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


ResponseMode = Literal["plain", "drip", "too_large"]


@dataclass(frozen=True)
class Response:
    """What the server sends for one request.

    `mode` "plain" sends `body` with its Content-Length. The streaming modes are written
    by the handler piece by piece: "drip" cycles through `body` one byte at a time with no
    Content-Length; "too_large" announces `TOO_LARGE_CLAIMED_BYTES` and sends zeros.
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
TOO_LARGE_CLAIMED_BYTES = 50 * 2**30  # the Content-Length a "too_large" response announces
TOO_LARGE_CHUNK_BYTES = 64 * 2**10
TOO_LARGE_MAX_BYTES = 256 * 2**20  # what it actually sends at most, if the client keeps reading
BOMB_SIDE = 20000  # pixels per side of the "bomb" PNG
_STREAM_SEND_TIMEOUT = 10.0  # a streaming write blocked this long means the client stopped reading

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


# --------------------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestRecord:
    """One request a `SyntheticWeb` handled, for tests to check what a crawler asked for."""

    path: str  # the request target as sent, query string included
    method: str
    status: int  # the status the site answered (or was about to answer when the client left)
    start: float  # time.monotonic() when handling began
    end: float  # time.monotonic() when the handler finished or noticed the client had left
    bytes_sent: int  # body bytes written (headers not counted)
    user_agent: str  # "" when the client sent none
    client_gone: bool  # a write failed or the client hung up mid-response (best effort)


class _RequestLog:
    # A record lands just after its response went out, so a client can finish before the
    # server has logged it; counting handlers in flight lets a test wait for the log to settle.
    def __init__(self) -> None:
        self._records: list[RequestRecord] = []
        self._in_flight = 0
        self._changed = threading.Condition()

    def begin(self) -> None:
        with self._changed:
            self._in_flight += 1

    def append(self, record: RequestRecord) -> None:
        with self._changed:
            self._records.append(record)
            self._in_flight -= 1
            self._changed.notify_all()

    def snapshot(self) -> list[RequestRecord]:
        with self._changed:
            return list(self._records)

    def clear(self) -> None:
        with self._changed:
            self._records.clear()

    def wait_idle(self, timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout)


class _Handler(BaseHTTPRequestHandler):
    server: "_SiteServer"
    server_version = "witclip-synthetic-web/1.0"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        started = time.monotonic()
        self._sent, self._gone = 0, False
        status = 0
        self.server.log.begin()
        try:
            target = urlsplit(self.path)
            response = self.server.site.response(
                unquote(target.path), target.query, method=self.command, private_target=self.server.private_target
            )
            status = response.status
            if send_body and response.delay_seconds > 0:
                time.sleep(response.delay_seconds)  # delay before headers, so client timeouts fire
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            if response.mode == "plain":
                self.send_header("Content-Length", str(len(response.body)))
            elif response.mode == "too_large":
                self.send_header("Content-Length", str(TOO_LARGE_CLAIMED_BYTES))
            for name, value in response.headers:
                self.send_header(name, value)
            if response.mode != "plain":
                self.send_header("Connection", "close")
            self.end_headers()
            if send_body:
                if response.mode == "drip":
                    self._drip(response.body)
                elif response.mode == "too_large":
                    self._stream_zeros()
                else:
                    self._write(response.body)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client gave up (timed out on a slow image, stopped reading a stream): routine.
            self._gone = True
        finally:
            if self._gone:
                self.close_connection = True
            self.server.log.append(
                RequestRecord(
                    path=self.path,
                    method=self.command,
                    status=status,
                    start=started,
                    end=time.monotonic(),
                    bytes_sent=self._sent,
                    user_agent=self.headers.get("User-Agent", ""),
                    client_gone=self._gone,
                )
            )

    def _write(self, data: bytes) -> None:
        self.wfile.write(data)
        self._sent += len(data)

    def _drip(self, body: bytes) -> None:
        # A client that never hangs up must not stall forever on a write either.
        self.connection.settimeout(_STREAM_SEND_TIMEOUT)
        spec = self.server.site.spec
        deadline = time.monotonic() + spec.drip_max_seconds
        index = 0
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            self._write(body[index % len(body) : index % len(body) + 1])
            index += 1
            if self._hung_up_within(spec.drip_interval):
                self._gone = True
                return

    def _stream_zeros(self) -> None:
        # A client that stops reading (but stays connected) makes the write time out.
        self.connection.settimeout(_STREAM_SEND_TIMEOUT)
        chunk = bytes(TOO_LARGE_CHUNK_BYTES)
        while self._sent < TOO_LARGE_MAX_BYTES and not self.server.stopping.is_set():
            self._write(chunk)

    def _hung_up_within(self, seconds: float) -> bool:
        """Wait up to `seconds`; True as soon as the client has closed its end.

        Watching the socket (rather than sleeping and waiting for a write to fail, which
        takes two writes after a close) notices a hang-up within milliseconds.
        """
        # selectors, not select.select: a busy test process can have fds above FD_SETSIZE.
        with selectors.DefaultSelector() as selector:
            selector.register(self.connection, selectors.EVENT_READ)
            if not selector.select(seconds):
                return False
        try:
            peeked = self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
        if not peeked:
            return True  # EOF: the client closed
        time.sleep(seconds)  # it sent more bytes: not a hang-up, just wait the interval out
        return False

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one stderr line per request would drown the pipeline logs


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must never keep the process alive
    # The default listen backlog (5) drops connection attempts when a crawler opens dozens at once; the
    # client's SYN retry then lands after its timeout and a healthy image counts as a failure.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], site: Site, log: _RequestLog, private_target: str):
        self.site = site
        self.log = log
        self.private_target = private_target
        self.stopping = threading.Event()  # streaming responses end when it is set
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # disconnects are routine for a web server
        super().handle_error(request, client_address)


class _ThreadedServer:
    """Start/stop/url/context-manager for an HTTP server served from a background daemon thread.
    Subclasses set `_address` and implement `_make_server()`."""

    _thread_name = "http-server"
    _address: tuple[str, int]

    def __init__(self) -> None:
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def _make_server(self) -> Any:
        raise NotImplementedError

    def _before_shutdown(self) -> None:
        """Hook: unblock handlers that would otherwise hold shutdown."""

    def start(self) -> str:
        """Start serving (port 0 = chosen by the OS) and return the base URL."""
        if self._server is None:
            self._server = self._make_server()
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=self._thread_name, daemon=True
            )
            self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._before_shutdown()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


class SyntheticWeb(_ThreadedServer):
    """Serve a built site on 127.0.0.1 from a background daemon thread.

    `private_target` is the base URL (e.g. a `CountingServer`'s) that "redirect_private"
    faults redirect to; by default `DEFAULT_PRIVATE_TARGET`, where nothing listens.

    >>> with SyntheticWeb(SiteSpec(seed=1)) as web:
    ...     seed_url = web.url  # http://127.0.0.1:<port>/
    """

    def __init__(
        self,
        spec: SiteSpec | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        private_target: str | None = None,
    ):
        self.spec = spec or SiteSpec()
        self.site = build_site(self.spec)
        self.private_target = private_target or DEFAULT_PRIVATE_TARGET
        self._address = (host, port)
        self._log = _RequestLog()  # outlives stop(), so a test can read it afterwards
        super().__init__()

    _thread_name = "synthetic-web"

    def _make_server(self) -> "_SiteServer":
        return _SiteServer(self._address, self.site, self._log, self.private_target)

    def _before_shutdown(self) -> None:
        self._server.stopping.set()  # ends drips and endless bodies still being written

    def requests(self) -> list[RequestRecord]:
        """Every request handled so far, in the order they finished (a copy).

        A request appears once its handler is done, a moment after the client got the
        response; call `wait_idle` first to be sure every finished exchange is in.
        """
        return self._log.snapshot()

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being handled; False if `timeout` seconds passed first.

        A drip or endless body still held open by a client keeps the server busy.
        """
        return self._log.wait_idle(timeout)

    def reset_requests(self) -> None:
        self._log.clear()



class _CountingHandler(BaseHTTPRequestHandler):
    server: "_CountingHTTPServer"
    server_version = "witclip-counting/1.0"

    def parse_request(self) -> bool:
        # Count every well-formed request whatever its method, before any do_* runs.
        parsed = super().parse_request()
        if parsed:
            self.server.owner._record(self.command, self.path)
        return parsed

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        body = self.server.owner.body
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _CountingHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], owner: "CountingServer"):
        self.owner = owner
        super().__init__(address, _CountingHandler)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        self.owner._connected()
        return True


class CountingServer(_ThreadedServer):
    """A host a crawler must never reach (say, a private address): answers and counts.

    Any GET or HEAD gets 200 with a tiny JPEG, so a crawler that does get through
    "succeeds" and the test sees it in `count` (requests) and `connections` (TCP
    connections accepted, even ones that never sent a request).

    >>> with CountingServer("127.0.0.2") as private:
    ...     web = SyntheticWeb(spec, private_target=private.url)
    """

    def __init__(self, host: str = "127.0.0.2", port: int = 0):
        self._address = (host, port)
        self.body = encode_jpeg(Image.new("RGB", (8, 8), (128, 128, 128)), 90)
        self._paths: list[str] = []
        self._connections = 0
        self._lock = threading.Lock()
        super().__init__()

    def _record(self, method: str, path: str) -> None:
        with self._lock:
            self._paths.append(f"{method} {path}")

    def _connected(self) -> None:
        with self._lock:
            self._connections += 1

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._paths)

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    @property
    def requests(self) -> list[str]:
        """"METHOD target" of every request so far."""
        with self._lock:
            return list(self._paths)

    _thread_name = "counting-server"

    def _make_server(self) -> "_CountingHTTPServer":
        return _CountingHTTPServer(self._address, self)


def main(argv: list[str] | None = None) -> int:
    """`witclip web`: serve a synthetic web until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="witclip web", description="Serve a deterministic synthetic web on loopback.")
    parser.add_argument("--seed", type=int, default=SiteSpec.seed)
    parser.add_argument("--pages", type=int, default=SiteSpec.n_pages, help="number of gallery pages")
    parser.add_argument("--port", type=int, default=0, help="0 lets the OS choose a free port")
    args = parser.parse_args(argv)
    web = SyntheticWeb(SiteSpec(seed=args.seed, n_pages=args.pages), port=args.port)
    try:
        # Print inside the try: a Ctrl-C right after the line appears must still exit cleanly.
        seed_url = web.start()
        print(f"serving synthetic web at {seed_url} {json.dumps(web.site.stats())}", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        web.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
