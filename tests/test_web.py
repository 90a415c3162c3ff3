"""The synthetic web: determinism, faithful captions, faults, duplicates and the loopback server."""

from __future__ import annotations

import hashlib
import http.client
import io
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import urllib.robotparser
import zlib
from collections import deque
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import pytest
from PIL import Image
from support.servers import CountingServer

from data.synthetic import (
    ALL_FAULT_KINDS,
    BACKGROUNDS,
    BOMB_SIDE,
    COLOURS,
    COUNTS,
    DEFAULT_PRIVATE_TARGET,
    DEMO_FAULT_KINDS,
    NOINDEX_PREFIX,
    NUMBER_WORDS,
    POSITIONS,
    SHAPES,
    TOO_LARGE_CLAIMED_BYTES,
    TOO_LARGE_MAX_BYTES,
    Scene,
    SiteSpec,
    SyntheticWeb,
    bomb_png,
    build_site,
    describe_scene,
    random_scene,
    render_scene,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# Small site with many faults so every kind occurs, and a short "slow" delay.
SERVED_SPEC = SiteSpec(seed=7, n_pages=12, images_per_page=6, fault_rate=0.3, slow_seconds=0.3)


# What SiteSpec() built before the demo's values became its defaults; fingerprinted below.
SMALL_SPEC = SiteSpec(n_pages=40, images_per_page=8, fault_rate=0.08)


@pytest.fixture(scope="module")
def default_site():
    return build_site(SMALL_SPEC)


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
    spec = SMALL_SPEC
    n = spec.n_pages * spec.images_per_page
    assert stats["n_image_refs"] == len(default_site.images) == n
    assert stats["n_pages"] == spec.n_pages and len(default_site.pages) == spec.n_pages + 1
    assert stats["n_clean"] + stats["n_noisy"] + stats["n_exact_dup"] + stats["n_near_dup"] == n
    assert stats["n_noisy"] == round(spec.noisy_alt_rate * n)
    assert stats["n_exact_dup"] == round(spec.exact_duplicate_rate * n)
    assert stats["n_near_dup"] == round(spec.near_duplicate_rate * n)
    assert stats["n_faulty"] == sum(stats["n_faults"].values()) == round(spec.fault_rate * n)
    per_kind = [stats["n_faults"][kind] for kind in DEMO_FAULT_KINDS]
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
from flows.cli import main
sys.exit(main(['web', '--seed', '2', '--pages', '3']))
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
        assert "http://127.0.0.1:" in line and '"n_image_refs": 48' in line  # 3 pages of the demo's 16 images, line
        url = line.split()[4]
        assert fetch(url)[0] == 200
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert process.stderr.read() == ""  # quiet: no per-request log lines
    finally:
        if process.poll() is None:
            process.kill()


# ---------------------------------------------------------------- fault kinds and the default site


def _site_fingerprint(site) -> str:
    """sha256 over every page and every image entry's ground truth (render seed included)."""
    digest = hashlib.sha256()
    for path, text in site.pages.items():
        digest.update(f"{path}\0{text}\0".encode())
    for path, e in site.images.items():
        fields = (path, e.page, e.kind, e.fault, e.duplicate_of, e.render_seed, e.jpeg_quality, e.caption)
        digest.update(("|".join(map(str, fields)) + "\n").encode())
    return digest.hexdigest()


def test_default_site_is_unchanged_by_the_extra_fault_kinds(default_site):
    # Recorded from build_site(SMALL_SPEC) before fault_kinds existed: the web must not move.
    assert default_site.stats() == {
        "seed": 0, "n_pages": 40, "n_image_refs": 320,
        "n_faults": {"404": 6, "500": 5, "slow": 5, "truncated": 5, "not_image": 5}, "n_faulty": 26,
        "n_clean": 268, "n_noisy": 26, "n_exact_dup": 13, "n_near_dup": 13,
    }  # fmt: skip
    assert _site_fingerprint(default_site) == "499b501fffcbf6672fe93403f21d206c70e709c86e0441113f26ea1266d9df12"
    assert _site_fingerprint(build_site(SERVED_SPEC)) == (
        "ab5ce98e7861b8cde6b4b88a3eb8f73ff2de49b4b4833644455ab14f2919f295"
    )
    assert default_site.robots_txt == "User-agent: *\nAllow: /\n"
    assert DEMO_FAULT_KINDS == SiteSpec().fault_kinds
    assert len(ALL_FAULT_KINDS) == len(set(ALL_FAULT_KINDS)) == 17 and ALL_FAULT_KINDS[:5] == DEMO_FAULT_KINDS


def test_fault_kinds_are_validated_and_the_spec_stays_hashable():
    with pytest.raises(ValueError, match="unknown fault kind"):
        SiteSpec(fault_kinds=("404", "teapot"))
    with pytest.raises(ValueError, match="duplicates"):
        SiteSpec(fault_kinds=("404", "404"))
    with pytest.raises(ValueError, match="at least one fault kind"):
        SiteSpec(fault_kinds=())
    assert SiteSpec(fault_rate=0, fault_kinds=()).fault_kinds == ()
    spec = SiteSpec(fault_kinds=["drip", "bomb"])  # a list is stored as a tuple
    assert spec.fault_kinds == ("drip", "bomb") and hash(spec) == hash(SiteSpec(fault_kinds=("drip", "bomb")))


def test_all_fault_kinds_split_evenly_and_move_no_url():
    kw = dict(seed=5, n_pages=10, images_per_page=10, fault_rate=0.6)
    demo, full = build_site(SiteSpec(**kw)), build_site(SiteSpec(**kw, fault_kinds=ALL_FAULT_KINDS))
    stats = full.stats()
    assert list(stats["n_faults"]) == list(ALL_FAULT_KINDS)
    per_kind = list(stats["n_faults"].values())
    assert sum(per_kind) == stats["n_faulty"] == 60 and min(per_kind) >= 3 and max(per_kind) - min(per_kind) <= 1
    # Same draws: the same image ids, captions and faulty positions; only "robots" entries changed prefix.
    for a, b in zip(demo.images.values(), full.images.values()):
        assert a.path.rsplit("/", 1)[1] == b.path.rsplit("/", 1)[1] and a.caption == b.caption
        assert (a.fault is None) == (b.fault is None)
        assert b.path.startswith(NOINDEX_PREFIX if b.fault == "robots" else "/img/"), b
    assert full.robots_txt == "User-agent: *\nDisallow: /img-noindex/\nAllow: /\n"
    for path, entry in full.images.items():
        assert full.expected_status(path) == (entry.fault or "ok")
        assert full.expected_status("http://127.0.0.1:1" + path + "?x=1") == (entry.fault or "ok")
    assert full.expected_status("/") == full.expected_status("/page/3.html") == "ok"
    with pytest.raises(KeyError):
        full.expected_status("/img/000000000000.jpg")


# ---------------------------------------------------------------- hostile faults, served

HOSTILE_SPEC = SiteSpec(
    seed=11,
    n_pages=4,
    images_per_page=18,
    fault_rate=0.5,
    fault_kinds=ALL_FAULT_KINDS,
    drip_interval=0.05,
    throttle_times=2,
    retry_after_seconds=3,
)
UA = "witclip-test/1.0"


@pytest.fixture(scope="module")
def hostile_web():
    with SyntheticWeb(HOSTILE_SPEC) as running:
        yield running


def _connect(web: SyntheticWeb, timeout: float = 10) -> http.client.HTTPConnection:
    netloc = urlsplit(web.url).netloc
    host, port = netloc.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def _get(web: SyntheticWeb, path: str, method: str = "GET") -> tuple[int, http.client.HTTPMessage, bytes]:
    """One request, redirects not followed."""
    conn = _connect(web)
    try:
        conn.request(method, path, headers={"User-Agent": UA})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def _record_for(web: SyntheticWeb, path: str, timeout: float = 5):
    """The request log entry for `path`; records land when a handler finishes, so poll."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [r for r in web.requests() if r.path == path]
        if found:
            return found[-1]
        time.sleep(0.02)
    raise AssertionError(f"no request record for {path}")


def test_hostile_site_has_every_kind(hostile_web):
    assert all(count >= 2 for count in hostile_web.site.stats()["n_faults"].values())
    assert hostile_web.private_target == DEFAULT_PRIVATE_TARGET


def test_request_log(hostile_web):
    assert hostile_web.wait_idle(timeout=5)
    hostile_web.reset_requests()
    assert hostile_web.requests() == []
    status, _, body = _get(hostile_web, "/page/1.html?utm=2")
    _get(hostile_web, "/page/1.html", method="HEAD")
    assert hostile_web.wait_idle(timeout=5)
    get, head = hostile_web.requests()
    assert (get.path, get.method, get.status, get.bytes_sent, get.user_agent) == (
        "/page/1.html?utm=2", "GET", 200, len(body), UA
    )
    assert (head.method, head.status, head.bytes_sent, head.client_gone) == ("HEAD", 200, 0, False)
    assert get.start <= get.end <= head.start <= head.end <= time.monotonic()
    assert _get(hostile_web, "/nope")[0] == 404 and _record_for(hostile_web, "/nope").status == 404


def test_drip_sends_bytes_slowly_until_the_client_leaves(hostile_web):
    path = _first_with_fault(hostile_web.site, "drip").path
    conn = _connect(hostile_web)
    conn.request("GET", path, headers={"User-Agent": UA})
    response = conn.getresponse()
    assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
    assert response.headers["Content-Length"] is None
    start = time.monotonic()
    received = b"".join(response.read(1) for _ in range(4))
    elapsed = time.monotonic() - start
    assert received == hostile_web.site.image_bytes(path)[:4]  # the real JPEG, a byte at a time
    assert elapsed >= 2.5 * HOSTILE_SPEC.drip_interval
    closing = time.monotonic()
    response.close()
    conn.close()
    record = _record_for(hostile_web, path)
    assert record.client_gone and record.status == 200 and record.user_agent == UA
    assert 0 <= record.end - closing < 1.0  # the handler noticed the hang-up and let go
    assert 4 <= record.bytes_sent <= 4 + (record.end - record.start) / HOSTILE_SPEC.drip_interval + 1


def test_drip_safety_limit_and_stop_end_streams():
    spec = SiteSpec(n_pages=1, images_per_page=6, fault_rate=0.5, fault_kinds=("drip",), drip_interval=0.05,
                    drip_max_seconds=0.3)  # fmt: skip
    with SyntheticWeb(spec) as web:
        path = _first_with_fault(web.site, "drip").path
        start = time.monotonic()
        status, _, body = _get(web, path)  # reads until the server closes
        assert status == 200 and 0.25 < time.monotonic() - start < 2.0 and 2 <= len(body) <= 8
        assert _record_for(web, path).client_gone is False

    # stop() ends a drip whose safety limit is far off: the client sees the end of the body.
    long_spec = SiteSpec(n_pages=1, images_per_page=6, fault_rate=0.5, fault_kinds=("drip",), drip_interval=0.05)
    web = SyntheticWeb(long_spec)
    web.start()
    conn = _connect(web)
    conn.request("GET", _first_with_fault(web.site, "drip").path)
    response = conn.getresponse()
    response.read(1)
    stopped = time.monotonic()
    web.stop()
    response.read()  # EOF arrives once the handler sees `stopping`
    assert time.monotonic() - stopped < 2.0
    conn.close()


def test_redirect_loop_alternates(hostile_web):
    path = _first_with_fault(hostile_web.site, "redirect_loop").path
    status, headers, _ = _get(hostile_web, path)
    assert status == 302 and headers["Location"] == f"{path}?loop=1"
    status, headers, _ = _get(hostile_web, f"{path}?loop=1")
    assert status == 302 and headers["Location"] == path
    # A client that follows redirects gives up on the loop.
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(urljoin(hostile_web.url, path), timeout=10)
    assert info.value.code == 302
    info.value.close()


def test_redirect_private_default_target(hostile_web):
    path = _first_with_fault(hostile_web.site, "redirect_private").path
    status, headers, _ = _get(hostile_web, path)
    assert status == 302 and headers["Location"] == "http://127.0.0.2:9" + path


def test_redirect_private_target_gets_nothing_unless_asked():
    spec = SiteSpec(seed=3, n_pages=2, images_per_page=6, fault_rate=0.5, fault_kinds=("redirect_private",))
    with CountingServer("127.0.0.2") as private, SyntheticWeb(spec, private_target=private.url) as web:
        assert urlsplit(private.url).hostname == "127.0.0.2"
        paths = [p for p, e in web.site.images.items() if e.fault == "redirect_private"]
        assert len(paths) == 6
        for path in paths:
            status, headers, _ = _get(web, path)
            assert status == 302 and headers["Location"] == private.url.rstrip("/") + path
        assert private.count == 0 and private.connections == 0  # not followed: never contacted
        # Following it by hand does reach the counting server.
        location = _get(web, paths[0])[1]["Location"]
        status, headers, body = fetch(location)
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        Image.open(io.BytesIO(body)).load()
        assert private.count == 1 and private.requests == [f"GET {urlsplit(location).path}"]
        assert fetch(location, method="HEAD")[0] == 200 and private.count == 2


def test_too_large_announces_50_gib_and_stops_when_the_client_leaves(hostile_web):
    path = _first_with_fault(hostile_web.site, "too_large").path
    conn = _connect(hostile_web)
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
    assert int(response.headers["Content-Length"]) == TOO_LARGE_CLAIMED_BYTES == 50 * 2**30
    assert response.read(2**20) == bytes(2**20)
    response.close()
    conn.close()
    record = _record_for(hostile_web, path)
    assert record.client_gone and 2**20 <= record.bytes_sent < TOO_LARGE_MAX_BYTES
    status, headers, body = _get(hostile_web, path, method="HEAD")
    assert status == 200 and int(headers["Content-Length"]) == TOO_LARGE_CLAIMED_BYTES and body == b""


def test_too_large_is_capped_server_side(hostile_web):
    path = _first_with_fault(hostile_web.site, "too_large").path
    host, port = urlsplit(hostile_web.url).netloc.rsplit(":", 1)
    received = 0
    buffer = bytearray(2**20)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"GET {path}?all=1 HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        while n := sock.recv_into(buffer):
            received += n
    record = _record_for(hostile_web, f"{path}?all=1")
    assert record.bytes_sent == TOO_LARGE_MAX_BYTES == 256 * 2**20 and not record.client_gone
    assert TOO_LARGE_MAX_BYTES < received < TOO_LARGE_MAX_BYTES + 1000  # body + headers


def test_bomb_is_a_tiny_valid_png_that_claims_400_megapixels(hostile_web, monkeypatch):
    path = _first_with_fault(hostile_web.site, "bomb").path
    status, headers, body = _get(hostile_web, path)
    assert status == 200 and headers["Content-Type"] == "image/png"
    assert len(body) < 200_000 and body == bomb_png() and bomb_png() is bomb_png()  # built once
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(body))  # PIL's default guard
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    image = Image.open(io.BytesIO(body))  # header only, nothing decoded
    assert image.size == (BOMB_SIDE, BOMB_SIDE) == (20000, 20000) and image.mode == "1"

    # Well-formed: signature, chunk CRCs, and an IDAT that inflates to 20000 zero scanlines.
    assert body[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(body):
        (length,) = struct.unpack(">I", body[offset : offset + 4])
        kind, data = body[offset + 4 : offset + 8], body[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", body[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + data) == crc, kind
        chunks.append((kind, data))
        offset += 12 + length
    assert [kind for kind, _ in chunks] == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (20000, 20000, 1, 0, 0, 0, 0)
    inflater, pending, total = zlib.decompressobj(), chunks[1][1], 0
    while pending or not inflater.eof:
        out = inflater.decompress(pending, 4 * 2**20)
        assert out.count(0) == len(out)
        total += len(out)
        pending = inflater.unconsumed_tail
    assert total == 20000 * (1 + 20000 // 8)


def test_429_then_image_with_retry_after(hostile_web):
    path = _first_with_fault(hostile_web.site, "429").path
    hostile_web.site.reset_throttles()
    status, headers, body = _get(hostile_web, path)
    assert status == 429 and headers["Retry-After"] == "3" and 0 < len(body) < 200
    assert _get(hostile_web, path, method="HEAD")[0] == 429  # HEAD does not use up a refusal
    assert _get(hostile_web, path)[0] == 429  # throttle_times=2
    status, headers, body = _get(hostile_web, path)
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and "Retry-After" not in headers
    assert body == hostile_web.site.image_bytes(path)
    assert _get(hostile_web, path)[0] == 200
    # Counted per path: another "429" URL is still throttled.
    other = [p for p, e in hostile_web.site.images.items() if e.fault == "429" and p != path][0]
    assert _get(hostile_web, other)[0] == 429
    hostile_web.site.reset_throttles()
    assert _get(hostile_web, path)[0] == 429


def test_robots_disallows_the_noindex_images(hostile_web):
    status, _, body = _get(hostile_web, "/robots.txt")
    assert status == 200 and body == b"User-agent: *\nDisallow: /img-noindex/\nAllow: /\n"
    parser = urllib.robotparser.RobotFileParser()
    parser.parse(body.decode().splitlines())
    for path, entry in hostile_web.site.images.items():
        assert path.startswith(NOINDEX_PREFIX) == (entry.fault == "robots")
        assert parser.can_fetch("witclip", urljoin(hostile_web.url, path)) == (entry.fault != "robots")
    # Linked from the pages like any other image, and still served if asked.
    path = _first_with_fault(hostile_web.site, "robots").path
    assert path.rsplit("/", 1)[1] in hostile_web.site.pages[hostile_web.site.images[path].page]
    status, headers, body = _get(hostile_web, path)
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert body == hostile_web.site.image_bytes(path)
    assert _record_for(hostile_web, path).status == 200


def test_noai_header(hostile_web):
    path = _first_with_fault(hostile_web.site, "noai").path
    status, headers, body = _get(hostile_web, path)
    assert status == 200 and headers["X-Robots-Tag"] == "noai" and headers["Content-Type"] == "image/jpeg"
    assert body == hostile_web.site.image_bytes(path)
    clean = next(p for p, e in hostile_web.site.images.items() if e.fault is None)
    assert "X-Robots-Tag" not in _get(hostile_web, clean)[1]


def test_counting_server_counts_every_request_and_connection():
    with CountingServer() as server:
        assert server.url.startswith("http://127.0.0.2:")
        host, port = urlsplit(server.url).netloc.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=5).close()  # connects, asks nothing
        deadline = time.monotonic() + 5
        while server.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (server.count, server.connections) == (0, 1)
        assert fetch(urljoin(server.url, "/anything?q=1"))[0] == 200
        assert fetch(urljoin(server.url, "/x"), method="POST")[0] == 501  # refused, still counted
        assert server.count == 2 and server.requests == ["GET /anything?q=1", "POST /x"]
    with pytest.raises(RuntimeError):
        _ = server.url


def _raw_head(web: SyntheticWeb, path: str, seconds: float) -> tuple[bytes, float]:
    """What arrives on a raw socket within `seconds` of sending a GET for `path`."""
    host, port = urlsplit(web.url).netloc.rsplit(":", 1)
    received = b""
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=seconds) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        while time.monotonic() - start < seconds:
            sock.settimeout(max(0.01, seconds - (time.monotonic() - start)))
            try:
                chunk = sock.recv(1024)
            except TimeoutError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - start


def test_trickled_status_line_never_ends(hostile_web):
    path = _first_with_fault(hostile_web.site, "trickle_status").path
    received, _ = _raw_head(hostile_web, path, 0.6)
    assert received and b"\n" not in received and received.startswith(b"HTTP/1.1 200 OK"[: len(received)])
    assert len(received) <= 0.6 / HOSTILE_SPEC.drip_interval + 2  # a byte at a time
    assert _record_for(hostile_web, path).client_gone


def test_trickled_headers_follow_a_proper_status_line(hostile_web):
    path = _first_with_fault(hostile_web.site, "trickle_headers").path
    received, _ = _raw_head(hostile_web, path, 0.6)
    head, _, trickled = received.partition(b"Content-Type: image/jpeg\r\n")
    assert head == b"HTTP/1.1 200 OK\r\n" and trickled and b"\r\n\r\n" not in received
    assert b"X-Trickle: one byte at a time"[: len(trickled)] == trickled[:29]


def test_slow_redirects_take_five_delayed_hops_then_serve_the_image(hostile_web):
    path = _first_with_fault(hostile_web.site, "slow_redirects").path
    hop, started = path, time.monotonic()
    for n in range(1, 6):
        status, headers, _ = _get(hostile_web, hop)
        assert status == 302 and headers["Location"] == f"{path}?hop={n}"
        hop = headers["Location"]
    assert time.monotonic() - started >= 5 * HOSTILE_SPEC.hop_delay_seconds
    status, headers, body = _get(hostile_web, hop)
    assert status == 200 and body == hostile_web.site.image_bytes(path)


def test_unidentified_body_is_an_hdr_that_only_opencv_reads(hostile_web):
    import cv2

    path = _first_with_fault(hostile_web.site, "unidentified").path
    status, headers, body = _get(hostile_web, path)
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and body.startswith(b"#?RADIANCE")
    with pytest.raises(Image.UnidentifiedImageError):
        Image.open(io.BytesIO(body))
    assert cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED).shape == (8, 8, 3)


def test_sites_with_private_redirects_link_a_page_that_redirects_there(hostile_web, default_site):
    from data.synthetic import MOVED_PAGE

    assert f'href="{MOVED_PAGE}"' in hostile_web.site.pages["/"]
    status, headers, _ = _get(hostile_web, MOVED_PAGE)
    assert status == 302 and headers["Location"] == "http://127.0.0.2:9" + MOVED_PAGE
    assert MOVED_PAGE not in default_site.pages["/"]
