"""The parent flow: runs the stage specs (`flows.stages.STAGES`) in order, skipping those whose outputs are
complete for the same inputs.

A stage is complete when `<run_dir>/<stage>/manifest.json` exists (written last, atomically) and its
key matches the key the stage would have now. The key covers exactly what the stage declares it reads of
the config (less where and how it runs), its inputs outside the config, the code version, and for each
upstream stage that stage's key and its outputs' hash -- so a change anywhere upstream reaches every
stage below. Anything else runs: that is what makes "resume a failed run" and "re-run one stage" cheap
and correct.

Keys say nothing about the run name, so a stage that another run under the same work_dir completed with
the same key is adopted (hard links, no copy of the bytes) instead of run again: a nightly scheduled run
with a fresh run name re-evaluates without re-training when only the eval settings changed.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prefect import flow

from data.common.files import atomic_write_json
from data.common.manifest import (
    hash_outputs,
    read_manifest,
    stable_hash,
    write_manifest,
)
from flows import tracking
from flows.config import PipelineConfig
from flows.errors import UserError
from flows.retries import mlflow_call
from flows.stages import STAGE_NAMES, STAGES, StageContext, StageSpec, get_stage

CODE_VERSION = "0.1.0"
ATTEMPT_FILE = ".attempt.json"  # key of an unfinished attempt: same key → resume its partial output


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped" (complete in this run) | "reused" (adopted from another run)
    seconds: float
    counts: dict[str, Any] = field(default_factory=dict)


def embedded_web_in_use(cfg: PipelineConfig) -> bool:
    """Whether harvest starts from the embedded synthetic web (no seed URL of the user's)."""
    return cfg.web.enabled and cfg.harvest.source == "web" and cfg.harvest.seed_url is None


class EmbeddedWeb:
    """Starts the synthetic web on first use; prefers the port the harvested URLs point at."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.server = None

    def seed_url(self, preferred: str | None = None) -> str:
        if self.server is None:
            from data.synthetic import SyntheticWeb

            spec = self.cfg.web.site_spec()
            port = urlparse(preferred).port if preferred else 0
            try:
                self.server = SyntheticWeb(spec, port=port or 0)
                self.server.start()
            except OSError:  # the old port is taken: any free one will do, harvest runs again
                self.server = SyntheticWeb(spec, port=0)
                self.server.start()
            print(f"embedded synthetic web serving at {self.server.url}")
        return self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def outputs_hash(stage_dir: Path) -> str | None:
    m = read_manifest(stage_dir)
    return m.get("outputs_hash") if m and m.get("status") == "complete" else None


def stage_key(cfg: PipelineConfig, stage: str) -> str:
    """sha256 of what the stage reads of the config, its extra inputs, the code version and, per upstream
    stage, that stage's key and the hash of its complete outputs (None while it has none)."""
    spec = get_stage(stage)
    upstream = {up: {"key": stage_key(cfg, up), "outputs": outputs_hash(cfg.stage_dir(up))} for up in spec.upstream}
    return stable_hash({"stage": stage, "config": spec.config_slice(cfg), "upstream": upstream, "code": CODE_VERSION})


def is_complete(cfg: PipelineConfig, stage: str) -> bool:
    m = read_manifest(cfg.stage_dir(stage))
    return bool(m and m.get("status") == "complete" and m.get("key") == stage_key(cfg, stage))


def find_reusable(cfg: PipelineConfig, stage: str) -> Path | None:
    """A complete output of `stage` with the key it would have here, left by another run in work_dir."""
    key = stage_key(cfg, stage)
    own = cfg.stage_dir(stage).resolve()
    for manifest_path in sorted(cfg.work_dir.glob(f"*/{stage}/manifest.json")):
        other = manifest_path.parent
        if other.resolve() == own:
            continue
        m = read_manifest(other)
        if m and m.get("status") == "complete" and m.get("key") == key:
            return other
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:  # complete stage outputs are never modified in place, so sharing the inode is safe
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def adopt_stage(cfg: PipelineConfig, stage: str, source: Path) -> dict:
    """Make `source` this run's output of `stage`: hard-linked into a scratch dir, renamed into place."""
    target = cfg.stage_dir(stage)
    scratch = target.with_name(f".{stage}.adopting")
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(source, scratch, copy_function=_link_or_copy)
    (scratch / ATTEMPT_FILE).unlink(missing_ok=True)
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
    manifest = dict(read_manifest(target) or {})
    manifest["reused_from"] = str(source.resolve())
    write_manifest(target, manifest)  # a new file replaces the shared link; the source stays as it was
    return manifest


def select_stages(stages: str | None, from_stage: str | None) -> list[str] | None:
    """The stages `--stages a,b` or `--from STAGE` ask for (None: the whole pipeline)."""
    if stages and from_stage:
        raise UserError("give --stages or --from, not both")
    if from_stage:
        if from_stage not in STAGE_NAMES:
            raise UserError(f"--from {from_stage!r}: expected one of {', '.join(STAGE_NAMES)}")
        return list(STAGE_NAMES[STAGE_NAMES.index(from_stage):])
    if stages:
        return [s.strip() for s in stages.split(",") if s.strip()]
    return None


def preflight(cfg: PipelineConfig, selected: list[str] | None) -> None:
    """User mistakes end here, in one line, before any stage starts."""
    if selected is not None:
        unknown = [s for s in selected if s not in STAGE_NAMES]
        if unknown:
            raise UserError(f"unknown stage '{unknown[0]}'; expected some of: {', '.join(STAGE_NAMES)}")
        for stage in selected:
            for up in get_stage(stage).upstream:
                if up not in selected and outputs_hash(cfg.stage_dir(up)) is None:
                    raise UserError(
                        f"stage '{stage}' needs the output of '{up}', which is not complete in "
                        f"{cfg.stage_dir(up)}; add '{up}' to --stages or run the whole pipeline"
                    )
    for spec in STAGES:
        if spec.preflight is not None and (selected is None or spec.name in selected):
            spec.preflight(spec.view(cfg), is_complete(cfg, spec.name))
    tracking.check_tracking_uri(cfg.mlflow.tracking_uri)


_FLOWS: dict[str, Any] = {}


def stage_flow(spec: StageSpec) -> Any:
    """The stage as a Prefect flow named after it: a thin call of its run function on its view of the config."""
    if spec.name not in _FLOWS:

        def run_stage(cfg: PipelineConfig, mlflow_run_id: str, tracking_uri: str, seed_url: str | None) -> dict:
            ctx = StageContext(stage=spec.name, cfg=spec.view(cfg), work_dir=cfg.work_dir,
                               out_dir=cfg.stage_dir(spec.name),
                               upstream_dirs={up: cfg.stage_dir(up) for up in spec.upstream},
                               mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri, seed_url=seed_url)
            return spec.run(ctx)

        _FLOWS[spec.name] = flow(name=spec.name, log_prints=True)(run_stage)
    return _FLOWS[spec.name]


def _prepare_dir(stage_dir: Path, key: str, force: bool) -> None:
    """Keep a crashed attempt's partial output only when it was made for the same key (resume)."""
    attempt_path = stage_dir / ATTEMPT_FILE
    attempt = read_manifest(stage_dir, name=ATTEMPT_FILE)
    if stage_dir.exists() and (force or not attempt or attempt.get("key") != key):
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "manifest.json").unlink(missing_ok=True)
    atomic_write_json(attempt_path, {"key": key, "status": "running"})


