"""Importing weights: register an OpenAI-format CLIP checkpoint as a baseline model version
(`witclip import-weights`, whose command line is in `flows.cli.models`).

SOURCE is a local file or an http(s) URL of a checkpoint as OpenAI released them (a TorchScript archive)
or a plain state_dict saved with torch.save, fp16 or fp32. It is converted to witclip's model directory
(model.safetensors + config.json + the tokenizer file, see `clip.tokenizer.load_tokenizer`), logged to
MLflow as the same pyfunc the pipeline registers (`flows.registry.log_clip_model`), registered as a new
version of the registered model (`witclip` by default) tagged with its lineage, and the alias `baseline`
is pointed at it (moved if another version held it). `champion` belongs to the pipeline's promotion
gate and is never set or moved here.

Importing never runs code the checkpoint carries unless the file is vouched for. A torch.save file is
read with ``torch.load(weights_only=True)``; a TorchScript archive (a program: PyTorch documents no safe
mode for torch.jit.load) is read by `clip.checkpoint.read_torchscript_weights`, which never compiles or
runs its code. Only an archive that reader refuses (one whose classes carry their own ``__setstate__``,
or other content it does not know) goes to torch.jit.load, and only when it is vouched for: the user
pinned its sha256 (``--sha256``, and it matches), it comes from an OpenAI CLIP release URL
(`data.acquire.weights.openai_release_sha256`: OpenAI's hosts, ``/clip/models/<sha256>/<name>``, and it
matches), or ``trust_code`` (``--trust-code``) is given; otherwise it is refused with one line.

A pin is ``sha256`` (``--sha256``) or the hash in an OpenAI-style URL's path on any host
(`data.acquire.weights.pinned_sha256_from_url`); two that differ are an error. A pin is checked before
anything is loaded (a download: before the file is renamed into place, and over any digest the server
publishes). A URL's hash pins the bytes wherever it is, but anyone can name the hash of their own file
in their own URL, so on another host it does not let code run. Whatever reaches MLflow or a message
shows a URL through `data.common.urls.redact_url`.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path
from typing import Any

from data.acquire.weights import (
    OPENAI_RELEASE_HOSTS,
    is_url,
    openai_release_sha256,
    pinned_sha256_from_url,
)
from data.common.files import SHA256_HEX, atomic_write_json, sha256_file
from data.common.urls import redact_url
from flows.errors import UserError

DEFAULT_IMPORTS_DIR = Path("runs") / "imports"  # downloads and converted model directories
IMPORTED_FROM = "openai-format"
PROTECTED_ALIASES = ("champion",)  # moved only by the promotion gate (flows.registry.register_model)
_ALIAS_RE = re.compile(r"[A-Za-z0-9_-]+")  # fullmatch: "$" would let a trailing newline through


def fetch(source: str, downloads: Path, *, what: str, progress: bool = True, sha256: str | None = None) -> Path:
    """`data.acquire.weights.fetch_model_file`, its one-line failure as a UserError."""
    from data.acquire.weights import ModelFileError, fetch_model_file

    try:
        return fetch_model_file(source, downloads, what=what, progress=progress, sha256=sha256)
    except ModelFileError as err:
        raise UserError(str(err)) from None


def resolve_pin(source: str, sha256: str | None) -> tuple[str | None, str]:
    """(the sha256 the checkpoint must have, where the pin came from: "argument", "url" or "none").

    ``sha256`` is the caller's (--sha256); an OpenAI-style URL names one in its path, on any host (it pins
    the bytes; whether it lets code run is `may_run_code`'s to say). Both given and different is a
    UserError naming both."""
    if sha256 is not None and not SHA256_HEX.fullmatch(sha256.strip()):
        raise UserError(f"--sha256 {sha256!r}: expected 64 hex digits (the checkpoint's sha256)")
    pin = sha256.strip().lower() if sha256 is not None else None
    named = pinned_sha256_from_url(source)
    if pin is not None and named is not None and named != pin:
        raise UserError(f"--sha256 {pin} differs from the sha256 {named} the URL {redact_url(source)} names; "
                        "expected the same digest (or a URL without one)")
    if pin is not None:
        return pin, "argument"
    return (named, "url") if named is not None else (None, "none")


def may_run_code(source: str, pin: str | None, pinned_by: str, trust_code: bool) -> bool:
    """Whether a TorchScript archive the weights-only reader refuses may go to torch.jit.load (`resolve_pin`
    gave ``pin`` and ``pinned_by``): the user pinned its sha256 (``pinned_by == "argument"``), ``source``
    is an OpenAI CLIP release URL and ``pin`` is the hash it names
    (`data.acquire.weights.openai_release_sha256`), or the user trusts it (``trust_code``). A hash in any
    other URL pins the bytes but vouches for nothing: whoever made the file chose the URL."""
    release = openai_release_sha256(source)
    return trust_code or (pin is not None and (pinned_by == "argument" or release == pin))


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


def _convert(path: Path, label: str, *, allow_code: bool, url_pinned: bool = False):
    """(model, source dtype, how it was read) from an OpenAI-format checkpoint file; one-line UserError
    otherwise. ``allow_code``: a TorchScript archive the weights-only reader refuses may go to
    torch.jit.load (`may_run_code`). ``url_pinned``: the URL's hash pinned the file (the refusal then
    says why that was not enough)."""
    import torch

    from clip.checkpoint import (
        CodeRefused,
        UnsafeTorchError,
        load_openai_state_dict,
        read_openai_checkpoint,
    )

    try:
        sd, how = read_openai_checkpoint(path, allow_code=allow_code)
        dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in sd.values()
                         if isinstance(v, torch.Tensor) and v.is_floating_point()})
        model = load_openai_state_dict(sd)
    except UnsafeTorchError as e:
        raise UserError(str(e)) from None
    except CodeRefused as e:
        why = (f"the sha256 in its URL checks its bytes but lets code run only from OpenAI's release URLs "
               f"(https://{OPENAI_RELEASE_HOSTS[0]}/clip/models/<sha256>/<name>); " if url_pinned else "")
        raise UserError(f"checkpoint {label}: {e}; {why}pin it with --sha256 HEX (the digest its publisher "
                        "gives) or pass --trust-code if you trust the file") from None
    except Exception as e:  # noqa: BLE001 - anything unreadable or mismatched is the input's fault
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{label}: not an OpenAI-format CLIP checkpoint ({type(e).__name__}: {first})") from None
    return model, ",".join(dtypes) or "none", how


def _check_alias(alias: str) -> None:
    if alias in PROTECTED_ALIASES:
        raise UserError(f"--alias {alias}: @{alias} is moved only by the pipeline's promotion gate; "
                        "import-weights sets a comparison alias such as baseline")
    if not _ALIAS_RE.fullmatch(alias) or re.fullmatch(r"[vV]\d+", alias) or alias == "latest":
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
    sha256: str | None = None,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Fetch, convert, log and register an OpenAI-format CLIP checkpoint; point `alias` at the new version.

    ``sha256`` pins the checkpoint's digest (an OpenAI-style URL pins it too, `resolve_pin`); it is checked
    before anything is loaded. A TorchScript archive the weights-only reader refuses runs under
    torch.jit.load only when ``sha256`` is given, the source is an OpenAI CLIP release URL, or
    ``trust_code`` (`may_run_code`; a hash in another URL is not enough; see the module docstring).

    Returns {version, model_uri, sha256, config, alias, run_id, model_dir, source_dtype, loaded_with}.
    `config` is the name of the bundled config the weights match (e.g. "ViT-B-32"), or None.
    """
    from clip.checkpoint import save_model
    from flows.registry import log_clip_model
    from flows.tracking import check_tracking_uri, tracking_client

    _check_alias(alias)
    pin, pinned_by = resolve_pin(source, sha256)
    check_tracking_uri(tracking_uri)
    out_dir = Path(out_dir)
    shown = redact_url(source)
    vocab_source = _locate_vocab(vocab)  # before any download: a missing vocab fails at once
    vocab_shown = redact_url(vocab_source)
    vocab_path = fetch(vocab_source, out_dir / "downloads", what="vocab", progress=progress)
    # a pinned download is checked before it is renamed into place (data.acquire.download)
    ckpt_path = fetch(source, out_dir / "downloads", what="checkpoint", progress=progress, sha256=pin)

    sha = sha256_file(ckpt_path)
    if pin is not None and sha != pin:  # a local file (or a cached download) checked before anything loads it
        raise UserError(f"checkpoint {shown}: sha256 {sha} does not match the pinned {pin}; nothing was loaded")
    allow_code = may_run_code(source, pin, pinned_by, trust_code)
    model, source_dtype, loaded_with = _convert(ckpt_path, shown, allow_code=allow_code, url_pinned=pinned_by == "url")
    tokenizer, vocab_name = _load_vocab(vocab_path, vocab_shown)
    model_vocab = model.config.text.vocab_size
    if tokenizer.vocab_size > model_vocab:
        raise UserError(f"vocab {vocab_shown}: {tokenizer.vocab_size} token ids, but the checkpoint's text "
                        f"tower has {model_vocab}; pass --vocab with the tokenizer it was trained with")
    config_name = bundled_config_name(model.config)

    model_dir = out_dir / sha[:16]
    if model_dir.exists():
        shutil.rmtree(model_dir)
    save_model(model, model_dir)
    shutil.copyfile(vocab_path, model_dir / vocab_name)
    del model

    lineage = {
        "source": shown if is_url(source) else sha,  # credentials and signed tokens never reach MLflow
        "source_sha256": sha,
        "sha256_pin": pinned_by,  # argument (--sha256), url (an OpenAI-style URL) or none
        "loaded_with": loaded_with,
        "imported_from": IMPORTED_FROM,
        "source_dtype": source_dtype,
        "tokenizer": vocab_name,
    }
    if config_name:
        lineage["config"] = config_name
    if not is_url(source):
        lineage["source_file"] = ckpt_path.name
    atomic_write_json(model_dir.parent / f"{sha[:16]}.import.json", lineage)

    client = tracking_client(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=f"import-{config_name or 'openai'}-{sha[:8]}",
                            tags={"witclip.import": "1", **{f"witclip.{k}": v for k, v in lineage.items()}})
    run_id = run.info.run_id
    try:
        client.log_param(run_id, "source", shown[:6000])
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
        "loaded_with": loaded_with,
    }
