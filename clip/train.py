"""Training engine: single process, or DDP when launched by torchrun (WORLD_SIZE > 1).

Deliberately free of orchestration/tracking libraries: the caller supplies batches via
``make_batches(epoch)`` and receives metrics via ``on_metrics(step, dict)``.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import load_training_state, save_model, save_training_state
from .loss import ClipLoss
from .model import CLIP

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per rank; informational here, batching is the caller's job
    lr: float = 5e-4
    weight_decay: float = 0.1
    warmup_steps: int = 50
    grad_accum: int = 1  # micro-batches per optimizer step
    amp: bool = False  # bf16 autocast
    seed: int = 0
    checkpoint_every: int = 200  # optimizer steps; 0 disables mid-epoch checkpoints
    log_every: int = 10
    grad_clip: float = 1.0  # max global grad norm; 0 disables

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -----------------------------------------------------------------------------
# helpers


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay only weight matrices; gains, biases, embeddings and logit_scale are exempt."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if exempt else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _setup_distributed(device: str | None) -> tuple[int, int, torch.device, bool]:
    """Returns (rank, world_size, device, we_initialised_the_process_group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank if world > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.set_float32_matmul_precision("high")  # TF32 matmuls: free speed on Ampere+
    if world <= 1:
        return 0, 1, dev, False
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev, owns


def _take(it: Iterator, n: int) -> list:
    out = []
    for item in it:
        out.append(item)
        if len(out) == n:
            break
    return out


def _agree_min(n: int, world: int, dev: torch.device) -> int:
    """Smallest n over ranks, so every rank stops an epoch at the same step (no DDP hang)."""
    if world == 1:
        return n
    t = torch.tensor([n], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def _mean_over_ranks(x: float, world: int, dev: torch.device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], device=dev, dtype=torch.float64)
    dist.all_reduce(t)  # SUM (gloo has no AVG)
    return float(t.item()) / world


# -----------------------------------------------------------------------------
# engine


def train(
    model: CLIP,
    make_batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    cfg: TrainConfig,
    out_dir: Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool = True,
    device: str | None = None,
) -> dict:
    """Train `model` contrastively; see module docstring.

    Resuming restarts the interrupted epoch's iterator (``make_batches(epoch)``) and runs
    only the steps it still owed. Under DDP every rank must see the same out_dir.
    """
    rank, world, dev, owns_pg = _setup_distributed(device)
    try:
        return _train(model, make_batches, steps_per_epoch, cfg, Path(out_dir), on_metrics,
                      resume, rank, world, dev)
    finally:
        if owns_pg:
            dist.destroy_process_group()


def _train(model, make_batches, steps_per_epoch, cfg, out_dir, on_metrics, resume,
           rank, world, dev) -> dict:
    t_start = time.time()
    ckpt_path = out_dir / "checkpoints" / "last.pt"
    total_steps = cfg.epochs * steps_per_epoch

    raw_model = model.to(dev)
    raw_model.train()
    optimizer = torch.optim.AdamW(
        param_groups(raw_model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.warmup_steps, total_steps)
    )

    step, extra = 0, {}
    if resume and ckpt_path.exists():
        step, extra = load_training_state(ckpt_path, raw_model, optimizer, scheduler)
        if rank == 0:
            print(f"[train] resumed from {ckpt_path} at step {step}", flush=True)
    epoch = int(extra.get("epoch", 0))
    epoch_step = int(extra.get("epoch_step", 0))
    samples_seen = int(extra.get("samples_seen", 0))
    final_loss = float(extra.get("final_loss", math.nan))
    # different (but reproducible) randomness per rank and per resume point
    torch.manual_seed(cfg.seed + 1000 * rank + 1_000_003 * step)

    model = raw_model
    if world > 1:  # wrap after loading so every rank starts from rank 0's weights
        device_ids = [dev.index] if dev.type == "cuda" else None
        model = DistributedDataParallel(raw_model, device_ids=device_ids)
    loss_fn = ClipLoss(local_loss=True)  # same DDP gradients as the full matrix, 1/world the cost

    def checkpoint(ep: int, ep_step: int) -> None:
        if rank == 0:
            save_training_state(ckpt_path, raw_model, optimizer, scheduler, step, {
                "epoch": ep, "epoch_step": ep_step, "samples_seen": samples_seen,
                "final_loss": final_loss,
            })

    window_losses: list[Tensor] = []
    step_lr = scheduler.get_last_lr()[0]
    window_samples, window_t0 = 0, time.time()

    def log() -> None:
        nonlocal final_loss, window_samples, window_t0
        final_loss = _mean_over_ranks(torch.stack(window_losses).mean().item(), world, dev)
        scale = raw_model.logit_scale.exp().item()
        dt = max(time.time() - window_t0, 1e-9)
        metrics = {
            "loss": final_loss,
            "lr": step_lr,
            "temperature": 1.0 / scale,
            "logit_scale": scale,
            "samples_per_s": window_samples * world / dt,
            "epoch": float(epoch),
        }
        if rank == 0:
            print(f"[train] step {step}/{total_steps} epoch {epoch} loss {final_loss:.4f} "
                  f"lr {metrics['lr']:.2e} scale {scale:.1f} "
                  f"{metrics['samples_per_s']:.1f} samples/s", flush=True)
            if on_metrics is not None:
                on_metrics(step, metrics)
        window_losses.clear()
        window_samples, window_t0 = 0, time.time()

    while epoch < cfg.epochs:
        batches = iter(make_batches(epoch))
        while epoch_step < steps_per_epoch:
            micro = _take(batches, cfg.grad_accum)
            n_micro = _agree_min(len(micro), world, dev)
            if n_micro == 0:
                break  # some rank's iterator is exhausted: end the epoch everywhere
            micro = micro[:n_micro]

            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=dev)
            for i, (images, tokens) in enumerate(micro):
                images = images.to(dev, non_blocking=True)
                tokens = tokens.to(dev, non_blocking=True)
                # only all-reduce gradients on the last micro-batch of the step
                sync = world == 1 or i == n_micro - 1
                with nullcontext() if sync else model.no_sync():
                    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cfg.amp):
                        image_f, text_f, scale = model(images, tokens)
                        loss = loss_fn(image_f, text_f, scale)
                    (loss / n_micro).backward()
                step_loss += loss.detach() / n_micro
                window_samples += images.shape[0]
                samples_seen += images.shape[0] * world
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            optimizer.step()
            step_lr = scheduler.get_last_lr()[0]  # the lr this step actually used
            scheduler.step()
            with torch.no_grad():
                raw_model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
            step += 1
            epoch_step += 1
            window_losses.append(step_loss)

            if step % cfg.log_every == 0 or step == total_steps:
                log()
            if cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 \
                    and epoch_step < steps_per_epoch:
                checkpoint(epoch, epoch_step)
        epoch += 1
        epoch_step = 0
        checkpoint(epoch, 0)

    if window_losses:
        log()
    if rank == 0:
        save_model(raw_model, out_dir)
        print(f"[train] done: {step} steps, final model in {out_dir}", flush=True)
    if world > 1:
        dist.barrier()  # callers on any rank may rely on the final model existing
    return {
        "steps": step,
        "final_loss": final_loss,
        "samples_seen": samples_seen,
        "seconds": time.time() - t_start,
    }
