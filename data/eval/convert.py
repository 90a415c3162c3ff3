"""Write any labelled image set in CLIP_benchmark's webdataset layout, the one the eval stage and the
public mirrors use:

    <out>/classnames.txt  <out>/zeroshot_classification_templates.txt
    <out>/test/nshards.txt  <out>/test/0.tar ...   (<key>.png|jpg + <key>.cls)

Sources: an image folder (``<dir>/<class>/<image>``, or ``<dir>/test/<class>/...``), or any dataset
object -- ``len()``, ``[i] -> (image, label)`` and ``.classes`` -- named as ``module:callable``
(e.g. ``torchvision.datasets:MNIST`` after partial application, or ``data.eval.convert:sklearn_digits``).
"""

from __future__ import annotations

import importlib
import io
import tarfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from data.common.files import atomic_path, atomic_write, atomic_write_json


class SklearnDigits:
    """scikit-learn's bundled handwritten digits (1,797 images of 8x8 pixels, 10 classes): a real
    labelled image set that ships inside a PyPI package, so it is on every machine with sklearn."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        d = load_digits()
        # 0..16 ink levels -> black digit on white, as written
        self.images = (255 - d.images * (255 / 16)).round().astype(np.uint8)
        self.targets = d.target.astype(int)
        self.classes = [str(c) for c in d.target_names]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[i], mode="L"), int(self.targets[i])


def sklearn_digits() -> SklearnDigits:
    return SklearnDigits()


def load_dataset_object(spec: str) -> Any:
    """``module:callable`` -> the dataset object it returns (or the object itself if not callable)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"--dataset {spec!r}: expected module:callable, e.g. data.eval.convert:sklearn_digits")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"--dataset {spec!r}: {exc}") from None
    return obj() if callable(obj) and not hasattr(obj, "__getitem__") else obj


def imagefolder(path: str | Path) -> Any:
    from torchvision.datasets import ImageFolder

    path = Path(path)
    if (path / "test").is_dir():
        path = path / "test"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: expected a folder of <class>/<image> sub-folders")
    return ImageFolder(str(path))


def convert_to_wds(
    dataset: Any,
    out_dir: str | Path,
    *,
    classnames: Sequence[str] | None = None,
    templates: Sequence[str] = ("a photo of a {c}.",),
    image_format: str = "png",
    shard_size: int = 10_000,
    split: str = "test",
) -> dict[str, Any]:
    """Write ``dataset`` to ``out_dir`` in the wds layout; returns {samples, shards, classes}.

    Lossless PNG by default (the eval sees the source pixels). The shard list (nshards.txt) and
    the info file are written last, so an interrupted conversion is never taken for a complete one.
    """
    out = Path(out_dir)
    names = list(classnames) if classnames else [str(c).replace("_", " ") for c in getattr(dataset, "classes", [])]
    if not names:
        raise ValueError("no class names: the dataset has no .classes; pass classnames")
    if any("{c}" not in t for t in templates):
        raise ValueError(f"templates need a '{{c}}' placeholder: {list(templates)}")
    split_dir = out / split
    split_dir.mkdir(parents=True, exist_ok=True)
    (split_dir / "nshards.txt").unlink(missing_ok=True)
    n = len(dataset)
    n_shards = max(1, -(-n // shard_size))
    ext = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}[image_format.lower()]
    counts = [0] * len(names)
    with tqdm(total=n, desc=f"convert -> {out.name}", unit="img") as bar:
        for s in range(n_shards):
            with atomic_path(split_dir / f"{s}.tar") as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                    image, label = dataset[i]
                    label = int(label)
                    if not 0 <= label < len(names):
                        raise ValueError(f"sample {i}: label {label} outside 0..{len(names) - 1}")
                    counts[label] += 1
                    if not isinstance(image, Image.Image):
                        image = Image.fromarray(np.asarray(image))
                    buf = io.BytesIO()
                    image.convert("RGB" if ext == "jpg" else image.mode).save(buf, format=ext.replace("jpg", "jpeg"))
                    for member, data in ((f"s{i:08d}.{ext}", buf.getvalue()), (f"s{i:08d}.cls", str(label).encode())):
                        info = tarfile.TarInfo(member)
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
                    bar.update(1)
    atomic_write(out / "classnames.txt", "\n".join(names) + "\n")
    atomic_write(out / "zeroshot_classification_templates.txt", "\n".join(templates) + "\n")
    info = {"samples": n, "shards": n_shards, "classes": len(names), "class_counts": dict(zip(names, counts)),
            "image_format": ext}
    atomic_write_json(out / "dataset_info.json", info)
    atomic_write(split_dir / "nshards.txt", f"{n_shards}\n")  # last: its presence means every shard is there
    return info
