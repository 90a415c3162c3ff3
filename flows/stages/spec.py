"""What a stage is: its declaration (`StageSpec`) and what it sees when it runs (`StageContext`).

A stage declares, in its own module under `flows/stages/`, the config paths it reads (`reads`: whole
sections like "harvest" or single keys like "web.enabled"). Its run function and its preflight check see
the config only through a `ConfigView` of those paths: reading anything else raises
`UndeclaredRead` at once, so the declaration cannot fall behind the code. The stage's key is
derived from exactly what it declared, less its `runtime` paths (where and how it runs, not what it
makes), with `key_values` turning a value into the part of it that matters (dedup needs only the
synthetic benchmarks among `eval.benchmarks`) and `key_extras` adding inputs that live outside the
config (file contents, benchmark data on disk). Its code is part of the key too: the sources of the witclip
modules it uses (found from its module, plus `code`) and the versions of its `engines`
(`flows.code_version`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from flows.config import PipelineConfig


class UndeclaredRead(LookupError):
    """A stage read a config path its spec does not declare: a bug in the stage's module."""


def covers(declared: frozenset[str], path: str) -> bool:
    """The path, or a section above it, is declared."""
    parts = path.split(".")
    return any(".".join(parts[:i]) in declared for i in range(1, len(parts) + 1))


class ConfigView:
    """The config as one stage sees it: the paths it declared, read-only. A declared section comes back
    as the section itself (its engine builders included); a section only some of whose keys are
    declared comes back as a narrower view."""

    __slots__ = ("_model", "_declared", "_stage", "_prefix")

    def __init__(self, model: BaseModel, declared: frozenset[str], stage: str, prefix: str = ""):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_declared", declared)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        path = self._prefix + name
        if covers(self._declared, path):
            return getattr(self._model, name)
        value = getattr(self._model, name, None)
        if isinstance(value, BaseModel) and any(d.startswith(path + ".") for d in self._declared):
            return ConfigView(value, self._declared, self._stage, path + ".")
        raise UndeclaredRead(f"stage '{self._stage}' read config '{path}', which its spec in "
                                   f"flows/stages/{self._stage}.py does not declare")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"stage '{self._stage}' may not change the config ({self._prefix}{name})")


def _lookup(dump: Mapping[str, Any], path: str) -> Any:
    node: Any = dump
    for part in path.split("."):
        node = node[part]
    return node


def _put(out: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _drop(out: dict[str, Any], path: str) -> None:
    *parents, leaf = path.split(".")
    node: Any = out
    for part in parents:
        node = node.get(part, {})
    if isinstance(node, dict):
        node.pop(leaf, None)


@dataclass(frozen=True)
class StageSpec:
    """One pipeline stage, declared once (see the module docstring)."""

    name: str
    upstream: tuple[str, ...]  # stages whose outputs it reads
    reads: Callable[["PipelineConfig"], Iterable[str]]  # config paths it reads (may depend on the config)
    run: Callable[["StageContext"], dict[str, Any]]  # does the work; returns the counts for its manifest
    figures: tuple[str, ...] = ()  # counts shown in the end-of-run table
    runtime: tuple[str, ...] = ()  # declared paths that say where or how it runs, not what it makes
    key_values: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)  # path -> the part the key holds
    key_extras: Callable[[ConfigView], dict[str, Any]] | None = None  # inputs outside the config
    preflight: Callable[[ConfigView, bool], None] | None = None  # (view, already complete): UserError early
    mlflow_artifacts: tuple[str, ...] = ()  # output files also logged to the pipeline's MLflow run
    uses_embedded_web: bool = False  # requests go to the embedded synthetic web when it is on
    code: tuple[str, ...] = ()  # code beyond its module's imports: modules run elsewhere, data files it reads
    engines: tuple[str, ...] = ()  # distributions whose version can change what it makes
    # (view, counts) -> why the output is not worth keeping (a crawl during an outage), or None: a
    # rejected output is never marked complete, adopted or resumed
    accept: Callable[[ConfigView, dict[str, Any]], str | None] | None = None

    def code_fingerprint(self) -> dict[str, Any]:
        """The code part of the key (`flows.code_version.stage_code`)."""
        from flows.code_version import stage_code

        return stage_code(self.run.__module__, self.code, self.engines)

    def declared(self, cfg: "PipelineConfig") -> frozenset[str]:
        return frozenset(self.reads(cfg))

    def view(self, cfg: "PipelineConfig") -> ConfigView:
        return ConfigView(cfg, self.declared(cfg), self.name)

    def config_slice(self, cfg: "PipelineConfig") -> dict[str, Any]:
        """What of the config is part of this stage's key (also its manifest's `config`)."""
        dump = cfg.model_dump(mode="json")
        out: dict[str, Any] = {}
        for path in sorted(self.declared(cfg)):
            value = copy.deepcopy(_lookup(dump, path))
            if path in self.key_values:
                value = self.key_values[path](value)
            _put(out, path, value)
        for path in self.runtime:
            _drop(out, path)
        if self.key_extras is not None:
            extras = self.key_extras(self.view(cfg))
            clash = extras.keys() & out.keys()
            if clash:
                raise ValueError(f"stage {self.name}: key_extras {sorted(clash)} clash with config sections")
            out.update(extras)
        return out


@dataclass
class StageContext:
    """What a stage's run function gets: its view of the config and its directories."""

    stage: str
    cfg: ConfigView
    work_dir: Path  # shared by the runs under it: generated benchmarks, caches
    out_dir: Path  # this stage's output directory
    upstream_dirs: Mapping[str, Path]
    mlflow_run_id: str
    tracking_uri: str
    seed_url: str | None = None  # the embedded web's index page, when harvest starts from it
    # the embedded web's host:port while this run serves it (harvest from it, crawl its URLs): the one
    # loopback address the address guard lets through
    embedded_web: str | None = None

    def input_dir(self, stage: str) -> Path:
        """The output directory of upstream stage `stage` (which the spec must declare)."""
        if stage not in self.upstream_dirs:
            raise UndeclaredRead(f"stage '{self.stage}' read the output of '{stage}', which its spec "
                                       f"does not list as upstream")
        return self.upstream_dirs[stage]
