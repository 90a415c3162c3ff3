"""MLflow: the pipeline run, model logging as a pyfunc zero-shot classifier, registration and the alias gate.

MLflow's active run is thread-local and Prefect may run code in other threads, so everything here takes
the run id explicitly and talks to the store through `MlflowClient` (or a `start_run(run_id=...)` scoped
to one call).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

# A model directory: these two, plus one tokenizer file (clip.tokenizer.TOKENIZER_FILES: witclip's
# tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz for imported OpenAI weights).
MODEL_FILES = ("model.safetensors", "config.json")
DEFAULT_TEMPLATES = ("{c}", "a photo of {c}.", "an image of {c}.")


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative sqlite path absolute so that subprocesses (torchrun ranks) see the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def check_tracking_uri(uri: str) -> None:
    """Fail fast, with one line, if the tracking store cannot be reached."""
    from flows.errors import UserError

    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as e:  # noqa: BLE001 - any failure means unreachable
            raise UserError(f"MLflow tracking server {uri} is unreachable ({e}); expected a running `mlflow server`")
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir():
            raise UserError(f"mlflow.tracking_uri {uri}: directory {parent} does not exist")


def get_or_create_run(tracking_uri: str, experiment: str, run_name: str, config_hash: str, params: dict) -> str:
    """One MLflow run per (pipeline run name, config): re-invocations with the same config reuse it."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`witclip.run_name` = '{run_name}' and tags.`witclip.config_hash` = '{config_hash}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp_id, run_name=run_name, tags={"witclip.run_name": run_name, "witclip.config_hash": config_hash}
    )
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps params per batch call
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


def log_stage(tracking_uri: str, run_id: str, stage: str, manifest_path: Path, counts: dict[str, Any]) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    now = int(time.time() * 1000)
    numbers = dict(counts)
    for reason, n in (counts.get("reasons") or {}).items():  # crawl: one metric per status reason
        numbers[f"reasons.{reason}"] = n
    metrics = [
        Metric(f"{stage}/{k}", float(v), now, 0)
        for k, v in numbers.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if metrics:
        client.log_batch(run_id, metrics=metrics)
    client.log_artifact(run_id, str(manifest_path), artifact_path=f"manifests/{stage}")


def log_artifacts(tracking_uri: str, run_id: str, paths: list[Path], artifact_path: str) -> None:
    client = MlflowClient(tracking_uri=tracking_uri)
    for p in paths:
        if p.exists():
            client.log_artifact(run_id, str(p), artifact_path=artifact_path)


class WitclipZeroShotModel(mlflow.pyfunc.PythonModel):
    """pyfunc zero-shot classifier. Input: a DataFrame with `image` (file path or raw bytes) and `labels`
    (list of candidate labels, or one comma-separated string). Output: `label`, `score`, `scores`."""

    def load_context(self, context) -> None:
        from clip.checkpoint import load_model
        from clip.tokenizer import load_tokenizer
        from clip.transform import eval_transform

        model_dir = Path(context.artifacts["clip_model"])
        self.model = load_model(model_dir).eval()
        self.tokenizer = load_tokenizer(model_dir)  # tokenizer.json or OpenAI's vocab
        self.transform = eval_transform(self.model.config.vision.image_size)
        templates_path = model_dir / "templates.json"
        self.templates = json.loads(templates_path.read_text()) if templates_path.is_file() else list(DEFAULT_TEMPLATES)

    def _load_image(self, item):
        import io

        from PIL import Image

        if isinstance(item, (bytes, bytearray)):
            return Image.open(io.BytesIO(item)).convert("RGB")
        return Image.open(str(item)).convert("RGB")

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        from clip.zeroshot import build_classifier, zeroshot_logits

        rows = []
        classifiers: dict[tuple[str, ...], torch.Tensor] = {}
        for _, row in model_input.iterrows():
            labels = row["labels"]
            if isinstance(labels, str):
                labels = [s.strip() for s in labels.split(",") if s.strip()]
            labels = tuple(labels)
            if labels not in classifiers:
                classifiers[labels] = build_classifier(
                    self.model, self.tokenizer, list(labels), self.templates,
                    context_length=self.model.config.text.context_length, device="cpu",
                )  # fmt: skip
            image = self.transform(self._load_image(row["image"])).unsqueeze(0)
            with torch.no_grad():
                logits = zeroshot_logits(self.model, image, classifiers[labels], scale=None)  # learned temperature
                probs = logits.softmax(dim=-1)[0]
            best = int(probs.argmax())
            rows.append({"label": labels[best], "score": float(probs[best]), "scores": [float(p) for p in probs]})
        return pd.DataFrame(rows)


def _champion_mean_score(client: MlflowClient, model_name: str, alias: str) -> tuple[float | None, str | None]:
    try:
        mv = client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None, None
    value = mv.tags.get("mean_score")
    return (float(value) if value is not None else None), mv.version


def model_dir_files(model_dir: Path) -> tuple[list[Path], list[str]]:
    """(files of a model directory to bundle, what is missing): MODEL_FILES plus its tokenizer file."""
    from clip.tokenizer import TOKENIZER_FILES, find_tokenizer_file

    present = [model_dir / f for f in MODEL_FILES if (model_dir / f).is_file()]
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    tokenizer = find_tokenizer_file(model_dir)
    if tokenizer is None:
        missing.append(" or ".join(TOKENIZER_FILES))
    else:
        present.append(tokenizer)
    return present, missing


def log_clip_model(*, model_dir: Path, run_id: str, tracking_uri: str, model_name: str) -> str:
    """Log a model directory as the witclip pyfunc (`WitclipZeroShotModel`, artifact `clip_model` = the
    model files + templates.json) under artifact path `model` of `run_id`, register it as a new version
    of `model_name`, and return that version. Sets no tag and no alias."""
    import torch

    files, missing = model_dir_files(model_dir)
    if missing:
        raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)}")
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "clip_model"
        bundle.mkdir()
        for f in files:
            shutil.copy2(f, bundle / f.name)
        (bundle / "templates.json").write_text(json.dumps(list(DEFAULT_TEMPLATES)))
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=WitclipZeroShotModel(),
                artifacts={"clip_model": str(bundle)},
                registered_model_name=model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "witclip"],
            )
    return str(info.registered_model_version)


