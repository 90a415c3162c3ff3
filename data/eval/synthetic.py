"""Held-out zero-shot benchmarks (colour, shape, count) from the synthetic-web generator.

Each benchmark pins one scene attribute to the class and randomises the others, renders
images with the same generator that feeds the synthetic web, and writes them in the
CLIP_benchmark webdataset layout so the eval stage reads them like any other dataset:

    <out_root>/<name>/classnames.txt                        one class name per line
    <out_root>/<name>/zeroshot_classification_templates.txt one prompt per line, "{c}" placeholder
    <out_root>/<name>/test/nshards.txt                      "1"
    <out_root>/<name>/test/0.tar                            <key>.jpg + <key>.cls (label as text)
    <out_root>/<name>/dataset_info.json                     written last = "complete" marker

Count classes are the number *words* ("one" .. "four"), not digits: captions use both,
and a word reads naturally in every prompt template ("a photo of three objects.").
Images are JPEG at the site's default quality, so they look like what was crawled.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data.common.files import atomic_path, atomic_write, atomic_write_json
from data.synthetic import (
    COLOURS,
    COUNTS,
    NUMBER_WORDS,
    SHAPES,
    SiteSpec,
    encode_jpeg,
    random_scene,
    render_scene,
)


@dataclass(frozen=True)
class SyntheticBenchmark:
    """One attribute turned into a classification task."""

    name: str
    attribute: str  # Scene field the label is read from
    values: tuple  # Scene attribute value for each class, in label order
    classnames: tuple[str, ...]  # what the prompts say for each class
    templates: tuple[str, ...]  # zero-shot prompts with a "{c}" placeholder


# Prompts are phrased like the alt texts the model was trained on (see describe_scene).
SYNTHETIC_BENCHMARKS: dict[str, SyntheticBenchmark] = {
    "colour": SyntheticBenchmark(
        name="colour",
        attribute="colour",
        values=tuple(COLOURS),
        classnames=tuple(COLOURS),
        templates=(
            "a photo of something {c}.",
            "{c} shapes.",
            "an object coloured {c}.",
            "{c} objects on a background.",
            "a picture of {c} shapes.",
            "something {c}.",
            "a simple drawing of {c} shapes.",
        ),
    ),
    "shape": SyntheticBenchmark(
        name="shape",
        attribute="shape",
        values=SHAPES,
        classnames=SHAPES,
        templates=(
            "a photo of a {c}.",
            "{c}s on a background.",
            "a picture of a {c}.",
            "a simple drawing of {c}s.",
            "an image of a {c}.",
            "one or more {c}s.",
        ),
    ),
    "count": SyntheticBenchmark(
        name="count",
        attribute="count",
        values=COUNTS,
        classnames=tuple(NUMBER_WORDS[n] for n in COUNTS),
        templates=(
            "a photo of {c} objects.",
            "{c} shapes.",
            "there are {c} shapes.",
            "a picture of {c} objects.",
            "{c} objects on a background.",
            "an image of {c} shapes.",
        ),
    ),
}

_INFO_FILE = "dataset_info.json"


def build_synthetic_benchmark(
    name: str,
    out_root: Path,
    seed: int,
    samples_per_class: int,
    image_size: int,
    *,
    jpeg_quality: int = SiteSpec.jpeg_quality,
) -> Path:
    """Write benchmark `name` under `out_root/name` and return that directory.

    Idempotent: an existing build with the same parameters (its dataset_info.json is
    written last) is reused; an incomplete or differently parameterised one is rebuilt.
    """
    if name not in SYNTHETIC_BENCHMARKS:
        raise ValueError(f"unknown synthetic benchmark {name!r}; expected one of {sorted(SYNTHETIC_BENCHMARKS)}")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
    bench = SYNTHETIC_BENCHMARKS[name]
    root = Path(out_root) / name
    info_path = root / _INFO_FILE
    wanted = {
        "seed": seed,
        "samples_per_class": samples_per_class,
        "image_size": image_size,
        "jpeg_quality": jpeg_quality,
    }
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except (OSError, json.JSONDecodeError):
            info = {}
        if all(info.get(key) == value for key, value in wanted.items()):
            return root
        info_path.unlink()  # stale: mark incomplete before touching anything else

    # A string seed is hashed with SHA-512 by `random`, so this stream is stable across
    # processes and can never coincide with a site's `random.Random(int_seed)` stream.
    rng = random.Random(f"{seed}:{name}:benchmark")
    labels = [label for label in range(len(bench.values)) for _ in range(samples_per_class)]
    rng.shuffle(labels)  # interleave classes so any prefix is roughly balanced

    split_dir = root / "test"
    split_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "classnames.txt", "\n".join(bench.classnames) + "\n")
    atomic_write(root / "zeroshot_classification_templates.txt", "\n".join(bench.templates) + "\n")

    # never a half-written shard under its real name
    with atomic_path(split_dir / "0.tar") as tmp_tar, tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, label in enumerate(labels):
            scene = random_scene(rng, **{bench.attribute: bench.values[label]})
            image = render_scene(scene, image_size, rng)
            key = f"{index:06d}"
            _add_member(tar, f"{key}.jpg", encode_jpeg(image, jpeg_quality))
            _add_member(tar, f"{key}.cls", str(label).encode())
    atomic_write(split_dir / "nshards.txt", "1\n")

    counts = {bench.classnames[c]: labels.count(c) for c in range(len(bench.values))}
    info = {
        "name": name,
        "n": len(labels),
        "classes": list(bench.classnames),
        "class_counts": counts,
        "chance": 1.0 / len(bench.classnames),
        "metric": "acc1",
        "attribute": bench.attribute,
        "generator": "data.synthetic.render_scene",
        **wanted,
    }
    atomic_write_json(info_path, info)
    return root


def build_synthetic_benchmarks(
    out_root: Path, seed: int, samples_per_class: int, image_size: int
) -> dict[str, Path]:
    """Build every benchmark in SYNTHETIC_BENCHMARKS; returns name -> directory."""
    return {
        name: build_synthetic_benchmark(name, out_root, seed, samples_per_class, image_size)
        for name in SYNTHETIC_BENCHMARKS
    }


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    # Fixed metadata (mtime 0, root owner) keeps the tar byte-for-byte reproducible.
    member = tarfile.TarInfo(name)
    member.size = len(data)
    member.mode = 0o644
    member.mtime = 0
    tar.addfile(member, io.BytesIO(data))
