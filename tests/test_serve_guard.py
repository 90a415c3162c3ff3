"""The served witclip model takes images only from the request: `mlflow models serve` (a real one, on
loopback, --env-manager local) answers a request naming a path or a file: URL -- of a file that exists on
the server -- with HTTP 400 and a message saying what to send, and a base64 image or a data: URI with 200
and a prediction."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import pytest
from support.servers import served_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LABELS = "a red circle,a blue square"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny witclip model logged and registered in a sqlite store, served on a free loopback port."""
    import torch
    from mlflow.tracking import MlflowClient

    import clip
    from clip.tokenizer import TOKENIZER_FILE, train_caption_tokenizer
    from flows.registry import log_clip_model

    root = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("witclip", artifact_location=(root / "artifacts").as_uri())
    model_dir = root / "model"
    torch.manual_seed(0)
    clip.save_model(clip.create_model("tiny"), model_dir)
    train_caption_tokenizer(["a red circle", "a blue square"] * 20, vocab_size=300).save(model_dir / TOKENIZER_FILE)
    version = log_clip_model(model_dir=model_dir, run_id=client.create_run(exp).info.run_id, tracking_uri=uri,
                             model_name="witclip")

    with served_model(f"models:/witclip/{version}", uri, root) as url:
        yield {"url": url, "root": root}


def _invoke(url: str, image: str) -> tuple[int, dict]:
    body = json.dumps({"dataframe_split": {"columns": ["image", "labels"], "data": [[image, LABELS]]}}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (220, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_path_or_file_url_is_answered_400(served):
    on_server = served["root"] / "server-side.png"  # exists and is an image: reading it would have worked
    on_server.write_bytes(_png())
    for image in (str(on_server), on_server.as_uri(), "../server-side.png"):
        status, answer = _invoke(served["url"], image)
        assert status == 400, (image, answer)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
        message = answer["message"]
        assert "image in row 0: a path or URL, which the served model never opens" in message, message
        assert "expected the image itself as raw bytes, base64 text or a data:image/...;base64, URI" in message


def test_text_that_is_not_an_image_is_answered_400(served):
    status, answer = _invoke(served["url"], "certainly not base64!")
    assert status == 400 and "image in row 0: not base64" in answer["message"]
    status, answer = _invoke(served["url"], base64.b64encode(b"plain bytes, no image").decode())
    assert status == 400 and "image in row 0: not a readable image" in answer["message"]


def test_base64_and_data_uri_images_are_answered_200(served):
    encoded = base64.b64encode(_png()).decode()
    rows = []
    for image in (encoded, f"data:image/png;base64,{encoded}"):
        status, answer = _invoke(served["url"], image)
        assert status == 200, answer
        row = answer["predictions"][0]
        assert row["label"] in LABELS.split(",") and len(row["scores"]) == 2
        assert abs(sum(row["scores"]) - 1) < 1e-4 and row["score"] == max(row["scores"])
        rows.append(row)
    assert rows[0] == rows[1]


def test_an_image_over_the_pixel_cap_is_refused_from_its_header():
    """A request image is sized from its header before decoding: 48 Mpx never reaches convert('RGB')."""
    import struct
    import zlib

    import mlflow

    from flows.registry import SERVED_MAX_PIXELS, WitclipZeroShotModel

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 8000, 6000, 8, 2, 0, 0, 0)  # 8000 x 6000 RGB, 48 Mpx > the cap
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    assert 8000 * 6000 > SERVED_MAX_PIXELS
    with pytest.raises(mlflow.exceptions.MlflowException, match="8000x6000 pixels, over the"):
        WitclipZeroShotModel._load_image(base64.b64encode(png).decode(), row=3)
