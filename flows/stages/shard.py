"""shard: the kept samples packed into train/val webdataset shards with sizes.json."""

from __future__ import annotations

from typing import Any

from flows.stages.spec import ConfigView, StageContext, StageSpec


def run(ctx: StageContext) -> dict[str, Any]:
    from data.dedup import KEEP_FILE
    from data.shards import write_shards

    s = ctx.cfg.shard
    return write_shards(ctx.input_dir("crawl"), ctx.input_dir("dedup") / KEEP_FILE, ctx.out_dir,
                        val_fraction=s.val_fraction, samples_per_shard=s.samples_per_shard, seed=s.seed)


def accept(cfg: ConfigView, counts: dict[str, Any]) -> str | None:
    return None if counts.get("train", 0) > 0 else "no sample went to the train split"


SPEC = StageSpec(
    name="shard",
    upstream=("crawl", "dedup"),
    reads=lambda cfg: ("shard",),
    run=run,
    figures=("train", "val"),
    accept=accept,
    engines=("pandas", "pyarrow"),
)
