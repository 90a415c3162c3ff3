"""Every stage, end to end, on real engines: Prefect's test harness, the synthetic web on loopback,
a Dask LocalCluster, torchrun, and a sqlite MLflow store. One tiny config keeps it to a few minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.manifest import read_manifest
from flows.config import STAGES, load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = [
    "run_name=it",
    "web.n_pages=12",
    "web.images_per_page=12",
    "web.fault_rate=0.1",
    "web.slow_seconds=1.5",
    "web.exact_duplicate_rate=0.08",
    "crawl.timeout=0.75",
    "crawl.shard_size=50",
    "shard.samples_per_shard=40",
    "train.epochs=2",
    "train.batch_size=16",
    "train.vocab_size=400",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.eval_every=4",
    "train.system_metrics_interval=1",
    "eval.samples_per_class=4",
]


@pytest.fixture(scope="module")
def pipeline_env(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("pipeline")
    overrides = TINY + [f"work_dir={root / 'runs'}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"]
    cfg = load_config(None, overrides)
    from flows.pipeline import run_pipeline

    first = run_pipeline(cfg)
    return {"root": root, "cfg": cfg, "first": first, "overrides": overrides}


def _counts(result, stage):
    return next(o for o in result["outcomes"] if o["stage"] == stage)["counts"]


def test_first_run_runs_every_stage_with_sane_counts(pipeline_env):
    from data.web import SiteSpec, build_site

    cfg, first = pipeline_env["cfg"], pipeline_env["first"]
    assert [o["stage"] for o in first["outcomes"]] == list(STAGES)
    assert all(o["status"] == "ran" for o in first["outcomes"])
    for stage in STAGES:
        m = read_manifest(cfg.stage_dir(stage))
        assert m and m["status"] == "complete" and m["outputs"], stage

    site = build_site(SiteSpec(seed=0, n_pages=12, images_per_page=12, fault_rate=0.1, exact_duplicate_rate=0.08))
    stats = site.stats()
    harvest = _counts(first, "harvest")
    assert harvest["pages_fetched"] == stats["n_pages"] + 1  # + the index page
    crawl = _counts(first, "crawl")
    assert crawl["urls"] == harvest["candidates"]
    # every fault kind fails; every clean image succeeds (faults served once per URL, none retried)
    assert crawl["successes"] + crawl["failed_to_download"] + crawl["failed_to_resize"] == crawl["urls"]
    assert crawl["failed_to_download"] + crawl["failed_to_resize"] >= 1
    assert crawl["successes"] >= crawl["urls"] - sum(stats["n_faults"].values())
    dedup = _counts(first, "dedup")
    assert dedup["input"] == crawl["successes"]
    assert dedup["kept"] < dedup["input"]  # planted exact duplicates are dropped
    shard = _counts(first, "shard")
    assert shard["train"] + shard["val"] == dedup["kept"]
    sizes = json.loads((cfg.stage_dir("shard") / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("train")) == shard["train"]
    train = _counts(first, "train")
    assert train["steps"] >= 2 and (cfg.stage_dir("train") / "model.safetensors").is_file()
    results = json.loads((cfg.stage_dir("eval") / "results.json").read_text())
    assert set(results["tasks"]) == {"colour", "shape", "count"} and results["tasks_ran"] == 3
    for r in results["tasks"].values():
        assert r["status"] == "ran" and r["metric"] == "acc1" and 0.0 <= r["value"] <= 1.0 and r["n"] > 0
        # All / Clean / Overlap against dedup's overlap index
        assert r["subsets"]["all"]["n"] == r["n"] == r["subsets"]["clean"]["n"] + r["subsets"]["overlap"]["n"]
    assert (cfg.stage_dir("eval") / "results.png").stat().st_size > 1000
    reg = _counts(first, "register")
    assert reg["version"] == 1 and reg["promoted"] == 1


def test_mlflow_run_holds_params_metrics_and_artifacts(pipeline_env):
    from mlflow.tracking import MlflowClient

    cfg, first = pipeline_env["cfg"], pipeline_env["first"]
    client = MlflowClient(tracking_uri=first["tracking_uri"])
    run = client.get_run(first["run_id"])
    assert run.data.params["train.model"] == "tiny"
    assert "eval/colour_score" in run.data.metrics and "eval/mean_score" in run.data.metrics
    loss = client.get_metric_history(first["run_id"], "train/loss")
    assert len(loss) >= 2
    assert [m.step for m in loss] == sorted(m.step for m in loss) and loss[0].step == 2  # per logged step
    assert {"train/lr", "train/temperature", "train/samples_per_s", "train/data_wait_s", "train/grad_norm",
            "train/skipped_steps", "train/zeroshot/heldout_colour_acc1"} <= set(run.data.metrics)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    # checkpoints are referenced from the run: the newest as a tag, all of them in an artifact
    ckpt = Path(run.data.tags["train.checkpoint"])
    assert ckpt.is_file() and ckpt.parent == cfg.stage_dir("train").resolve() / "checkpoints"
    listed = json.loads(Path(client.download_artifacts(first["run_id"], "train/checkpoints.json")).read_text())
    assert listed[-1]["path"] == str(ckpt) and [c["step"] for c in listed] == sorted(c["step"] for c in listed)
    top = {a.path for a in client.list_artifacts(first["run_id"])}
    assert {"manifests", "eval"} <= top
    eval_files = {a.path for a in client.list_artifacts(first["run_id"], "eval")}
    assert "eval/summary.md" in eval_files
    mv = client.get_model_version_by_alias(cfg.mlflow.model_name, "champion")
    assert str(mv.version) == "1"


def test_second_run_skips_everything_then_reruns_selected_stages(pipeline_env):
    from flows.pipeline import run_pipeline

    cfg = pipeline_env["cfg"]
    again = run_pipeline(cfg)
    assert [o["status"] for o in again["outcomes"]] == ["skipped"] * len(STAGES)
    assert again["run_id"] == pipeline_env["first"]["run_id"]

    before = (cfg.stage_dir("train") / "model.safetensors").stat().st_mtime_ns
    partial = run_pipeline(cfg, ["eval", "register"])
    assert [(o["stage"], o["status"]) for o in partial["outcomes"]] == [("eval", "ran"), ("register", "ran")]
    assert (cfg.stage_dir("train") / "model.safetensors").stat().st_mtime_ns == before
    reg = _counts(partial, "register")
    # same model, same held-out data: the same accuracy does not beat the champion
    assert reg["version"] == 2 and reg["promoted"] == 0


def test_pyfunc_loads_and_predicts_from_a_plain_interpreter(pipeline_env, tmp_path):
    from data.web import Scene, render_scene

    import random

    img = render_scene(Scene("circle", "red", 1, "large", "white", "centre"), 64, random.Random(0))
    path = tmp_path / "red_circle.png"
    img.save(path)
    uri = pipeline_env["first"]["tracking_uri"]
    code = (
        "import mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/witclip@champion')\n"
        f"out = m.predict(pd.DataFrame({{'image': [{str(path)!r}], 'labels': [['a red circle', 'a blue square']]}}))\n"
        "print(out['label'][0], len(out['scores'][0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    label, n = out.stdout.strip().splitlines()[-1].rsplit(" ", 1)
    assert label in {"a red circle", "a blue square"} and n == "2"

    cli = Path(sys.executable).parent / "witclip"
    out = subprocess.run(
        [str(cli), "classify", "--tracking-uri", uri, "--labels", "a red circle,a blue square", str(path)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert str(path) in out.stdout