def execute_stage(
    cfg: PipelineConfig, stage: str, web: EmbeddedWeb, run_id: str, tracking_uri: str, force: bool
) -> StageOutcome:
    spec = get_stage(stage)
    stage_dir = cfg.stage_dir(stage)
    key = stage_key(cfg, stage)
    existing = read_manifest(stage_dir)
    if not force and existing and existing.get("status") == "complete" and existing.get("key") == key:
        print(f"[{stage}] complete, skipped")
        return StageOutcome(stage, "skipped", 0.0, existing.get("counts", {}))
    if not force and (source := find_reusable(cfg, stage)) is not None:
        manifest = adopt_stage(cfg, stage, source)
        print(f"[{stage}] reused from {source} (same inputs, config and code)")
        _stage_run(tracking_uri, run_id, stage, "reused", manifest, stage_dir / "manifest.json")
        return StageOutcome(stage, "reused", 0.0, manifest.get("counts", {}))
    _prepare_dir(stage_dir, key, force)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    starts_from_web = spec is _web_start_stage() and embedded_web_in_use(cfg)
    seed_url = web.seed_url() if starts_from_web else None
    try:
        counts = stage_flow(spec)(cfg, run_id, tracking_uri, seed_url)
    except Exception:
        try:  # recording the failure must not hide it
            _stage_run(tracking_uri, run_id, stage, "failed", {"key": key, "config": spec.config_slice(cfg)})
        except Exception as log_error:  # noqa: BLE001
            print(f"[{stage}] could not record the failure in MLflow: {log_error}")
        raise
    seconds = time.perf_counter() - t0
    outputs = hash_outputs(stage_dir, exclude=("manifest.json", ATTEMPT_FILE))
    manifest = {
        "stage": stage,
        "status": "complete",
        "key": key,
        "code_version": CODE_VERSION,
        "config": spec.config_slice(cfg),
        "inputs": {up: outputs_hash(cfg.stage_dir(up)) for up in spec.upstream},
        "outputs": outputs,
        "outputs_hash": stable_hash(outputs),
        "counts": counts,
        "seconds": round(seconds, 2),
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "mlflow_run_id": run_id,
    }
    path = write_manifest(stage_dir, manifest)
    (stage_dir / ATTEMPT_FILE).unlink(missing_ok=True)
    mlflow_call(tracking.log_stage, tracking_uri, run_id, stage, path, counts)
    if spec.mlflow_artifacts:
        mlflow_call(tracking.log_artifacts, tracking_uri, run_id, [stage_dir / f for f in spec.mlflow_artifacts], stage)
    _stage_run(tracking_uri, run_id, stage, "ran", manifest, path)
    _stage_artifacts(stage, counts, seconds, run_id, tracking_uri, stage_dir)
    print(f"[{stage}] done in {seconds:.1f}s")
    return StageOutcome(stage, "ran", seconds, counts)


