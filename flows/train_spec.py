"""`spec.json`: what the train stage hands every torchrun rank (`flows.train_entry`), read strictly.

The train stage writes it from the config (`TrainSpec.from_config`); every rank reads it back with
`TrainSpec.load`, which refuses a file with a key that is unknown or missing -- in the spec or in its
`engine` part, which must name every field of `clip.train.TrainConfig` -- with one line, so a renamed
setting can never fall back to some default on the ranks. Standard library only: every rank imports it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip.train_config import TrainConfig as EngineTrainConfig


class SpecError(ValueError):
    """spec.json is not what this version of witclip writes; the message is one line."""


@dataclass(frozen=True)
class LoaderSpec:
    """The training loader's settings (`data.shards.loader.build_train_loader`)."""

    batch_size: int
    seed: int
    num_workers: int
    shuffle_buffer: int
    partition: str
    crop_scale: tuple[float, float]


@dataclass(frozen=True)
class TrainSpec:
    shard_dir: str
    out_dir: str
    tokenizer: str
    model: str
    context_length: int
    device: str  # auto | cpu | cuda
    nnodes: int
    system_metrics_interval: float
    loader: LoaderSpec
    engine: EngineTrainConfig
    mlflow: dict[str, str] | None = None  # {"tracking_uri", "run_id"}: rank 0 logs there
    zeroshot: dict[str, Any] | None = None  # {"root", "name", "batch_size"}: the periodic held-out check

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def load(cls, path: str | Path) -> "TrainSpec":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise SpecError(f"{path}: cannot read it as JSON ({err})") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "spec.json") -> "TrainSpec":
        top = _exact(cls, data, source)
        top["loader"] = LoaderSpec(**{**_exact(LoaderSpec, data["loader"], f"{source} loader"),
                                      "crop_scale": tuple(data["loader"]["crop_scale"])})
        engine = _exact(EngineTrainConfig, data["engine"], f"{source} engine")
        engine["betas"] = tuple(engine["betas"])
        top["engine"] = EngineTrainConfig(**engine)
        return cls(**top)


def _exact(cls: type, data: Any, where: str) -> dict[str, Any]:
    """data as keyword arguments of the dataclass `cls`, refusing unknown and missing keys."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    missing = sorted(names - set(data))  # defaults do not count: every key is written, so every key is read
    if unknown or missing:
        what = "; ".join(part for part in (f"unknown key(s) {', '.join(unknown)}" if unknown else "",
                                           f"missing key(s) {', '.join(missing)}" if missing else "") if part)
        raise SpecError(f"{where}: {what} (written by another version of witclip? run the train stage again)")
    return dict(data)
