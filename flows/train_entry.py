"""torchrun entry point: `python -m torch.distributed.run ... -m flows.train_entry spec.json`.

Wires the pieces together on every rank — model from `clip`, streaming shards from `data.shards`, the
engine `clip.train.train` — and, on rank 0, sends the engine's metrics to the pipeline's MLflow run.
"""

from __future__ import annotations

import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch

from clip import create_model
from clip.tokenizer import CaptionTokenizer
from clip.train import TrainConfig, train
from clip.transform import train_transform
from data.loader import build_train_loader


class MlflowMetricSink:
    """Buffers per-step metrics and writes them to one MLflow run by id (no thread-local active run)."""

    def __init__(self, tracking_uri: str, run_id: str, flush_every: int = 20):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self.flush_every = flush_every
        self.buffer: list = []

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(f"train/{k}", float(v), now, step) for k, v in metrics.items()]
        if len(self.buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.client.log_batch(self.run_id, metrics=self.buffer)
            self.buffer = []


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    t = spec["train"]
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    # Share the machine's cores between the ranks on it (the environment may pin OMP_NUM_THREADS=1).
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))

    tokenizer = CaptionTokenizer.load(spec["tokenizer"])
    model = create_model(t["model"], vocab_size=tokenizer.vocab_size, context_length=t["context_length"])
    image_size = model.config.vision.image_size
    transform = train_transform(image_size)
    shard_dir = Path(spec["shard_dir"])

    def batches(epoch: int):
        # webdataset pipeline (data/loader.py): shard shuffle by (seed, epoch), split by node and
        # worker, sample shuffle buffer; also reads img2dataset's raw NNNNN.tar output directly
        return build_train_loader(
            shard_dir,
            image_transform=transform,
            tokenize=partial(tokenizer.__call__, context_length=t["context_length"]),  # picklable, unlike a lambda
            batch_size=t["batch_size"], seed=t["seed"], epoch=epoch,
            rank=rank, world_size=world_size, num_workers=t["num_workers"],
        )  # fmt: skip

    first = batches(0)
    n_train = first.num_samples
    steps_per_epoch = max(1, first.batches_per_epoch // t["grad_accum"])

    engine_cfg = TrainConfig(
        epochs=t["epochs"],
        batch_size=t["batch_size"],
        lr=t["lr"],
        weight_decay=t["weight_decay"],
        warmup_steps=t["warmup_steps"],
        grad_accum=t["grad_accum"],
        amp=t["amp"],
        seed=t["seed"],
        checkpoint_every=t["checkpoint_every"],
        log_every=t["log_every"],
    )
    device = None if t["device"] == "auto" else t["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("train.device is 'cuda' but no CUDA device is available")

    sink = MlflowMetricSink(**spec["mlflow"]) if rank == 0 and spec.get("mlflow", {}).get("run_id") else None
    out_dir = Path(spec["out_dir"])
    summary = train(model, batches, steps_per_epoch, engine_cfg, out_dir, on_metrics=sink, resume=True, device=device)
    if rank == 0:
        if sink is not None:
            sink.flush()
        summary.update({"train_samples": n_train, "world_size": world_size, "steps_per_epoch": steps_per_epoch})
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
