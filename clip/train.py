"""Training engine: one process, or DDP when launched by torchrun (WORLD_SIZE > 1).

    summary = train(model, make_batches, steps_per_epoch, TrainConfig(...), out_dir,
                    on_metrics=sink, on_checkpoint=note, eval_fn=zeroshot_check)

Free of orchestration and tracking libraries: batches come from the caller's
``make_batches(epoch, start)`` and metrics leave through callbacks.

What one optimizer step does (``TrainStep``):

* ``grad_accum`` micro-batches per step, accumulated *exactly* for the contrastive loss. A
  no-grad pass computes every micro-batch's features; then each micro-batch is run again with
  gradient and its fresh features replace its cached ones in the full set, so every loss sees the
  whole accumulated batch (times every rank) as negatives. The sum of those backward passes is
  the gradient of the one big-batch loss. The temperature enters every pass, so its gradient is
  taken in one pass only (the last, which DDP synchronises).
* precision: fp32, bf16 autocast, or fp16 autocast with a gradient scaler ("auto": bf16 where the
  device multiplies bf16 natively and a probe confirms it is faster, see ``clip.precision``; every
  rank must agree, so rank 0's choice is used by all). Autocast covers the towers only: the loss,
  its logits and the temperature are fp32. Optional activation checkpointing and ``torch.compile``.
* AdamW (torch's fused kernel on CPU and CUDA) with no weight decay on gains, biases and the
  temperature (the paper's rule), cosine schedule after a linear warmup, global grad-norm
  clipping, temperature clamped at 100.
* a non-finite loss or gradient norm skips the update (counted); ``max_bad_steps`` of them in a
  row stop training with ``TrainingDiverged`` after writing a checkpoint of the last good weights.

Checkpoints (``out_dir/checkpoints/step-<step>.pt``, every ``checkpoint_every`` steps, at each
epoch end, newest ``keep_checkpoints`` kept) hold the model, optimizer, scheduler, scaler, step,
and per rank its RNG states and the loader position, so a killed run resumes mid-epoch at the
exact next batch. ``make_batches(epoch, start)`` receives ``start`` = None for a fresh epoch, the
position a batch iterable reported through ``.position()`` (e.g. ``data.shards.loader.TrainLoader``), or
else the number of micro-batches already consumed this epoch, which the callee must skip.

Metrics. Rank 0 appends one JSON row per log (``{"step": N, "loss": ...}``) and per eval
(``{"step": N, "zeroshot/...": ...}``) to ``out_dir/metrics.jsonl`` and hands the same dict to
``on_metrics(step, metrics)``. A run starting at step S (0, or a checkpoint's step) first rewrites
the file keeping only rows with step <= S (``trim_metrics``), since it is about to do the later
steps again: after any number of kills and resumes each (step, metric) appears once, and a line
torn by a kill mid-write is gone. ``on_metrics`` sees re-done steps again; a sink that cannot take
values back (MLflow) must skip steps it already has.

Reproducibility. Nothing here reads the clock except to report speed; the model is seeded by the
caller, the trainer's RNG by ``cfg.seed`` and the rank. On CPU the same batches and the same number
of intra-op threads give the same ``model.safetensors`` bytes (another thread count adds up in
another order); CUDA kernels need not repeat bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .checkpoint import (
    load_newest_checkpoint,
    save_checkpoint,
    save_model,
    write_atomically,
)
from .loss import ClipLoss
from .model import CLIP
from .precision import PrecisionChoice, autocast, resolve_precision
from .train_config import TrainConfig

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the learned temperature at 1/100


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; ``checkpoint`` holds the last good weights."""

    def __init__(self, message: str, checkpoint: Path | None):
        super().__init__(message)
        self.checkpoint = checkpoint


