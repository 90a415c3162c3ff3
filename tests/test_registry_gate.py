"""The registry's eval gate on a real (sqlite) MLflow store: every version becomes @candidate with
lineage tags; @champion moves only when the mean over the tasks both models ran beats the holder's by
the margin; `witclip promote` / `witclip rollback` move it by hand; two registers racing on one store
take turns (`registry_lock`), so @champion and its history stay consistent."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import clip
from flows.locks import LockHeld
from flows.registry import (
    HISTORY_TAG,
    promotion_decision,
    register_model,
    registry_lock,
    registry_lock_path,
)

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

    def witclip(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", *argv, "--tracking-uri", store["uri"]], cwd=REPO,
                              check=False, capture_output=True, text=True)

    back = witclip("rollback")
    assert back.returncode == 0, back.stderr
    assert "version 4 -> version 1" in back.stdout and holder(client, "champion") == "1"
    promote = witclip("promote", "2")
    assert promote.returncode == 0 and holder(client, "champion") == "2"
    back = witclip("rollback")
    assert back.returncode == 0 and holder(client, "champion") == "1"
    nothing = witclip("rollback")
    assert nothing.returncode == 2 and "no earlier holder" in nothing.stderr
    missing = witclip("promote", "99")
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


def test_registry_lock_lives_beside_sqlite_inside_a_file_store_and_in_the_user_cache_for_a_server(tmp_path,
                                                                                                  monkeypatch):
    tmp = tmp_path.resolve()
    monkeypatch.chdir(tmp)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "cache"))
    assert registry_lock_path(f"sqlite:///{tmp}/s/mlflow.db", "witclip") == tmp / "s/mlflow.db.registry-witclip.lock"
    assert registry_lock_path("sqlite:///mlflow.db", "witclip") == tmp / "mlflow.db.registry-witclip.lock"  # relative
    assert registry_lock_path(f"file://{tmp}/mlruns", "witclip") == tmp / "mlruns" / "registry-witclip.lock"
    assert registry_lock_path("mlruns", "witclip") == tmp / "mlruns" / "registry-witclip.lock"
    assert registry_lock_path(f"sqlite:///{tmp}/mlflow.db", "a/b c") == tmp / "mlflow.db.registry-a_b_c.lock"

    server = registry_lock_path("http://mlflow.internal:5000", "witclip")
    assert server.parent == tmp / "cache" / "witclip" / "locks" and server.name.startswith("registry-witclip-")
    assert registry_lock_path("http://mlflow.internal:5000/", "witclip") == server  # one server, however spelt
    assert registry_lock_path("https://other:5000", "witclip") != server
    assert registry_lock_path("http://mlflow.internal:5000", "witclip-small") != server
    assert registry_lock_path("databricks", "witclip").parent == server.parent
    assert registry_lock_path("sqlite:///:memory:", "witclip").parent == server.parent  # no file to sit beside


def test_registry_lock_waits_for_another_process_then_names_it(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    holder_code = ("import sys; from flows.locks import hold\n"
                   "with hold(sys.argv[1], purpose='test holder'):\n"
                   "    print('held', flush=True); sys.stdin.read()")
    other = subprocess.Popen([sys.executable, "-c", holder_code, str(registry_lock_path(uri, "witclip"))], cwd=REPO,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        started = time.monotonic()
        refused = rf"alias lock of model 'witclip' on {uri} is in use by pid {other.pid}"
        with pytest.raises(LockHeld, match=refused), registry_lock(uri, "witclip", wait_s=0.5):
            pass
        assert time.monotonic() - started >= 0.5
        assert f"waiting up to 0s for pid {other.pid}" in capsys.readouterr().out
    finally:
        other.communicate("")  # closing its stdin ends it, and the kernel drops its lock
    with registry_lock(uri, "witclip", wait_s=0):
        pass


# One pipeline run's register stage, started by a test: imports first (slow), then it says it is ready and
# waits for the go file, so that two of them call register_model at the same moment.
RACER = """
import json, sys, time
from pathlib import Path
import torch  # noqa: F401 - log_clip_model imports it; imported here so that both start level
from flows.registry import register_model
a = json.loads(sys.argv[1])
Path(a["ready"]).touch()
while not Path(a["go"]).exists():
    time.sleep(0.01)
register_model(train_dir=Path(a["model_dir"]), eval_results=a["eval_results"], out_dir=Path(a["out_dir"]),
               run_id=a["run_id"], tracking_uri=a["uri"], model_name="witclip", alias="champion", margin=0.0)
"""


def wait_for(condition, what: str, racers: list, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        for r in racers:
            if r["proc"].poll() is not None:
                pytest.fail(f"a racer exited ({r['proc'].returncode}) while waiting for {what}: "
                            f"{r['log'].read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_two_registers_racing_on_one_store_take_turns_and_keep_the_champion_history_consistent(store):
    client, tmp = store["client"], store["tmp"]
    exp_id = client.get_run(store["run_id"]).info.experiment_id
    racers = []
    for name, score in (("worse", 0.5), ("better", 0.6)):  # margin 0: the worse one promotes only if first
        args = {"model_dir": str(store["model_dir"]), "eval_results": results(colour=score), "uri": store["uri"],
                "out_dir": str(tmp / name), "run_id": client.create_run(exp_id).info.run_id,
                "ready": str(tmp / f"{name}.ready"), "go": str(tmp / "go")}
        racers.append({"name": name, "args": args, "log": tmp / f"{name}.log"})

    # The test holds the registry lock while both register their versions (outside the lock), so both
    # then queue on it and race for it the moment it is released.
    with registry_lock(store["uri"], "witclip"):
        for r in racers:
            with open(r["log"], "w") as log:
                r["proc"] = subprocess.Popen([sys.executable, "-u", "-c", RACER, json.dumps(r["args"])], cwd=REPO,
                                             stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: all(Path(r["args"]["ready"]).exists() for r in racers), "both racers to import", racers)
        Path(tmp / "go").touch()
        wait_for(lambda: all("[registry] waiting" in r["log"].read_text() for r in racers),
                 "both racers to queue on the registry lock", racers)
        versions = client.search_model_versions("name = 'witclip'")
        assert len(versions) == 2 and all("mean_score" in v.tags for v in versions)  # registered before the lock
        assert client.get_registered_model("witclip").aliases == {}  # nothing moved while the lock was held

    for r in racers:
        assert r["proc"].wait(timeout=180) == 0, r["log"].read_text()[-3000:]
        r["decision"] = json.loads((Path(r["args"]["out_dir"]) / "model_version.json").read_text())

    # lock order: the first had no holder to beat, the second compared with whatever the first left
    first, second = sorted((r["decision"] for r in racers), key=lambda d: d["previous_alias_holder"] is not None)
    assert first["previous_alias_holder"] is None and first["promoted"]
    assert str(second["previous_alias_holder"]) == first["version"]  # MLflow gives the holder's as an int
    history = json.loads(client.get_registered_model("witclip").tags[f"{HISTORY_TAG}.champion"])
    assert history == [d["version"] for d in (first, second) if d["promoted"]]  # every promotion, in order, once
    better = next(r["decision"]["version"] for r in racers if r["name"] == "better")
    assert holder(client, "champion") == history[-1] == better  # whichever went first, the better one holds it
    assert holder(client, "candidate") == second["version"]
