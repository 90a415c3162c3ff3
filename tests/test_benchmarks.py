"""Synthetic zero-shot benchmarks and the CLIP_benchmark webdataset reader."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.eval import (
    SYNTHETIC_BENCHMARKS,
    build_synthetic_benchmark,
    load_wds_benchmark,
)
from data.synthetic import COLOURS, SiteSpec, build_site

SEED = 0
PER_CLASS = 12
IMAGE_SIZE = 64


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    for name in SYNTHETIC_BENCHMARKS:
        build_synthetic_benchmark(name, root, seed=SEED, samples_per_class=PER_CLASS, image_size=IMAGE_SIZE)
    return root


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


@pytest.mark.parametrize("name", sorted(SYNTHETIC_BENCHMARKS))
def test_layout_and_info(bench_root, name):
    root = bench_root / name
    bench = SYNTHETIC_BENCHMARKS[name]
    assert (root / "classnames.txt").read_text().splitlines() == list(bench.classnames)
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert 4 <= len(templates) <= 8 and all("{c}" in t for t in templates)
    assert (root / "test" / "nshards.txt").read_text().strip() == "1"
    assert (root / "test" / "0.tar").is_file()
    info = json.loads((root / "dataset_info.json").read_text())
    n_classes = len(bench.classnames)
    assert info["name"] == name and info["n"] == PER_CLASS * n_classes
    assert info["classes"] == list(bench.classnames)
    assert info["chance"] == pytest.approx(1 / n_classes) and info["metric"] == "acc1"
    assert info["seed"] == SEED
    members = _tar_members(root / "test" / "0.tar")
    assert len(members) == 2 * info["n"]
    image_keys = sorted(m.removesuffix(".jpg") for m in members if m.endswith(".jpg"))
    label_keys = sorted(m.removesuffix(".cls") for m in members if m.endswith(".cls"))
    assert image_keys == label_keys and len(image_keys) == info["n"]


def test_count_classnames_are_words():
    assert SYNTHETIC_BENCHMARKS["count"].classnames == ("one", "two", "three", "four")
    assert SYNTHETIC_BENCHMARKS["colour"].classnames == tuple(COLOURS)


@pytest.mark.parametrize("name", sorted(SYNTHETIC_BENCHMARKS))
def test_loader_round_trip_balanced(bench_root, name):
    dataset = load_wds_benchmark(bench_root / name)
    n_classes = len(SYNTHETIC_BENCHMARKS[name].classnames)
    assert dataset.classnames == list(SYNTHETIC_BENCHMARKS[name].classnames)
    assert dataset.templates == list(SYNTHETIC_BENCHMARKS[name].templates)
    assert len(dataset) == PER_CLASS * n_classes
    samples = list(dataset)
    assert len(samples) == len(dataset)
    labels = [label for _, label in samples]
    assert labels == dataset.labels()
    assert all(0 <= label < n_classes for label in labels)
    assert Counter(labels) == {c: PER_CLASS for c in range(n_classes)}
    assert all(image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE) for image, _ in samples)
    # Same labels as the raw .cls members, in key order.
    members = _tar_members(bench_root / name / "test" / "0.tar")
    raw = [int(members[k]) for k in sorted(k for k in members if k.endswith(".cls"))]
    assert raw == labels


def test_colour_labels_are_faithful(bench_root):
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float32)
    dataset = load_wds_benchmark(bench_root / "colour")
    for image, label in dataset:
        pixels = np.asarray(image, dtype=np.float32).reshape(-1, 1, 3)
        close = (np.linalg.norm(pixels - palette, axis=-1) < 70).sum(axis=0)
        assert int(close.argmax()) == label


def test_readable_by_webdataset(bench_root):
    wds = pytest.importorskip("webdataset")
    dataset = wds.WebDataset(str(bench_root / "shape" / "test" / "0.tar"), shardshuffle=False).decode("pil")
    first = next(iter(dataset))
    assert first["jpg"].size == (IMAGE_SIZE, IMAGE_SIZE) and 0 <= int(first["cls"]) < 4


def test_deterministic_and_idempotent(tmp_path, bench_root):
    root = build_synthetic_benchmark("shape", tmp_path, seed=SEED, samples_per_class=PER_CLASS, image_size=IMAGE_SIZE)
    shard = root / "test" / "0.tar"
    assert shard.read_bytes() == (bench_root / "shape" / "test" / "0.tar").read_bytes()
    # A complete build is reused as is.
    mtime = shard.stat().st_mtime_ns
    build_synthetic_benchmark("shape", tmp_path, seed=SEED, samples_per_class=PER_CLASS, image_size=IMAGE_SIZE)
    assert shard.stat().st_mtime_ns == mtime
    # No info file = incomplete: rebuilt.
    (root / "dataset_info.json").unlink()
    build_synthetic_benchmark("shape", tmp_path, seed=SEED, samples_per_class=PER_CLASS, image_size=IMAGE_SIZE)
    assert (root / "dataset_info.json").is_file()
    # Different parameters: rebuilt, and a different seed gives different images.
    build_synthetic_benchmark("shape", tmp_path, seed=SEED + 1, samples_per_class=3, image_size=IMAGE_SIZE)
    assert len(load_wds_benchmark(root)) == 12
    assert json.loads((root / "dataset_info.json").read_text())["seed"] == SEED + 1


def test_benchmark_images_never_served(bench_root):
    site = build_site(SiteSpec(seed=SEED, n_pages=40, images_per_page=8))
    served_bytes = {site.image_bytes(p) for p in site.images}
    served_pixels = {
        hashlib.sha1(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")).tobytes()).digest() for b in served_bytes
    }
    for name in SYNTHETIC_BENCHMARKS:
        for member, data in _tar_members(bench_root / name / "test" / "0.tar").items():
            if member.endswith(".jpg"):
                assert data not in served_bytes
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()
                assert hashlib.sha1(pixels).digest() not in served_pixels


def test_unknown_benchmark(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic benchmark"):
        build_synthetic_benchmark("texture", tmp_path, seed=0, samples_per_class=1, image_size=64)


# ---------------------------------------------------------------- reader errors


def _write_layout(root: Path, samples: list[tuple[str, bytes]], nshards: str | None = "1") -> Path:
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("cat\ndog\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    if nshards is not None:
        (root / "test" / "nshards.txt").write_text(nshards + "\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_reader_accepts_png_and_missing_nshards(tmp_path):
    samples = [("a.png", _png()), ("a.cls", b"1"), ("b.png", _png()), ("b.cls", b"0")]
    root = _write_layout(tmp_path / "ds", samples, nshards=None)
    dataset = load_wds_benchmark(root)
    assert [label for _, label in dataset] == [1, 0] and len(dataset) == 2


@pytest.mark.parametrize("missing", ["classnames.txt", "zeroshot_classification_templates.txt", "test/0.tar"])
def test_reader_names_missing_file(tmp_path, missing):
    root = _write_layout(tmp_path / "ds", [("a.png", _png()), ("a.cls", b"1")])
    (root / missing).unlink()
    with pytest.raises(FileNotFoundError, match=Path(missing).name):
        load_wds_benchmark(root)


def test_reader_layout_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_wds_benchmark(tmp_path / "nowhere")
    root = _write_layout(tmp_path / "ds", [("a.png", _png()), ("a.cls", b"1")])
    with pytest.raises(FileNotFoundError, match="train"):
        load_wds_benchmark(root, split="train")
    (root / "test" / "nshards.txt").write_text("2\n")
    with pytest.raises(FileNotFoundError, match="1.tar"):
        load_wds_benchmark(root)


@pytest.mark.parametrize(
    "samples, message",
    [
        ([("a.png", _png())], "no label"),
        ([("a.cls", b"0")], "no image"),
        ([("a.png", _png()), ("a.cls", b"7")], "outside"),
        ([("a.png", _png()), ("a.cls", b"dog")], "not an integer"),
    ],
)
def test_reader_bad_samples(tmp_path, samples, message):
    dataset = load_wds_benchmark(_write_layout(tmp_path / "ds", samples))
    with pytest.raises(ValueError, match=message):
        list(dataset)
