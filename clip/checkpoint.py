"""Model export (safetensors + config.json), resumable training state (torch.save), and
import of OpenAI's released CLIP checkpoints (ViT and ModifiedResNet).

Both keep OpenAI's parameter names, so an OpenAI state_dict loads without renaming.
Training state holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no arbitrary unpickling).

``save_model`` writes the same bytes for the same weights (no time, path or version in the
safetensors metadata), so two equal trainings can be compared by file hash. Files the training
engine rewrites (checkpoints, metrics.jsonl) go through ``write_atomically``: readers and a kill at
any moment see the old file or the new one, never a mix.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save_file

from .model import CLIP, RESNET_STRIDE, CLIPConfig, TextConfig, VisionConfig

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
    # constant metadata only: equal weights must give equal bytes (see the module docstring)
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


CHECKPOINT_PATTERN = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_path(directory: str | Path, step: int) -> Path:
    return Path(directory) / f"step-{step:09d}.pt"


def write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temp file beside ``path``, fsync it and rename it to ``path``.

    The temp name ``.<name>.<pid>.<random>.tmp`` is unique per writer (two processes rewriting the
    same file never share one) and is what witclip's output hashing skips as in flight. On any
    error the temp file is removed and ``path`` keeps its old content. The pipeline's
    ``data.common.files.atomic_path`` does the same; this copy keeps ``clip`` free of witclip imports.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_checkpoint(directory: str | Path, step: int, state: Mapping[str, Any], keep: int = 3) -> Path:
    """Write ``directory/step-<step>.pt`` atomically, then delete all but the newest ``keep``.

    Atomic (``write_atomically``): a kill at any moment leaves either the whole checkpoint or none
    (a stray ``*.tmp`` is ignored on resume). ``state`` must hold only tensors, numbers, strings,
    None, lists/tuples and dicts, so that it loads with ``weights_only=True``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = write_atomically(checkpoint_path(directory, step), lambda f: torch.save(dict(state), f))
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in ``directory``, oldest first (by step)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def load_newest_checkpoint(directory: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, as (path, state); None when there is none.

    A file that fails to load (disk trouble, a copy cut short) is reported and skipped in favour
    of the one before it, rather than ending the run.
    """
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: fall back to an older one
            print(f"[checkpoint] skipping unreadable {path}: {type(exc).__name__}: {exc}", flush=True)
    return None


# -----------------------------------------------------------------------------
# OpenAI checkpoint import

# non-tensor metadata entries present in OpenAI's TorchScript state_dicts
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
HEAD_WIDTH = 64  # OpenAI CLIP uses 64-dim attention heads everywhere


def _count_indices(sd: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct ``<prefix><int>.`` indices among the keys."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> CLIPConfig:
    """Infer the CLIPConfig of an OpenAI-layout state_dict from its tensor shapes.

    ViT if ``visual.proj`` is present, else ModifiedResNet. Heads are not stored in the
    weights and are taken as width // 64 (OpenAI's convention); act is quick_gelu.
    """
    if "visual.proj" in sd:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=width,
            layers=_count_indices(sd, "visual.transformer.resblocks."),
            heads=width // HEAD_WIDTH,
            mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
        )
    else:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        pool_width = sd["visual.attnpool.positional_embedding"].shape[1]
        vision = VisionConfig(
            image_size=grid * RESNET_STRIDE,
            patch_size=RESNET_STRIDE,
            width=width,
            layers=[_count_indices(sd, f"visual.layer{i}.") for i in (1, 2, 3, 4)],
            heads=pool_width // HEAD_WIDTH,
        )
    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width,
        layers=_count_indices(sd, "transformer.resblocks."),
        heads=text_width // HEAD_WIDTH,
        mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
    )
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text,
                      act="quick_gelu")


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zips holding ``<name>/constants.pkl`` and ``<name>/code/``;
    torch.save zips hold only ``data.pkl`` and tensor data."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_openai_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from a TorchScript archive (OpenAI's ``*.pt`` releases) or a
    torch.save file (loaded with ``weights_only=True``; a ``{"state_dict": ...}`` wrapper
    is unwrapped)."""
    path = Path(path)
    if _is_torchscript_archive(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    return dict(obj)


def load_openai_state_dict(sd_or_path: Mapping[str, torch.Tensor] | str | Path) -> CLIP:
    """Build a CLIP (quick_gelu, fp32, eval mode) from an OpenAI-layout checkpoint.

    Accepts a state_dict, a torch.save file, or a TorchScript archive. The metadata keys
    ``input_resolution`` / ``context_length`` / ``vocab_size`` are dropped, a ``module.``
    prefix (DDP) is stripped, floating tensors are cast to fp32, and loading is strict.
    Tensors that are already fp32 CPU tensors are used in place (not copied).
    """
    if isinstance(sd_or_path, (str, os.PathLike)):
        sd: Mapping[str, Any] = read_openai_state_dict(sd_or_path)
    else:
        sd = sd_or_path
    state: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in OPENAI_EXTRA_KEYS:
            continue
        if key.startswith("module."):
            key = key[len("module."):]
        value = value.detach().to("cpu")
        state[key] = value.float() if value.is_floating_point() else value
    cfg = config_from_state_dict(state)
    with torch.device("meta"):  # skip random init; weights are assigned below
        model = CLIP(cfg)
    # BatchNorm counters are bookkeeping only; tolerate checkpoints saved without them
    for key, buf in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=buf.dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
