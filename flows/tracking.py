"""MLflow tracking: where the store is (resolved in one place), the pipeline's run and its nested stage
runs, metrics and artifacts. mlflow is imported inside the functions, so that reading the config (which
takes `DEFAULT_TRACKING_URI` from here) stays light.

MLflow's active run is thread-local and Prefect may run code in other threads, so everything here takes
the run id explicitly and talks to the store through `MlflowClient`.

Param values go through `param_value`: URLs in them (harvest.seed_url, harvest.urls, ...) are shown with
credentials and secret query parameters redacted (`data.common.urls.redact_urls`), and cut to MLflow's
6000 characters.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow's own local default, in the working directory


def tracking_uri(explicit: str | None = None) -> str:
    """The MLflow store a command uses: `explicit` (a --tracking-uri flag or the config's
    mlflow.tracking_uri), else $MLFLOW_TRACKING_URI, else DEFAULT_TRACKING_URI; a relative sqlite path is
    made absolute so that subprocesses (torchrun ranks) see the same store."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def sqlite_db_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (its query string dropped); None for any other store and
    for an in-memory database."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    db = uri[len(prefix):].split("?", 1)[0]
    return Path(db) if db and db != ":memory:" else None


def param_value(value: Any) -> str:
    """How a config value is logged as an MLflow param: text, URLs redacted, at most 6000 characters."""
    from data.common.urls import redact_urls

    return redact_urls(str(value))[:6000]


def tracking_client(uri: str) -> Any:
    """An MlflowClient on ``uri``. Constructing one opens the store, and on a sqlite file that creates and
    migrates the schema: done under the store's setup lock, so two processes starting at once on a fresh
    store do not both run CREATE TABLE."""
    from mlflow.tracking import MlflowClient

    with _setup_lock(uri):
        return MlflowClient(tracking_uri=uri)


def check_tracking_uri(uri: str) -> None:
    """Fail fast, with one line, if the tracking store cannot be reached."""
    from flows.errors import UserError

    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            raise UserError(f"MLflow tracking server {uri} is unreachable ({e}); expected a running `mlflow server`")
    elif (db := sqlite_db_path(uri)) is not None:
        parent = db.parent
        if not parent.is_dir():
            raise UserError(f"mlflow.tracking_uri {uri}: directory {parent} does not exist")


def _setup_lock(uri: str) -> Any:
    """Held while a run first touches a sqlite store: MLflow creates and migrates the schema of a new
    database on first use, and two runs starting at once on a fresh store would both try (and one fail on
    "table already exists"); the same for creating the experiment."""
    db = sqlite_db_path(uri)
    if db is None:
        return contextlib.nullcontext()
    from flows.locks import hold

    return hold(db.with_name(f"{db.name}.setup.lock"), purpose=f"setting up the MLflow store {uri}", wait_s=300)


def _experiment_id(client: Any, experiment: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(experiment)
    except MlflowException:  # another process created it since: use theirs
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise
        return exp.experiment_id


def get_or_create_run(tracking_uri: str, experiment: str, run_name: str, config_hash: str, params: dict) -> str:
    """One MLflow run per (pipeline run name, config): re-invocations with the same config reuse it."""
    from mlflow.entities import Param

    client = tracking_client(tracking_uri)
    with _setup_lock(tracking_uri):
        exp_id = _experiment_id(client, experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`witclip.run_name` = '{run_name}' and tags.`witclip.config_hash` = '{config_hash}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, run_name=run_name, tags={"witclip.run_name": run_name, "witclip.config_hash": config_hash}
    )
    items = [Param(k, param_value(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps params per batch call
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_stage(tracking_uri: str, run_id: str, stage: str, manifest_path: Path, counts: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    client = tracking_client(tracking_uri)
    now = int(time.time() * 1000)
    numbers = dict(counts)
    for reason, n in (counts.get("reasons") or {}).items():  # crawl: one metric per status reason
        numbers[f"reasons.{reason}"] = n
    metrics = [
        Metric(f"{stage}/{k}", float(v), now, 0)
        for k, v in numbers.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    from data.common.urls import redact_urls

    # the run's copy: a seed URL or URL list with a token in it stays on this machine
    client.log_text(run_id, redact_urls(manifest_path.read_text()), f"manifests/{stage}/{manifest_path.name}")


RESOLVED_PARAMS = ("precision", "precision_reason")  # string figures of a stage logged as params


def log_stage_run(tracking_uri: str, parent_run_id: str, stage: str, status: str, manifest: dict[str, Any],
                  manifest_path: Path | None = None) -> str:
    """A nested run for one stage of the pipeline run: the stage's config slice as params, its key,
    status and provenance as tags, its figures as metrics, its manifest as an artifact."""
    from mlflow.entities import Metric, Param

    client = tracking_client(tracking_uri)
    parent = client.get_run(parent_run_id)
    tags = {"mlflow.parentRunId": parent_run_id, "witclip.stage": stage, "witclip.stage_status": status,
            "witclip.run_name": parent.data.tags.get("witclip.run_name", ""), "witclip.stage_key": manifest.get("key", "")}
    if manifest.get("reused_from"):
        tags["witclip.reused_from"] = manifest["reused_from"]
    child = client.create_run(parent.info.experiment_id, run_name=f"{parent.info.run_name}/{stage}", tags=tags)
    run_id = child.info.run_id
    flat = flatten_params(manifest.get("config", {}))
    # what the stage resolved from its config at run time (e.g. precision: auto -> bf16 on this machine)
    flat.update({f"resolved.{k}": v for k, v in manifest.get("counts", {}).items() if k in RESOLVED_PARAMS})
    params = [Param(k, param_value(v)) for k, v in flat.items()]
    now = int(time.time() * 1000)
    numbers = {**manifest.get("counts", {}), "seconds": manifest.get("seconds", 0.0) if status == "ran" else 0.0}
    metrics = [Metric(k, float(v), now, 0) for k, v in numbers.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    for i in range(0, max(len(params), len(metrics)), 100):  # MLflow caps items per batch call
        client.log_batch(run_id, params=params[i : i + 100], metrics=metrics[i : i + 100])
    if manifest_path is not None:  # none for a failed stage: it wrote no manifest
        from data.common.urls import redact_urls

        # the run's copy: a seed URL or URL list with a token in it stays on this machine
        client.log_text(run_id, redact_urls(manifest_path.read_text()), manifest_path.name)
    client.set_terminated(run_id, "FAILED" if status == "failed" else "FINISHED")
    return run_id


def flatten_params(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: nested config as MLflow param names."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten_params(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def log_artifacts(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str) -> None:
    client = tracking_client(tracking_uri)
    for p in paths:
        if p.exists():
            client.log_artifact(run_id, str(p), artifact_path=artifact_path)


