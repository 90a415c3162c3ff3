"""The pipeline against real services started by infra/local: `mlflow server`, `prefect server start`
and a Dask scheduler with 2 worker processes, all on 127.0.0.1, stopped afterwards.

One test, in two phases that share the servers' state (starting servers and running the pipeline are
the slow parts): first without authentication -- run the pipeline, see its runs in both web UIs through
headless Chromium; then the same servers restarted with authentication on -- an unauthenticated client is
refused, `prefect deploy` takes infra/prefect.yaml, and `witclip serve`, with credentials from the
environment, starts scheduled runs: the first re-evaluates on one benchmark more and registers through
the authenticated servers, reusing harvest..train; the second reuses every stage."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from data.common.manifest import read_manifest
from flows.config import load_config
from flows.stages import STAGE_NAMES as STAGES

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "infra" / "local" / "server.sh"
DASK = REPO / "infra" / "local" / "dask-cluster.sh"
ARTIFACTS = Path(os.environ.get("WITCLIP_TEST_ARTIFACTS", REPO / "test-artifacts"))  # screenshots are kept here
TINY = ["web.n_pages=10", "web.images_per_page=10", "crawl.timeout=0.75", "web.slow_seconds=1.5",
        "shard.samples_per_shard=40", "train.epochs=1", "train.batch_size=16", "train.vocab_size=400",
        "train.warmup_steps=2", "train.log_every=2", "train.eval_every=0", "eval.samples_per_class=4"]
USER, PASSWORD = "witclip-ci", "pw-" + os.urandom(6).hex()
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD,
               "PREFECT_API_AUTH_STRING": f"{USER}:{PASSWORD}"}
FAST_SCHEDULER = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "3", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def _sh(*args, env: dict | None = None) -> str:
    env = {**os.environ, "PYTHON": sys.executable, **FAST_SCHEDULER, **(env or {})}
    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def _prefect_api(url: str, path: str, body: dict, auth: str | None = None):
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(f"{url}/api/{path}", data=json.dumps(body).encode(), method="POST", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _witclip(args: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env={**os.environ, **env},
                         capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def _parent_run(client, run_name: str):
    """The pipeline run's MLflow run (its nested stage runs carry the same run-name tag)."""
    experiment = client.get_experiment_by_name("witclip").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`witclip.run_name` = '{run_name}'")
    return next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)


def _check_uis(mlflow_url: str, prefect_url: str, run_name: str) -> None:
    """Headless Chromium opens each UI on loopback and finds the pipeline's run by name."""
    from mlflow.tracking import MlflowClient
    from support.browser import ensure_chromium, wait_for_text  # tests/ is on sys.path

    ensure_chromium()
    client = MlflowClient(tracking_uri=mlflow_url)
    parent = _parent_run(client, run_name)
    experiment = parent.info.experiment_id
    shots = ARTIFACTS / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    dom = wait_for_text(f"{mlflow_url}/#/experiments/{experiment}/runs", run_name, shots / "mlflow-runs.png")
    assert "Training runs" in dom
    runs = _prefect_api(prefect_url, "flow_runs/filter", {"flow_runs": {"name": {"any_": [run_name]}}})
    assert [r["state_type"] for r in runs] == ["COMPLETED"]  # the parent flow run is named after the pipeline run
    dom = wait_for_text(f"{prefect_url}/runs/flow-run/{runs[0]['id']}", "[register] done", shots / "prefect-run.png")
    assert run_name in dom and "witclip-pipeline" in dom
    for png in ("mlflow-runs", "prefect-run"):
        assert (shots / f"{png}.png").stat().st_size > 10_000  # a drawn page, not a blank one


def _deployments(prefect_url: str) -> dict[str, dict]:
    return {d["name"]: d for d in _prefect_api(prefect_url, "deployments/filter", {},
                                                auth=CREDENTIALS["PREFECT_API_AUTH_STRING"])}


