"""The parent flow: runs the stage specs (`flows.stages.STAGES`) in order, skipping those whose outputs are
complete for the same inputs.

A stage is complete when `<run_dir>/<stage>/manifest.json` exists (written last, atomically), its key
matches the key the stage would have now, and every output it lists is still as written (size and mtime;
sha256 too with `verify`). The key covers exactly what the stage declares it reads of the config (less
where and how it runs), its inputs outside the config, its code (`flows.code_version`: the sources of
the modules it uses and its engines' versions), and for each upstream stage that stage's key and its
outputs' hash -- so a change anywhere upstream reaches every stage below, and an edit to one stage's code
re-runs it and what follows, nothing above. Anything else runs: that is what makes "resume a failed run"
and "re-run one stage" cheap and correct.

Keys say nothing about the run name, so a stage that another run under the same work_dir completed with
the same key is adopted (hard links, no copy of the bytes) instead of run again: a nightly scheduled run
with a fresh run name re-evaluates without re-training when only the eval settings changed. Complete
outputs are made read-only, and the CLI refuses to write reports into a stage directory, so a file shared
by two runs cannot change under either; a changed file fails the check above and its stage runs again.

One process writes a run directory (`flows.locks.run_lock`, held for the whole run). Different runs may
share a work_dir at the same time: shared caches are written under unique temp names and renamed.
A stage whose output its spec rejects (`accept`: a crawl during an outage) fails, is marked rejected,
and runs afresh next time -- neither resumed nor adopted.
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
    ATTEMPT_NAME,
    hash_outputs,
    output_stats,
    read_manifest,
    stable_hash,
    verify_outputs,
    write_manifest,
)
from flows import tracking
from flows.code_version import code_version, source_fingerprint
from flows.config import PipelineConfig
from flows.errors import RejectedOutput, UserError
from flows.locks import run_lock
from flows.retries import mlflow_call
from flows.stages import STAGE_NAMES, STAGES, StageContext, StageSpec, get_stage


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

    @property
    def netloc(self) -> str | None:
        """host:port of the running web (None when not started)."""
        return urlparse(self.server.url).netloc if self.server is not None else None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def outputs_hash(stage_dir: Path) -> str | None:
    m = read_manifest(stage_dir)
    return m.get("outputs_hash") if m and m.get("status") == "complete" else None


def stage_key(cfg: PipelineConfig, stage: str) -> str:
    """sha256 of what the stage reads of the config, its extra inputs, its code and, per upstream stage,
    that stage's key and the hash of its complete outputs (None while it has none)."""
    spec = get_stage(stage)
    upstream = {up: {"key": stage_key(cfg, up), "outputs": outputs_hash(cfg.stage_dir(up))} for up in spec.upstream}
    return stable_hash({"stage": stage, "config": spec.config_slice(cfg), "upstream": upstream,
                        "code": spec.code_fingerprint()})


def check_complete(stage_dir: Path, key: str | None, deep: bool = False) -> tuple[dict | None, str | None]:
    """(manifest, None): stage_dir holds a complete output (for `key`; any key if None) whose files are as
    written. (None, None): it holds none. (None, why): it did, but a file changed since; `why` names it."""
    m = read_manifest(stage_dir)
    if not m or m.get("status") != "complete" or (key is not None and m.get("key") != key):
        return None, None
    problem = verify_outputs(stage_dir, m, deep=deep)
    return (None, problem) if problem else (m, None)


def is_complete(cfg: PipelineConfig, stage: str, deep: bool = False) -> bool:
    return check_complete(cfg.stage_dir(stage), stage_key(cfg, stage), deep)[0] is not None


def find_reusable(cfg: PipelineConfig, stage: str, deep: bool = False) -> Path | None:
    """A complete output of `stage` with the key it would have here and its files as written, left by
    another run in work_dir."""
    key = stage_key(cfg, stage)
    own = cfg.stage_dir(stage).resolve()
    for manifest_path in sorted(cfg.work_dir.glob(f"*/{stage}/manifest.json")):
        other = manifest_path.parent
        if other.resolve() == own:
            continue
        m, problem = check_complete(other, key, deep)
        if m is not None:
            return other
        if problem:
            print(f"[{stage}] not reusing {other}: {problem}")
    return None


def _link_or_copy(src: str, dst: str) -> None:
    try:  # complete outputs are read-only and never modified in place, so sharing the inode is safe
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a copy with the same size and mtime
        shutil.copy2(src, dst)


def make_read_only(stage_dir: Path, rel_paths: list[str]) -> None:
    """Complete outputs lose their write bits (hard links share them: every run's copy is protected).
    Directories stay writable, so a stage that runs again can still replace its own."""
    for rel in rel_paths:
        path = stage_dir / rel
        path.chmod(path.stat().st_mode & ~0o222)


