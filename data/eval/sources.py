"""Open a located benchmark as one indexable dataset, whatever its layout on disk.

    data = open_task_data(task, location)       # Location from data.eval.registry.locate
    data.dataset[i] -> (PIL image, target)      # target: int class | float[C] multi-label | list[str] captions
    data.classnames, data.templates, data.keys, data.fingerprint

Layouts:

* ``wds`` -- CLIP_benchmark's webdataset layout (the public mirrors): ``test/nshards.txt``,
  ``test/0.tar`` ..., ``classnames.txt``, ``zeroshot_classification_templates.txt``, optional
  ``dataset_type.txt`` (``retrieval`` | ``multilabel``). Samples hold an image plus ``cls``
  (class index), ``npy`` (multi-label vector) or ``txt`` (captions, one per line). The tars are
  indexed once (member headers only) and read by offset, so a DataLoader can fetch samples in
  any order from any worker.
* ``imagefolder`` -- ``<dir>/test/<class>/<image>``; class order is sorted folder names.
* ``torchvision`` -- ``torchvision.datasets.<class>(root, download=False, **kwargs)`` over data
  already on disk; nothing is ever downloaded here.

Class names and templates come with the data when it has them, else from the task's metadata.
A class count that disagrees with the metadata is an error naming both numbers.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
DATASET_TYPE_FILE = "dataset_type.txt"
FULL_HASH_LIMIT = 256 * 2**20  # above this many bytes, fingerprint sizes + first/last MiB per file


class BenchmarkDataError(ValueError):
    """A located benchmark that cannot be used as it is (corrupt, mismatched, malformed)."""


@dataclass
class TaskData:
    task: str
    type: str  # classification | multilabel | retrieval
    classnames: list[str] | None
    templates: list[str]
    dataset: Dataset
    keys: list[str]  # per sample, as dedup's overlap index names benchmark test images
    layout: str
    path: Path
    fingerprint: str  # sha256 of the data files (or of sizes + edges for big sets; see fingerprint_kind)
    fingerprint_kind: str = "sha256"
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def _read_lines(path: Path) -> list[str]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line]


def fingerprint_files(paths: list[Path], base: Path) -> tuple[str, str]:
    """(hex digest, kind): the whole bytes when small, else names + sizes + first and last MiB."""
    paths = sorted(paths)
    total = sum(p.stat().st_size for p in paths)
    h = hashlib.sha256()
    full = total <= FULL_HASH_LIMIT
    for p in paths:
        h.update(str(p.relative_to(base)).encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        with open(p, "rb") as f:
            if full:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            else:
                h.update(f.read(1 << 20))
                f.seek(max(0, p.stat().st_size - (1 << 20)))
                h.update(f.read(1 << 20))
    return h.hexdigest(), "sha256" if full else "sha256-sampled"


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode now, inside the try: a truncated file fails here, naming the sample
            # an RGB image is returned as decoded: convert("RGB") would copy every pixel for nothing
            return im if im.mode == "RGB" else im.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad bytes
        raise BenchmarkDataError(f"{where}: undecodable image ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- wds
@dataclass(frozen=True)
class _Member:
    shard: int
    offset: int
    size: int


class WdsDataset(Dataset):
    """Random access to the samples of a CLIP_benchmark webdataset split."""

    def __init__(self, root: Path, split: str = "test", kind: str = "classification") -> None:
        self.root, self.kind = Path(root), kind
        self.shards = _wds_shards(self.root / split)
        self.samples: list[tuple[str, dict[str, _Member]]] = []
        for i, shard in enumerate(self.shards):
            try:
                self._index(i, shard)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise BenchmarkDataError(f"{shard}: unreadable tar ({type(exc).__name__}: {exc})") from None
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def _index(self, shard_no: int, shard: Path) -> None:
        current, fields = None, {}
        for name, offset, size in _tar_members(shard):
            base = os.path.basename(name)
            key, _, ext = base.partition(".")
            key = os.path.join(os.path.dirname(name), key) if os.path.dirname(name) else key
            if key != current:
                if current is not None:
                    self._add(shard, current, fields)
                current, fields = key, {}
            fields[ext.lower()] = _Member(shard_no, offset, size)
        if current is not None:
            self._add(shard, current, fields)

    def _add(self, shard: Path, key: str, fields: dict[str, _Member]) -> None:
        image = next((e for e in IMAGE_EXTENSIONS if e in fields), None)
        target = {"classification": ("cls", "cls.txt", "label"), "multilabel": ("npy",),
                  "retrieval": ("txt",)}[self.kind]
        label = next((e for e in target if e in fields), None)
        if image is None or label is None:
            what = "an image" if image is None else f"a {'/'.join(target)} member"
            raise BenchmarkDataError(f"{shard}: sample {key!r} has no {what}; members: {sorted(fields)}")
        self.samples.append((os.path.basename(key), {"image": fields[image], "target": fields[label],
                                                     "target_ext": label}))  # type: ignore[dict-item]

    def _read(self, m: _Member) -> bytes:
        if self._pid != os.getpid():  # a forked DataLoader worker: never share file offsets
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(m.shard)
        if f is None:
            f = self._handles[m.shard] = open(self.shards[m.shard], "rb")
        f.seek(m.offset)
        return f.read(m.size)

    def target(self, i: int) -> Any:
        key, fields = self.samples[i]
        raw = self._read(fields["target"])
        where = f"{self.shards[fields['target'].shard]}: sample {key!r}"
        if self.kind == "classification":
            text = raw.decode("utf-8").strip()
            if not text.lstrip("-").isdigit():
                raise BenchmarkDataError(f"{where}: label {text!r} is not an integer")
            return int(text)
        if self.kind == "multilabel":
            return np.load(io.BytesIO(raw)).astype(np.float32).reshape(-1)
        return [line.strip() for line in raw.decode("utf-8").splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Image.Image, Any]:
        key, fields = self.samples[i]
        where = f"{self.shards[fields['image'].shard]}: sample {key!r}"
        return _decode(self._read(fields["image"]), where), self.target(i)

    def __getstate__(self) -> dict:  # file handles stay behind when pickled into workers
        return {**self.__dict__, "_handles": {}}


def _tar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files in a tar, in order.

    Plain ustar/v7 headers (what webdataset writers produce) are parsed directly, several times
    faster than tarfile's TarInfo objects; any other header (pax, GNU long names, sparse) hands the
    whole file to tarfile, which knows them all.
    """
    out = []
    with open(path, "rb") as f:
        pos = 0
        while True:
            f.seek(pos)
            header = f.read(512)
            if len(header) < 512:
                raise EOFError(f"truncated tar header at byte {pos}")
            if header == b"\0" * 512:
                return out
            kind = header[156:157]
            try:
                size = int(header[124:136].rstrip(b"\0 ").decode() or "0", 8)
                stored = int(header[148:156].rstrip(b"\0 ").decode() or "0", 8)
            except ValueError:
                break  # base-256 sizes or garbage: let tarfile judge
            if stored != sum(header[:148]) + 256 + sum(header[156:]):
                break  # not a valid plain header
            if kind not in (b"0", b"\0", b"5", b"1", b"2"):
                break  # pax / GNU extensions
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
                name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            if kind in (b"0", b"\0"):
                out.append((name, pos + 512, size))
            pos += 512 + (size + 511) // 512 * 512
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _wds_shards(split_dir: Path) -> list[Path]:
    from data.eval.wds import find_shards

    try:
        return find_shards(split_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise BenchmarkDataError(str(exc)) from None


def _open_wds(task, path: Path) -> TaskData:
    kind_file = path / DATASET_TYPE_FILE
    declared = kind_file.read_text().strip() if kind_file.is_file() else "classification"
    if declared not in ("classification", "multilabel", "retrieval"):
        raise BenchmarkDataError(f"{kind_file}: unknown dataset type {declared!r}")
    kind = declared
    if task.type == "multilabel" and declared == "classification":
        # e.g. CLIP_benchmark's wds_voc2007: single-label object crops, not the paper's multi-label set
        kind = "classification"
    ds = WdsDataset(path, kind=kind)
    classnames = _read_lines(path / CLASSNAMES_FILE) if (path / CLASSNAMES_FILE).is_file() else None
    templates = _read_lines(path / TEMPLATES_FILE) if (path / TEMPLATES_FILE).is_file() else []
    files = [*ds.shards, *[p for p in (path / CLASSNAMES_FILE, path / TEMPLATES_FILE) if p.is_file()]]
    digest, fkind = fingerprint_files(files, path)
    return TaskData(task=task.name, type=kind, classnames=classnames, templates=templates, dataset=ds,
                    keys=[k for k, _ in ds.samples], layout="wds", path=path, fingerprint=digest,
                    fingerprint_kind=fkind, info={"declared_type": declared})


# ----------------------------------------------------------------------------- folders / torchvision
class _Wrapped(Dataset):
    """A torchvision-style dataset yielding (PIL image, target), images forced to RGB and targets
    put into the order of the task's class names (``target_offset`` / ``target_map`` in its metadata,
    or a folder name that is the label itself)."""

    def __init__(self, base: Any, offset: int = 0, target_map: list[int] | None = None,
                 folder_labels: list[int] | None = None) -> None:
        self.base, self.offset, self.target_map, self.folder_labels = base, offset, target_map, folder_labels

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Image.Image, Any]:
        image, target = self.base[i]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        if self.folder_labels is not None:
            target = self.folder_labels[target]
        if self.target_map is not None:
            target = self.target_map[target]
        return image.convert("RGB"), int(target) + self.offset


