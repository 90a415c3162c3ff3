"""The zero-shot suite: one metadata file per task, plus where on disk a task's data can be found.

Package data, next to this file:

    tasks/<name>.json        what the task is (fields of `Task`, minus classnames/templates)
    classnames/<name>.txt    one class name per line, in label order
    templates/<name>.txt     one prompt per line with a "{c}" placeholder (shared files are fine)

`classnames_file` / `templates_file` in a task file are relative to the parent of the tasks
directory. Class names are in the label order of the task's torchvision / ImageFolder source
(ImageFolder = class directories in sorted order); where torchvision numbers classes differently,
its `torchvision` entry says how to map its targets ("target_offset": add this; "target_map":
list indexed by the torchvision target). A CLIP_benchmark webdataset directory carries its own
classnames.txt and templates file, in its own label order, and those win for that directory.

Where the data is (`locate`), tried in order for each data root:

    <root>/<d>/test/nshards.txt or <root>/<d>/test/*.tar      d in task.wds_dirs -> "wds"
                                                               ("synthetic" for the generated sets,
                                                               once their dataset_info.json exists)
    <root>/<d>/test/<class_dir>/<image file>                   d in task.wds_dirs -> "imagefolder"
    <root>/<name>/ and the task has a torchvision loader       -> "torchvision" (opened with download=False)
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from data.eval.metrics import METRICS

GROUPS = ("paper", "shift", "retrieval", "synthetic")
TYPES = ("classification", "multilabel", "retrieval")
LOCATION_KINDS = ("wds", "torchvision", "imagefolder", "synthetic")
PAPER_MODELS = ("vit_b32", "vit_l14")

PACKAGE_DIR = Path(__file__).parent
TASKS_DIR = PACKAGE_DIR / "tasks"

# What torchvision's ImageFolder accepts as an image.
IMAGEFOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# data.eval.synthetic writes this file last, so its presence marks a complete build.
SYNTHETIC_COMPLETE_MARKER = "dataset_info.json"

_FIELDS = (
    "name",
    "title",
    "group",
    "type",
    "metric",
    "num_classes",
    "wds_dirs",
    "wds_mirror",
    "torchvision",
    "obtain",
    "definition_note",
    "paper",
    "classnames_file",
    "templates_file",
)
_TORCHVISION_KEYS = {"class", "kwargs", "target_offset", "target_map"}

# Other spellings people use, offered as suggestions by get_task (never resolved silently).
_ALIASES = {
    "stanford_cars": "cars",
    "stanfordcars": "cars",
    "aircraft": "fgvc_aircraft",
    "oxford_pets": "pets",
    "oxfordiiitpet": "pets",
    "flowers102": "flowers",
    "oxford_flowers": "flowers",
    "imagenet": "imagenet1k",
    "kitti": "kitti_closest_vehicle_distance",
    "clevr": "clevr_count_all",
    "clevr_count": "clevr_count_all",
    "patchcamelyon": "pcam",
    "rendered_sst2": "renderedsst2",
    "sst2": "renderedsst2",
    "kinetics": "kinetics700",
    "coco": "mscoco_captions",
    "mscoco": "mscoco_captions",
    "color": "colour",
}


@dataclass(frozen=True)
class Task:
    """One benchmark: what it measures, how it is scored, how to get it."""

    name: str  # CLIP_benchmark's dataset name where it has one
    title: str  # human name, e.g. "Stanford Cars"
    group: str  # "paper" | "shift" | "retrieval" | "synthetic"
    type: str  # "classification" | "multilabel" | "retrieval"
    metric: str  # one of METRICS: the paper's score for this task
    num_classes: int | None  # the paper's class count; None for retrieval
    wds_dirs: tuple[str, ...]  # directory names to look for under a data root, best first
    wds_mirror: str | None  # CLIP_benchmark's published webdataset repository, if there is one
    torchvision: Mapping[str, Any] | None = field(hash=False)  # {"class", "kwargs", ["target_offset" | "target_map"]}
    obtain: str  # one sentence: how a user gets the data
    definition_note: str  # how witclip's definition relates to the paper's and CLIP_benchmark's
    paper: Mapping[str, float | None] | None = field(hash=False)  # {"vit_b32": .., "vit_l14": ..} in percent
    classnames_file: str | None
    templates_file: str | None
    classnames: tuple[str, ...] | None = field(repr=False)  # None: the names come with the data
    templates: tuple[str, ...] = field(repr=False)  # () for retrieval


@dataclass(frozen=True)
class Location:
    """Where a task's data was found and in which layout."""

    kind: str  # one of LOCATION_KINDS
    path: Path


