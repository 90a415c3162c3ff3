"""Reader for CLIP_benchmark-style webdataset benchmarks.

Layout (as published for CLIP_benchmark and written by `data.eval.synthetic`):

    <root>/classnames.txt                          one class name per line
    <root>/zeroshot_classification_templates.txt   one prompt per line, "{c}" placeholder
    <root>/<split>/nshards.txt                     number of shards N (optional: else *.tar)
    <root>/<split>/0.tar .. <N-1>.tar              <key>.<image ext> + <key>.cls

Only the stdlib `tarfile` is used: shards are read sequentially, members of one sample
are adjacent (the webdataset convention), so memory stays at one sample at a time.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
LABEL_EXTENSIONS = ("cls", "cls.txt", "label")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"


def _split_key(member_name: str) -> tuple[str, str]:
    """webdataset rule: the key ends at the first dot of the basename."""
    directory, _, basename = member_name.rpartition("/")
    stem, _, ext = basename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file missing: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"benchmark file is empty: {path}")
    return lines


def find_shards(split_dir: Path) -> list[Path]:
    """The tars of one split: 0.tar .. N-1.tar per nshards.txt, else every *.tar in numeric order.
    Raises FileNotFoundError / ValueError naming what is missing or malformed."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"benchmark split directory missing: {split_dir}")
    nshards_path = split_dir / "nshards.txt"
    if nshards_path.is_file():
        text = nshards_path.read_text().strip()
        if not text.isdigit() or int(text) < 1:
            raise ValueError(f"{nshards_path}: expected a positive shard count, got {text!r}")
        shards = [split_dir / f"{i}.tar" for i in range(int(text))]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"benchmark shard missing: {shard} ({nshards_path} says {text})")
        return shards

    def shard_order(path: Path) -> tuple[bool, int, str]:
        return (not path.stem.isdigit(), int(path.stem) if path.stem.isdigit() else 0, path.name)

    shards = sorted(split_dir.glob("*.tar"), key=shard_order)
    if not shards:
        raise FileNotFoundError(f"benchmark shards missing: no nshards.txt and no *.tar in {split_dir}")
    return shards


class WdsBenchmark:
    """A zero-shot classification set: class names, prompt templates and (image, label) samples."""

    def __init__(self, root: Path, split: str = "test"):
        self.root = Path(root)
        self.split = split
        if not self.root.is_dir():
            raise FileNotFoundError(f"benchmark directory missing: {self.root}")
        self.name = self.root.name
        self.classnames: list[str] = _read_lines(self.root / CLASSNAMES_FILE)
        self.templates: list[str] = _read_lines(self.root / TEMPLATES_FILE)
        bad = [t for t in self.templates if "{c}" not in t]
        if bad:
            raise ValueError(f"{self.root / TEMPLATES_FILE}: templates without a '{{c}}' placeholder: {bad}")
        self.shards: list[Path] = self._find_shards()
        self._length: int | None = None

    def _find_shards(self) -> list[Path]:
        return find_shards(self.root / self.split)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.classnames)

    def _samples(self, decode: bool) -> Iterator[tuple[Image.Image | None, int]]:
        for shard in self.shards:
            with tarfile.open(shard) as tar:
                key, fields = None, {}
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = _split_key(member.name)
                    if member_key != key:
                        if key is not None:
                            yield self._sample(shard, key, fields, decode)
                        key, fields = member_key, {}
                    if ext in IMAGE_EXTENSIONS or ext in LABEL_EXTENSIONS:
                        # Skip image bytes when only counting.
                        if decode or ext in LABEL_EXTENSIONS:
                            fields[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                        else:
                            fields[ext] = b""
                if key is not None:
                    yield self._sample(shard, key, fields, decode)

    def _sample(self, shard: Path, key: str, fields: dict[str, bytes], decode: bool) -> tuple[Image.Image | None, int]:
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
        label_ext = next((e for e in LABEL_EXTENSIONS if e in fields), None)
        if image_ext is None or label_ext is None:
            missing = "image" if image_ext is None else "label (.cls)"
            raise ValueError(f"{shard}: sample {key!r} has no {missing}; members: {sorted(fields)}")
        text = fields[label_ext].decode("utf-8").strip()
        try:
            label = int(text)
        except ValueError:
            raise ValueError(f"{shard}: sample {key!r} label {text!r} is not an integer") from None
        if not 0 <= label < len(self.classnames):
            raise ValueError(f"{shard}: sample {key!r} label {label} outside 0..{len(self.classnames) - 1}")
        image = Image.open(io.BytesIO(fields[image_ext])).convert("RGB") if decode else None
        return image, label

    def __iter__(self) -> Iterator[tuple[Image.Image, int]]:
        return self._samples(decode=True)  # type: ignore[return-value]

    def labels(self) -> list[int]:
        """All labels in order, without decoding images."""
        return [label for _, label in self._samples(decode=False)]

    def __len__(self) -> int:
        if self._length is None:
            self._length = len(self.labels())
        return self._length

    def __repr__(self) -> str:
        return f"WdsBenchmark({str(self.root)!r}, split={self.split!r}, classes={len(self.classnames)})"


def load_wds_benchmark(root: Path, split: str = "test") -> WdsBenchmark:
    """Open a CLIP_benchmark webdataset directory; raises FileNotFoundError/ValueError naming what is wrong."""
    return WdsBenchmark(root, split)
