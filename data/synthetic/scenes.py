"""Scenes of the synthetic web: what an image shows, how it is drawn, and how it is captioned.

A scene is `count` copies of one shape in one colour on a neutral background. `render_scene` draws it
(jittered, so no two renders are identical) and `describe_scene` writes a caption that names colour,
shape and count in one of many phrasings. The synthetic site (`site.py`) serves these images, and the
held-out zero-shot benchmarks (`data.eval.synthetic`) are rendered by the same code, so a model trained
on the crawl can be scored on colour, shape and count without ever having seen those images.

Everything is driven by explicit `random.Random` instances (never the global RNG).
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
from dataclasses import dataclass
from typing import Any

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
