"""The training engine's settings (`clip.train.TrainConfig`), in a module that imports no torch: the
pipeline's config takes its defaults from here, so there is one source of them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per rank and micro-batch; informational here, batching is the caller's job
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Precision = "auto"
    grad_checkpointing: bool = False
    compile: bool = False
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still logged)
    max_bad_steps: int = 20  # consecutive non-finite steps before training stops
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms
    checkpoint_every: int = 200  # optimizer steps; 0: only at epoch ends
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 200  # steps between eval_fn calls (rank 0), when an eval_fn is given; 0: never mid-run
    progress: bool = True  # tqdm bar with ETA on rank 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
