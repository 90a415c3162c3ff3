"""One Prefect flow per pipeline stage. Each is a thin call into `data/` or `clip/`: paths and config in,
counts out. Bookkeeping (skip/resume, manifests, the MLflow run) lives in `flows/pipeline.py`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_table_artifact

from data.common.files import atomic_write_json
from data.crawl.fetch import FetchPolicy
from flows.config import PipelineConfig
from flows.errors import UserError


@flow(name="harvest", log_prints=True)
def harvest_flow(cfg: PipelineConfig, seed_url: str | None) -> dict[str, Any]:
    from data.harvest import harvest_site, harvest_url_list, harvest_warc
    from data.harvest.queries import load_queries

    h = cfg.harvest
    out = cfg.stage_dir("harvest")
    balance = {"queries": load_queries(h.queries) if h.queries else None, "query_cap": h.query_cap}
    if h.source == "urls":
        return harvest_url_list(h.urls, out, url_col=h.url_col, caption_col=h.caption_col,
                                file_format=h.file_format, **balance)
    if h.source == "warc":
        return harvest_warc(h.warc, out, **balance)
    return harvest_site(
        seed_url,
        out,
        max_pages=h.max_pages,
        max_depth=h.max_depth,
        allowed_hosts=h.allowed_hosts or None,
        timeout=h.timeout,
        user_agent=cfg.crawl.user_agent,
        **balance,
    )


@flow(name="crawl", log_prints=True)
def crawl_flow(cfg: PipelineConfig) -> dict[str, Any]:
    from data.crawl import crawl

    c = cfg.crawl
    counts = crawl(
        cfg.stage_dir("harvest") / "candidates.parquet",
        cfg.stage_dir("crawl"),
        image_size=c.image_size,
        resize_mode=c.resize_mode,
        shard_size=c.shard_size,
        processes=c.processes,
        threads=c.threads,
        retries=c.retries,
        scheduler_address=c.scheduler_address,
        policy=fetch_policy(cfg),
    )
    create_table_artifact(
        key="crawl-status",
        table=[{"reason": reason, "urls": n} for reason, n in counts.get("reasons", {}).items()],
        description=f"{counts.get('urls', 0)} candidate URLs, one status each (crawl/status.parquet)",
    )
    return counts


def fetch_policy(cfg: PipelineConfig) -> FetchPolicy:
    c = cfg.crawl
    allowed = list(c.allowed_addresses)
    if cfg.web.enabled:
        allowed.append("127.0.0.1")  # the embedded synthetic web is served there
    return FetchPolicy(
        timeout=c.timeout,
        deadline=c.deadline if c.deadline is not None else 4 * c.timeout,
        max_bytes=c.max_image_bytes,
        max_pixels=c.max_image_pixels,
        allowed_addresses=tuple(allowed),
        user_agent=c.user_agent,
        robots_txt=c.robots_txt,
        x_robots_directives=tuple(c.x_robots_directives),
        max_connections_per_host=c.max_connections_per_host,
        max_requests_per_second_per_host=c.max_requests_per_second_per_host,
        max_retry_after=c.max_retry_after,
    )


@flow(name="dedup", log_prints=True)
def dedup_flow(cfg: PipelineConfig) -> dict[str, Any]:
    from data.dedup import dedup

    d = cfg.dedup
    return dedup(
        cfg.stage_dir("crawl"),
        cfg.stage_dir("dedup"),
        near_duplicates=d.near_duplicates,
        max_distance=d.max_distance,
        benchmark_roots=synthetic_benchmarks(cfg) if d.decontaminate else None,
        scheduler_address=cfg.crawl.scheduler_address,
        processes=cfg.crawl.processes,
    )


def synthetic_benchmarks(cfg: PipelineConfig) -> dict[str, Path]:
    """The synthetic eval benchmarks among eval.benchmarks (generated from eval.seed, idempotent),
    {name: root}; dedup decontaminates against these."""
    from data.eval.synthetic import SYNTHETIC_BENCHMARKS, build_synthetic_benchmark

    e = cfg.eval
    return {
        name: build_synthetic_benchmark(name, cfg.work_dir / "benchmarks", seed=e.seed,
                                        samples_per_class=e.samples_per_class, image_size=cfg.web.image_size)
        for name in e.benchmarks if name in SYNTHETIC_BENCHMARKS
    }


@flow(name="shard", log_prints=True)
def shard_flow(cfg: PipelineConfig) -> dict[str, Any]:
    from data.shards import write_shards

    s = cfg.shard
    return write_shards(
        cfg.stage_dir("crawl"),
        cfg.stage_dir("dedup") / "keep.parquet",
        cfg.stage_dir("shard"),
        val_fraction=s.val_fraction,
        samples_per_shard=s.samples_per_shard,
        seed=s.seed,
    )


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(cfg: PipelineConfig, spec_path: Path, node_rank: int) -> list[str]:
    """The torchrun command line of one node. One node: a fresh loopback port; several: torchrun's
    c10d rendezvous at train.rdzv_endpoint, where every node runs this same command."""
    t = cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc}"]
    if t.nnodes == 1:
        cmd += ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={_free_loopback_port()}"]
    else:
        cmd += [f"--nnodes={t.nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id=witclip-{cfg.run_name}"]
    return cmd + ["-m", "flows.train_entry", str(spec_path.resolve())]


HELDOUT_BENCHMARK = "colour"  # the periodic mid-training check; generated from its own seed


@flow(name="train", log_prints=True)
def train_flow(cfg: PipelineConfig, mlflow_run_id: str, tracking_uri: str) -> dict[str, Any]:
    """Train the caption tokenizer, then launch the DDP training engine through torchrun."""
    from data.eval.synthetic import build_synthetic_benchmark
    from data.shards.tokenizer import train_tokenizer

    t = cfg.train
    out_dir = cfg.stage_dir("train")
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(cfg.stage_dir("shard"), out_dir / "tokenizer.json", vocab_size=t.vocab_size)
    spec: dict[str, Any] = {
        "shard_dir": str(cfg.stage_dir("shard").resolve()),
        "out_dir": str(out_dir.resolve()),
        "tokenizer": str(Path(tok["path"]).resolve()),
        "train": t.model_dump(mode="json"),
        "mlflow": {"tracking_uri": tracking_uri, "run_id": mlflow_run_id},
    }
    if t.eval_every > 0:
        # held out from both training (never served) and the final eval (another seed)
        root = build_synthetic_benchmark(HELDOUT_BENCHMARK, cfg.work_dir / "benchmarks" / "heldout",
                                         seed=cfg.eval.seed + 1, samples_per_class=20, image_size=cfg.web.image_size)
        spec["zeroshot"] = {"root": str(root.resolve()), "name": f"heldout_{HELDOUT_BENCHMARK}",
                            "batch_size": cfg.eval.batch_size}
    spec_path = out_dir / "spec.json"
    atomic_write_json(spec_path, spec)
    cmd = torchrun_command(cfg, spec_path, t.node_rank)
    env = dict(os.environ)
    if t.nnodes == 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback: nothing leaves the machine
    else:
        for rank in range(t.nnodes):
            if rank != t.node_rank:
                print(f"node {rank} of {t.nnodes} must run (with {spec_path} at the same path):",
                      " ".join(torchrun_command(cfg, spec_path, rank)))
    print("launching:", " ".join(cmd))
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {proc.returncode}: see the [train] lines above")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["vocab_size"] = tok["vocab_size"]
    return summary


@flow(name="eval", log_prints=True)
def eval_flow(cfg: PipelineConfig) -> dict[str, Any]:
    """Score the trained model on every task in eval.benchmarks that has data; reports in eval/."""
    from data.eval.suite import evaluate_suite, load_model_for_eval, read_overlap

    e = cfg.eval
    generated = synthetic_benchmarks(cfg)
    overlap = None
    if cfg.dedup.decontaminate:  # the overlap index covers the benchmarks dedup checked
        found = read_overlap(cfg.stage_dir("dedup") / "overlap.parquet") or {}
        overlap = {name: found.get(name, set()) for name in generated}
    model, tokenizer, _ = load_model_for_eval(cfg.stage_dir("train"))
    report = evaluate_suite(
        model, tokenizer, e.benchmarks, [cfg.work_dir / "benchmarks", *map(Path, e.data_roots)],
        cfg.stage_dir("eval"), model_label=str(cfg.stage_dir("train")), overlap=overlap,
        batch_size=e.batch_size, num_workers=e.num_workers, cache_dir=cfg.work_dir / "cache" / "classifiers",
    )  # fmt: skip
    if report["tasks_ran"] == 0:  # nothing to register a model on; the reports say why per task
        raise UserError(f"none of the {report['tasks_total']} eval tasks ran (eval.benchmarks, eval.data_roots): "
                        f"see {cfg.stage_dir('eval') / 'summary.md'}")
    counts: dict[str, Any] = {k: report[k] for k in ("mean_score", "tasks_ran", "tasks_total", "tasks_failed")}
    for name, t in report["tasks"].items():
        if t["status"] == "ran":
            counts[f"{name}_score"] = t["value"]
    return counts


@flow(name="register", log_prints=True)
def register_flow(cfg: PipelineConfig, mlflow_run_id: str, tracking_uri: str) -> dict[str, Any]:
    from flows.registry import register_model

    results_path = cfg.stage_dir("eval") / "results.json"
    if not results_path.is_file():
        raise UserError(f"{results_path} is missing: run the eval stage before register")
    from data.common.manifest import read_manifest

    train_manifest = read_manifest(cfg.stage_dir("train")) or {}
    lineage = {
        "pipeline_run_name": cfg.run_name,
        "data_manifest_hash": (read_manifest(cfg.stage_dir("shard")) or {}).get("outputs_hash", ""),
        "train_outputs_hash": train_manifest.get("outputs_hash", ""),
        "code_version": train_manifest.get("code_version", ""),
    }
    return register_model(
        train_dir=cfg.stage_dir("train"),
        eval_results=json.loads(results_path.read_text()),
        out_dir=cfg.stage_dir("register"),
        run_id=mlflow_run_id,
        tracking_uri=tracking_uri,
        model_name=cfg.mlflow.model_name,
        alias=cfg.mlflow.alias,
        candidate_alias=cfg.mlflow.candidate_alias,
        margin=cfg.mlflow.promotion_margin,
        lineage=lineage,
    )