# -----------------------------------------------------------------------------
# optimisation pieces


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices and embeddings; exempt gains, biases (all <2-d tensors: LayerNorm,
    BatchNorm, biases, the class token) and the temperature, as the paper prescribes."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "logit_scale" in name
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


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: list[tuple[Tensor, Tensor]],
    loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    *,
    feature_model: torch.nn.Module | None = None,
    autocast: Callable[[], Any] = nullcontext,
    backward: Callable[[Tensor], None] = Tensor.backward,
) -> Tensor:
    """Add to ``.grad`` the gradient of the contrastive loss over all micro-batches taken as one
    batch; returns that loss (detached). See the module docstring for the method.

    ``model`` may be DDP-wrapped: every pass but the last runs under ``no_sync`` so gradients are
    all-reduced once. ``feature_model`` (default: ``model``) computes the no-grad feature cache;
    pass the unwrapped module to keep DDP's bookkeeping out of it.
    """
    n = len(micro_batches)
    if n == 0:
        raise ValueError("no micro-batches")
    if n == 1:
        images, tokens = micro_batches[0]
        with autocast():
            image_f, text_f, scale = model(images, tokens)
            loss = loss_fn(image_f, text_f, scale)
        backward(loss)
        return loss.detach()

    feature_model = feature_model or model
    with torch.no_grad(), autocast():
        cached = [feature_model(images, tokens)[:2] for images, tokens in micro_batches]
    ddp = isinstance(model, DistributedDataParallel)
    loss = torch.zeros(())
    for i, (images, tokens) in enumerate(micro_batches):
        last = i == n - 1
        with nullcontext() if last or not ddp else model.no_sync():
            with autocast():
                image_f, text_f, scale = model(images, tokens)
                if not last:
                    scale = scale.detach()  # the temperature's gradient is counted once
                all_image = torch.cat([c[0] for c in cached[:i]] + [image_f] + [c[0] for c in cached[i + 1:]])
                all_text = torch.cat([c[1] for c in cached[:i]] + [text_f] + [c[1] for c in cached[i + 1:]])
                loss = loss_fn(all_image, all_text, scale)
            backward(loss)
    return loss.detach()


# glibc mallopt parameters (malloc.h) and the largest mmap threshold glibc accepts on 64-bit
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20


@functools.lru_cache(maxsize=1)
def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse in this process (Linux/glibc only; a no-op
    elsewhere); returns whether it applied. Process-wide, once.

    Torch's CPU tensors come from malloc. By default glibc returns large freed blocks to the kernel
    (blocks above a moving mmap threshold, and the heap's free top past a trim threshold), so every
    training step maps its gradients and activations afresh and the kernel zero-fills each page on
    first touch: ~130,000 page faults and ~0.4-0.8 CPU-s of system time per ViT-B-32 step at batch
    8 on 2 cores (10-25 % of the step). With blocks up to 32 MiB served from the heap and the heap
    never trimmed below 2 GiB of free top, steady-state steps take no page faults; the cost is that
    the process keeps its peak heap instead of shrinking between steps."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def adamw_kernel(params: list[Tensor]) -> dict[str, bool]:
    """AdamW's implementation: ``fused`` (one pass over param, grad and both moments) where torch
    has the kernel, i.e. floating-point parameters on CPU or CUDA; else ``foreach``. On CPU the
    fused kernel is ~5x faster than foreach (ViT-B-32's 151M parameters on 2 cores: ~90 vs ~480 ms
    a step), which re-reads every tensor once per elementwise op."""
    if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params):
        return {"fused": True}
    return {"foreach": True}


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_``: the global L2 norm of the gradients, returned, and every
    gradient scaled by ``max_norm / (norm + 1e-6)`` where that is below 1 (``max_norm <= 0``: no
    clipping). torch multiplies by the clamped factor even when it is exactly 1 (no device sync);
    that pass over every gradient (~25 ms a step for ViT-B-32 on 2 cores) is skipped here, bit for
    bit the same result. A NaN norm is not applied: such a step is skipped by the caller."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, foreach=True)
    if max_norm > 0 and grads and float(max_norm / (norm + 1e-6)) < 1.0:  # torch's factor, in fp32
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: no update applied
    data_s: float = 0.0


