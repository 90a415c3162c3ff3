"""The pipeline's stages, in order. Each module declares one stage (`StageSpec`: name, upstream stages,
the config it reads, its run function, its key figures); the pipeline, the CLI and key derivation
iterate over `STAGES`. Adding a stage is one new module here plus one line in that tuple
(docs/architecture.md walks through it)."""

from __future__ import annotations

from flows.stages import crawl, dedup, harvest, register, shard, train
from flows.stages import eval as eval_stage
from flows.stages.spec import ConfigView, StageContext, StageSpec, UndeclaredRead

STAGES: tuple[StageSpec, ...] = (
    harvest.SPEC,
    crawl.SPEC,
    dedup.SPEC,
    shard.SPEC,
    train.SPEC,
    eval_stage.SPEC,
    register.SPEC,
)
STAGE_NAMES: tuple[str, ...] = tuple(spec.name for spec in STAGES)
_BY_NAME = {spec.name: spec for spec in STAGES}


def get_stage(name: str) -> StageSpec:
    return _BY_NAME[name]


def downstream(name: str) -> set[str]:
    """Every stage that reads `name`'s output, directly or through others."""
    out: set[str] = set()
    for spec in STAGES:
        if name in spec.upstream or out & set(spec.upstream):
            out.add(spec.name)
    return out


__all__ = ["STAGES", "STAGE_NAMES", "ConfigView", "StageContext", "StageSpec", "UndeclaredRead", "downstream",
           "get_stage"]
