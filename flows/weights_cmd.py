"""`witclip import-weights`: register an OpenAI-format CLIP checkpoint as a baseline model version.

SOURCE is a local file or an http(s) URL of a checkpoint as OpenAI released them (a TorchScript archive)
or a plain state_dict saved with torch.save, fp16 or fp32. It is converted to witclip's model directory
(model.safetensors + config.json + the tokenizer file, see `clip.tokenizer.load_tokenizer`), logged to
MLflow as the same pyfunc the pipeline registers (`flows.registry.log_clip_model`), registered as a new
version of the registered model (`witclip` by default) tagged with its lineage, and the alias `baseline`
is pointed at it (moved if another version held it). `champion` belongs to the pipeline's promotion
gate and is never set or moved here.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from data.common.files import atomic_write_json, sha256_file
from flows.errors import UserError

DEFAULT_OUT = Path("runs") / "imports"
IMPORTED_FROM = "openai-format"
PROTECTED_ALIASES = ("champion",)  # moved only by the promotion gate (flows.registry.register_model)
_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]+$")


# ----------------------------------------------------------------------------- fetching
def _is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def _url_dest(url: str, downloads: Path) -> Path:
    """downloads/<hash of the URL>/<the URL's file name>: one place per URL, named like the remote file."""
    name = Path(unquote(urlparse(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download"
    return downloads / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch(source: str, downloads: Path, *, what: str, progress: bool = True) -> Path:
    """A local file as is; an http(s) URL downloaded (resumably) under `downloads`. One-line UserError
    for a missing file, an unsupported scheme or a failed download (the message names the host)."""
    if _is_url(source):
        from data.acquire.download import FETCH_MANIFEST, DownloadError, download_files

        dest = _url_dest(source, downloads)
        dest.parent.mkdir(parents=True, exist_ok=True)
        host = urlparse(source).netloc
        try:
            # the manifest records each file's sha256: a later run re-uses a file only if its bytes match
            download_files([(source, dest)], manifest=downloads / FETCH_MANIFEST, progress=progress, desc=what)
        except DownloadError as e:  # one line naming the host (HostUnreachable: within ~5 s)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(msg if host in msg else f"{what} {source}: {msg}") from None
        except (ValueError, OSError) as e:  # a malformed URL; anything the downloader did not wrap
            raise UserError(f"{what} {source}: download from {host or 'nowhere'} failed: {e}") from None
        if not dest.is_file():
            raise UserError(f"{what} {source}: download from {host} produced no file")
        return dest
    if "://" in source:
        raise UserError(f"{what} {source}: unsupported URL scheme; expected a local file or an http(s) URL")
    path = Path(source).expanduser()
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"{what} {source} {state}; expected a local file or an http(s) URL")
    return path


# ----------------------------------------------------------------------------- tokenizer vocab
def packaged_openai_vocab() -> Path | None:
    """OpenAI's bpe_simple_vocab_16e6.txt.gz as shipped inside an installed open_clip (not imported)."""
    from clip.tokenizer import OPENAI_VOCAB_FILE

    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / OPENAI_VOCAB_FILE
        if path.is_file():
            return path
    return None


def _locate_vocab(vocab: str | None) -> str:
    """Where the tokenizer comes from: --vocab, else open_clip's copy of OpenAI's vocab."""
    from clip.tokenizer import OPENAI_VOCAB_FILE

    if vocab:
        return vocab
    found = packaged_openai_vocab()
    if found is None:
        raise UserError(f"no tokenizer vocab: pass --vocab PATH_OR_URL to OpenAI's {OPENAI_VOCAB_FILE} "
                        "(or install open_clip_torch, which ships it)")
    return str(found)


def _load_vocab(path: Path, label: str):
    """(tokenizer, file name in the model directory): a .json is witclip's tokenizer.json, anything
    else is read as OpenAI's gzipped merges file."""
    from clip.tokenizer import (
        OPENAI_VOCAB_FILE,
        TOKENIZER_FILE,
        CaptionTokenizer,
        load_openai_tokenizer,
    )

    try:
        if path.name.endswith(".json"):
            return CaptionTokenizer.load(path), TOKENIZER_FILE
        return load_openai_tokenizer(path), OPENAI_VOCAB_FILE
    except Exception as e:  # noqa: BLE001 - any failure: not a usable vocab
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"vocab {label}: not a tokenizer.json or OpenAI {OPENAI_VOCAB_FILE} "
                        f"({type(e).__name__}: {first})") from None


# ----------------------------------------------------------------------------- conversion
def bundled_config_name(cfg) -> str | None:
    """Name of the bundled config (clip/configs/*.json) equal to `cfg`, if any (e.g. ViT-B-32)."""
    import clip

    for name in clip.list_models():
        if clip.get_config(name) == cfg:
            return name
    return None


def _convert(path: Path, label: str):
    """(model, source dtype) from an OpenAI-format checkpoint file; one-line UserError otherwise."""
    import torch

    from clip.checkpoint import load_openai_state_dict, read_openai_state_dict

    try:
        sd = read_openai_state_dict(path)
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point()})
        model = load_openai_state_dict(sd)
    except Exception as e:  # noqa: BLE001 - anything unreadable or mismatched is the input's fault
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{label}: not an OpenAI-format CLIP checkpoint ({type(e).__name__}: {first})") from None
    return model, ",".join(dtypes) or "none"