def _fail(path: Path, problem: str) -> ValueError:
    return ValueError(f"benchmark task file {path}: {problem}")


def _nonempty_str(data: dict, key: str, path: Path) -> str:
    value = data[key]
    if not isinstance(value, str) or not value.strip():
        raise _fail(path, f"{key!r} must be a non-empty string, got {value!r}")
    return value


def _choice(data: dict, key: str, options: tuple[str, ...], path: Path) -> str:
    value = data[key]
    if value not in options:
        raise _fail(path, f"unknown {key} {value!r}; expected one of {list(options)}")
    return value


def _resolve(base: Path, relative: Any, key: str, path: Path) -> Path:
    if not isinstance(relative, str) or not relative:
        raise _fail(path, f"{key!r} must be a relative path string or null, got {relative!r}")
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise _fail(path, f"{key!r} must stay inside {base}, got {relative!r}")
    resolved = base / rel
    if not resolved.is_file():
        raise _fail(path, f"{key!r} points to {resolved}, which does not exist")
    return resolved


def _read_lines(file: Path, key: str, path: Path) -> tuple[str, ...]:
    lines = file.read_text(encoding="utf-8-sig").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise _fail(path, f"{key!r} file {file} is empty")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise _fail(path, f"{key!r} file {file} has blank line(s) {blank[:5]}")
    return tuple(line.strip() for line in lines)


def _is_dir_name(value: Any) -> bool:
    return isinstance(value, str) and value not in ("", ".", "..") and "/" not in value and "\\" not in value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_torchvision(value: Any, num_classes: int | None, path: Path) -> Mapping[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path, f"'torchvision' must be null or an object, got {value!r}")
    unknown = sorted(value.keys() - _TORCHVISION_KEYS)
    if unknown:
        raise _fail(path, f"'torchvision' has unknown key(s) {unknown}; allowed: {sorted(_TORCHVISION_KEYS)}")
    if not isinstance(value.get("class"), str) or not value["class"]:
        raise _fail(path, "'torchvision' needs a 'class' (a torchvision.datasets class name)")
    if not isinstance(value.get("kwargs"), dict):
        raise _fail(path, "'torchvision' needs 'kwargs' (an object, possibly empty)")
    if "download" in value["kwargs"]:
        raise _fail(path, "'torchvision.kwargs' must not set 'download' (the loader decides)")
    if "target_offset" in value and "target_map" in value:
        raise _fail(path, "'torchvision' takes 'target_offset' or 'target_map', not both")
    if "target_offset" in value and not _is_int(value["target_offset"]):
        raise _fail(path, f"'torchvision.target_offset' must be an integer, got {value['target_offset']!r}")
    if "target_map" in value:
        target_map = value["target_map"]
        if (
            not isinstance(target_map, list)
            or not target_map
            or not all(_is_int(v) and 0 <= v < (num_classes or 0) for v in target_map)
        ):
            raise _fail(
                path, f"'torchvision.target_map' must list class indices in [0, {num_classes}), got {target_map!r}"
            )
    frozen = dict(value)
    frozen["kwargs"] = MappingProxyType(dict(value["kwargs"]))
    if "target_map" in frozen:
        frozen["target_map"] = tuple(frozen["target_map"])
    return MappingProxyType(frozen)


def _check_paper(value: Any, path: Path) -> Mapping[str, float | None] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(path, f"'paper' must be null or an object, got {value!r}")
    unknown = sorted(value.keys() - set(PAPER_MODELS))
    if unknown:
        raise _fail(path, f"'paper' has unknown model(s) {unknown}; allowed: {list(PAPER_MODELS)}")
    for model, score in value.items():
        is_number = isinstance(score, (int, float)) and not isinstance(score, bool)
        if score is not None and not (is_number and 0 <= score <= 100):
            raise _fail(path, f"'paper.{model}' must be a percentage or null, got {score!r}")
    return MappingProxyType({m: (None if value.get(m) is None else float(value[m])) for m in PAPER_MODELS})


