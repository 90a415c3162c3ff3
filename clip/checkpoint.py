"""Model export (safetensors + config.json) and resumable training state (torch.save).

Both keep OpenAI's parameter names, so an OpenAI state_dict can be loaded the same way.
Training state holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no arbitrary unpickling).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .model import CLIP, CLIPConfig

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def unwrap_model(model: torch.nn.Module) -> CLIP:
    """Strip DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model  # type: ignore[return-value]


def save_model(model: torch.nn.Module, out_dir: str | Path) -> Path:
    """Write out_dir/model.safetensors and out_dir/config.json; returns out_dir."""
    model = unwrap_model(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    return out_dir


def load_model(model_dir: str | Path, map_location: str | torch.device = "cpu") -> CLIP:
    """Rebuild CLIP from config.json and load model.safetensors strictly."""
    model_dir = Path(model_dir)
    cfg = CLIPConfig.from_dict(json.loads((model_dir / CONFIG_NAME).read_text()))
    with torch.device("meta"):  # skip random init; weights are assigned below
        model = CLIP(cfg)
    state = load_file(str(model_dir / WEIGHTS_NAME), device=str(map_location))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def save_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    step: int,
    extra: dict[str, Any] | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "step": int(step),
        "extra": dict(extra or {}),
    }
    # write-then-rename: a crash mid-write never leaves a truncated last.pt
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_training_state(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> tuple[int, dict[str, Any]]:
    """Restore model/optimizer/scheduler in place; returns (step, extra)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    unwrap_model(model).load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    return int(state["step"]), dict(state.get("extra", {}))
