"""torchrun entry point: `python -m torch.distributed.run ... -m flows.train_entry spec.json`.

Wires the pieces together on every rank -- model from `clip`, the webdataset loader from `data.shards.loader`,
the engine `clip.train.train` -- and, on rank 0, sends the engine's metrics, checkpoints and the
machine's system metrics to the pipeline's MLflow run (by run id: MLflow's active run is thread-local).
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from clip import create_model
from clip.tokenizer import CaptionTokenizer
from clip.train import TrainingDiverged, train
from clip.transform import train_transform
from data.common.files import atomic_write_json
from data.shards.loader import build_train_loader
from flows.train_spec import SpecError, TrainSpec


class MlflowMetricSink:
    """Buffers per-step metrics and writes them to one MLflow run by id, never a (key, step) pair
    the run already has: a resumed training does the steps after its checkpoint again, and the
    run's history must still hold one value per step."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 20):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.buffer: list = []
        self.logged: dict[str, set[int]] = {}  # key -> steps the run has (fetched on the key's first use)
        self.checkpoints: list[dict[str, Any]] = self._listed_checkpoints()  # a resumed run keeps its list

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for name, value in metrics.items():
            key = f"train/{name}"
            steps = self._logged_steps(key)
            if step in steps:
                continue
            steps.add(step)
            self.buffer.append(Metric(key, float(value), now, step))
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def _logged_steps(self, key: str) -> set[int]:
        # MLflow cannot delete a single value, so a re-done step is skipped rather than replaced: the
        # run keeps the first value (on CPU the re-done loss is the same number; timings differ),
        # while metrics.jsonl keeps the re-done one. The exact step set per key rather than its
        # newest step: it assumes nothing about which values reached the store before a kill, for
        # one history query per key per launch.
        if key not in self.logged:
            self.logged[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self.logged[key]

    def checkpoint(self, path: Path, step: int) -> None:
        """Reference each checkpoint from the run: a tag names the newest, the artifact
        train/checkpoints.json lists all written so far (older ones may since be pruned)."""
        # a step written again after a resume (past an unreadable newest file) replaces its entry
        self.checkpoints = [c for c in self.checkpoints if c["step"] != step]
        self.checkpoints.append({"step": step, "path": str(path)})
        self.client.set_tag(self.run_id, "train.checkpoint", str(path))
        self.client.log_dict(self.run_id, self.checkpoints, "train/checkpoints.json")
        self.flush()

    def _listed_checkpoints(self) -> list[dict[str, Any]]:
        try:
            local = self.client.download_artifacts(self.run_id, "train/checkpoints.json")
        except Exception:  # noqa: BLE001 - none logged yet
            return []
        return json.loads(Path(local).read_text())

    def flush(self) -> None:
        if self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []


def _system_metrics(mlflow_spec: dict[str, Any], interval: float, node_rank: int, nnodes: int):
    """MLflow's system metrics monitor (CPU, memory, disk, network; GPU when pynvml is present)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        mlflow_spec["run_id"], sampling_interval=interval, samples_before_logging=1, resume_logging=True,
        node_id=f"node{node_rank}" if nnodes > 1 else None, tracking_uri=mlflow_spec["tracking_uri"],
    )  # fmt: skip
    monitor.start()
    return monitor


def _zeroshot_check(spec: dict[str, Any], tokenizer: CaptionTokenizer, context_length: int, precision: str):
    """The periodic held-out check: top-1 on a small benchmark that is neither trained on nor the
    final eval set."""
    from data.eval.suite import score_model

    root = Path(spec["root"])
    name = spec.get("name", root.name)

    def check(model) -> dict[str, float]:
        # train.precision as training resolved it: "auto" resolves the same on rank 0 (the probe is cached)
        m = score_model(model, tokenizer, root, context_length=context_length, batch_size=spec.get("batch_size", 256),
                        precision=precision)
        return {f"{name}_acc1": m["acc1"], f"{name}_acc5": m["acc5"]}

    return check


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        spec = TrainSpec.load(argv[0])
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    loader = spec.loader
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # Share the machine's cores between the ranks on it (the environment may pin OMP_NUM_THREADS=1).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    tokenizer = CaptionTokenizer.load(spec.tokenizer)
    torch.manual_seed(spec.engine.seed)  # the same initial weights for any world size
    model = create_model(spec.model, vocab_size=tokenizer.vocab_size, context_length=spec.context_length)
    transform = train_transform(model.config.vision.image_size, scale=loader.crop_scale)
    shard_dir = Path(spec.shard_dir)

    def batches(epoch: int, start: Any = None):
        # webdataset pipeline (data/shards/loader.py): shard shuffle by (seed, epoch), split by node and
        # worker, sample shuffle buffer; also reads img2dataset's raw NNNNN.tar output directly.
        # `start` is the position this rank checkpointed: the loader skips to the exact next batch.
        return build_train_loader(
            shard_dir,
            image_transform=transform,
            tokenize=partial(tokenizer.__call__, context_length=spec.context_length),  # picklable, unlike a lambda
            batch_size=loader.batch_size, seed=loader.seed, epoch=epoch,
            rank=rank, world_size=world_size, num_workers=loader.num_workers,
            shuffle_buffer=loader.shuffle_buffer, partition=loader.partition, start_batch=start or 0,
        )  # fmt: skip

    first = batches(0)
    n_train = first.num_samples
    steps_per_epoch = max(1, first.batches_per_epoch // spec.engine.grad_accum)
    device = None if spec.device == "auto" else spec.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.device is 'cuda' but no CUDA device is available")

    mlflow_spec = spec.mlflow or {}
    tracked = rank == 0 and bool(mlflow_spec.get("run_id"))
    sink = MlflowMetricSink(mlflow_spec["tracking_uri"], mlflow_spec["run_id"]) if tracked else None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    node_rank = int(os.environ.get("GROUP_RANK", 0))
    monitor = None
    if mlflow_spec.get("run_id") and local_rank == 0 and spec.system_metrics_interval > 0:
        monitor = _system_metrics(mlflow_spec, spec.system_metrics_interval, node_rank, spec.nnodes)
    eval_fn = _zeroshot_check(spec.zeroshot, tokenizer, spec.context_length, spec.engine.precision) if spec.zeroshot else None

    out_dir = Path(spec.out_dir)
    try:
        summary = train(model, batches, steps_per_epoch, spec.engine, out_dir, on_metrics=sink, resume=True,
                        device=device, on_checkpoint=sink.checkpoint if sink else None, eval_fn=eval_fn)
    except TrainingDiverged as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    finally:
        if sink is not None:
            sink.flush()
        if monitor is not None:
            monitor.finish()
    if rank == 0:
        summary.update({"train_samples": n_train, "world_size": world_size, "steps_per_epoch": steps_per_epoch})
        atomic_write_json(out_dir / "summary.json", summary)


if __name__ == "__main__":
    main()