def _parse_task(path: Path, base: Path) -> Task:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise _fail(path, f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _fail(path, f"expected a JSON object, got {type(data).__name__}")
    missing = [k for k in _FIELDS if k not in data]
    if missing:
        raise _fail(path, f"missing field(s) {missing}")
    unknown = sorted(data.keys() - set(_FIELDS))
    if unknown:
        raise _fail(path, f"unknown field(s) {unknown}; expected exactly {list(_FIELDS)}")

    name = _nonempty_str(data, "name", path)
    if name != path.stem:
        raise _fail(path, f"'name' is {name!r} but the file is named {path.name}")
    title = _nonempty_str(data, "title", path)
    obtain = _nonempty_str(data, "obtain", path)
    note = _nonempty_str(data, "definition_note", path)
    group = _choice(data, "group", GROUPS, path)
    type_ = _choice(data, "type", TYPES, path)
    metric = _choice(data, "metric", METRICS, path)

    if (type_ == "retrieval") != (metric == "recall_at_k"):
        raise _fail(path, f"metric {metric!r} does not fit type {type_!r} (recall_at_k is the retrieval metric)")
    if (type_ == "multilabel") != (metric == "map_11point"):
        raise _fail(path, f"metric {metric!r} does not fit type {type_!r} (map_11point is the multilabel metric)")

    num_classes = data["num_classes"]
    if type_ == "retrieval":
        if num_classes is not None:
            raise _fail(path, f"a retrieval task has no classes; 'num_classes' must be null, got {num_classes!r}")
    elif not _is_int(num_classes) or num_classes < 2:
        raise _fail(path, f"'num_classes' must be an integer >= 2, got {num_classes!r}")
    if metric == "roc_auc" and num_classes != 2:
        raise _fail(path, f"roc_auc scores binary tasks; 'num_classes' is {num_classes}")

    wds_dirs = data["wds_dirs"]
    if not isinstance(wds_dirs, list) or not wds_dirs or not all(_is_dir_name(d) for d in wds_dirs):
        raise _fail(path, f"'wds_dirs' must be a non-empty list of directory names, got {wds_dirs!r}")
    mirror = data["wds_mirror"]
    if mirror is not None and (not isinstance(mirror, str) or not mirror):
        raise _fail(path, f"'wds_mirror' must be a string or null, got {mirror!r}")
    torchvision = _check_torchvision(data["torchvision"], num_classes, path)
    paper = _check_paper(data["paper"], path)

    classnames_file = data["classnames_file"]
    classnames = None
    if classnames_file is not None:
        if type_ == "retrieval":
            raise _fail(path, "a retrieval task takes no 'classnames_file'")
        classnames = _read_lines(_resolve(base, classnames_file, "classnames_file", path), "classnames_file", path)
        if len(classnames) != num_classes:
            raise _fail(
                path,
                f"'classnames_file' {classnames_file} has {len(classnames)} class names, "
                f"'num_classes' is {num_classes}",
            )

    templates_file = data["templates_file"]
    templates: tuple[str, ...] = ()
    if type_ == "retrieval":
        if templates_file is not None:
            raise _fail(path, "a retrieval task takes no 'templates_file'")
    else:
        if templates_file is None:
            raise _fail(path, f"a {type_} task needs a 'templates_file' of zero-shot prompts")
        templates = _read_lines(_resolve(base, templates_file, "templates_file", path), "templates_file", path)
        bad = [t for t in templates if "{c}" not in t]
        if bad:
            raise _fail(
                path, f"'templates_file' {templates_file}: template(s) without the '{{c}}' placeholder: {bad[:5]}"
            )
        for t in templates:
            try:
                t.format(c="x")
            except (IndexError, KeyError, ValueError) as exc:
                raise _fail(
                    path, f"'templates_file' {templates_file}: template {t!r} is not a valid format string ({exc!r})"
                ) from None

    return Task(
        name=name,
        title=title,
        group=group,
        type=type_,
        metric=metric,
        num_classes=num_classes,
        wds_dirs=tuple(wds_dirs),
        wds_mirror=mirror,
        torchvision=torchvision,
        obtain=obtain,
        definition_note=note,
        paper=paper,
        classnames_file=classnames_file,
        templates_file=templates_file,
        classnames=classnames,
        templates=templates,
    )


@functools.lru_cache(maxsize=16)
def _load_tasks_cached(directory: Path) -> Mapping[str, Task]:
    if not directory.is_dir():
        raise FileNotFoundError(f"benchmark task directory missing: {directory}")
    files = sorted(directory.glob("*.json"))
    if not files:
        raise ValueError(f"no benchmark task files (*.json) in {directory}")
    base = directory.parent
    tasks = {f.stem: _parse_task(f, base) for f in files}
    owner: dict[str, str] = {}
    for task in tasks.values():
        for d in task.wds_dirs:
            if owner.setdefault(d, task.name) != task.name:
                problem = f"directory name {d!r} is also claimed by task {owner[d]!r}"
                raise _fail(directory / f"{task.name}.json", problem)
    return MappingProxyType(tasks)


def load_tasks(directory: Path | str | None = None) -> dict[str, Task]:
    """All tasks by name (parsed once per directory; a malformed file raises ValueError naming it)."""
    d = Path(directory) if directory is not None else TASKS_DIR
    return dict(_load_tasks_cached(d.resolve()))


def suggest_task_names(name: str, known: Iterable[str]) -> list[str]:
    """Known names close to `name`: alias targets, substring matches, then difflib matches."""
    known = list(known)
    key = name.strip().lower().replace(" ", "_")
    out: list[str] = []
    if key in _ALIASES and _ALIASES[key] in known:
        out.append(_ALIASES[key])
    alt = key.replace("-", "_")
    out += [k for k in known if key and (key in k or k in key or alt in k.replace("-", "_"))]
    out += difflib.get_close_matches(key, known, n=5, cutoff=0.6)
    return list(dict.fromkeys(out))[:5]


def get_task(name: str, directory: Path | str | None = None) -> Task:
    """The task called `name`; a ValueError with close names if there is none."""
    tasks = load_tasks(directory)
    if name in tasks:
        return tasks[name]
    close = suggest_task_names(name, tasks)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown benchmark task {name!r}{hint} (known: {', '.join(sorted(tasks))})")


def _as_task(task: Task | str) -> Task:
    return task if isinstance(task, Task) else get_task(task)


def _has_wds_split(directory: Path) -> bool:
    split = directory / "test"
    if (split / "nshards.txt").is_file():
        return True
    return split.is_dir() and any(p.is_file() for p in split.glob("*.tar"))


def _has_imagefolder_split(directory: Path) -> bool:
    split = directory / "test"
    if not split.is_dir():
        return False
    for class_dir in sorted(split.iterdir()):
        if class_dir.is_dir():
            for f in class_dir.iterdir():
                if f.suffix.lower() in IMAGEFOLDER_EXTENSIONS and f.is_file():
                    return True
    return False


def locate(task: Task | str, data_roots: Iterable[Path | str]) -> Location | None:
    """Where `task`'s test data is under the first root that has it, or None (see module doc)."""
    task = _as_task(task)
    for root in map(Path, data_roots):
        for d in task.wds_dirs:
            candidate = root / d
            if _has_wds_split(candidate):
                if task.group != "synthetic":
                    return Location("wds", candidate)
                if (candidate / SYNTHETIC_COMPLETE_MARKER).is_file():
                    return Location("synthetic", candidate)
                # a generated set without its marker is half-written: not usable, regenerate it
        if task.type != "retrieval":
            for d in task.wds_dirs:
                candidate = root / d
                if _has_imagefolder_split(candidate):
                    return Location("imagefolder", candidate)
        if task.torchvision is not None and (root / task.name).is_dir():
            return Location("torchvision", root / task.name)
    return None


def describe_missing(task: Task | str, data_roots: Iterable[Path | str]) -> str:
    """One line for a user whose data roots lack `task`: where it was expected, how to get it."""
    task = _as_task(task)
    roots = [Path(r) for r in data_roots]

    def expected(root: Path) -> str:
        wds = root / task.wds_dirs[0]
        if task.group == "synthetic":
            return f"{wds} (generated, CLIP_benchmark wds layout)"
        if task.type == "retrieval":
            return f"{wds} (CLIP_benchmark wds layout)"
        other = "torchvision/ImageFolder" if task.torchvision is not None else "ImageFolder"
        return f"{wds} (CLIP_benchmark wds layout) or {root / task.name} ({other})"

    if roots:
        where = "expected at " + "; or ".join(expected(r) for r in roots)
    else:
        where = f"no data roots given (looked for {task.wds_dirs[0]}/ or {task.name}/ under a data root)"
    return f"{task.name} ({task.title}) not available: {where}; obtain it by: {task.obtain}"
