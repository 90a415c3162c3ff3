"""The parent flow: runs the stages in order, skipping those whose outputs are complete for the same inputs.

A stage is complete when `<run_dir>/<stage>/manifest.json` exists (written last, atomically) and its
key — a hash of the stage's config slice, its upstream stages' output hashes and the code version —
matches the key the stage would have now. Anything else runs: that is what makes "resume a failed run"
and "re-run one stage" cheap and correct.

Keys say nothing about the run name, so a stage that another run under the same work_dir completed with
the same key is adopted (hard links, no copy of the bytes) instead of run again: a nightly scheduled run
with a fresh run name re-evaluates without re-training when only the eval settings changed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.error
import urllib.request
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
from flows import registry, stages
from flows.config import STAGES, PipelineConfig, stage_config
from flows.errors import UserError
from flows.retries import mlflow_call

CODE_VERSION = "0.1.0"
UPSTREAM: dict[str, tuple[str, ...]] = {
    "harvest": (),
    "crawl": ("harvest",),
    "dedup": ("crawl",),
    "shard": ("dedup",),
    "train": ("shard",),
    "eval": ("train",),
    "register": ("train", "eval"),
}
ATTEMPT_FILE = ".attempt.json"  # key of an unfinished attempt: same key → resume its partial output


@dataclass
class StageOutcome:
    stage: str
    status: str  # "ran" | "skipped" (complete in this run) | "reused" (adopted from another run)
    seconds: float
    counts: dict[str, Any] = field(default_factory=dict)


class EmbeddedWeb:
    """Starts the synthetic web on first use; prefers the port the harvested URLs point at."""

    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.server = None

    def seed_url(self, preferred: str | None = None) -> str:
        if self.server is None:
            from data.synthetic import SiteSpec, SyntheticWeb

            w = self.cfg.web
            spec = SiteSpec(
                seed=w.seed, n_pages=w.n_pages, images_per_page=w.images_per_page,
                links_per_page=w.links_per_page, image_size=w.image_size, noisy_alt_rate=w.noisy_alt_rate,
                exact_duplicate_rate=w.exact_duplicate_rate, near_duplicate_rate=w.near_duplicate_rate,
                fault_rate=w.fault_rate, slow_seconds=w.slow_seconds,
            )  # fmt: skip
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


def check_seed_url(url: str, timeout: float) -> None:
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout).close()
    except urllib.error.HTTPError as e:
        raise UserError(f"harvest.seed_url {url} answered HTTP {e.code}; expected a reachable HTML page") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"harvest.seed_url {url} is unreachable ({reason}); expected a reachable http(s) URL") from None


def outputs_hash(stage_dir: Path) -> str | None:
    m = read_manifest(stage_dir)
    return m.get("outputs_hash") if m and m.get("status") == "complete" else None


def stage_key(cfg: PipelineConfig, stage: str) -> str:
    inputs = {up: outputs_hash(cfg.stage_dir(up)) for up in UPSTREAM[stage]}
    return stable_hash({"stage": stage, "config": stage_config(cfg, stage), "inputs": inputs, "code": CODE_VERSION})


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


def preflight(cfg: PipelineConfig, selected: list[str] | None) -> None:
    """User mistakes end here, in one line, before any stage starts."""
    if selected is not None:
        unknown = [s for s in selected if s not in STAGES]
        if unknown:
            raise UserError(f"unknown stage '{unknown[0]}'; expected some of: {', '.join(STAGES)}")
        for stage in selected:
            for up in UPSTREAM[stage]:
                if up not in selected and outputs_hash(cfg.stage_dir(up)) is None:
                    raise UserError(
                        f"stage '{stage}' needs the output of '{up}', which is not complete in "
                        f"{cfg.stage_dir(up)}; add '{up}' to --stages or run the whole pipeline"
                    )
    runs_harvest = selected is None or "harvest" in selected
    h = cfg.harvest
    if runs_harvest and h.source != "web":
        for key, paths in (("harvest.urls", h.urls if h.source == "urls" else []),
                           ("harvest.warc", h.warc if h.source == "warc" else [])):
            for path in paths:
                if not Path(path).exists():
                    raise UserError(f"{key}: {path} does not exist; expected a file or directory to harvest from")
    if runs_harvest and h.source == "urls":
        from data.harvest import check_url_lists

        try:  # headers only: a wrong column name fails here, not after minutes of reading
            check_url_lists(h.urls, url_col=h.url_col, caption_col=h.caption_col, file_format=h.file_format)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"harvest.urls: {err}") from None
    if runs_harvest and h.queries is not None and not Path(h.queries).is_file():
        raise UserError(f"harvest.queries: {h.queries} does not exist; expected a file with one query per line")
    if runs_harvest and h.source == "web" and not cfg.web.enabled and h.seed_url is None:
        raise UserError(
            "harvest.seed_url is not set; expected an http(s) URL to crawl from "
            "(or web.enabled: true for the embedded synthetic web)"
        )
    if h.source == "web" and h.seed_url is not None and runs_harvest and not is_complete(cfg, "harvest"):
        check_seed_url(cfg.harvest.seed_url, cfg.harvest.timeout)
    registry.check_tracking_uri(cfg.mlflow.tracking_uri)


def _run_stage(cfg: PipelineConfig, stage: str, web: EmbeddedWeb, run_id: str, tracking_uri: str) -> dict:
    if stage == "harvest":
        if cfg.harvest.source != "web":
            return stages.harvest_flow(cfg, None)
        seed = cfg.harvest.seed_url or web.seed_url()
        counts = stages.harvest_flow(cfg, seed)
        counts["seed_url"] = seed
        return counts
    if stage == "crawl":
        return stages.crawl_flow(cfg)
    if stage == "dedup":
        return stages.dedup_flow(cfg)
    if stage == "shard":
        return stages.shard_flow(cfg)
    if stage == "train":
        return stages.train_flow(cfg, run_id, tracking_uri)
    if stage == "eval":
        return stages.eval_flow(cfg)
    if stage == "register":
        return stages.register_flow(cfg, run_id, tracking_uri)
    raise ValueError(stage)


def _prepare_dir(stage_dir: Path, key: str, force: bool) -> None:
    """Keep a crashed attempt's partial output only when it was made for the same key (resume)."""
    attempt_path = stage_dir / ATTEMPT_FILE
    attempt = json.loads(attempt_path.read_text()) if attempt_path.is_file() else None
    if stage_dir.exists() and (force or not attempt or attempt.get("key") != key):
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "manifest.json").unlink(missing_ok=True)
    atomic_write_json(attempt_path, {"key": key, "status": "running"})