def _check_alias(alias: str) -> None:
    if alias in PROTECTED_ALIASES:
        raise UserError(f"--alias {alias}: @{alias} is moved only by the pipeline's promotion gate; "
                        "import-weights sets a comparison alias such as baseline")
    if not _ALIAS_RE.match(alias) or re.fullmatch(r"[vV]\d+", alias) or alias == "latest":
        raise UserError(f"--alias {alias!r}: expected letters, digits, '_' or '-' (not 'latest' or v<N>)")


def import_weights(
    source: str,
    *,
    name: str = "witclip",
    alias: str = "baseline",
    vocab: str | None = None,
    tracking_uri: str,
    out_dir: Path,
    experiment: str = "witclip",
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch, convert, log and register an OpenAI-format CLIP checkpoint; point `alias` at the new version.

    Returns {version, model_uri, sha256, config, alias, run_id, model_dir, source_dtype}. `config` is
    the name of the bundled config the weights match (e.g. "ViT-B-32"), or None.
    """
    from mlflow.tracking import MlflowClient

    from clip.checkpoint import save_model
    from flows.registry import check_tracking_uri, log_clip_model

    _check_alias(alias)
    check_tracking_uri(tracking_uri)
    out_dir = Path(out_dir)
    vocab_source = _locate_vocab(vocab)  # before any download: a missing vocab fails at once
    vocab_path = fetch(vocab_source, out_dir / "downloads", what="vocab", progress=progress)
    ckpt_path = fetch(source, out_dir / "downloads", what="checkpoint", progress=progress)

    sha = sha256_file(ckpt_path)
    model, source_dtype = _convert(ckpt_path, source)
    tokenizer, vocab_name = _load_vocab(vocab_path, vocab_source)
    model_vocab = model.config.text.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise UserError(f"vocab {vocab_source}: {tokenizer.vocab_size} token ids, but the checkpoint's text "
                        f"tower has {model_vocab}; pass --vocab with the tokenizer it was trained with")
    config_name = bundled_config_name(model.config)

    model_dir = out_dir / sha[:16]
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_model(model, model_dir)
    shutil.copyfile(vocab_path, model_dir / vocab_name)
    del model

    lineage = {
        "source": source if _is_url(source) else sha,
        "source_sha256": sha,
        "imported_from": IMPORTED_FROM,
        "source_dtype": source_dtype,
        "tokenizer": vocab_name,
    }
    if config_name:
        lineage["config"] = config_name
    if not _is_url(source):
        lineage["source_file"] = ckpt_path.name
    atomic_write_json(model_dir.parent / f"{sha[:16]}.import.json", lineage)

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"import-{config_name or 'openai'}-{sha[:8]}",
                            tags={"witclip.import": "1", **{f"witclip.{k}": v for k, v in lineage.items()}})
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "source", source[:6000])
        client.log_artifact(run_id, str(model_dir.parent / f"{sha[:16]}.import.json"), artifact_path="import")
        version = log_clip_model(model_dir=model_dir, run_id=run_id, tracking_uri=tracking_uri, model_name=name)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    for key, value in lineage.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, alias, version)  # moves it when another version held it
    return {
        "version": int(version),
        "model_uri": f"models:/{name}/{version}",
        "sha256": sha,
        "config": config_name,
        "alias": alias,
        "run_id": run_id,
        "model_dir": str(model_dir),
        "source_dtype": source_dtype,
    }


# ----------------------------------------------------------------------------- command line
def cmd_import_weights(args: argparse.Namespace) -> int:
    from flows.registry import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    result = import_weights(args.source, name=args.name, alias=args.alias, vocab=args.vocab, tracking_uri=uri,
                            out_dir=Path(args.out), experiment=args.experiment, progress=True)
    config = result["config"] or "no bundled config"
    print(f"registered {result['model_uri']} as @{result['alias']} ({config}, {result['source_dtype']} source, "
          f"sha256 {result['sha256']})")
    print(f"model directory: {result['model_dir']}; MLflow store: {uri}")
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Add `import-weights` to the `witclip` subcommands (`sub` = ArgumentParser.add_subparsers())."""
    p = sub.add_parser(
        "import-weights",
        help="register an OpenAI-format CLIP checkpoint (file or URL) as a model version with alias baseline",
        description="Convert an OpenAI-format CLIP checkpoint (TorchScript archive or torch.save state_dict, "
                    "fp16 or fp32) to witclip's format, log it to MLflow and register it with an alias "
                    "(baseline) for the eval stage and the promotion gate to compare against. "
                    "Never sets @champion.",
    )
    p.add_argument("source", metavar="SOURCE", help="checkpoint file or http(s) URL")
    p.add_argument("--name", default="witclip", help="registered model name (default: witclip)")
    p.add_argument("--alias", default="baseline", help="alias to point at the new version (default: baseline)")
    p.add_argument("--vocab", help="tokenizer: OpenAI's bpe_simple_vocab_16e6.txt.gz (file or URL) or a "
                                   "tokenizer.json (default: the copy open_clip ships, when installed)")
    p.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", default="witclip", help="MLflow experiment of the import run (default: witclip)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help=f"where downloads and converted model directories go (default: {DEFAULT_OUT})")
    p.set_defaults(fn=cmd_import_weights)
    return p
