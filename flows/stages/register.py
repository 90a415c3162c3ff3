"""register: the trained model logged as a pyfunc and registered; @champion moves when the eval gate passes."""

from __future__ import annotations

import json
from typing import Any

from flows.errors import UserError
from flows.stages.spec import StageContext, StageSpec


def run(ctx: StageContext) -> dict[str, Any]:
    from data.common.manifest import read_manifest
    from flows.registry import register_model

    results_path = ctx.input_dir("eval") / "results.json"
    if not results_path.is_file():
        raise UserError(f"{results_path} is missing: run the eval stage before register")
    train_dir = ctx.input_dir("train")
    train_manifest = read_manifest(train_dir) or {}
    lineage = {
        "pipeline_run_name": ctx.cfg.run_name,
        "data_manifest_hash": (read_manifest(ctx.input_dir("shard")) or {}).get("outputs_hash", ""),
        "train_outputs_hash": train_manifest.get("outputs_hash", ""),
        # the code that made the model: git commit (-dirty when edited) in a checkout, and always the
        # fingerprint of every witclip source file
        "code_version": train_manifest.get("code_version", ""),
        "source_fingerprint": train_manifest.get("source_fingerprint", ""),
    }
    m = ctx.cfg.mlflow
    return register_model(
        train_dir=train_dir, eval_results=json.loads(results_path.read_text()), out_dir=ctx.out_dir,
        run_id=ctx.mlflow_run_id, tracking_uri=ctx.tracking_uri, model_name=m.model_name, alias=m.alias,
        candidate_alias=m.candidate_alias, margin=m.promotion_margin, lineage=lineage,
    )  # fmt: skip


SPEC = StageSpec(
    name="register",
    upstream=("shard", "train", "eval"),  # shard: the data hash in the lineage tags
    reads=lambda cfg: ("mlflow", "run_name"),
    runtime=("run_name",),  # a lineage tag: a nightly run under a new name registers nothing new
    run=run,
    figures=("version", "promoted", "mean_score"),
    engines=("mlflow", "torch"),
)
