"""OpenCV's own decode limit, set to the crawl's pixel cap in every process that decodes crawled images.

OpenCV refuses to decode an image of more than `OPENCV_IO_MAX_IMAGE_PIXELS` pixels (default 2^30), but
reads that variable once, when its library loads; setting it after `import cv2` does nothing. Every
img2dataset import loads OpenCV, and unpickling a crawl task's arguments imports img2dataset. So a crawl
task is shipped to its Dask worker as this module's `run_with_opencv_limit(max_pixels, payload)`:
this module imports nothing heavy, sets the variable, and only then unpickles `payload` (the task's
function and arguments) and calls it.

The crawl's fetcher already refuses, before any decoder, a body whose dimensions Pillow cannot read from
its header or that exceed the cap; OpenCV's limit is the second wall, for a body that Pillow and OpenCV
read as different images. A process that loaded OpenCV before the first crawl task (another library,
an earlier crawl with another cap) keeps the limit it loaded with: `limit_opencv_pixels` returns it and
warns once.
"""

from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import Any

OPENCV_PIXELS_VAR = "OPENCV_IO_MAX_IMAGE_PIXELS"
OPENCV_DEFAULT_MAX_PIXELS = 1 << 30

log = logging.getLogger(__name__)
_warned: set[tuple[int, int]] = set()


def limit_opencv_pixels(max_pixels: int) -> int:
    """Make `max_pixels` OpenCV's decode limit in this process if OpenCV is not loaded yet; the limit in
    force either way."""
    if "cv2" not in sys.modules:
        os.environ[OPENCV_PIXELS_VAR] = str(int(max_pixels))
        return int(max_pixels)
    value = os.environ.get(OPENCV_PIXELS_VAR, "")
    in_force = int(value) if value.isdigit() else OPENCV_DEFAULT_MAX_PIXELS
    if in_force != max_pixels and (in_force, max_pixels) not in _warned:
        _warned.add((in_force, max_pixels))
        log.warning("OpenCV was loaded in process %d with a decode limit of %d pixels, not the crawl's %d; "
                    "bodies over %d pixels are still refused from their header before any decoder",
                    os.getpid(), in_force, max_pixels, max_pixels)
    return in_force


def run_with_opencv_limit(max_pixels: int, payload: bytes) -> Any:
    """`function(*args)` for `payload = pickle.dumps((function, args))`, unpickled only after OpenCV's
    limit is set (module docstring)."""
    limit_opencv_pixels(max_pixels)
    function, args = pickle.loads(payload)
    return function(*args)
