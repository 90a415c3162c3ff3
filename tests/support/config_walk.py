"""Every leaf field of the pipeline config, each changed to another valid value, for the tests that check
what a change reaches (stage keys, engine objects)."""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from flows.config import PipelineConfig

# Fields whose change needs other fields set first (base) or a value the generic rule cannot guess.
# path -> (overrides of the base config, overrides of the changed config on top of the base)
SPECIAL: dict[str, tuple[list[str], list[str]]] = {
    "harvest.source": ([], ["harvest.source=warc", "harvest.warc=[w.warc]"]),
    "harvest.urls": ([], ["harvest.urls=[list.csv]"]),
    "harvest.warc": ([], ["harvest.warc=[w.warc]"]),
    "harvest.seed_url": ([], ["harvest.seed_url=http://127.0.0.1:9/"]),
    "harvest.allowed_hosts": ([], ["harvest.allowed_hosts=[example.com]"]),
    "harvest.file_format": ([], ["harvest.file_format=csv"]),
    "http.allowed_addresses": ([], ["http.allowed_addresses=[10.0.0.1]"]),
    "cluster.scheduler_address": ([], ["cluster.scheduler_address=tcp://127.0.0.1:1"]),
    "crawl.deadline": ([], ["crawl.deadline=5.0"]),
    "crawl.x_robots_directives": ([], ["crawl.x_robots_directives=[noai]"]),
    "train.nnodes": ([], ["train.nnodes=2", "train.rdzv_endpoint=127.0.0.1:29400"]),
    "train.node_rank": (["train.nnodes=2", "train.rdzv_endpoint=127.0.0.1:29400"], ["train.node_rank=1"]),
    "train.rdzv_endpoint": ([], ["train.rdzv_endpoint=127.0.0.1:29400"]),
    "train.crop_scale": ([], ["train.crop_scale=[0.8, 1.0]"]),
    "eval.benchmarks": ([], ["eval.benchmarks=[colour, shape]"]),  # one generated benchmark fewer
    "eval.data_roots": ([], ["eval.data_roots=[benchmark-data]"]),
    "mlflow.tracking_uri": ([], ["mlflow.tracking_uri=sqlite:///other.db"]),
}


def leaf_paths(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[str]:
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from leaf_paths(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def _value(cfg: PipelineConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _field(path: str) -> Any:
    model: type[BaseModel] = PipelineConfig
    *sections, leaf = path.split(".")
    for section in sections:
        model = model.model_fields[section].annotation  # type: ignore[assignment]
    return model.model_fields[leaf]


def _changed(path: str, value: Any) -> str:
    """A `--set` override giving the field another valid value."""
    annotation = _field(path).annotation
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    if choices:
        new = next(c for c in choices if c != value)
    elif isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + 1
    elif isinstance(value, float):
        new = value * 2 if value else 1.0
    elif isinstance(value, str):
        new = value + "x"
    else:
        raise AssertionError(f"no rule to change {path}={value!r}: add it to SPECIAL")
    return f"{path}={str(new).lower() if isinstance(new, bool) else new}"


def changed_configs(tmp_path: Path) -> Iterator[tuple[str, PipelineConfig, PipelineConfig]]:
    """(path, config before, config after) for every leaf field of the pipeline config. Files the
    changes name (a URL list, a WARC, a query file) are created under tmp_path."""
    from flows.config import load_config

    (tmp_path / "list.csv").write_text("url,caption\nhttp://example.com/a.jpg,a red circle\n")
    (tmp_path / "w.warc").write_bytes(b"")
    (tmp_path / "queries.txt").write_text("circle\n")
    (tmp_path / "benchmark-data").mkdir(exist_ok=True)
    special = dict(SPECIAL)
    special["harvest.queries"] = ([], [f"harvest.queries={tmp_path / 'queries.txt'}"])

    def local(overrides: list[str]) -> list[str]:
        out = []
        for override in overrides:
            for name in ("list.csv", "w.warc", "benchmark-data"):
                override = override.replace(f"[{name}]", f"[{tmp_path / name}]")
            out.append(override)
        return out

    # an empty work_dir of their own: stage keys also cover the outputs of earlier runs found there
    here = [f"work_dir={tmp_path / 'runs'}"]
    special["work_dir"] = ([], [f"work_dir={tmp_path / 'elsewhere'}"])
    for path in leaf_paths():
        if path in special:
            base_overrides, change = special[path]
            before = load_config(None, here + local(base_overrides))
            after = load_config(None, here + local(base_overrides + change))
        else:
            before = load_config(None, here)
            after = load_config(None, here + [_changed(path, _value(before, path))])
        assert _value(before, path) != _value(after, path), path
        yield path, before, after
