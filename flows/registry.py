"""MLflow's model registry: the witclip pyfunc zero-shot classifier, logging and registering a model
directory, and the alias gate (@candidate always, @champion when it beats the holder; promote, rollback).

Alias moves are serialised per (tracking store, model name) by `registry_lock`: whoever moves @champion
holds it from reading the current holder to writing the history tag, so two pipeline runs finishing at
once cannot both read the same holder and both move the alias (which would leave @champion on the worse
model, or the history short of a move). Registering the version itself (log_model: pickling, artifacts)
happens outside the lock. The lock is a file lock (`flows.locks`): beside the database for a sqlite
store, inside the directory for a file store; for a remote store (http(s), databricks, a database
server) it lives under the user's cache directory, so there it serialises only the processes of one
machine -- runs on other machines registering into the same server are not held back (a Prefect global
concurrency limit would be the way to serialise those; not done here).

The pyfunc class is pickled by reference into every logged model, so `flows.registry.WitclipZeroShotModel`
must stay importable under this name for already registered versions to load. Runs, metrics and the
tracking URI are `flows.tracking`'s. MLflow's active run is thread-local and Prefect may run code in
other threads, so everything here takes the run id explicitly and talks to the store through
`MlflowClient` (or a `start_run(run_id=...)` scoped to one call).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from data.common.files import atomic_write_json
from flows.locks import LockHeld, describe_holder, hold
from flows.retries import mlflow_call
from flows.tracking import sqlite_db_path, tracking_client

# A model directory: these two, plus one tokenizer file (clip.tokenizer.TOKENIZER_FILES: witclip's
# tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz for imported OpenAI weights).
MODEL_FILES = ("model.safetensors", "config.json")
DEFAULT_TEMPLATES = ("{c}", "a photo of {c}.", "an image of {c}.")


# A string that names a file or a URL rather than carrying an image, for the error message only: no
# string is ever opened, whatever it looks like. (A short one starting with "/" is a path; base64 of an
# image, which may start with "/" too -- a JPEG's does --, is longer.)
_PATH_OR_URL_RE = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*:|~|\.\.?[/\\]|[A-Za-z]:[\\/]|\\\\)"
                             r"|\.(?:png|jpe?g|gif|bmp|webp|tiff?)$", re.IGNORECASE)
_DATA_URI_RE = re.compile(r"^data:[^,;]*(?:;[^,;]*)*;base64,", re.IGNORECASE)
# Pixels one request image may have, read from its header before decoding: Pillow's own guard only
# fires near 179 Mpx (about 0.5 GB once converted to RGB), per row of a request anyone may send.
SERVED_MAX_PIXELS = 40_000_000  # the crawl's default cap (crawl.max_image_pixels)


def _bad_image(row: int, text: str | None, why: str) -> Exception:
    """The 400 answer (`mlflow models serve` maps INVALID_PARAMETER_VALUE to HTTP 400) for an unusable image:
    one line naming the row, what was wrong (a path or URL, when the string looks like one) and what is
    expected."""
    got = ""
    if text is not None:
        t = text.strip()
        if t[:5].lower() != "data:" and (_PATH_OR_URL_RE.search(t) or (t.startswith("/") and len(t) < 256)):
            why = "a path or URL, which the served model never opens"
        got = f" ({t if len(t) <= 60 else t[:57] + '...'!r})"
    return mlflow.exceptions.MlflowException.invalid_parameter_value(
        f"image in row {row}: {why}{got}; expected the image itself as raw bytes, base64 text or a "
        "data:image/...;base64, URI")


class WitclipZeroShotModel(mlflow.pyfunc.PythonModel):
    """pyfunc zero-shot classifier. Input: a DataFrame with `image` and `labels`. `image` is the image
    itself: raw bytes, base64 text, or a ``data:image/...;base64,`` URI (what a REST client sends). It is
    never a path or a URL: the model is served to whoever can reach `mlflow models serve`, and reading a
    file the request names would hand out the server's files. Anything else (a path, a ``file:`` or
    http URL, text that is not base64 of an image) is refused with an MlflowException whose error code,
    INVALID_PARAMETER_VALUE, the scoring server answers as HTTP 400. `labels` is a list of candidate
    labels, or one comma-separated string. Output: `label`, `score`, `scores`."""

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

    @staticmethod
    def _load_image(item: Any, row: int = 0):
        """A PIL RGB image from the request's bytes (see the class docstring); never opens a path."""
        import binascii
        import io

        from PIL import Image

        text = None
        if isinstance(item, (bytes, bytearray, memoryview)):
            data = bytes(item)
        elif isinstance(item, str):
            text = item
            payload = item.strip()
            if payload[:5].lower() == "data:":
                if not _DATA_URI_RE.match(payload):
                    raise _bad_image(row, text, "a data: URI that is not base64")
                payload = payload.split(",", 1)[1]
            try:
                data = base64.b64decode("".join(payload.split()), validate=True)  # (line breaks are fine)
            except (binascii.Error, ValueError):
                raise _bad_image(row, text, "not base64") from None
        else:
            raise _bad_image(row, None, f"a value of type {type(item).__name__}")
        try:
            image = Image.open(io.BytesIO(data))  # the header only
            width, height = image.size
            if width * height > SERVED_MAX_PIXELS:
                raise _bad_image(row, None, f"{width}x{height} pixels, over the {SERVED_MAX_PIXELS} a served "
                                            "image may have")
            return image.convert("RGB")
        except mlflow.exceptions.MlflowException:
            raise
        except Exception as e:  # noqa: BLE001 - any decoder failure (PIL raises several kinds) is the request's
            raise _bad_image(row, text, f"not a readable image ({type(e).__name__})") from None

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import torch

        from clip.zeroshot import build_classifier, zeroshot_logits

        rows = []
        classifiers: dict[tuple[str, ...], torch.Tensor] = {}
        for i, (_, row) in enumerate(model_input.iterrows()):
            labels = row["labels"]
            if isinstance(labels, str):
                labels = [s.strip() for s in labels.split(",") if s.strip()]
            labels = tuple(labels)
            if labels not in classifiers:
                classifiers[labels] = build_classifier(
                    self.model, self.tokenizer, list(labels), self.templates,
                    context_length=self.model.config.text.context_length, device="cpu",
                )  # fmt: skip
            image = self.transform(self._load_image(row["image"], i)).unsqueeze(0)
            with torch.no_grad():
                logits = zeroshot_logits(self.model, image, classifiers[labels], scale=None)  # learned temperature
                probs = logits.softmax(dim=-1)[0]
            best = int(probs.argmax())
            rows.append({"label": labels[best], "score": float(probs[best]), "scores": [float(p) for p in probs]})
        return pd.DataFrame(rows)


