"""A deterministic synthetic "web" of captioned images, served on loopback.

The demo and the tests have no internet, so witclip builds its own little web from a
seed: HTML pages that link to each other and embed `<img alt="...">` tags whose images
are simple rendered scenes (N coloured shapes on a neutral background) and whose alt
texts describe them faithfully. Like the real web it is messy on purpose: some alt
texts are junk, some images are exact or near duplicates, and some URLs fail in the
ways a downloader must survive (404, 500, slow, truncated JPEG, HTML served as JPEG).

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
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

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

FAULT_KINDS: tuple[str, ...] = ("404", "500", "slow", "truncated", "not_image")
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


@dataclass(frozen=True)
class ImageEntry:
    """One `<img>` on the site and the ground truth behind it."""

    path: str  # "/img/<id>.jpg"
    page: str  # the page that embeds it
    scene: Scene
    caption: str  # the alt text as served
    kind: ImageKind
    fault: str | None  # one of FAULT_KINDS, or None
    duplicate_of: str | None  # source image path for exact_dup / near_dup
    render_seed: int
    jpeg_quality: int


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes
    delay_seconds: float = 0.0


_ROBOTS_TXT = "User-agent: *\nAllow: /\n"
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
        self.robots_txt = _ROBOTS_TXT
        self._image_bytes: dict[str, bytes] = {}
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

    def response(self, path: str) -> Response:
        """What the server sends for a GET of `path` (without query string)."""
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
        data = self.image_bytes(path)
        if entry.fault == "truncated":
            return Response(200, "image/jpeg", data[: len(data) // 2])
        if entry.fault == "slow":
            return Response(200, "image/jpeg", data, delay_seconds=self.spec.slow_seconds)
        return Response(200, "image/jpeg", data)

    def stats(self) -> dict[str, Any]:
        entries = list(self.images.values())
        faults = {kind: sum(e.fault == kind for e in entries) for kind in FAULT_KINDS}
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


def build_site(spec: SiteSpec) -> Site:
    """Build pages, image entries and captions deterministically from `spec`.

    Kind counts are exact (round(rate * n_image_refs)) rather than sampled, so stats are
    predictable. Faults only hit clean images, and duplicates always copy an earlier,
    fault-free clean image.
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
        fault_of[index] = FAULT_KINDS[k % len(FAULT_KINDS)]  # split evenly among kinds

    # Image entries in page order.
    images: dict[str, ImageEntry] = {}
    sources: list[ImageEntry] = []  # clean, fault-free: eligible to be duplicated
    for index in range(n_refs):
        page = f"/page/{index // spec.images_per_page}.html"
        path = _unique_image_path(rng, images)
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


def _unique_image_path(rng: random.Random, taken: dict[str, ImageEntry]) -> str:
    while True:
        path = f"/img/{rng.getrandbits(48):012x}.jpg"
        if path not in taken:
            return path


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


class _Handler(BaseHTTPRequestHandler):
    server: "_SiteServer"
    server_version = "witclip-synthetic-web/1.0"

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        response = self.server.site.response(unquote(urlsplit(self.path).path))
        try:
            if send_body and response.delay_seconds > 0:
                time.sleep(response.delay_seconds)  # delay before headers, so client timeouts fire
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Content-Length", str(len(response.body)))
            self.end_headers()
            if send_body:
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up (e.g. timed out on a slow image): nothing to report.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one stderr line per request would drown the pipeline logs


class _SiteServer(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must never keep the process alive
    # The default listen backlog (5) drops connection attempts when a crawler opens dozens at once; the
    # client's SYN retry then lands after its timeout and a healthy image counts as a failure.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], site: Site):
        self.site = site
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # disconnects are routine for a web server
        super().handle_error(request, client_address)


class SyntheticWeb:
    """Serve a built site on 127.0.0.1 from a background daemon thread.

    >>> with SyntheticWeb(SiteSpec(seed=1)) as web:
    ...     seed_url = web.url  # http://127.0.0.1:<port>/
    """

    def __init__(self, spec: SiteSpec | None = None, *, host: str = "127.0.0.1", port: int = 0):
        self.spec = spec or SiteSpec()
        self.site = build_site(self.spec)
        self._address = (host, port)
        self._server: _SiteServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        """Start serving (port 0 = chosen by the OS) and return the seed URL."""
        if self._server is None:
            self._server = _SiteServer(self._address, self.site)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="synthetic-web", daemon=True
            )
            self._thread.start()
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("SyntheticWeb is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/"

    def __enter__(self) -> "SyntheticWeb":
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


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
