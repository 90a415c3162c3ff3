"""img2dataset's Resizer under a decode-memory budget per worker process.

img2dataset decodes each downloaded body with OpenCV and, for an image with an alpha channel, blends it
onto white in float64: measured here with its Resizer on a 40-Mpx image (the default
`crawl.max_image_pixels`), an RGBA PNG raises the process's peak RSS by 2.75 GB (about 72 bytes per
pixel) and an RGB one by 0.12 GB (about 3). Each crawl shard runs `crawl.threads` (16) download threads,
so 16 such images at once would need 44 GB.

`BoundedResizer` runs the Resizer unchanged, but first reads the image's size and mode from its header
(Pillow; no decoding) and holds that image's estimated cost from a per-process `DecodeBudget` while it
decodes: the alpha rate for a 4-band image, one with a transparency entry, and any format but JPEG,
PNG, GIF and WebP (OpenCV hands img2dataset a CMYK TIFF or an RGBX BMP as 4 channels, which it blends
as alpha). Small images run side by side as before; an image at the cap runs alone. An image whose cost
alone exceeds the budget takes all of it. A worker's decoding memory is thus bounded by the budget
(`DECODE_BUDGET_BYTES`, 3 GiB) plus one thread's share beyond it, whatever the web sends. A stream that
carries the `ImageHeader` the fetcher already read (`image_header`, set by the crawl's download
function) is costed from it; any other stream's header is read here.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from img2dataset.resizer import Resizer

from data.crawl.fetch import ImageHeader, read_image_header

DECODE_BUDGET_BYTES = 3 << 30  # per worker process: one RGBA image at the 40-Mpx cap fits
ALPHA_BYTES_PER_PIXEL = 80  # measured 72: decode + img2dataset's float64 alpha blend, with headroom
OPAQUE_BYTES_PER_PIXEL = 8  # measured 3: decode (up to 16 bits a channel) + the resize's copies
# Charged the cheap rate: formats whose OpenCV decode never has a 4th channel unless Pillow sees alpha.
# Anything else (TIFF, BMP, ... where OpenCV returns CMYK or RGBX as 4 channels and img2dataset blends
# them as alpha) pays the alpha rate, as do 4-band modes and a "transparency" entry.
_OPAQUE_FORMATS = {"JPEG", "PNG", "GIF", "WEBP"}


class DecodeBudget:
    """A weighted semaphore over bytes: `hold(n)` waits until n more bytes fit (n is capped at the
    total, so any single image can run). First come, first served: a large image waiting for room is
    not overtaken by small ones forever."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._cond = threading.Condition()
        self._queue: deque[object] = deque()

    @contextmanager
    def hold(self, n: int) -> Iterator[None]:
        n = max(0, min(int(n), self.total))
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] is ticket and self.used + n <= self.total)
            self._queue.popleft()
            self.used += n
            self._cond.notify_all()  # the next in line may fit too
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


_budget = DecodeBudget(DECODE_BUDGET_BYTES)  # one per process: every shard's threads share it


def header_cost(header: ImageHeader) -> int:
    """Estimated peak bytes of decoding and resizing an image with this header (module docstring)."""
    alpha = header.format not in _OPAQUE_FORMATS or header.bands == 4 or header.transparency
    return header.pixels * (ALPHA_BYTES_PER_PIXEL if alpha else OPAQUE_BYTES_PER_PIXEL)


def decode_cost(body: bytes) -> int:
    """Estimated peak bytes of decoding and resizing `body` with img2dataset (module docstring); 0 when
    its header cannot be read (the decoder then fails at once)."""
    try:
        header = read_image_header(body)
    except Exception:  # noqa: BLE001 - unreadable headers are the fetcher's business, not the budget's
        return 0
    return header_cost(header)


class BoundedResizer(Resizer):
    """img2dataset's Resizer, each call holding its image's `decode_cost` from the process's budget."""

    def __call__(self, img_stream: Any, blurring_bbox_list: Any = None) -> Any:
        header = getattr(img_stream, "image_header", None)
        if isinstance(header, ImageHeader):
            cost = header_cost(header)
        else:
            img_stream.seek(0)
            cost = decode_cost(img_stream.read())
        img_stream.seek(0)
        with _budget.hold(cost):
            return super().__call__(img_stream, blurring_bbox_list)