def adopt_stage(cfg: PipelineConfig, stage: str, source: Path) -> dict | None:
    """Make `source` this run's output of `stage`: hard-linked into a scratch dir, checked against its
    manifest, renamed into place. None (and nothing changed here) when the source changed under us --
    its run may be re-making it right now."""
    target = cfg.stage_dir(stage)
    scratch = target.with_name(f".{stage}.adopting")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        shutil.copytree(source, scratch, copy_function=_link_or_copy, ignore=lambda d, names: [ATTEMPT_NAME])
        manifest = dict(read_manifest(scratch) or {})
        problem = verify_outputs(scratch, manifest) if manifest.get("status") == "complete" else "not complete"
    except OSError as err:
        problem = str(err)
    if problem:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"[{stage}] could not reuse {source} ({problem}): running it")
        return None
    shutil.rmtree(target, ignore_errors=True)
    scratch.rename(target)
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


def preflight(cfg: PipelineConfig, selected: list[str] | None, verify: bool = False) -> None:
    """User mistakes end here, in one line, before any stage starts."""
    if selected is not None:
        unknown = [s for s in selected if s not in STAGE_NAMES]
        if unknown:
            raise UserError(f"unknown stage '{unknown[0]}'; expected some of: {', '.join(STAGE_NAMES)}")
        for stage in selected:
            for up in get_stage(stage).upstream:
                if up in selected:
                    continue
                m, problem = check_complete(cfg.stage_dir(up), None, deep=verify)
                if m is None:
                    state = problem or f"it is not complete in {cfg.stage_dir(up)}"
                    raise UserError(f"stage '{stage}' needs the output of '{up}', but {state}; add '{up}' to "
                                    "--stages or run the whole pipeline")
    for spec in STAGES:
        if spec.preflight is not None and (selected is None or spec.name in selected):
            spec.preflight(spec.view(cfg), is_complete(cfg, spec.name))
    tracking.check_tracking_uri(cfg.mlflow.tracking_uri)


_FLOWS: dict[str, Any] = {}


def stage_flow(spec: StageSpec) -> Any:
    """The stage as a Prefect flow named after it: a thin call of its run function on its view of the config."""
    if spec.name not in _FLOWS:

        def run_stage(cfg: PipelineConfig, mlflow_run_id: str, tracking_uri: str, seed_url: str | None,
                      embedded_web: str | None = None) -> dict:
            ctx = StageContext(stage=spec.name, cfg=spec.view(cfg), work_dir=cfg.work_dir,
                               out_dir=cfg.stage_dir(spec.name),
                               upstream_dirs={up: cfg.stage_dir(up) for up in spec.upstream},
                               mlflow_run_id=mlflow_run_id, tracking_uri=tracking_uri, seed_url=seed_url,
                               embedded_web=embedded_web)
            return spec.run(ctx)

        _FLOWS[spec.name] = flow(name=spec.name, log_prints=True)(run_stage)
    return _FLOWS[spec.name]


def _prepare_dir(stage_dir: Path, key: str, force: bool) -> None:
    """Keep a crashed attempt's partial output only when it was made for the same key and not rejected
    (resume); anything else starts from an empty directory."""
    attempt_path = stage_dir / ATTEMPT_NAME
    attempt = read_manifest(stage_dir, name=ATTEMPT_NAME)
    resumable = bool(attempt and attempt.get("key") == key and attempt.get("status") == "running")
    if stage_dir.exists() and (force or not resumable):
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "manifest.json").unlink(missing_ok=True)
    atomic_write_json(attempt_path, {"key": key, "status": "running"})