def _stage_run(tracking_uri: str, parent_run_id: str, stage: str, status: str, manifest: dict,
               manifest_path: Path | None = None) -> None:
    """A nested MLflow run per stage the pipeline run did something about: its key, config slice, figures."""
    mlflow_call(tracking.log_stage_run, tracking_uri, parent_run_id, stage, status, manifest, manifest_path)


def _stage_artifacts(stage: str, counts: dict, seconds: float, run_id: str, tracking_uri: str, stage_dir: Path) -> None:
    """Prefect artifacts per stage: its counts as a table, a markdown summary, a link to the MLflow run."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

    key = f"witclip-{stage}"
    flat = {k: v for k, v in counts.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    create_table_artifact(key=f"{key}-counts", table=[{"figure": k, "value": v} for k, v in flat.items()],
                          description=f"{stage}: counts from {stage_dir / 'manifest.json'}")
    lines = [f"# {stage}", "", f"Ran in {seconds:.1f} s; outputs in `{stage_dir}`.", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in flat.items()]
    create_markdown_artifact(key=f"{key}-summary", markdown="\n".join(lines))
    if tracking_uri.startswith(("http://", "https://")):
        create_link_artifact(key=f"{key}-mlflow", link=f"{tracking_uri.rstrip('/')}/#/runs/{run_id}",
                             link_text=f"MLflow run {run_id}")
    else:  # a local store has no web address until `mlflow ui` serves it
        create_markdown_artifact(key=f"{key}-mlflow", markdown=f"MLflow run `{run_id}` in `{tracking_uri}`")


def _will_run(cfg: PipelineConfig, stage: str, force: bool) -> bool:
    """Not complete here, and not adoptable from another run."""
    return not is_complete(cfg, stage) and (force or find_reusable(cfg, stage) is None)


def _web_start_stage() -> StageSpec:
    """The stage that starts from the embedded web's index page (harvest); later stages that use the web
    request the URLs it found there."""
    return next(spec for spec in STAGES if spec.uses_embedded_web)


@flow(name="witclip-pipeline", flow_run_name="{cfg.run_name}", log_prints=True)
def pipeline_flow(cfg: PipelineConfig, selected: list[str] | None, force: bool, run_id: str) -> list[dict]:
    tracking_uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    web = EmbeddedWeb(cfg)
    start = _web_start_stage()
    outcomes: list[StageOutcome] = []
    try:
        for spec in STAGES:
            if selected is not None and spec.name not in selected:
                continue
            stage_force = force or selected is not None
            if (spec.uses_embedded_web and spec is not start and embedded_web_in_use(cfg)
                    and _will_run(cfg, spec.name, stage_force)):
                # the URLs found there name the port the web had then; serve it there again if we can
                found_at = (read_manifest(cfg.stage_dir(start.name)) or {}).get("counts", {}).get("seed_url")
                if web.seed_url(preferred=found_at) != found_at:
                    print(f"[{spec.name}] the embedded web could not get its old port back: {start.name} runs again")
                    outcomes.append(execute_stage(cfg, start.name, web, run_id, tracking_uri, force=True))
            outcomes.append(execute_stage(cfg, spec.name, web, run_id, tracking_uri, stage_force))
    finally:
        web.stop()
    return [o.__dict__ for o in outcomes]


def run_pipeline(cfg: PipelineConfig, selected: list[str] | None = None, force: bool = False,
                 verbose: bool = True) -> dict:
    """Validate, open (or reuse) the MLflow run, run the parent flow; returns outcomes, run id and the
    run's log file. With verbose=False the console shows only witclip's lines (flows.console)."""
    from flows.console import RunLog

    preflight(cfg, selected)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    with RunLog(cfg.run_dir, verbose=verbose) as log:
        print(f"pipeline run {cfg.run_name} in {cfg.run_dir}; the engines' messages go to {log.path}")
        flat = tracking.flatten_params(cfg.model_dump(mode="json"))
        run_id = tracking.get_or_create_run(uri, cfg.mlflow.experiment, cfg.run_name,
                                            stable_hash(cfg.model_dump(mode="json")), flat)
        outcomes = pipeline_flow(cfg, selected, force, run_id)
    return {"outcomes": outcomes, "run_id": run_id, "tracking_uri": uri, "log": str(log.path)}


def scheduled_run_name(base: str, scheduled_at: datetime) -> str:
    """Each scheduled run gets its own run name (and MLflow run): <run_name>-<UTC scheduled time>."""
    return f"{base}-{scheduled_at.astimezone(timezone.utc):%Y%m%d-%H%M%S}"


@flow(name="witclip-scheduled", log_prints=True)
def scheduled_pipeline(config: str | None = None, overrides: list[str] | None = None) -> list[dict]:
    """What `witclip serve` and infra/prefect.yaml deploy. The config file is read when the run starts,
    so an edit between runs (say, a benchmark added to eval.benchmarks) is picked up; stages whose
    inputs did not change are reused from earlier runs under the same work_dir."""
    from prefect.runtime import flow_run

    from flows.config import load_config

    cfg = load_config(config, overrides or [])
    cfg = cfg.model_copy(update={"run_name": scheduled_run_name(cfg.run_name, flow_run.scheduled_start_time)})
    result = run_pipeline(cfg)  # a worker's console is a log already: nothing is filtered there
    return [{"stage": o["stage"], "status": o["status"]} for o in result["outcomes"]]
