"""train: the caption tokenizer on the train captions, then the DDP training engine under torchrun."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.stages.generated import HELDOUT_BENCHMARK, heldout_benchmark
from flows.stages.spec import ConfigView, StageContext, StageSpec


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(ctx: StageContext, spec_path: Path, node_rank: int) -> list[str]:
    """The torchrun command line of one node. One node: a fresh loopback port; several: torchrun's
    c10d rendezvous at train.rdzv_endpoint, where every node runs this same command."""
    t = ctx.cfg.train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.nproc}"]
    if t.nnodes == 1:
        cmd += ["--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={free_loopback_port()}"]
    else:
        cmd += [f"--nnodes={t.nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint={t.rdzv_endpoint}", f"--rdzv-id=witclip-{ctx.cfg.run_name}"]
    return cmd + ["-m", "flows.train_entry", str(spec_path.resolve())]


def run_torchrun(cmd: list[str], env: dict[str, str]) -> int:
    """Run torchrun and wait for it. What witclip's ranks print (`[train] ...`, `error: ...`) is printed
    here, so it reaches the console and the flow's logs; the rest of the ranks' output (torchrun's own
    messages, library warnings, MLflow's system-metrics notices) goes to the `torchrun` logger, which
    only the run's log file shows (flows.console)."""
    engine_log = logging.getLogger("torchrun")
    env = {**env, "PYTHONUNBUFFERED": "1"}  # the ranks write into a pipe now: lines must arrive as printed
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        if line.startswith(("[train]", "error:")):
            print(line)
        elif line:
            engine_log.info(line)
    return proc.wait()


def run(ctx: StageContext) -> dict[str, Any]:
    from data.common.files import atomic_write
    from data.shards.tokenizer import train_tokenizer

    t = ctx.cfg.train
    out_dir = ctx.out_dir
    shard_dir = ctx.input_dir("shard")
    tok = train_tokenizer(shard_dir, out_dir / "tokenizer.json", vocab_size=t.vocab_size)
    zeroshot = None
    if t.eval_every > 0:
        zeroshot = {"root": str(heldout_benchmark(ctx).resolve()), "name": f"heldout_{HELDOUT_BENCHMARK}",
                    "batch_size": ctx.cfg.eval.batch_size}
    spec = t.train_spec(shard_dir=shard_dir, out_dir=out_dir, tokenizer=Path(tok["path"]), zeroshot=zeroshot,
                        mlflow={"tracking_uri": ctx.tracking_uri, "run_id": ctx.mlflow_run_id})
    spec_path = atomic_write(out_dir / "spec.json", spec.to_json())
    cmd = torchrun_command(ctx, spec_path, t.node_rank)
    env = dict(os.environ)
    if t.nnodes == 1:
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo on loopback: nothing leaves the machine
    else:
        for rank in range(t.nnodes):
            if rank != t.node_rank:
                print(f"node {rank} of {t.nnodes} must run (with {spec_path} at the same path):",
                      " ".join(torchrun_command(ctx, spec_path, rank)))
    print("[train] launching:", " ".join(cmd))
    code = run_torchrun(cmd, env)
    if code != 0:
        raise RuntimeError(f"torchrun exited with code {code}: see the [train] lines above and the run's log "
                           f"in {out_dir.parent / 'logs'}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["vocab_size"] = tok["vocab_size"]
    return summary


def accept(cfg: ConfigView, counts: dict[str, Any]) -> str | None:
    loss = counts.get("final_loss")
    if not counts.get("steps") or loss is None or not math.isfinite(loss):
        return f"{counts.get('steps', 0)} steps, final loss {loss}: no usable model"
    return None


SPEC = StageSpec(
    name="train",
    upstream=("shard",),
    reads=lambda cfg: ("train", "eval.seed", "eval.batch_size", "web.image_size", "run_name"),
    # where training runs and what it reports do not change the weights (the rank count does); the
    # held-out check (eval.seed, eval.batch_size, web.image_size) only reports
    runtime=("train.num_workers", "train.log_every", "train.node_rank", "train.rdzv_endpoint", "train.progress",
             "train.system_metrics_interval", "train.eval_every", "train.keep_checkpoints",
             "train.checkpoint_every", "eval.seed", "eval.batch_size", "web.image_size", "run_name"),
    run=run,
    figures=("steps", "final_loss", "samples_seen"),
    accept=accept,
    code=("flows.train_entry", "clip/configs"),  # what torchrun runs on every rank
    engines=("torch", "torchvision", "tokenizers", "webdataset", "safetensors", "pillow", "numpy"),
)
