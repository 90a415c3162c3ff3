"""The pipeline against real services started by infra/local: `mlflow server`, `prefect server start`
and a Dask scheduler with 2 worker processes, all on 127.0.0.1, stopped afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from flows.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "infra" / "local" / "server.sh"
DASK = REPO / "infra" / "local" / "dask-cluster.sh"
TINY = ["web.n_pages=10", "web.images_per_page=10", "crawl.timeout=0.75", "web.slow_seconds=1.5",
        "shard.samples_per_shard=40", "train.epochs=1", "train.batch_size=16", "train.vocab_size=400",
        "train.warmup_steps=2", "train.log_every=2", "train.eval_every=0", "eval.samples_per_class=4"]


def _sh(*args: str) -> str:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(a) for a in args], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_pipeline_runs_against_real_mlflow_prefect_and_dask_servers(tmp_path):
    state = tmp_path / "services"
    started = []
    try:
        mlflow_url = _sh(SERVER, "start", "mlflow", state, "0")
        started.append("mlflow")
        prefect_url = _sh(SERVER, "start", "prefect", state, "0")
        started.append("prefect")
        dask_address = _sh(DASK, "start", state / "dask", "2", "0")
        started.append("dask")
        assert mlflow_url.startswith("http://127.0.0.1:") and prefect_url.startswith("http://127.0.0.1:")

        overrides = TINY + [f"work_dir={tmp_path / 'runs'}", f"mlflow.tracking_uri={mlflow_url}",
                            f"crawl.scheduler_address={dask_address}"]
        load_config(REPO / "configs" / "local-services.yaml", overrides)  # the shipped file parses
        cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(REPO / "configs" / "local-services.yaml"),
               *[a for o in overrides for a in ("--set", o)]]
        env = {**os.environ, "PREFECT_API_URL": f"{prefect_url}/api"}
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_url)
        champion = client.get_model_version_by_alias("witclip", "champion")
        assert champion.tags["pipeline_run_name"] == "local-services"
        runs = client.search_runs([client.get_experiment_by_name("witclip").experiment_id])
        assert any(len(client.get_metric_history(r.info.run_id, "train/loss")) > 0 for r in runs)

        request = urllib.request.Request(f"{prefect_url}/api/flow_runs/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            flow_runs = json.loads(r.read())
        assert len(flow_runs) >= 8 and all(fr["state_type"] == "COMPLETED" for fr in flow_runs)  # parent + 7 stages
    finally:
        for kind in reversed(started):
            if kind == "dask":
                _sh(DASK, "stop", state / "dask")
            else:
                _sh(SERVER, "stop", kind, state)
    for kind in ("mlflow", "prefect"):
        health = subprocess.run([str(SERVER), "health", kind, str(state)], cwd=REPO, capture_output=True)
        assert health.returncode != 0  # stopped
