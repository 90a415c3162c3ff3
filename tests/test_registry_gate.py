"""The registry's eval gate on a real (sqlite) MLflow store: every version becomes @candidate with
lineage tags; @champion moves only when the mean over the tasks both models ran beats the holder's by
the margin; `witclip promote` / `witclip rollback` move it by hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import clip
from flows.registry import promotion_decision, register_model

REPO = Path(__file__).resolve().parents[1]


def test_promotion_decision_compares_common_tasks_with_a_margin():
    assert promotion_decision({"a": 0.5}, None, 0.01)["promoted"]
    d = promotion_decision({"a": 0.6, "b": 0.2, "new": 0.9}, {"a": 0.5, "b": 0.3, "old": 0.0}, 0.0)
    assert d["common_tasks"] == ["a", "b"] and d["promoted"]  # 0.4 >= 0.4: tasks only one ran don't count
    assert not promotion_decision({"a": 0.6, "b": 0.2}, {"a": 0.5, "b": 0.3}, 0.01)["promoted"]
    assert not promotion_decision({"x": 1.0}, {"y": 0.0}, 0.0)["promoted"]  # nothing to compare


def results(**scores: float) -> dict:
    tasks = {n: {"status": "ran", "metric": "acc1", "value": v} for n, v in scores.items()}
    tasks["dtd"] = {"status": "not_available", "metric": "acc1"}
    return {"tasks": tasks, "mean_score": sum(scores.values()) / len(scores)}


@pytest.fixture()
def store(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("gate", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(exp).info.run_id
    model_dir = tmp_path / "model"
    tok = clip.train_caption_tokenizer(["a red square", "a blue circle"] * 20, 300)
    torch.manual_seed(0)
    clip.save_model(clip.create_model("tiny", vocab_size=tok.vocab_size, context_length=16, image_size=32,
                                      patch_size=16, vision_width=64, text_width=64, embed_dim=32), model_dir)
    tok.save(model_dir / "tokenizer.json")
    return {"uri": uri, "client": client, "run_id": run_id, "model_dir": model_dir, "tmp": tmp_path}


def register(store, scores: dict, **kw) -> dict:
    return register_model(train_dir=store["model_dir"], eval_results=results(**scores), out_dir=store["tmp"] / "reg",
                          run_id=store["run_id"], tracking_uri=store["uri"], model_name="witclip", alias="champion",
                          margin=0.01, lineage={"data_manifest_hash": "abc123", "code_version": "0.1.0"}, **kw)


def holder(client, alias: str) -> str:
    return str(client.get_model_version_by_alias("witclip", alias).version)


@pytest.mark.slow
def test_worse_model_keeps_champion_better_moves_it_and_rollback_restores(store):
    client = store["client"]
    assert register(store, {"colour": 0.9, "shape": 0.4})["promoted"] == 1
    assert holder(client, "champion") == "1" and holder(client, "candidate") == "1"

    worse = register(store, {"colour": 0.85, "shape": 0.4, "count": 0.99})  # better only on a task v1 lacks
    assert worse["promoted"] == 0 and holder(client, "champion") == "1" and holder(client, "candidate") == "2"
    barely = register(store, {"colour": 0.905, "shape": 0.4})  # +0.0025 mean: inside the 0.01 margin
    assert barely["promoted"] == 0 and holder(client, "champion") == "1"
    better = register(store, {"colour": 0.95, "shape": 0.45})
    assert better["promoted"] == 1 and holder(client, "champion") == "4" and holder(client, "candidate") == "4"

    tags = client.get_model_version("witclip", "4").tags
    assert tags["pipeline_run_id"] == store["run_id"] and tags["data_manifest_hash"] == "abc123"
    assert tags["code_version"] == "0.1.0" and float(tags["mean_score"]) == pytest.approx(0.7)
    assert float(tags["score.colour"]) == 0.95 and tags["metric.colour"] == "acc1" and "score.dtd" not in tags
    decision = client.get_run(store["run_id"]).data.tags["register.decision"]
    assert "mean over 2 common task(s)" in decision and ">=" in decision

    cli = [sys.executable, "-m", "flows.cli"]
    back = subprocess.run(cli + ["rollback", "--tracking-uri", store["uri"]], cwd=REPO, capture_output=True, text=True)
    assert back.returncode == 0, back.stderr
    assert "version 4 -> version 1" in back.stdout and holder(client, "champion") == "1"
    promote = subprocess.run(cli + ["promote", "2", "--tracking-uri", store["uri"]], cwd=REPO, capture_output=True,
                             text=True)
    assert promote.returncode == 0 and holder(client, "champion") == "2"
    back = subprocess.run(cli + ["rollback", "--tracking-uri", store["uri"]], cwd=REPO, capture_output=True, text=True)
    assert back.returncode == 0 and holder(client, "champion") == "1"
    nothing = subprocess.run(cli + ["rollback", "--tracking-uri", store["uri"]], cwd=REPO, capture_output=True,
                             text=True)
    assert nothing.returncode == 2 and "no earlier holder" in nothing.stderr
    missing = subprocess.run(cli + ["promote", "99", "--tracking-uri", store["uri"]], cwd=REPO, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "no version 99" in missing.stderr


def test_mlflow_calls_retry_transient_failures_only(prefect_harness):
    """A dropped connection is retried as a Prefect task; a bug is not."""
    from prefect import flow

    from flows.retries import _mlflow_task

    calls = {"flaky": 0, "bug": 0}

    def flaky(n_failures: int) -> str:
        calls["flaky"] += 1
        if calls["flaky"] <= n_failures:
            raise ConnectionError("connection reset by peer")
        return "logged"

    def bug() -> None:
        calls["bug"] += 1
        raise KeyError("run_id")

    @flow
    def calls_mlflow() -> str:
        quick = _mlflow_task.with_options(retry_delay_seconds=0)
        result = quick(flaky, 2)
        with pytest.raises(KeyError):
            quick(bug)
        return result

    assert calls_mlflow() == "logged"
    assert calls == {"flaky": 3, "bug": 1}
