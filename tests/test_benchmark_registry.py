"""The zero-shot benchmark registry: metadata files, paper facts, data location, error messages."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data.eval.metrics import compute_metric
from data.eval.registry import (
    GROUPS,
    LOCATION_KINDS,
    METRICS,
    TASKS_DIR,
    TYPES,
    Location,
    Task,
    describe_missing,
    get_task,
    load_tasks,
    locate,
)
from data.eval.synthetic import SYNTHETIC_BENCHMARKS, build_synthetic_benchmark

# CLIP paper Table 11 (shared/REFERENCE.md, "Zero-shot suite"): classes, metric, ViT-B/32, ViT-L/14.
PAPER_27 = {
    "food101": (101, "acc1", 84.4, 92.9),
    "cifar10": (10, "acc1", 91.3, 96.2),
    "cifar100": (100, "acc1", 65.1, 77.9),
    "birdsnap": (500, "acc1", 37.8, 48.3),
    "sun397": (397, "acc1", 63.2, 67.7),
    "cars": (196, "acc1", 59.4, 77.3),
    "fgvc_aircraft": (100, "mean_per_class_recall", 21.2, 36.1),
    "voc2007": (20, "map_11point", 83.1, 84.1),
    "dtd": (47, "acc1", 44.5, 55.3),
    "pets": (37, "mean_per_class_recall", 87.0, 93.5),
    "caltech101": (102, "mean_per_class_recall", 87.9, 92.6),
    "flowers": (102, "mean_per_class_recall", 66.7, 78.7),
    "mnist": (10, "acc1", 51.9, 87.2),
    "fer2013": (7, "acc1", 47.3, 57.5),
    "stl10": (10, "acc1", 97.2, 99.3),
    "eurosat": (10, "acc1", 49.4, 59.9),
    "resisc45": (45, "acc1", 60.3, 71.6),
    "gtsrb": (43, "acc1", 32.2, 50.3),
    "kitti_closest_vehicle_distance": (4, "acc1", 39.4, 23.1),
    "country211": (211, "acc1", 17.8, 32.7),
    "pcam": (2, "acc1", 58.4, 58.8),
    "ucf101": (101, "acc1", 64.5, 76.2),
    "kinetics700": (700, "mean_top1_top5", 47.8, 60.3),
    "clevr_count_all": (8, "acc1", 24.8, 24.3),
    "hateful_memes": (2, "roc_auc", 57.6, 63.3),
    "renderedsst2": (2, "acc1", 59.6, 64.0),
    "imagenet1k": (1000, "acc1", 63.2, 75.3),
}
# Distribution shifts: classes and OpenAI ViT-B/32 top-1 as re-measured by open_clip.
SHIFTS = {
    "imagenetv2": (1000, 55.9),
    "imagenet_sketch": (1000, 42.3),
    "imagenet-a": (200, 31.6),
    "imagenet-r": (200, 69.3),
    "objectnet": (113, 44.3),
}
RETRIEVAL = {"flickr30k", "mscoco_captions"}
SYNTHETIC = {"colour", "shape", "count"}


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return load_tasks()


def test_suite_size_and_membership(tasks):
    assert len(tasks) >= 35
    assert set(PAPER_27) | set(SHIFTS) | RETRIEVAL | SYNTHETIC <= set(tasks)
    assert {n for n, t in tasks.items() if t.group == "paper"} == set(PAPER_27)
    assert {n for n, t in tasks.items() if t.group == "shift"} == set(SHIFTS)
    assert {n for n, t in tasks.items() if t.group == "synthetic"} == SYNTHETIC
    assert RETRIEVAL <= {n for n, t in tasks.items() if t.group == "retrieval"}


def test_every_metadata_file_parses_to_a_task():
    files = sorted(TASKS_DIR.glob("*.json"))
    tasks = load_tasks()
    assert [f.stem for f in files] == sorted(tasks)
    for f in files:
        raw = json.loads(f.read_text(encoding="utf-8"))
        task = tasks[f.stem]
        assert raw["name"] == task.name == f.stem
        assert task.group in GROUPS and task.type in TYPES and task.metric in METRICS


def test_load_tasks_is_cached(tasks):
    assert load_tasks()["cars"] is tasks["cars"]
    assert load_tasks(TASKS_DIR)["cars"] is tasks["cars"]
    fresh = load_tasks()
    fresh.pop("cars")  # callers get their own dict
    assert "cars" in load_tasks()


@pytest.mark.parametrize("name", sorted(PAPER_27))
def test_paper_tasks_match_table_11(tasks, name):
    classes, metric, b32, l14 = PAPER_27[name]
    task = tasks[name]
    assert task.num_classes == classes
    assert task.metric == metric
    assert task.paper == {"vit_b32": b32, "vit_l14": l14}
    assert task.type == ("multilabel" if name == "voc2007" else "classification")


def test_paper_means_match_reference(tasks):
    paper = [tasks[n].paper for n in PAPER_27]
    assert round(sum(p["vit_b32"] for p in paper) / 27, 1) == 57.9
    assert round(sum(p["vit_l14"] for p in paper) / 27, 1) == 66.8


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_shift_tasks(tasks, name):
    classes, b32 = SHIFTS[name]
    task = tasks[name]
    assert (task.num_classes, task.metric, task.type) == (classes, "acc1", "classification")
    assert task.paper["vit_b32"] == b32


def test_retrieval_tasks(tasks):
    for task in tasks.values():
        if task.group == "retrieval":
            assert (task.type, task.metric, task.num_classes) == ("retrieval", "recall_at_k", None)
            assert task.classnames is None and task.templates == ()
            assert task.torchvision is None


def test_every_metric_is_implemented(tasks):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 4))
    labels = np.arange(20) % 4
    targets = (rng.random((20, 4)) < 0.5).astype(int)
    targets[0] = 1
    arrays = {
        "acc1": {"logits": logits, "labels": labels},
        "mean_per_class_recall": {"logits": logits, "labels": labels},
        "map_11point": {"scores": logits, "targets": targets},
        "roc_auc": {"logits": logits[:, :2], "labels": labels % 2},
        "mean_top1_top5": {"logits": logits, "labels": labels},
        "recall_at_k": {"similarity": rng.normal(size=(5, 10)), "text_to_image": np.arange(10) % 5},
    }
    assert set(arrays) == set(METRICS)
    for task in tasks.values():
        assert "value" in compute_metric(task.metric, **arrays[task.metric])


def test_classnames_and_templates(tasks):
    for task in tasks.values():
        if task.type == "retrieval":
            continue
        assert task.templates, task.name
        assert all("{c}" in t and t.format(c="x") for t in task.templates), task.name
        if task.classnames is not None:
            assert len(task.classnames) == task.num_classes, task.name
            assert all(c == c.strip() and c for c in task.classnames), task.name
    # CLIP's curated ImageNet names repeat two words; every other list is duplicate-free.
    for task in tasks.values():
        if task.classnames and not task.name.startswith("imagenet"):
            assert len(set(task.classnames)) == len(task.classnames), task.name
    imagenet = tasks["imagenet1k"].classnames
    assert imagenet[:3] == ("tench", "goldfish", "great white shark")
    assert tasks["imagenetv2"].classnames == tasks["imagenet_sketch"].classnames == imagenet
    assert set(tasks["imagenet-a"].classnames) <= set(imagenet)
    assert set(tasks["imagenet-r"].classnames) <= set(imagenet)
    assert tasks["kitti_closest_vehicle_distance"].templates == ("{c}",)
    assert tasks["voc2007"].classnames[:2] == ("aeroplane", "bicycle")
    assert tasks["caltech101"].classnames[0] == "background"


@pytest.mark.parametrize("name", sorted(SYNTHETIC_BENCHMARKS))
def test_synthetic_tasks_match_the_generator(tasks, name):
    task = tasks[name]
    bench = SYNTHETIC_BENCHMARKS[name]
    assert task.group == "synthetic" and task.metric == "acc1"
    assert task.classnames == tuple(bench.classnames)
    assert task.templates == tuple(bench.templates)
    assert task.num_classes == len(bench.classnames)
    assert task.paper is None


def test_wds_directory_names(tasks):
    for task in tasks.values():
        if task.group == "synthetic":
            assert task.wds_dirs == (task.name,)  # where build_synthetic_benchmark writes it
            continue
        assert f"wds_{task.name.replace('/', '-')}" in task.wds_dirs
        assert task.name in task.wds_dirs
        if task.wds_mirror is not None:
            assert task.wds_mirror == f"clip-benchmark/{task.wds_dirs[0]}"
    assert tasks["cifar10"].wds_dirs[0] == "wds_vtab-cifar10"
    assert tasks["kitti_closest_vehicle_distance"].wds_dirs[0] == "wds_vtab-kitti_closest_vehicle_distance"
    assert tasks["voc2007"].wds_dirs[:2] == ("wds_voc2007_multilabel", "wds_voc2007")


def _torchvision_init_params() -> dict[str, set[str]] | None:
    """__init__ parameter names of torchvision.datasets classes, read from source (importing costs seconds)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return None
    own: dict[str, set[str] | None] = {}
    bases: dict[str, list[str]] = {}
    for source in (Path(spec.origin).parent / "datasets").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases[node.name] = [b.id for b in node.bases if isinstance(b, ast.Name)]
                own[node.name] = None
                for item in node.body:
                    if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                        a = item.args
                        names = {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
                        if a.kwarg is not None:
                            names.add("**")
                        own[node.name] = names

    def resolve(name: str) -> set[str] | None:  # a class without __init__ inherits its base's
        if own.get(name) is not None:
            return own[name]
        for base in bases.get(name, []):
            found = resolve(base)
            if found is not None:
                return found
        return None

    return {name: params for name in own if (params := resolve(name)) is not None}


def test_torchvision_entries_name_real_classes_and_arguments(tasks):
    params = _torchvision_init_params()
    if params is None:
        pytest.skip("torchvision not installed")
    for task in tasks.values():
        tv = task.torchvision
        if tv is None:
            continue
        assert tv["class"] in params, task.name
        accepted = params[tv["class"]]
        for kwarg in tv["kwargs"]:
            assert kwarg in accepted or "**" in accepted, (task.name, kwarg)
        assert "root" in accepted and ("download" in accepted or "**" in accepted or tv["class"] == "FER2013")


def test_tasks_are_immutable(tasks):
    task = tasks["cars"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.metric = "acc5"  # type: ignore[misc]
    with pytest.raises(TypeError):
        task.torchvision["kwargs"]["split"] = "train"  # type: ignore[index]
    assert hash(task) == hash(tasks["cars"])


# --- get_task ---------------------------------------------------------------------------------------


def test_get_task(tasks):
    assert get_task("flowers") is tasks["flowers"]


@pytest.mark.parametrize(
    "query, suggested",
    [
        ("kitti", "kitti_closest_vehicle_distance"),
        ("stanford_cars", "cars"),
        ("cifar", "cifar10"),
        ("imagenet_a", "imagenet-a"),
        ("clevr_count", "clevr_count_all"),
        ("flowers102", "flowers"),
    ],
)
def test_get_task_unknown_names_suggest_close_ones(query, suggested):
    with pytest.raises(ValueError) as err:
        get_task(query)
    message = str(err.value)
    assert f"unknown benchmark task {query!r}" in message
    assert "did you mean" in message and repr(suggested) in message


def test_get_task_with_nothing_close_still_lists_known_tasks():
    with pytest.raises(ValueError, match="known: .*food101"):
        get_task("zzzzzzzz")


# --- locate / describe_missing ------------------------------------------------------------------------


def _wds(directory: Path, nshards: bool = True) -> Path:
    (directory / "test").mkdir(parents=True)
    (directory / "test" / "0.tar").write_bytes(b"")
    if nshards:
        (directory / "test" / "nshards.txt").write_text("1\n")
    return directory


def _imagefolder(directory: Path, classes=("a", "b")) -> Path:
    for c in classes:
        (directory / "test" / c).mkdir(parents=True)
        (directory / "test" / c / "0.JPEG").write_bytes(b"\xff\xd8")
    return directory


def test_locate_wds_layouts(tmp_path):
    root = tmp_path / "data"
    mirror = _wds(root / "wds_vtab-cifar10")
    assert locate("cifar10", [root]) == Location("wds", mirror)
    loose = _wds(root / "mnist", nshards=False)  # shards without nshards.txt also count
    assert locate(get_task("mnist"), [root]) == Location("wds", loose)
    coco = _wds(root / "wds_mscoco_captions")
    assert locate("mscoco_captions", [str(root)]) == Location("wds", coco)


def test_locate_prefers_wds_then_imagefolder_then_torchvision(tmp_path):
    root = tmp_path
    (root / "food101").mkdir()
    assert locate("food101", [root]) == Location("torchvision", root / "food101")
    _imagefolder(root / "food101")
    assert locate("food101", [root]) == Location("imagefolder", root / "food101")
    _wds(root / "wds_food101")
    assert locate("food101", [root]) == Location("wds", root / "wds_food101")


def test_locate_imagefolder_needs_images_and_torchvision_needs_a_loader(tmp_path):
    (tmp_path / "imagenet-a" / "test" / "n01498041").mkdir(parents=True)  # class dir, no image yet
    assert locate("imagenet-a", [tmp_path]) is None  # and imagenet-a has no torchvision loader
    (tmp_path / "imagenet-a" / "test" / "n01498041" / "0.jpg").write_bytes(b"\xff\xd8")
    assert locate("imagenet-a", [tmp_path]) == Location("imagefolder", tmp_path / "imagenet-a")
    _imagefolder(tmp_path / "flickr30k")  # retrieval data has no ImageFolder form
    assert locate("flickr30k", [tmp_path]) is None


def test_locate_searches_roots_in_order(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    (first / "cars").mkdir(parents=True)
    _wds(second / "wds_cars")
    assert locate("cars", [first, second]) == Location("torchvision", first / "cars")
    assert locate("cars", [second, first]) == Location("wds", second / "wds_cars")


def test_locate_returns_none_for_empty_or_missing_roots(tmp_path):
    for name in ("food101", "voc2007", "flickr30k", "colour"):
        assert locate(name, [tmp_path]) is None
        assert locate(name, [tmp_path / "missing"]) is None
        assert locate(name, []) is None


def test_locate_synthetic_needs_a_complete_build(tmp_path):
    half = _wds(tmp_path / "shape")  # shards but no dataset_info.json: an interrupted build
    assert locate("shape", [tmp_path]) is None
    build_synthetic_benchmark("count", tmp_path, seed=0, samples_per_class=1, image_size=16)
    assert locate("count", [tmp_path]) == Location("synthetic", tmp_path / "count")
    (half / "dataset_info.json").write_text("{}")
    assert locate("shape", [tmp_path]).kind == "synthetic"
    assert {loc.kind for loc in [locate("count", [tmp_path])]} <= set(LOCATION_KINDS)


def test_describe_missing(tmp_path):
    message = describe_missing("cars", [tmp_path])
    assert "not available" in message
    assert str(tmp_path / "wds_cars") in message and str(tmp_path / "cars") in message
    assert "torchvision" in message and get_task("cars").obtain in message
    two = describe_missing(get_task("imagenet-a"), [tmp_path / "a", tmp_path / "b"])
    assert str(tmp_path / "a" / "wds_imagenet-a") in two and str(tmp_path / "b" / "imagenet-a") in two
    assert "torchvision" not in two.split("obtain it by")[0]
    assert "no data roots" in describe_missing("flickr30k", [])


# --- malformed metadata ------------------------------------------------------------------------------


def _task_dir(tmp_path: Path, task_name: str = "cars", **changes) -> Path:
    """A private copy of one task (and its class/template files) with `changes` applied."""
    base = tmp_path / "benchmarks"
    (base / "tasks").mkdir(parents=True)
    source = TASKS_DIR.parent
    data = json.loads((TASKS_DIR / f"{task_name}.json").read_text(encoding="utf-8"))
    for key in ("classnames_file", "templates_file"):
        if data[key]:
            (base / data[key]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source / data[key], base / data[key])
    for key, value in changes.items():
        if value is _DELETE:
            del data[key]
        else:
            data[key] = value
    (base / "tasks" / f"{task_name}.json").write_text(json.dumps(data), encoding="utf-8")
    return base / "tasks"


_DELETE = object()


def test_private_copy_loads(tmp_path):
    directory = _task_dir(tmp_path)
    assert load_tasks(directory)["cars"].classnames == load_tasks()["cars"].classnames
    assert get_task("cars", directory).num_classes == 196


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"metric": "top1"}, "unknown metric 'top1'"),
        ({"type": "detection"}, "unknown type 'detection'"),
        ({"group": "extra"}, "unknown group 'extra'"),
        ({"metric": _DELETE}, r"missing field\(s\) \['metric'\]"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"num_classes": 195}, "196 class names, 'num_classes' is 195"),
        ({"name": "stanford_cars"}, "file is named cars.json"),
        ({"metric": "recall_at_k"}, "does not fit type"),
        ({"metric": "roc_auc"}, "binary"),
        ({"classnames_file": "classnames/nope.txt"}, "does not exist"),
        ({"classnames_file": "../../cars.txt"}, "must stay inside"),
        ({"templates_file": None}, "needs a 'templates_file'"),
        ({"wds_dirs": []}, "'wds_dirs'"),
        ({"wds_dirs": ["a/b"]}, "'wds_dirs'"),
        ({"torchvision": {"class": "StanfordCars"}}, "'kwargs'"),
        ({"torchvision": {"class": "StanfordCars", "kwargs": {}, "offset": 1}}, "unknown key"),
        ({"paper": {"vit_b16": 60.0}}, "unknown model"),
        ({"title": ""}, "'title' must be a non-empty string"),
    ],
)
def test_malformed_metadata_names_file_and_problem(tmp_path, changes, match):
    directory = _task_dir(tmp_path, **changes)
    with pytest.raises(ValueError, match=match) as err:
        load_tasks(directory)
    assert str(directory / "cars.json") in str(err.value)


