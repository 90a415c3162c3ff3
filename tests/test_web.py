"""The synthetic web: determinism, faithful captions, faults, duplicates and the loopback server."""

from __future__ import annotations

import io
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from PIL import Image

from data.web import (
    BACKGROUNDS,
    COLOURS,
    COUNTS,
    FAULT_KINDS,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    Scene,
    SiteSpec,
    SyntheticWeb,
    build_site,
    describe_scene,
    random_scene,
    render_scene,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small site with many faults so every kind occurs, and a short "slow" delay.
SERVED_SPEC = SiteSpec(seed=7, n_pages=12, images_per_page=6, fault_rate=0.3, slow_seconds=0.3)


@pytest.fixture(scope="module")
def default_site():
    return build_site(SiteSpec())


@pytest.fixture(scope="module")
def web():
    with SyntheticWeb(SERVED_SPEC) as running:
        yield running


def fetch(url: str, method: str = "GET", timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class LinkParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[tuple[str, str]] = []  # (src, alt)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"])
        elif tag == "img":
            self.images.append((attributes.get("src") or "", attributes.get("alt") or ""))


# ---------------------------------------------------------------- scenes and captions


def test_random_scene_respects_fixed_attributes():
    rng = random.Random(0)
    for _ in range(50):
        scene = random_scene(rng, colour="red", shape="star")
        assert (scene.colour, scene.shape) == ("red", "star")
        assert (scene.position is None) == (scene.count > 1)
    assert random_scene(rng, position="left").count == 1
    assert random_scene(rng, count=3).position is None
    with pytest.raises(ValueError):
        random_scene(rng, colour="black")
    with pytest.raises(TypeError):
        random_scene(rng, texture="smooth")
    with pytest.raises(ValueError):
        Scene("circle", "red", 2, "small", "white", "left")


def test_vocabulary_is_unambiguous():
    assert len(COLOURS) == 6 and len(SHAPES) == 4 and COUNTS == (1, 2, 3, 4)
    # No background is close to any object colour.
    for bg in BACKGROUNDS.values():
        for colour in COLOURS.values():
            assert np.linalg.norm(np.subtract(bg, colour)) > 100
    assert not set(BACKGROUNDS) & set(COLOURS)


def _components(mask: np.ndarray, min_pixels: int = 6) -> int:
    """Number of 4-connected blobs of at least `min_pixels` in a boolean mask."""
    seen = np.zeros_like(mask)
    blobs = 0
    height, width = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, size = deque([(y, x)]), 0
        while queue:
            cy, cx = queue.popleft()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        blobs += size >= min_pixels
    return blobs


def test_render_shows_count_separate_objects_in_the_right_colour():
    rng = random.Random(1)
    for _ in range(80):
        scene = random_scene(rng)
        image = render_scene(scene, 64, rng)
        assert image.size == (64, 64) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float32)
        near_object = np.linalg.norm(pixels - np.array(COLOURS[scene.colour]), axis=-1) < 90
        assert near_object.sum() > 40, scene  # clearly visible
        assert _components(near_object) == scene.count, scene  # non-overlapping


def test_render_single_object_position():
    rng = random.Random(2)
    for position in POSITIONS:
        scene = random_scene(rng, position=position, size="small")
        pixels = np.asarray(render_scene(scene, 64, rng), dtype=np.float32)
        ys, xs = np.nonzero(np.linalg.norm(pixels - np.array(COLOURS[scene.colour]), axis=-1) < 90)
        cx, cy = xs.mean() / 64, ys.mean() / 64
        expected = {"left": cx < 0.4, "right": cx > 0.6, "top": cy < 0.4, "bottom": cy > 0.6}
        assert expected.get(position, 0.35 < cx < 0.65 and 0.35 < cy < 0.65), (position, cx, cy)


def test_render_jitters_but_is_reproducible():
    scene = Scene("star", "blue", 3, "large", "white", None)
    a = np.asarray(render_scene(scene, 64, random.Random(5)))
    b = np.asarray(render_scene(scene, 64, random.Random(5)))
    c = np.asarray(render_scene(scene, 64, random.Random(6)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert render_scene(scene, 96, random.Random(5)).size == (96, 96)


def test_describe_scene_is_faithful_and_varied():
    rng = random.Random(3)
    scene = Scene("triangle", "yellow", 3, "small", "black", None)
    captions = {describe_scene(scene, rng) for _ in range(300)}
    assert len(captions) > 50
    for caption in captions:
        text = caption.lower()
        assert "yellow" in text and "triangles" in text and ("three" in text or "3" in text), caption
    single = Scene("circle", "orange", 1, "large", "white", "top")
    for _ in range(100):
        text = describe_scene(single, rng).lower()
        assert "orange" in text and "circle" in text and "circles" not in text, text
        assert "a orange" not in text


# ---------------------------------------------------------------- site structure


def test_same_spec_builds_identical_site():
    spec = SiteSpec(seed=3, n_pages=6)
    a, b = build_site(spec), build_site(spec)
    assert a.pages == b.pages
    assert [e.caption for e in a.images.values()] == [e.caption for e in b.images.values()]
    assert list(a.images) == list(b.images)
    assert all(a.image_bytes(p) == b.image_bytes(p) for p in a.images)
    other = build_site(SiteSpec(seed=4, n_pages=6))
    assert other.pages != a.pages
    assert [e.caption for e in other.images.values()] != [e.caption for e in a.images.values()]
    assert {other.image_bytes(p) for p in other.images}.isdisjoint({a.image_bytes(p) for p in a.images})


def test_stats_add_up(default_site):
    stats = default_site.stats()
    spec = SiteSpec()
    n = spec.n_pages * spec.images_per_page
    assert stats["n_image_refs"] == len(default_site.images) == n
    assert stats["n_pages"] == spec.n_pages and len(default_site.pages) == spec.n_pages + 1
    assert stats["n_clean"] + stats["n_noisy"] + stats["n_exact_dup"] + stats["n_near_dup"] == n
    assert stats["n_noisy"] == round(spec.noisy_alt_rate * n)
    assert stats["n_exact_dup"] == round(spec.exact_duplicate_rate * n)
    assert stats["n_near_dup"] == round(spec.near_duplicate_rate * n)
    assert stats["n_faulty"] == sum(stats["n_faults"].values()) == round(spec.fault_rate * n)
    per_kind = [stats["n_faults"][kind] for kind in FAULT_KINDS]
    assert max(per_kind) - min(per_kind) <= 1 and min(per_kind) > 0


def test_captions_match_scenes(default_site):
    for entry in default_site.images.values():
        text = entry.caption.lower()
        if entry.kind == "noisy":
            assert not any(c in text for c in COLOURS) and not any(s in text for s in SHAPES), text
            continue
        scene = entry.scene
        assert scene.colour in text and scene.shape in text, (scene, text)
        if scene.count > 1:
            assert scene.shape + "s" in text, text
            assert NUMBER_WORDS[scene.count] in text or str(scene.count) in text, text


def test_duplicates(default_site):
    order = list(default_site.images)
    for path, entry in default_site.images.items():
        if entry.kind not in ("exact_dup", "near_dup"):
            assert entry.duplicate_of is None
            continue
        source = default_site.images[entry.duplicate_of]
        assert order.index(source.path) < order.index(path)
        assert source.kind == "clean" and source.fault is None and entry.fault is None
        assert source.scene == entry.scene
        same_bytes = default_site.image_bytes(path) == default_site.image_bytes(source.path)
        assert same_bytes == (entry.kind == "exact_dup"), entry
    # Outside of exact duplicates, no two URLs serve the same bytes.
    unique = {default_site.image_bytes(p) for p, e in default_site.images.items() if e.kind != "exact_dup"}
    assert len(unique) == sum(e.kind != "exact_dup" for e in default_site.images.values())


def test_pages_use_absolute_and_relative_srcs(default_site):
    srcs = []
    for html_text in default_site.pages.values():
        parser = LinkParser()
        parser.feed(html_text)
        srcs += [src for src, _ in parser.images]
    assert any(s.startswith("/img/") for s in srcs) and any(s.startswith("../img/") for s in srcs)
    assert len(srcs) == len(default_site.images)


# ---------------------------------------------------------------- server


def test_bfs_from_seed_reaches_every_page_and_image(web):
    seed = web.url
    assert seed.startswith("http://127.0.0.1:") and seed.endswith("/")
    host = urlsplit(seed).netloc
    queue, seen_pages, image_urls = deque([seed]), {seed}, set()
    while queue:
        url = queue.popleft()
        status, headers, body = fetch(url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        parser = LinkParser()
        parser.feed(body.decode("utf-8"))
        image_urls.update(urljoin(url, src) for src, _ in parser.images)
        for href in parser.links:
            target = urljoin(url, href).split("#")[0]
            if urlsplit(target).netloc == host and target not in seen_pages:
                seen_pages.add(target)
                queue.append(target)
    assert {urlsplit(u).path for u in seen_pages} == set(web.site.pages)
    assert {urlsplit(u).path for u in image_urls} == set(web.site.images)


def test_clean_image_and_headers(web):
    entry = next(e for e in web.site.images.values() if e.kind == "clean" and e.fault is None)
    status, headers, body = fetch(urljoin(web.url, entry.path))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(body) == len(web.site.image_bytes(entry.path))
    image = Image.open(io.BytesIO(body))
    image.load()
    assert image.size == (SERVED_SPEC.image_size,) * 2
    status, headers, body = fetch(urljoin(web.url, entry.path), method="HEAD")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_robots_and_unknown_paths(web):
    status, headers, body = fetch(urljoin(web.url, "/robots.txt"))
    assert status == 200 and b"Allow: /" in body and headers["Content-Type"].startswith("text/plain")
    assert fetch(urljoin(web.url, "/nope.html"))[0] == 404
    assert fetch(urljoin(web.url, "/img/000000000000.jpg"))[0] == 404
    assert fetch(urljoin(web.url, "/page/0.html?utm=1"))[0] == 200


def _first_with_fault(site, fault):
    return next(e for e in site.images.values() if e.fault == fault)


def test_http_error_faults(web):
    assert fetch(urljoin(web.url, _first_with_fault(web.site, "404").path))[0] == 404
    assert fetch(urljoin(web.url, _first_with_fault(web.site, "500").path))[0] == 500


def test_slow_fault(web):
    url = urljoin(web.url, _first_with_fault(web.site, "slow").path)
    start = time.monotonic()
    status, _, body = fetch(url)
    assert status == 200 and time.monotonic() - start >= SERVED_SPEC.slow_seconds
    Image.open(io.BytesIO(body)).load()
    # A client that times out must not break the server.
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        urllib.request.urlopen(url, timeout=0.05).read()
    assert fetch(web.url)[0] == 200


def test_truncated_fault(web):
    entry = _first_with_fault(web.site, "truncated")
    status, headers, body = fetch(urljoin(web.url, entry.path))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert len(body) == len(web.site.image_bytes(entry.path)) // 2
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


def test_not_image_fault(web):
    status, headers, body = fetch(urljoin(web.url, _first_with_fault(web.site, "not_image").path))
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert body.lstrip().lower().startswith(b"<!doctype html")
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


def test_exact_duplicates_served_byte_identical(web):
    entry = next(e for e in web.site.images.values() if e.kind == "exact_dup")
    assert fetch(urljoin(web.url, entry.path))[2] == fetch(urljoin(web.url, entry.duplicate_of))[2]


def test_concurrent_requests_render_once_consistently(web):
    paths = [p for p, e in web.site.images.items() if e.fault is None][:12]
    results: dict[str, set[bytes]] = {p: set() for p in paths}

    def worker() -> None:
        for path in paths:
            results[path].add(fetch(urljoin(web.url, path))[2])

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(bodies) == 1 for bodies in results.values())


def test_stop_and_context_manager():
    web = SyntheticWeb(SiteSpec(n_pages=2, images_per_page=1))
    with pytest.raises(RuntimeError):
        _ = web.url
    url = web.start()
    assert web.start() == url  # idempotent
    assert fetch(url)[0] == 200
    web.stop()
    web.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)


# The child re-enables Ctrl-C: a runner started in the background (`pytest &`) passes
# SIGINT on as ignored, and Python then never raises KeyboardInterrupt.
CLI_CHILD = """
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from data.web import main
sys.exit(main(['--seed', '2', '--pages', '3']))
"""


def test_cli_main_serves_until_interrupted():
    process = subprocess.Popen(
        [sys.executable, "-c", CLI_CHILD],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert "http://127.0.0.1:" in line and '"n_image_refs": 24' in line, line
        url = line.split()[4]
        assert fetch(url)[0] == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert process.stderr.read() == ""  # quiet: no per-request log lines
    finally:
        if process.poll() is None:
            process.kill()
