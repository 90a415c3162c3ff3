"""eval: the trained model scored zero-shot on every task in eval.benchmarks that has data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.errors import UserError
from flows.stages.generated import synthetic_benchmarks, synthetic_names
from flows.stages.spec import ConfigView, StageContext, StageSpec

REPORTS = ("results.json", "results.csv", "summary.md", "results.png")


def benchmark_data(cfg: ConfigView) -> dict[str, Any]:
    """Benchmark data fetched or converted after the last eval counts as a change. A cheap fingerprint,
    not the bytes: where each downloaded task's data lies, its file count, size and newest mtime."""
    from data.eval.registry import locate

    roots = [Path(r) for r in cfg.eval.data_roots]
    generated = set(synthetic_names(cfg.eval.benchmarks))  # rendered from eval.seed: already in the key
    found: dict[str, Any] = {}
    for name in cfg.eval.benchmarks:
        if name in generated or not roots:
            continue
        loc = locate(name, roots)
        if loc is None:
            found[name] = None
            continue
        files = [loc.path] if loc.path.is_file() else [f for f in loc.path.rglob("*") if f.is_file()]
        stats = [f.stat() for f in files]
        found[name] = {"path": str(loc.path.resolve()), "kind": loc.kind, "files": len(stats),
                       "bytes": sum(st.st_size for st in stats), "newest": max((st.st_mtime_ns for st in stats), default=0)}
    return {"benchmark_data": found}


def run(ctx: StageContext) -> dict[str, Any]:
    from data.dedup import OVERLAP_FILE
    from data.eval.suite import evaluate_suite, load_model_for_eval, read_overlap

    e = ctx.cfg.eval
    generated = synthetic_benchmarks(ctx)
    overlap = None
    if ctx.cfg.dedup.decontaminate:  # the overlap index covers the benchmarks dedup checked
        found = read_overlap(ctx.input_dir("dedup") / OVERLAP_FILE) or {}
        overlap = {name: found.get(name, set()) for name in generated}
    train_dir = ctx.input_dir("train")
    model, tokenizer, _ = load_model_for_eval(train_dir)
    report = evaluate_suite(
        model, tokenizer, e.benchmarks, [ctx.work_dir / "benchmarks", *map(Path, e.data_roots)],
        ctx.out_dir, model_label=str(train_dir), overlap=overlap, batch_size=e.batch_size,
        num_workers=e.num_workers, cache_dir=ctx.work_dir / "cache" / "classifiers", precision=e.precision,
    )  # fmt: skip
    if report["tasks_ran"] == 0:  # nothing to register a model on; the reports say why per task
        raise UserError(f"none of the {report['tasks_total']} eval tasks ran (eval.benchmarks, eval.data_roots): "
                        f"see {ctx.out_dir / 'summary.md'}")
    counts: dict[str, Any] = {k: report[k] for k in ("mean_score", "tasks_ran", "tasks_total", "tasks_failed",
                                                     "precision", "precision_reason")}
    for name, t in report["tasks"].items():
        if t["status"] == "ran":
            counts[f"{name}_score"] = t["value"]
    return counts


SPEC = StageSpec(
    name="eval",
    upstream=("dedup", "train"),  # dedup: its overlap index splits each task into Clean / Overlap
    reads=lambda cfg: ("eval", "dedup.decontaminate", "web.image_size"),
    runtime=("eval.batch_size", "eval.num_workers"),
    key_extras=benchmark_data,
    run=run,
    figures=("tasks_ran", "colour_score", "shape_score", "count_score", "mean_score"),
    mlflow_artifacts=REPORTS,
    code=("data/eval/tasks", "data/eval/classnames", "data/eval/templates"),
    engines=("torch", "torchvision", "pillow", "numpy", "webdataset", "matplotlib"),
)