HISTORY_TAG = "witclip.champion_history"  # registered-model tag: JSON list of versions that held the alias


def version_scores(mv: Any) -> dict[str, float]:
    """Per-task eval scores recorded on a model version (tags ``score.<task>``)."""
    return {k[len("score."):]: float(v) for k, v in mv.tags.items() if k.startswith("score.")}


def promotion_decision(new: dict[str, float], holder: dict[str, float] | None, margin: float) -> dict[str, Any]:
    """The eval gate: promote when there is no holder, or when the new model's mean over the tasks both
    models ran is at least the holder's mean over those tasks plus ``margin``."""
    if holder is None:
        return {"promoted": True, "reason": "no current holder", "common_tasks": sorted(new)}
    common = sorted(set(new) & set(holder))
    if not common:
        return {"promoted": False, "common_tasks": [],
                "reason": "no eval task in common with the holder: compare by hand, then `witclip promote`"}
    new_mean = sum(new[t] for t in common) / len(common)
    holder_mean = sum(holder[t] for t in common) / len(common)
    promoted = new_mean >= holder_mean + margin
    return {"promoted": promoted, "common_tasks": common, "new_mean": new_mean, "holder_mean": holder_mean,
            "margin": margin,
            "reason": f"mean over {len(common)} common task(s) {new_mean:.6f} "
                      f"{'>=' if promoted else '<'} holder {holder_mean:.6f} + margin {margin}"}


