"""dedup: exact duplicates, decontamination against the generated benchmarks, near-duplicate clusters."""

from __future__ import annotations

from typing import Any

from flows.stages.generated import synthetic_benchmarks, synthetic_names
from flows.stages.spec import ConfigView, StageContext, StageSpec


def reads(cfg) -> tuple[str, ...]:
    paths = ("dedup", "cluster")
    if cfg.dedup.decontaminate:  # the generated benchmarks it checks against
        paths += ("eval.benchmarks", "eval.samples_per_class", "eval.seed", "web.image_size")
    return paths


def run(ctx: StageContext) -> dict[str, Any]:
    from data.dedup import dedup

    d = ctx.cfg.dedup
    return dedup(
        ctx.input_dir("crawl"), ctx.out_dir, near_duplicates=d.near_duplicates, max_distance=d.max_distance,
        benchmark_roots=synthetic_benchmarks(ctx) if d.decontaminate else None,
        scheduler_address=ctx.cfg.cluster.scheduler_address, processes=ctx.cfg.cluster.processes,
    )  # fmt: skip


def accept(cfg: ConfigView, counts: dict[str, Any]) -> str | None:
    if counts.get("kept", 0) == 0:
        return f"kept none of the {counts.get('input', 0)} downloaded samples"
    return None


SPEC = StageSpec(
    name="dedup",
    upstream=("crawl",),
    reads=reads,
    runtime=("cluster",),
    # only the generated benchmarks decide what is dropped: adding a downloaded one to eval.benchmarks
    # re-runs eval, not dedup and what follows
    key_values={"eval.benchmarks": synthetic_names},
    run=run,
    figures=("input", "kept"),
    accept=accept,
    engines=("pillow", "numpy", "scipy", "pandas", "pyarrow"),
)