def execute_stage(
    cfg: PipelineConfig, stage: str, web: EmbeddedWeb, run_id: str, tracking_uri: str, force: bool
) -> StageOutcome:
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
    try:
        counts = _run_stage(cfg, stage, web, run_id, tracking_uri)
    except Exception:
        try:  # recording the failure must not hide it
            _stage_run(tracking_uri, run_id, stage, "failed", {"key": key, "config": stage_config(cfg, stage)})
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
        "config": stage_config(cfg, stage),
        "inputs": {up: outputs_hash(cfg.stage_dir(up)) for up in UPSTREAM[stage]},
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
    mlflow_call(registry.log_stage, tracking_uri, run_id, stage, path, counts)
    if stage == "eval":
        reports = [stage_dir / f for f in ("results.json", "results.csv", "summary.md", "results.png")]
        mlflow_call(registry.log_artifacts, tracking_uri, run_id, reports, "eval")
    _stage_run(tracking_uri, run_id, stage, "ran", manifest, path)
    _stage_artifacts(stage, counts, seconds, run_id, tracking_uri, stage_dir)
    print(f"[{stage}] done in {seconds:.1f}s")
    return StageOutcome(stage, "ran", seconds, counts)


def _stage_run(tracking_uri: str, parent_run_id: str, stage: str, status: str, manifest: dict,
               manifest_path: Path | None = None) -> None:
    """A nested MLflow run per stage the pipeline run did something about: its key, config slice, figures."""
    mlflow_call(registry.log_stage_run, tracking_uri, parent_run_id, stage, status, manifest, manifest_path)


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


def _crawl_will_run(cfg: PipelineConfig, force: bool) -> bool:
    """Whether the crawl needs the embedded web: not complete here, and not adoptable from another run."""
    return not is_complete(cfg, "crawl") and (force or find_reusable(cfg, "crawl") is None)


@flow(name="witclip-pipeline", flow_run_name="{cfg.run_name}", log_prints=True)
def pipeline_flow(cfg: PipelineConfig, selected: list[str] | None, force: bool, run_id: str) -> list[dict]:
    tracking_uri = registry.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    web = EmbeddedWeb(cfg)
    outcomes: list[StageOutcome] = []
    try:
        for stage in STAGES:
            if selected is not None and stage not in selected:
                continue
            embedded = cfg.web.enabled and cfg.harvest.source == "web" and cfg.harvest.seed_url is None
            stage_force = force or selected is not None
            if stage == "crawl" and embedded and _crawl_will_run(cfg, stage_force):
                # the harvested URLs name the port the web had then; serve it there again if we can
                harvested = (read_manifest(cfg.stage_dir("harvest")) or {}).get("counts", {}).get("seed_url")
                if web.seed_url(preferred=harvested) != harvested:
                    print("[crawl] the embedded web could not get its old port back: harvesting again")
                    outcomes.append(execute_stage(cfg, "harvest", web, run_id, tracking_uri, force=True))
            outcomes.append(execute_stage(cfg, stage, web, run_id, tracking_uri, stage_force))
    finally:
        web.stop()
    return [o.__dict__ for o in outcomes]


def run_pipeline(cfg: PipelineConfig, selected: list[str] | None = None, force: bool = False) -> dict:
    """Validate, open (or reuse) the MLflow run, run the parent flow; returns outcomes + run id."""
    preflight(cfg, selected)
    tracking_uri = registry.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    flat = registry.flatten_params(cfg.model_dump(mode="json"))
    run_id = registry.get_or_create_run(
        tracking_uri, cfg.mlflow.experiment, cfg.run_name, stable_hash(cfg.model_dump(mode="json")), flat
    )
    outcomes = pipeline_flow(cfg, selected, force, run_id)
    return {"outcomes": outcomes, "run_id": run_id, "tracking_uri": tracking_uri}


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
    print(f"pipeline run {cfg.run_name} in {cfg.run_dir}")
    result = run_pipeline(cfg)
    return [{"stage": o["stage"], "status": o["status"]} for o in result["outcomes"]]