# Moving aliases takes seconds (more while flows.retries retries a dropped connection), so a generous wait
# only ever queues a register behind other moves; it gives up (LockHeld) on a holder that is stuck.
REGISTRY_LOCK_WAIT_S = 300.0


def _is_file_store(tracking_uri: str) -> bool:
    """MLflow's own test (a bare path or file: URI, but not the bare word ``databricks``)."""
    from mlflow.utils.uri import is_local_uri

    try:
        return is_local_uri(tracking_uri)
    except mlflow.exceptions.MlflowException:  # file://otherhost/...: not a store MLflow opens
        return False


def registry_lock_path(tracking_uri: str, model_name: str) -> Path:
    """The lock file that serialises alias moves of ``model_name`` on ``tracking_uri``:

    - ``sqlite:///path/mlflow.db`` -> ``path/mlflow.db.registry-<model>.lock`` (a relative path is taken
      from the working directory, as SQLAlchemy does);
    - a file store (a path, or a ``file:`` URI) -> ``registry-<model>.lock`` inside that directory;
    - anything else (http(s), databricks, postgresql, in-memory sqlite) ->
      ``$XDG_CACHE_HOME/witclip/locks/registry-<model>-<hash of URI and model>.lock`` (default
      ``~/.cache``): it serialises only the processes of this machine.

    ``<model>`` is the name with anything but letters, digits, ``.``, ``_`` and ``-`` made ``_``; two
    names that read the same then share one lock, which only makes them wait for each other."""
    slug = re.sub(r"[^A-Za-z0-9._-]", "_", model_name)[:100]
    db = sqlite_db_path(tracking_uri)
    if db is not None:
        db = db.resolve()
        return db.with_name(f"{db.name}.registry-{slug}.lock")
    if _is_file_store(tracking_uri):
        parsed = urlparse(tracking_uri)
        store_dir = Path(unquote(parsed.path) if parsed.scheme == "file" else tracking_uri)
        return store_dir.resolve() / f"registry-{slug}.lock"
    # the same server spelt with or without a trailing slash is one store
    digest = hashlib.sha256(f"{tracking_uri.rstrip('/')}\n{model_name}".encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "witclip" / "locks" / f"registry-{slug}-{digest}.lock"


@contextmanager
def registry_lock(tracking_uri: str, model_name: str, *, wait_s: float = REGISTRY_LOCK_WAIT_S) -> Iterator[Path]:
    """Hold the alias lock of ``model_name`` on ``tracking_uri`` (`registry_lock_path`) for the block;
    re-entrant within a process. Waits up to ``wait_s`` for another holder, saying so once, then raises
    `flows.locks.LockHeld` naming it. Yields the lock file's path."""
    path = registry_lock_path(tracking_uri, model_name)
    purpose = f"the alias lock of model {model_name!r} on {tracking_uri}"
    with ExitStack() as stack:
        try:
            stack.enter_context(hold(path, purpose=purpose))
        except LockHeld as busy:  # a silent wait would look like a hang
            print(f"[registry] waiting up to {wait_s:.0f}s for {describe_holder(busy.holder)} "
                  f"to finish moving aliases of {model_name} (lock {path})")
            stack.enter_context(hold(path, purpose=purpose, wait_s=wait_s))
        yield path


def _alias_holder(client: MlflowClient, model_name: str, alias: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _history(client: MlflowClient, model_name: str, alias: str) -> list[str]:
    raw = client.get_registered_model(model_name).tags.get(f"{HISTORY_TAG}.{alias}")
    return json.loads(raw) if raw else []


def move_alias(client: MlflowClient, model_name: str, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` and remember the move, so ``rollback_alias`` can undo it. The caller
    holds `registry_lock`: the history is read, appended to and written back."""
    history = _history(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, str(version))
    if not history or history[-1] != str(version):
        history.append(str(version))
    client.set_registered_model_tag(model_name, f"{HISTORY_TAG}.{alias}", json.dumps(history))


def rollback_alias(client: MlflowClient, model_name: str, alias: str) -> tuple[str, str]:
    """Point ``alias`` back at the version that held it before the current one; returns (from, to). The
    caller holds `registry_lock`: the history is read, cut and written back."""
    history = _history(client, model_name, alias)
    if len(history) < 2:
        raise ValueError(f"@{alias} of {model_name} has no earlier holder to roll back to")
    current, previous = history[-1], history[-2]
    client.set_registered_model_alias(model_name, alias, previous)
    client.set_registered_model_tag(model_name, f"{HISTORY_TAG}.{alias}", json.dumps(history[:-1]))
    return current, previous


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


def _example_image_base64() -> str:
    """A 32-pixel red circle on white as base64 PNG: the logged model's input example."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((6, 6, 26, 26), fill=(220, 30, 30))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


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
            shutil.copyfile(f, bundle / f.name)  # not copy2: stage outputs are read-only, the bundle need not be
        (bundle / "templates.json").write_text(json.dumps(list(DEFAULT_TEMPLATES)))
        example = pd.DataFrame({"image": [_example_image_base64()], "labels": ["a red circle,a blue square"]})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=WitclipZeroShotModel(),
                artifacts={"clip_model": str(bundle)},
                registered_model_name=model_name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "witclip"],
                input_example=example,  # the signature is inferred from it: image (string), labels (string)
            )
    return str(info.registered_model_version)


def _tag_version(client: MlflowClient, model_name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))


def register_model(
    *,
    train_dir: Path,
    eval_results: dict,
    out_dir: Path,
    run_id: str,
    tracking_uri: str,
    model_name: str,
    alias: str,
    candidate_alias: str = "candidate",
    margin: float = 0.0,
    lineage: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Log the trained model as a pyfunc and register a version: tagged with its eval scores and lineage,
    given ``candidate_alias``, and given ``alias`` (champion) only if it passes the eval gate
    (`promotion_decision`). The decision and both alias moves happen under `registry_lock` (waiting up to
    REGISTRY_LOCK_WAIT_S, then LockHeld). The decision and its figures go to out_dir/model_version.json
    and to the run."""
    _, missing = model_dir_files(train_dir)
    if missing:
        raise FileNotFoundError(f"{train_dir} lacks {', '.join(missing)}: run the train stage first")
    client = tracking_client(tracking_uri)
    mean_score = float(eval_results["mean_score"])
    ran = {name: r for name, r in eval_results["tasks"].items() if r["status"] == "ran"}
    version = log_clip_model(model_dir=train_dir, run_id=run_id, tracking_uri=tracking_uri, model_name=model_name)
    tags = {"mean_score": repr(mean_score), "pipeline_run_id": run_id, **(lineage or {})}
    for name, r in ran.items():
        tags[f"score.{name}"] = repr(float(r["value"]))  # full precision: the gate compares them
        tags[f"metric.{name}"] = r["metric"]
    # from here on every call is idempotent, so a transient failure is retried (flows.retries)
    mlflow_call(_tag_version, client, model_name, version, tags)
    # the holder is read under the lock: read outside it, another run could move @champion between our
    # read and our move, and the gate would have compared against a model that no longer holds it
    with registry_lock(tracking_uri, model_name):
        holder = mlflow_call(_alias_holder, client, model_name, alias)
        decision = promotion_decision({n: float(r["value"]) for n, r in ran.items()},
                                      version_scores(holder) if holder is not None else None, margin)
        mlflow_call(client.set_registered_model_alias, model_name, candidate_alias, version)
        if decision["promoted"]:
            mlflow_call(move_alias, client, model_name, alias, version)
    decision.update({
        "model_name": model_name,
        "version": version,
        "model_uri": f"models:/{model_name}/{version}",
        "mean_score": mean_score,
        "previous_alias_holder": holder.version if holder is not None else None,
        "alias": alias,
        "candidate_alias": candidate_alias,
        "lineage": tags,
    })
    atomic_write_json(out_dir / "model_version.json", decision)
    mlflow_call(client.log_dict, run_id, decision, "register/decision.json")
    mlflow_call(client.set_tag, run_id, "register.decision", decision["reason"])
    print(f"[register] version {version}: @{candidate_alias}; @{alias} "
          f"{'moved to it' if decision['promoted'] else 'unchanged'} ({decision['reason']})")
    return {"version": int(version), "mean_score": mean_score, "promoted": int(decision["promoted"])}