def _wait_for_scheduled_runs(prefect_url: str, deployment_id: str, n: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = _prefect_api(prefect_url, "flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}},
                            auth=CREDENTIALS["PREFECT_API_AUTH_STRING"])
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        failed = [r for r in runs if r["state_type"] in ("FAILED", "CRASHED")]
        assert not failed, f"scheduled run {failed[0]['name']} ended {failed[0]['state_type']}"
        if len(done) >= n:
            return done
        assert time.monotonic() < deadline, f"{len(done)} of {n} scheduled runs completed in {timeout:.0f} s"
        time.sleep(2)


def test_pipeline_on_real_servers_ui_auth_and_schedule(tmp_path, monkeypatch):
    for var in CREDENTIALS:  # this process is the unauthenticated client; subprocesses get credentials
        monkeypatch.delenv(var, raising=False)
    state = tmp_path / "services"
    started: list[str] = []
    serve = None
    try:
        # -- phase 1: no authentication ------------------------------------------------------------
        mlflow_url = _sh(SERVER, "start", "mlflow", state, "0")
        started.append("mlflow")
        prefect_url = _sh(SERVER, "start", "prefect", state, "0")
        started.append("prefect")
        dask_address = _sh(DASK, "start", state / "dask", "2", "0")
        started.append("dask")
        assert mlflow_url.startswith("http://127.0.0.1:") and prefect_url.startswith("http://127.0.0.1:")

        overrides = TINY + [f"work_dir={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_url}",
                            f"cluster.scheduler_address={dask_address}"]
        config = str(REPO / "configs" / "local-services.yaml")
        load_config(config, overrides)  # the shipped file parses
        sets = [a for o in overrides for a in ("--set", o)]
        # INFO: the stage logs go to the Prefect server too, where its UI shows them
        _witclip(["run", "--config", config, *sets], tmp_path,
                 {"PREFECT_API_URL": f"{prefect_url}/api", "PREFECT_LOGGING_LEVEL": "INFO"})

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_url)
        champion = client.get_model_version_by_alias("witclip", "champion")
        assert champion.tags["pipeline_run_name"] == "local-services"
        flow_runs = _prefect_api(prefect_url, "flow_runs/filter", {})
        assert len(flow_runs) >= 8 and all(fr["state_type"] == "COMPLETED" for fr in flow_runs)  # parent + 7 stages
        _check_uis(mlflow_url, prefect_url, "local-services")

        # -- phase 2: the same servers and stores, authentication switched on ------------------------
        _sh(SERVER, "stop", "mlflow", state)
        _sh(SERVER, "stop", "prefect", state)
        auth_env = {"WITCLIP_SERVICES_AUTH": "1", **CREDENTIALS}
        port = mlflow_url.rsplit(":", 1)[1]
        assert _sh(SERVER, "start", "mlflow", state, port, env=auth_env) == mlflow_url
        assert _sh(SERVER, "start", "prefect", state, prefect_url.rsplit(":", 1)[1], env=auth_env) == prefect_url
        import mlflow

        with pytest.raises(mlflow.exceptions.MlflowException, match="401|Unauthorized|credentials"):
            MlflowClient(tracking_uri=mlflow_url).search_experiments()
        with pytest.raises(urllib.error.HTTPError, match="401"):
            _prefect_api(prefect_url, "flow_runs/filter", {})

        env = {"PREFECT_API_URL": f"{prefect_url}/api", **CREDENTIALS}
        # `prefect deploy` takes infra/prefect.yaml (a process work pool runs it; not started here)
        prefect_cli = Path(sys.executable).parent / "prefect"
        for args in (["work-pool", "create", "witclip-process", "--type", "process"],
                     ["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--all"]):
            subprocess.run([prefect_cli, *args], cwd=REPO, env={**os.environ, **env}, check=True, capture_output=True,
                           timeout=120)
        deployments = _deployments(prefect_url)
        assert deployments["nightly"]["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert deployments["nightly-eval"]["entrypoint"] == "flows/pipeline.py:scheduled_pipeline"

        # `witclip serve` on a short interval, with credentials from the environment and one benchmark more
        # than the first run: the first scheduled run re-uses harvest..train and runs eval and register
        # through the authenticated servers; the next reuses everything
        nightly = sets + ["--set", "eval.benchmarks=[colour,shape,count,cifar10]"]
        serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--interval", "15", "--config", config, *nightly],
                                 cwd=tmp_path, env={**os.environ, **env, **FAST_SCHEDULER}, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 90
        while "scheduled" not in deployments and time.monotonic() < deadline:
            time.sleep(1)
            deployments = _deployments(prefect_url)
        assert "scheduled" in deployments, "witclip serve did not register its deployment"
        _wait_for_scheduled_runs(prefect_url, deployments["scheduled"]["id"], 2, timeout=360)
        os.killpg(serve.pid, signal.SIGTERM)
        serve_log = serve.communicate(timeout=60)[0]
        assert PASSWORD not in serve_log

        for var, value in CREDENTIALS.items():
            monkeypatch.setenv(var, value)
        client = MlflowClient(tracking_uri=mlflow_url)
        names = sorted(m.parent.parent.name for m in (tmp_path / "runs").glob("local-services-*/register/manifest.json"))
        assert len(names) >= 2 and all(re.fullmatch(r"local-services-\d{8}-\d{6}", n) for n in names), names
        expected = {names[0]: ["reused"] * 5 + ["ran", "ran"], names[1]: ["reused"] * 7}
        for name, statuses in expected.items():
            for stage, status in zip(STAGES, statuses):
                reused_from = read_manifest(tmp_path / "runs" / name / stage).get("reused_from", "")
                assert (status == "reused") == bool(reused_from), (name, stage)
            run = _parent_run(client, name)
            children = client.search_runs([run.info.experiment_id],
                                          filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
            assert [c.data.tags["witclip.stage_status"] for c in sorted(children, key=lambda c: STAGES.index(
                c.data.tags["witclip.stage"]))] == statuses, name
            assert not any(PASSWORD in str(v) for v in [*run.data.params.values(), *run.data.tags.values()])
        version = client.get_model_version_by_alias("witclip", "candidate")
        assert version.version == "2" and version.tags["pipeline_run_name"] == names[0]  # registered with credentials
        evaluated = read_manifest(tmp_path / "runs" / names[0] / "eval")["counts"]
        assert evaluated["tasks_total"] == 4 and evaluated["tasks_ran"] == 3  # cifar10 has no data here
        assert len(client.search_model_versions("name = 'witclip'")) == 2  # the second run registered nothing
    finally:
        if serve is not None and serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=30)
        for kind in reversed(started):
            if kind == "dask":
                _sh(DASK, "stop", state / "dask")
            else:
                _sh(SERVER, "stop", kind, state)
    for kind in ("mlflow", "prefect"):
        health = subprocess.run([str(SERVER), "health", kind, str(state)], cwd=REPO, capture_output=True)
        assert health.returncode != 0  # stopped