def test_templates_without_placeholder_are_rejected(tmp_path):
    directory = _task_dir(tmp_path)
    (directory.parent / "templates" / "cars.txt").write_text("a photo of a {c}.\na photo of a car.\n")
    with pytest.raises(ValueError, match=r"without the '\{c\}' placeholder: \['a photo of a car.'\]"):
        load_tasks(directory)


def test_blank_and_invalid_lines_are_rejected(tmp_path):
    directory = _task_dir(tmp_path)
    names = directory.parent / "classnames" / "cars.txt"
    lines = names.read_text().splitlines()
    names.write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match="blank line"):
        load_tasks(directory)
    names.write_text("\n".join(lines) + "\n\n")  # trailing blank lines are fine
    (directory.parent / "templates" / "cars.txt").write_text("a {c} of {kind}\n")
    with pytest.raises(ValueError, match="not a valid format string"):
        load_tasks(directory)


def test_two_tasks_may_not_claim_one_directory(tmp_path):
    directory = _task_dir(tmp_path)
    other = json.loads((directory / "cars.json").read_text())
    other["name"] = "cars2"
    (directory / "cars2.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="'wds_cars' is also claimed by task 'cars'"):
        load_tasks(directory)


def test_invalid_json_and_empty_directory(tmp_path):
    directory = _task_dir(tmp_path)
    (directory / "cars.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cars\.json: not valid JSON"):
        load_tasks(directory)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no benchmark task files"):
        load_tasks(empty)
    with pytest.raises(FileNotFoundError):
        load_tasks(tmp_path / "absent")
