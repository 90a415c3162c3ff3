"""Decoding crawled images is bounded: OpenCV's pixel limit is the crawl's cap in every process that
decodes (set before OpenCV loads), and img2dataset's Resizer runs under a per-process memory budget."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from data.crawl.decode import (
    ALPHA_BYTES_PER_PIXEL,
    OPAQUE_BYTES_PER_PIXEL,
    DecodeBudget,
    decode_cost,
)

REPO = Path(__file__).resolve().parents[1]


def _png(mode: str, size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new(mode, size).save(out, "PNG")
    return out.getvalue()


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_opencv_refuses_images_over_the_crawl_cap_in_a_task_process():
    """A fresh process (a Dask worker) that runs a crawl task: OpenCV gets the crawl's cap, not its own
    2^30, although the task's objects import OpenCV while they unpickle."""
    out = _run("""
        import pickle, sys
        from data.common.opencv_limit import run_with_opencv_limit
        sys.path.insert(0, "tests")
        from support.opencv_probe import decode_with_opencv
        assert "cv2" not in sys.modules
        print(run_with_opencv_limit(10_000, pickle.dumps((decode_with_opencv, (200, 100)))),
              run_with_opencv_limit(10_000, pickle.dumps((decode_with_opencv, (100, 100)))))
    """)
    assert out == "refused decoded"


def test_a_process_that_loaded_opencv_first_keeps_its_limit_and_says_so():
    out = _run("""
        import logging, pickle
        import cv2
        from data.common.opencv_limit import limit_opencv_pixels
        logging.basicConfig(level=logging.WARNING)
        print(limit_opencv_pixels(10_000))
    """)
    assert out == str(1 << 30)


def test_decode_cost_reads_the_header_and_charges_alpha_more():
    assert decode_cost(_png("RGBA", (300, 200))) == 300 * 200 * ALPHA_BYTES_PER_PIXEL
    assert decode_cost(_png("RGB", (300, 200))) == 300 * 200 * OPAQUE_BYTES_PER_PIXEL
    palette = Image.new("P", (10, 10))
    palette.info["transparency"] = 0
    out = io.BytesIO()
    palette.save(out, "PNG", transparency=0)
    assert decode_cost(out.getvalue()) == 100 * ALPHA_BYTES_PER_PIXEL
    assert decode_cost(b"<html>not an image</html>") == 0
    cmyk = io.BytesIO()
    Image.new("CMYK", (30, 20)).save(cmyk, "TIFF")  # OpenCV decodes it to 4 channels: img2dataset blends them
    assert decode_cost(cmyk.getvalue()) == 30 * 20 * ALPHA_BYTES_PER_PIXEL


def test_a_large_image_waiting_for_the_budget_is_not_overtaken():
    budget = DecodeBudget(100)
    order: list[str] = []
    first = budget.hold(60)
    first.__enter__()

    def take(name: str, n: int) -> None:
        with budget.hold(n):
            order.append(name)

    large = threading.Thread(target=take, args=("large", 100))
    large.start()
    time.sleep(0.1)  # the large one is queued, waiting for the 60 to be given back
    small = threading.Thread(target=take, args=("small", 10))
    small.start()
    time.sleep(0.1)
    assert order == []  # 10 would fit beside the 60, but it queued behind the large one
    first.__exit__(None, None, None)
    large.join(5)
    small.join(5)
    assert order == ["large", "small"] and budget.used == 0


def test_the_budget_runs_what_fits_side_by_side_and_the_rest_in_turn():
    budget = DecodeBudget(100)
    peak, active, lock = [0], [0], threading.Lock()

    def work(n: int) -> None:
        with budget.hold(n):
            with lock:
                active[0] += n
                peak[0] = max(peak[0], active[0])
            time.sleep(0.05)
            with lock:
                active[0] -= n

    threads = [threading.Thread(target=work, args=(n,)) for n in (60, 60, 30, 500)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert peak[0] <= 100 + 400  # the 500 is capped at the total and runs alone
    assert budget.used == 0


@pytest.mark.slow
def test_rgba_images_at_the_pixel_cap_decode_one_at_a_time():
    """Two threads resizing 40-Mpx RGBA PNGs (the default cap) through BoundedResizer: the process's
    peak RSS grows by about one image's float64 alpha blend (2.75 GB measured), not two."""
    out = _run("""
        import io, os, resource, threading
        os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
        import numpy as np, cv2
        from data.crawl.decode import BoundedResizer
        img = np.zeros((5000, 8000, 4), np.uint8)
        data = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1].tobytes()
        del img
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = BoundedResizer(image_size=64, resize_mode="center_crop", resize_only_if_bigger=False,
                           upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=95,
                           encode_format="jpg", skip_reencode=False, disable_all_reencoding=False,
                           min_image_size=0, max_image_area=float("inf"), max_aspect_ratio=float("inf"), blurrer=None)
        errors = []
        def one():
            errors.append(r(io.BytesIO(data))[-1])
        threads = [threading.Thread(target=one) for _ in range(2)]
        [t.start() for t in threads]; [t.join() for t in threads]
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(errors, (peak - base) >> 10)
    """)
    errors, grew_mb = out.rsplit(" ", 1)
    assert errors == "[None, None]"
    assert int(grew_mb) < 4000, f"peak RSS grew by {grew_mb} MB"
