"""Every stage, end to end, on real engines: Prefect's test harness, the synthetic web on loopback,
a Dask LocalCluster, torchrun, and a sqlite MLflow store. One tiny config keeps it to a few minutes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data.common.manifest import read_manifest
from flows.config import load_config
from flows.stages import STAGE_NAMES as STAGES

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
    from data.synthetic import SiteSpec, build_site

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
    # Prefect artifacts per stage: counts table, markdown summary, MLflow run reference
    from prefect.artifacts import Artifact

    table = Artifact.get("witclip-train-counts")
    assert table is not None and '"steps"' in str(table.data)
    assert Artifact.get("witclip-eval-summary") is not None
    assert first["run_id"] in str(Artifact.get("witclip-register-mlflow").data)


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
    import mlflow

    mlflow.set_tracking_uri(first["tracking_uri"])
    signature = mlflow.models.get_model_info(f"models:/{cfg.mlflow.model_name}/1").signature
    assert signature is not None and signature.inputs.input_names() == ["image", "labels"]
    assert mv.tags["pipeline_run_id"] == first["run_id"] and mv.tags["data_manifest_hash"]
    assert str(client.get_model_version_by_alias(cfg.mlflow.model_name, "candidate").version) == "1"


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
    import random

    from data.synthetic import Scene, render_scene

    img = render_scene(Scene("circle", "red", 1, "large", "white", "centre"), 64, random.Random(0))
    path = tmp_path / "red_circle.png"
    img.save(path)
    uri = pipeline_env["first"]["tracking_uri"]
    code = (
        "import base64, mlflow, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        "m = mlflow.pyfunc.load_model('models:/witclip@champion')\n"
        f"img = base64.b64encode(open({str(path)!r}, 'rb').read()).decode()\n"
        "out = m.predict(pd.DataFrame({'image': [img], 'labels': [['a red circle', 'a blue square']]}))\n"
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


def test_mlflow_models_serve_answers_a_rest_prediction(pipeline_env, tmp_path):
    """`mlflow models serve -m models:/witclip@champion` on loopback; a generated image sent as base64."""
    import base64
    import io
    import random
    import urllib.request

    from support.servers import served_model

    from data.synthetic import Scene, render_scene

    buf = io.BytesIO()
    render_scene(Scene("circle", "red", 1, "large", "white", "centre"), 64, random.Random(0)).save(buf, "PNG")
    with served_model("models:/witclip@champion", pipeline_env["first"]["tracking_uri"], tmp_path) as url:
        body = json.dumps({"dataframe_split": {"columns": ["image", "labels"], "data": [
            [base64.b64encode(buf.getvalue()).decode(), "a red circle,a blue square"]]}}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        row = answer["predictions"][0]
        assert row["label"] in ("a red circle", "a blue square") and len(row["scores"]) == 2
        assert abs(sum(row["scores"]) - 1) < 1e-4


def test_killed_during_training_then_run_again_resumes_without_redoing_data_stages(tmp_path):
    """`witclip run` SIGKILLed (with torchrun, its rank and Prefect's server) mid-training; the next
    `witclip run` skips harvest..shard and resumes training from the newest checkpoint."""
    import os
    import signal

    import psutil

    overrides = TINY + ["train.epochs=6", "train.checkpoint_every=3", f"work_dir={tmp_path / 'runs'}",
                        f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "flows.cli", "run", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    first = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if line.startswith("[train] step 8/"):
            victims = psutil.Process(first.pid).children(recursive=True)
            first.kill()
            for v in victims:
                v.send_signal(signal.SIGKILL)
            psutil.wait_procs(victims, timeout=30)
            break
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, "".join(seen[-40:])
    train_dir = tmp_path / "runs" / "it" / "train"
    assert not (train_dir / "manifest.json").exists() and list((train_dir / "checkpoints").glob("step-*.pt"))

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    out = again.stdout + again.stderr
    import re

    for stage in ("harvest", "crawl", "dedup", "shard"):  # the end-of-run table
        assert re.search(rf"^{stage}\s+skipped\s", out, flags=re.M), stage
    assert re.search(r"^train\s+ran\s", out, flags=re.M)
    resumed = next(line for line in out.splitlines() if "[train] resumed from" in line)
    at = int(re.search(r" at step (\d+) ", resumed).group(1))
    assert 3 <= at <= 8, resumed  # the newest checkpoint written before the kill
    trained = [int(m) for m in re.findall(r"^\[train\] step (\d+)/", out, flags=re.M)]
    assert trained and min(trained) > at  # nothing before the checkpoint was trained again
    summary = json.loads((train_dir / "summary.json").read_text())
    assert summary["steps"] == summary["steps_per_epoch"] * 6
    # the console shows witclip's lines; the engines' chatter is in the run's log file only
    log = Path(re.search(r"^Log of this run \(witclip and the engines\): (\S+)$", out, flags=re.M).group(1))
    logged = "".join(f.read_text() for f in sorted(log.parent.glob("*.log")))  # the killed run's and this one's
    for chatter in ("distributed.scheduler", "Beginning subflow run", "Finished in state", "Successfully registered"):
        assert chatter not in out and chatter in logged, chatter
    assert "[train] resumed from" in logged and "[register] done" in logged


def test_eval_with_no_task_data_fails_in_one_line_and_registers_nothing(pipeline_env):
    from flows.errors import UserError
    from flows.pipeline import run_pipeline

    cfg = load_config(None, pipeline_env["overrides"] + ["eval.benchmarks=[cifar10]"])
    with pytest.raises(UserError, match="none of the 1 eval tasks ran"):
        run_pipeline(cfg, ["eval", "register"])
    assert read_manifest(cfg.stage_dir("eval")) is None  # not marked complete
    assert "not available: expected at" in (cfg.stage_dir("eval") / "summary.md").read_text()


def test_a_new_run_name_reuses_unchanged_stages_and_reruns_what_changed(pipeline_env):
    """A scheduled run gets a fresh run name; with only the eval settings changed it adopts harvest..train
    from the earlier run (hard links) and runs eval and register; every stage gets a nested MLflow run."""
    import os

    from mlflow.tracking import MlflowClient

    from flows.pipeline import run_pipeline

    earlier = pipeline_env["cfg"]
    cfg = load_config(None, pipeline_env["overrides"] + ["run_name=nightly", "eval.benchmarks=[colour,shape,count,cifar10]"])
    result = run_pipeline(cfg)
    statuses = {o["stage"]: o["status"] for o in result["outcomes"]}
    assert statuses == {"harvest": "reused", "crawl": "reused", "dedup": "reused", "shard": "reused",
                        "train": "reused", "eval": "ran", "register": "ran"}
    weights = cfg.stage_dir("train") / "model.safetensors"
    assert os.stat(weights).st_ino == os.stat(earlier.stage_dir("train") / "model.safetensors").st_ino
    manifest = read_manifest(cfg.stage_dir("train"))
    assert manifest["reused_from"] == str(earlier.stage_dir("train").resolve())
    assert "reused_from" not in read_manifest(earlier.stage_dir("train"))  # the source manifest is untouched
    assert _counts(result, "eval")["tasks_total"] == 4 and _counts(result, "eval")["tasks_ran"] == 3

    client = MlflowClient(tracking_uri=result["tracking_uri"])
    children = client.search_runs([client.get_run(result["run_id"]).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result['run_id']}'")
    by_stage = {r.data.tags["witclip.stage"]: r for r in children}
    assert set(by_stage) == set(STAGES)
    assert by_stage["train"].data.tags["witclip.stage_status"] == "reused"
    assert by_stage["eval"].data.tags["witclip.stage_status"] == "ran" and "seconds" in by_stage["eval"].data.metrics
    assert by_stage["eval"].data.params["eval.benchmarks"].endswith("'cifar10']")
    assert all(r.info.status == "FINISHED" for r in children)