class TrainStep:
    """Owns the model wrappers, optimizer, schedule and scaler; ``step(micro_batches)`` runs one
    optimizer step. Usable on its own (bench/train.py times exactly this). On CPU it calls
    ``retain_freed_memory()``, which changes malloc's policy for the whole process."""

    def __init__(self, model: CLIP, cfg: TrainConfig, total_steps: int, device: torch.device,
                 world_size: int = 1, precision_choice: PrecisionChoice | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.world_size = world_size
        self.precision_choice = precision_choice or resolve_precision(cfg.precision, device)
        self.precision = self.precision_choice.precision
        if device.type == "cpu":
            retain_freed_memory()
        self.raw_model = model.to(device)
        self.raw_model.train()
        if cfg.grad_checkpointing:
            self.raw_model.set_grad_checkpointing(True)
        self._params = [p for p in self.raw_model.parameters() if p.requires_grad]
        self._kernel = adamw_kernel(self._params)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.raw_model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
            **self._kernel,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup_steps, total_steps))
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        # rows of this rank x columns of all ranks: the global-batch gradient at 1/world the cost
        self.loss_fn = ClipLoss(local_loss=True)
        self.model: torch.nn.Module = self.raw_model

    def wrap(self) -> None:
        """DDP (after any checkpoint was loaded: DDP broadcasts rank 0's weights) and compile."""
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw_model, device_ids=ids)
        if self.cfg.compile:
            self.model = torch.compile(self.model)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _backward(self, loss: Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, micro_batches: list[tuple[Tensor, Tensor]]) -> StepResult:
        dev = self.device
        micro = [(i.to(dev, non_blocking=True), t.to(dev, non_blocking=True)) for i, t in micro_batches]
        self.optimizer.zero_grad(set_to_none=True)
        loss = accumulate_gradients(self.model, micro, self.loss_fn, feature_model=self.raw_model,
                                    autocast=lambda: autocast(self.precision, dev), backward=self._backward)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm(self._params, self.cfg.grad_clip)
        # gradients are all-reduced (equal on every rank) but the loss is per rank: agree on "bad"
        bad = (~torch.isfinite(loss) | ~torch.isfinite(grad_norm)).to(torch.float32).reshape(1)
        if self.world_size > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        skipped = bool(bad.item())
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()  # lowers the scale after inf/nan, like a scaler-skipped step
        elif self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()  # the schedule follows the data, bad step or not
        with torch.no_grad():
            self.raw_model.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)
        return StepResult(loss=float(loss), grad_norm=float(grad_norm), skipped=skipped)

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw_model.load_state_dict(state["model"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # a checkpoint's groups carry the kernel choice it was saved with
            group.update({"fused": None, "foreach": None, **self._kernel})
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


# -----------------------------------------------------------------------------
# distributed plumbing


def _setup_distributed(device: str | None) -> tuple[int, int, torch.device, bool]:
    """Returns (rank, world_size, device, we_initialised_the_process_group). torchrun's env
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) covers one node or many."""
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


def _agreed_precision(precision: str, dev: torch.device, rank: int, world: int) -> PrecisionChoice:
    """Rank 0's resolution of ``precision``, shared with every rank: a probe measured on each rank
    could disagree on a loaded machine, and ranks in different precisions would not match."""
    choice = resolve_precision(precision, dev) if rank == 0 or precision != "auto" else None
    if world > 1 and precision == "auto":
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    assert choice is not None
    return choice


def _rng_state(dev: torch.device) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(dev) if dev.type == "cuda" else None,
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def _set_rng_state(state: dict[str, Any], dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], dev)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _gather_to_rank0(obj: Any, rank: int, world: int) -> list[Any] | None:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out if rank == 0 else None


# -----------------------------------------------------------------------------
# metrics.jsonl


def trim_metrics(path: str | Path, last_step: int) -> int:
    """Rewrite the metrics file at ``path`` atomically, keeping the rows with step <= ``last_step``
    in their order; a line that is no complete JSON row (torn by a kill mid-write) is dropped.
    Returns how many lines were dropped; a missing file is left missing."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    lines = data.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # also a UnicodeDecodeError: bytes cut inside a character
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
            kept.append(line + b"\n")
    # a complete last row without its newline is rewritten too: the next append would join it
    if len(kept) != len(lines) or (data and not data.endswith(b"\n")):
        write_atomically(path, lambda f: f.writelines(kept))
    return len(lines) - len(kept)


# -----------------------------------------------------------------------------
# engine


@dataclass
class _Progress:
    epoch: int = 0
    epoch_step: int = 0  # optimizer steps done in `epoch`
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0
    bad_in_a_row: int = 0
    final_loss: float = math.nan
    window: list[StepResult] = field(default_factory=list)


def train(
    model: CLIP,
    make_batches: Callable[[int, Any], Iterable[tuple[Tensor, Tensor]]],
    steps_per_epoch: int,
    cfg: TrainConfig,
    out_dir: str | Path,
    on_metrics: Callable[[int, dict[str, float]], None] | None = None,
    resume: bool = True,
    device: str | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    eval_fn: Callable[[CLIP], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Train ``model`` contrastively; see the module docstring. Under DDP every rank must see the
    same ``out_dir``. Returns a summary (steps, final_loss, samples_seen, skipped_steps, seconds)."""
    rank, world, dev, owns_pg = _setup_distributed(device)
    try:
        return _Run(model, make_batches, steps_per_epoch, cfg, Path(out_dir), on_metrics, on_checkpoint,
                    eval_fn, rank, world, dev).run(resume)
    finally:
        if owns_pg:
            dist.destroy_process_group()


class _Run:
    def __init__(self, model, make_batches, steps_per_epoch, cfg, out_dir, on_metrics, on_checkpoint,
                 eval_fn, rank, world, dev) -> None:
        self.make_batches, self.steps_per_epoch, self.cfg = make_batches, steps_per_epoch, cfg
        self.out_dir, self.ckpt_dir = out_dir, out_dir / "checkpoints"
        self.on_metrics, self.on_checkpoint, self.eval_fn = on_metrics, on_checkpoint, eval_fn
        self.rank, self.world, self.dev = rank, world, dev
        self.total_steps = cfg.epochs * steps_per_epoch
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.stepper = TrainStep(model, cfg, self.total_steps, dev, world,
                                 precision_choice=_agreed_precision(cfg.precision, dev, rank, world))
        self.p = _Progress()
        self.loader: Any = None
        self.last_checkpoint: Path | None = None
        self.run_t0, self.run_step0 = time.time(), 0

    # -- checkpoints ----------------------------------------------------------------
    def _rank_state(self) -> dict[str, Any]:
        position = self.loader.position().to_dict() if hasattr(self.loader, "position") else None
        return {"rng": _rng_state(self.dev), "loader": position}

    def save(self) -> None:
        """Every rank contributes its RNG states and loader position; rank 0 writes one file."""
        ranks = _gather_to_rank0(self._rank_state(), self.rank, self.world)
        if self.rank == 0:
            p = self.p
            state = {
                **self.stepper.state_dict(),
                "step": p.step, "epoch": p.epoch, "epoch_step": p.epoch_step,
                "samples_seen": p.samples_seen, "skipped_steps": p.skipped_steps,
                "final_loss": p.final_loss, "world_size": self.world, "grad_accum": self.cfg.grad_accum,
                "ranks": ranks,
            }
            self.last_checkpoint = save_checkpoint(self.ckpt_dir, p.step, state, keep=self.cfg.keep_checkpoints)
            if self.on_checkpoint is not None:
                self.on_checkpoint(self.last_checkpoint, p.step)
        if self.world > 1:
            dist.barrier()  # nobody runs ahead of a checkpoint that may be needed to resume

    def restore(self) -> Any:
        """Load the newest complete checkpoint; returns this rank's start for make_batches."""
        found = load_newest_checkpoint(self.ckpt_dir)
        if found is None:
            return None
        path, state = found
        self.stepper.load_state_dict(state)
        p = self.p
        p.step, p.epoch, p.epoch_step = int(state["step"]), int(state["epoch"]), int(state["epoch_step"])
        p.samples_seen, p.skipped_steps = int(state["samples_seen"]), int(state["skipped_steps"])
        p.final_loss = float(state["final_loss"])
        self.last_checkpoint = path
        same_layout = state.get("world_size") == self.world and state.get("grad_accum") == self.cfg.grad_accum
        mine = state["ranks"][self.rank] if same_layout else None
        if self.rank == 0:
            print(f"[train] resumed from {path} at step {p.step} (epoch {p.epoch}, step {p.epoch_step} of it)",
                  flush=True)
            if not same_layout:
                print(f"[train] checkpoint was written by {state.get('world_size')} ranks x grad_accum "
                      f"{state.get('grad_accum')}; now {self.world} x {self.cfg.grad_accum}: the epoch "
                      "restarts at the same batch count, not the same samples", flush=True)
        if mine is not None:
            _set_rng_state(mine["rng"], self.dev)
            if mine["loader"] is not None and p.epoch_step > 0:
                return mine["loader"]
        else:
            torch.manual_seed(self.cfg.seed + 1000 * self.rank + 1_000_003 * p.step)
        return p.epoch_step * self.cfg.grad_accum if p.epoch_step > 0 else None

    # -- metrics ----------------------------------------------------------------------
    def log(self, lr: float, window_t0: float, window_samples: int, data_s: float) -> None:
        p, w = self.p, self.p.window
        good = [r.loss for r in w if not r.skipped]
        local = sum(good) / len(good) if good else math.nan
        p.final_loss = _mean_over_ranks(local, self.world, self.dev)
        scale = self.stepper.raw_model.logit_scale.exp().item()
        dt = max(time.time() - window_t0, 1e-9)
        norms = [r.grad_norm for r in w if not r.skipped]
        metrics = {
            "loss": p.final_loss,
            "lr": lr,
            "temperature": 1.0 / scale,
            "logit_scale": scale,
            "samples_per_s": window_samples * self.world / dt,
            "data_wait_s": data_s / max(1, len(w)),  # mean seconds per step spent waiting for batches
            "step_s": dt / max(1, len(w)),
            "grad_norm": sum(norms) / len(norms) if norms else math.nan,
            "skipped_steps": float(p.skipped_steps),
            "epoch": p.epoch + p.epoch_step / max(1, self.steps_per_epoch),
        }
        if self.rank == 0:
            done = p.step - self.run_step0
            eta = (time.time() - self.run_t0) / max(1, done) * (self.total_steps - p.step)
            tqdm.write(f"[train] step {p.step}/{self.total_steps} epoch {p.epoch} loss {p.final_loss:.4f} "
                       f"lr {lr:.2e} scale {scale:.1f} {metrics['samples_per_s']:.1f} samples/s "
                       f"eta {int(eta) // 60}m{int(eta) % 60:02d}s", file=sys.stdout)
            sys.stdout.flush()
            self.emit(metrics)
        w.clear()

    def emit(self, metrics: dict[str, float]) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": self.p.step, **metrics}) + "\n")
        if self.on_metrics is not None:
            self.on_metrics(self.p.step, metrics)

    def evaluate(self) -> None:
        if self.rank == 0 and self.eval_fn is not None:
            scores = self.eval_fn(self.stepper.raw_model)
            print(f"[train] step {self.p.step} zero-shot " +
                  " ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
            self.emit({f"zeroshot/{k}": float(v) for k, v in scores.items()})
            self.stepper.raw_model.train()

    # -- loop -------------------------------------------------------------------------
    def run(self, resume: bool) -> dict[str, Any]:
        cfg, p, t_start = self.cfg, self.p, time.time()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        start = self.restore() if resume else None
        if self.rank == 0:
            # rows past the starting step are about to be logged again (see Metrics above)
            dropped = trim_metrics(self.out_dir / "metrics.jsonl", p.step)
            if dropped:
                print(f"[train] metrics.jsonl: dropped {dropped} row(s) after step {p.step}, which this "
                      "run does again", flush=True)
        if self.rank == 0:
            print(f"[train] precision: {self.stepper.precision_choice}", flush=True)
        self.stepper.wrap()
        # the bar only on a terminal; in logs the [train] lines carry the ETA instead of '\r' debris
        bar = tqdm(total=self.total_steps, initial=p.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=self.rank != 0 or not cfg.progress or not sys.stderr.isatty(), file=sys.stderr)
        self.run_t0, self.run_step0 = time.time(), p.step
        lr = self.stepper.lr
        window_t0, window_samples, data_s = time.time(), 0, 0.0
        try:
            while p.epoch < cfg.epochs:
                self.loader = self.make_batches(p.epoch, start)
                batches = iter(self.loader)
                start = None
                while p.epoch_step < self.steps_per_epoch:
                    t0 = time.time()
                    micro = _take(batches, cfg.grad_accum)
                    data_s += time.time() - t0
                    n_micro = _agree_min(len(micro), self.world, self.dev)
                    if n_micro == 0:
                        break  # some rank's iterator is exhausted: end the epoch everywhere
                    micro = micro[:n_micro]
                    lr = self.stepper.lr  # the lr this step uses
                    result = self.stepper.step(micro)
                    n = sum(images.shape[0] for images, _ in micro)
                    window_samples += n
                    p.samples_seen += n * self.world
                    p.step += 1
                    p.epoch_step += 1
                    p.window.append(result)
                    self._count_bad(result)
                    bar.update(1)
                    if p.step % cfg.log_every == 0 or p.step == self.total_steps:
                        bar.set_postfix(loss=f"{result.loss:.3f}")
                        self.log(lr, window_t0, window_samples, data_s)
                        window_t0, window_samples, data_s = time.time(), 0, 0.0
                    if cfg.checkpoint_every > 0 and p.step % cfg.checkpoint_every == 0 \
                            and p.epoch_step < self.steps_per_epoch:
                        self.save()
                    if cfg.eval_every > 0 and p.step % cfg.eval_every == 0:
                        self.evaluate()
                p.epoch += 1
                p.epoch_step = 0
                self.save()
        finally:
            bar.close()
        if p.window:
            self.log(lr, window_t0, window_samples, data_s)
        if self.rank == 0:
            save_model(self.stepper.raw_model, self.out_dir)
            print(f"[train] done: {p.step} steps ({p.skipped_steps} skipped), final model in {self.out_dir}",
                  flush=True)
        if self.world > 1:
            dist.barrier()  # callers on any rank may rely on the final model existing
        return {
            "steps": p.step,
            "final_loss": p.final_loss,
            "samples_seen": p.samples_seen,
            "skipped_steps": p.skipped_steps,
            "precision": self.stepper.precision,
            "precision_reason": self.stepper.precision_choice.reason,
            "seconds": time.time() - t_start,
            "last_checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }

    def _count_bad(self, result: StepResult) -> None:
        p = self.p
        if not result.skipped:
            p.bad_in_a_row = 0
            return
        p.skipped_steps += 1
        p.bad_in_a_row += 1
        if self.rank == 0:
            print(f"[train] step {p.step}: non-finite loss or gradient (loss {result.loss}, grad norm "
                  f"{result.grad_norm}); update skipped ({p.bad_in_a_row} in a row)", flush=True)
        if p.bad_in_a_row >= self.cfg.max_bad_steps:
            # the weights are still the last good ones (bad updates were never applied): keep them
            self.save()
            raise TrainingDiverged(
                f"training stopped at step {p.step}: {p.bad_in_a_row} steps in a row had a non-finite "
                f"loss or gradient (train.max_bad_steps={self.cfg.max_bad_steps}); last good weights "
                f"in {self.last_checkpoint}", self.last_checkpoint)