def register_model(
    *,
    train_dir: Path,
    eval_results: dict,
    out_dir: Path,
    run_id: str,
    tracking_uri: str,
    model_name: str,
    alias: str,
) -> dict[str, Any]:
    """Log the trained model as a pyfunc, register a version, and move `alias` to it if it beats the holder."""
    _, missing = model_dir_files(train_dir)
    if missing:
        raise FileNotFoundError(f"{train_dir} lacks {', '.join(missing)}: run the train stage first")
    client = MlflowClient(tracking_uri=tracking_uri)
    mean_score = float(eval_results["mean_score"])
    version = log_clip_model(model_dir=train_dir, run_id=run_id, tracking_uri=tracking_uri, model_name=model_name)
    client.set_model_version_tag(model_name, version, "mean_score", repr(mean_score))  # full precision: the gate compares it
    for name, r in eval_results["tasks"].items():
        if r["status"] == "ran":
            client.set_model_version_tag(model_name, version, f"{r['metric']}.{name}", f"{r['value']:.6f}")
    champion_acc, champion_version = _champion_mean_score(client, model_name, alias)
    promoted = champion_acc is None or mean_score > champion_acc
    if promoted:
        client.set_registered_model_alias(model_name, alias, version)
    decision = {
        "model_name": model_name,
        "version": version,
        "model_uri": f"models:/{model_name}/{version}",
        "mean_score": mean_score,
        "previous_alias_holder": champion_version,
        "previous_mean_score": champion_acc,
        "alias": alias,
        "promoted": promoted,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model_version.json").write_text(json.dumps(decision, indent=2))
    return {"version": int(version), "mean_score": mean_score, "promoted": int(promoted)}