def execute_stage(
    cfg: PipelineConfig, stage: str, web: EmbeddedWeb, run_id: str, tracking_uri: str, force: bool,
    verify: bool = False,
) -> StageOutcome:
    spec = get_stage(stage)
    stage_dir = cfg.stage_dir(stage)
    key = stage_key(cfg, stage)
    if not force:
        existing, problem = check_complete(stage_dir, key, deep=verify)
        if existing is not None:
            print(f"[{stage}] complete, skipped")
            return StageOutcome(stage, "skipped", 0.0, existing.get("counts", {}))
        if problem:
            print(f"[{stage}] {problem}: running it again")
        source = find_reusable(cfg, stage, deep=verify)
        if source is not None and (manifest := adopt_stage(cfg, stage, source)) is not None:
            print(f"[{stage}] reused from {source} (same inputs, config and code)")
            _stage_run(tracking_uri, run_id, stage, "reused", manifest, stage_dir / "manifest.json")
            return StageOutcome(stage, "reused", 0.0, manifest.get("counts", {}))
    _prepare_dir(stage_dir, key, force)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    starts_from_web = spec is _web_start_stage() and embedded_web_in_use(cfg)
    seed_url = web.seed_url() if starts_from_web else None
    # started above for harvest, or by pipeline_flow for a later stage that fetches the URLs found there
    embedded_web = web.netloc if spec.uses_embedded_web and embedded_web_in_use(cfg) else None
    try:
        counts = stage_flow(spec)(cfg, run_id, tracking_uri, seed_url, embedded_web)
        rejected = spec.accept(spec.view(cfg), counts) if spec.accept is not None else None
        if rejected:
            # kept on disk to look at, never resumed: the next attempt starts afresh (_prepare_dir)
            atomic_write_json(stage_dir / ATTEMPT_NAME, {"key": key, "status": "rejected", "reason": rejected})
            raise RejectedOutput(f"stage '{stage}' rejected its output: {rejected}; nothing was cached, "
                                 "the next run makes it again")
    except Exception:
        try:  # recording the failure must not hide it
            _stage_run(tracking_uri, run_id, stage, "failed", {"key": key, "config": spec.config_slice(cfg)})
        except Exception as log_error:  # noqa: BLE001
            print(f"[{stage}] could not record the failure in MLflow: {log_error}")
        raise
    seconds = time.perf_counter() - t0
    outputs = hash_outputs(stage_dir, exclude=("manifest.json", ATTEMPT_NAME))
    manifest = {
        "stage": stage,
        "status": "complete",
        "key": key,
        "code": spec.code_fingerprint(),
        "code_version": code_version(),
        "source_fingerprint": source_fingerprint(),
        "config": spec.config_slice(cfg),
        "inputs": {up: outputs_hash(cfg.stage_dir(up)) for up in spec.upstream},
        "outputs": outputs,
        "stats": output_stats(stage_dir, outputs),
        "outputs_hash": stable_hash(outputs),
        "counts": counts,
        "seconds": round(seconds, 2),
        "started_at": started.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "mlflow_run_id": run_id,
    }
    make_read_only(stage_dir, list(outputs))  # before the manifest: a complete output is a protected one
    path = write_manifest(stage_dir, manifest)
    (stage_dir / ATTEMPT_NAME).unlink(missing_ok=True)
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


def _will_run(cfg: PipelineConfig, stage: str, force: bool, verify: bool) -> bool:
    """Not complete here, and not adoptable from another run."""
    return not is_complete(cfg, stage, verify) and (force or find_reusable(cfg, stage, verify) is None)


def _web_start_stage() -> StageSpec:
    """The stage that starts from the embedded web's index page (harvest); later stages that use the web
    request the URLs it found there."""
    return next(spec for spec in STAGES if spec.uses_embedded_web)


@flow(name="witclip-pipeline", flow_run_name="{cfg.run_name}", log_prints=True)
def pipeline_flow(cfg: PipelineConfig, selected: list[str] | None, force: bool, run_id: str,
                  verify: bool = False) -> list[dict]:
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
                    and _will_run(cfg, spec.name, stage_force, verify)):
                # the URLs found there name the port the web had then; serve it there again if we can
                found_at = (read_manifest(cfg.stage_dir(start.name)) or {}).get("counts", {}).get("seed_url")
                if web.seed_url(preferred=found_at) != found_at:
                    print(f"[{spec.name}] the embedded web could not get its old port back: {start.name} runs again")
                    outcomes.append(execute_stage(cfg, start.name, web, run_id, tracking_uri, force=True))
            outcomes.append(execute_stage(cfg, spec.name, web, run_id, tracking_uri, stage_force, verify))
    finally:
        web.stop()
    return [o.__dict__ for o in outcomes]


def run_pipeline(cfg: PipelineConfig, selected: list[str] | None = None, force: bool = False,
                 verbose: bool = True, verify: bool = False) -> dict:
    """Validate, take the run's lock, open (or reuse) the MLflow run, run the parent flow; returns
    outcomes, run id and the run's log file. With verbose=False the console shows only witclip's lines
    (flows.console); with verify=True complete outputs are checked by sha256, not size and mtime only."""
    preflight(cfg, selected, verify)  # before the lock: bad input creates no run directory
    with run_lock(cfg.run_dir, cfg.run_name):
        return _run_locked(cfg, selected, force, verbose, verify)


def _run_locked(cfg: PipelineConfig, selected: list[str] | None, force: bool, verbose: bool, verify: bool) -> dict:
    from flows.console import RunLog

    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    with RunLog(cfg.run_dir, verbose=verbose) as log:
        print(f"pipeline run {cfg.run_name} in {cfg.run_dir}; the engines' messages go to {log.path}")
        flat = tracking.flatten_params(cfg.model_dump(mode="json"))
        run_id = tracking.get_or_create_run(uri, cfg.mlflow.experiment, cfg.run_name,
                                            stable_hash(cfg.model_dump(mode="json")), flat)
        outcomes = pipeline_flow(cfg, selected, force, run_id, verify)
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
