"""What OpenCV does with an image of a given size in this process; imports nothing heavy until called,
so a test can ship it to a fresh process whose OpenCV is not loaded yet."""

from __future__ import annotations


def decode_with_opencv(width: int, height: int) -> str:
    """'decoded' or 'refused': OpenCV decoding a width x height PNG in this process."""
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.zeros((height, width), np.uint8))
    try:
        return "decoded" if cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) is not None else "refused"
    except cv2.error:
        return "refused"
