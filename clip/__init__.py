"""witclip's CLIP: model, tokenizer, loss, transforms, zero-shot eval, checkpoints, training.

Named model configs live as data in ``clip/configs/*.json``. The names below are imported on first
use (PEP 562), so `import clip.train_config` -- what the pipeline's config reads its defaults from --
does not load torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import fields, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .model import CLIP, CLIPConfig
    from .tokenizer import CaptionTokenizer

# public name -> submodule that defines it
_LAZY = {
    **dict.fromkeys(("config_from_state_dict", "load_model", "load_openai_state_dict", "list_checkpoints",
                     "load_newest_checkpoint", "save_model", "save_checkpoint"), "checkpoint"),
    "ClipLoss": "loss",
    **dict.fromkeys(("CLIP", "CLIPConfig", "ModifiedResNet", "TextConfig", "TextTransformer", "VisionConfig",
                     "VisionTransformer"), "model"),
    **dict.fromkeys(("CaptionTokenizer", "OpenAITokenizer", "load_openai_tokenizer", "load_tokenizer",
                     "train_caption_tokenizer"), "tokenizer"),
    **dict.fromkeys(("TrainingDiverged", "TrainStep", "accumulate_gradients", "train"), "train"),
    "TrainConfig": "train_config",
    **dict.fromkeys(("eval_transform", "train_transform"), "transform"),
    **dict.fromkeys(("build_classifier", "evaluate_zeroshot", "predict_topk", "zeroshot_logits"), "zeroshot"),
}

__all__ = [*_LAZY, "create_model", "get_config", "list_models", "tokenize"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def list_models() -> list[str]:
    """Names of the bundled configs (``clip/configs/<name>.json``)."""
    files = resources.files(__name__).joinpath("configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def _apply_overrides(cfg: CLIPConfig, overrides: dict[str, Any]) -> CLIPConfig:
    """Override fields by top-level name (``embed_dim``), dotted path (``text.width``),
    tower prefix (``text_width``, ``vision_layers``), or an unambiguous leaf name
    (``vocab_size``, ``context_length``, ``image_size``, ``patch_size``)."""
    from .model import CLIPConfig, TextConfig, VisionConfig

    top = {f.name for f in fields(CLIPConfig)} - {"vision", "text"}
    towers = {"vision": {f.name for f in fields(VisionConfig)},
              "text": {f.name for f in fields(TextConfig)}}
    changes: dict[str, dict[str, Any]] = {"": {}, "vision": {}, "text": {}}
    for key, value in overrides.items():
        if key in top:
            changes[""][key] = value
            continue
        for sep in (".", "_"):
            tower, _, leaf = key.partition(sep)
            if tower in towers and leaf in towers[tower]:
                changes[tower][leaf] = value
                break
        else:
            owners = [t for t, names in towers.items() if key in names]
            if len(owners) != 1:
                raise ValueError(f"cannot resolve override {key!r}; use e.g. 'text_{key}' "
                                 f"or 'vision_{key}'" if owners else f"unknown override {key!r}")
            changes[owners[0]][key] = value
    return replace(
        cfg,
        vision=replace(cfg.vision, **changes["vision"]),
        text=replace(cfg.text, **changes["text"]),
        **changes[""],
    )


def get_config(name: str) -> CLIPConfig:
    """Load a bundled named config."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    from .model import CLIPConfig

    path = resources.files(__name__).joinpath("configs", f"{name}.json")
    return CLIPConfig.from_dict(json.loads(path.read_text()))


def create_model(name_or_config: str | CLIPConfig | dict, **overrides: Any) -> CLIP:
    """Build a randomly initialised CLIP, e.g. ``create_model("tiny", vocab_size=tok.vocab_size)``."""
    from .model import CLIP, CLIPConfig

    if isinstance(name_or_config, str):
        cfg = get_config(name_or_config)
    elif isinstance(name_or_config, dict):
        cfg = CLIPConfig.from_dict(name_or_config)
    else:
        cfg = name_or_config
    return CLIP(_apply_overrides(cfg, overrides))


def tokenize(tokenizer: CaptionTokenizer, texts: str | list[str], context_length: int):
    """Functional alias for ``tokenizer(texts, context_length)``."""
    return tokenizer(texts, context_length)