def _open_imagefolder(task, path: Path) -> TaskData:
    from torchvision.datasets import ImageFolder

    root = path / "test"
    try:
        base = ImageFolder(str(root))
    except (FileNotFoundError, RuntimeError) as exc:
        raise BenchmarkDataError(f"{root}: not a usable image folder ({exc})") from None
    files = [Path(p) for p, _ in base.samples]
    digest, fkind = fingerprint_files(files, root)
    keys = [os.path.splitext(os.path.basename(p))[0] for p, _ in base.samples]
    folder_names = [c.replace("_", " ") for c in base.classes]
    folder_labels = None
    if all(c.isdigit() for c in base.classes):
        # folders named by label (e.g. ImageNetV2's 0..999): the name is the label, not its sorted
        # position ("10" sorts before "2")
        folder_labels = [int(c) for c in base.classes]
        folder_names = [str(i) for i in range(max(folder_labels) + 1)]
    return TaskData(task=task.name, type="classification", classnames=folder_names, templates=[],
                    dataset=_Wrapped(base, folder_labels=folder_labels), keys=keys, layout="imagefolder",
                    path=path, fingerprint=digest, fingerprint_kind=fkind, info={"folder_classnames": True})


def _open_torchvision(task, path: Path) -> TaskData:
    import torchvision.datasets as tvd

    spec = task.torchvision or {}
    cls = getattr(tvd, spec.get("class", ""), None)
    if cls is None:
        raise BenchmarkDataError(f"torchvision has no dataset class {spec.get('class')!r} for task {task.name}")
    kwargs = dict(spec.get("kwargs", {}))
    try:
        base = cls(root=str(path), download=False, **kwargs) if "download" in cls.__init__.__code__.co_varnames \
            else cls(root=str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001 - each class raises its own "not found" type
        raise BenchmarkDataError(f"torchvision.datasets.{spec['class']}(root={path}, download=False) failed: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    files = [p for p in path.rglob("*") if p.is_file()]
    digest, fkind = fingerprint_files(files, path)
    classes = getattr(base, "classes", None)
    if spec.get("target_offset") or spec.get("target_map"):
        classes = None  # torchvision's own list is in another order: the metadata's names apply
    wrapped = _Wrapped(base, offset=int(spec.get("target_offset", 0)), target_map=spec.get("target_map"))
    return TaskData(task=task.name, type="classification", classnames=list(classes) if classes else None,
                    templates=[], dataset=wrapped, keys=[str(i) for i in range(len(base))],
                    layout="torchvision", path=path, fingerprint=digest, fingerprint_kind=fkind)


# ----------------------------------------------------------------------------- entry point
def open_task_data(task, location) -> TaskData:
    """Open `task`'s data at `location` (registry.Location); raises BenchmarkDataError naming the problem."""
    openers = {"wds": _open_wds, "imagefolder": _open_imagefolder, "torchvision": _open_torchvision,
               "synthetic": _open_wds}
    data = openers[location.kind](task, Path(location.path))
    if len(data.dataset) == 0:
        raise BenchmarkDataError(f"{location.path}: no samples")
    if data.type != "retrieval":
        meta = list(task.classnames) if task.classnames else None
        # wds data carries names in its own label order, which win; for torchvision and image folders
        # the metadata's readable names (in those sources' label order) replace class/folder ids
        replaceable = data.layout != "wds" and meta and (data.classnames is None or len(meta) == len(data.classnames))
        if data.classnames is None or replaceable:
            data.classnames = meta
        if data.classnames is None:
            raise BenchmarkDataError(f"{location.path}: no class names in the data and none in the metadata of {task.name}")
        if task.num_classes is not None and len(data.classnames) != task.num_classes:
            raise BenchmarkDataError(f"{location.path}: {len(data.classnames)} classes in the data, "
                                     f"but task {task.name} has {task.num_classes}")
    if not data.templates:
        data.templates = list(task.templates)
    bad = [t for t in data.templates if "{c}" not in t]
    if data.type != "retrieval" and bad:
        raise BenchmarkDataError(f"{location.path}: templates without a '{{c}}' placeholder: {bad[:3]}")
    return data
