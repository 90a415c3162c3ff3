"""Model export (safetensors + config.json), resumable training state (torch.save), and
import of OpenAI's released CLIP checkpoints (ViT and ModifiedResNet).

Both keep OpenAI's parameter names, so an OpenAI state_dict loads without renaming.
Training state holds only tensors, numbers, strings, lists and dicts, so it loads with
``torch.load(weights_only=True)`` (no arbitrary unpickling; refused on a torch older than 2.6,
whose weights_only mode could be bypassed). Nothing here runs code a checkpoint carries unless the
caller says so: OpenAI's TorchScript archives are read by a weights-only reader that never compiles
or runs their code, and torch.jit.load is used only with ``allow_code=True``.

``save_model`` writes the same bytes for the same weights (no time, path or version in the
safetensors metadata), so two equal trainings can be compared by file hash. Files the training
engine rewrites (checkpoints, metrics.jsonl) go through ``write_atomically``: readers and a kill at
any moment see the old file or the new one, never a mix.
"""

from __future__ import annotations

import collections
import dataclasses
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
    of the one before it, rather than ending the run. UnsafeTorchError on a torch older than
    MIN_SAFE_TORCH (its weights_only unpickler is not safe; see `check_safe_torch`).
    """
    check_safe_torch()
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


# -----------------------------------------------------------------------------
# Loading weights without running code
#
# torch.load(weights_only=True) restricts unpickling to tensors and plain containers, but it was
# bypassable before torch 2.6 (CVE-2025-32434). A TorchScript archive is a program: torch.jit.load
# compiles its code/ and runs it (a module's __setstate__ runs while loading), and PyTorch
# documents no safe mode for it. So a TorchScript archive is read here by
# `read_torchscript_weights`, which unpickles data.pkl with a closed list of globals and never
# compiles or runs the code/ files (it only reads their ``__parameters__`` / ``__buffers__``
# declarations, as text). torch.jit.load is used only when the caller allows code
# (`read_openai_checkpoint(allow_code=True)`): for an archive that reader refuses.

MIN_SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) is bypassable below this (CVE-2025-32434)


class UnsafeTorchError(RuntimeError):
    """The installed torch cannot load weights safely; one line."""


class TorchScriptReadError(ValueError):
    """A TorchScript archive holds something the weights-only reader does not read; one line."""


class CodeRefused(ValueError):
    """Reading the checkpoint would run code it carries, and the caller did not allow that; one line."""


def check_safe_torch(version: str | None = None) -> None:
    """Raise UnsafeTorchError when torch (``version``, default the installed one) is older than
    MIN_SAFE_TORCH, whose ``weights_only=True`` unpickler can be made to run code."""
    version = version or torch.__version__
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) < MIN_SAFE_TORCH:
        need = ".".join(map(str, MIN_SAFE_TORCH))
        raise UnsafeTorchError(f"torch {version} cannot load checkpoints safely (torch.load weights_only=True "
                               f"can run code before {need}, CVE-2025-32434); expected torch>={need}")


_STORAGE_DTYPES = {
    f"{name}Storage": dtype for name, dtype in (
        ("Float", torch.float32), ("Double", torch.float64), ("Half", torch.float16),
        ("BFloat16", torch.bfloat16), ("Long", torch.int64), ("Int", torch.int32), ("Short", torch.int16),
        ("Char", torch.int8), ("Byte", torch.uint8), ("Bool", torch.bool),
        ("ComplexFloat", torch.complex64), ("ComplexDouble", torch.complex128),
    )
}
_CLASS_RE = re.compile(r"^class (\w+)\((\w+)\):")
_DECL_RE = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])\s*$")


@dataclasses.dataclass
class _ScriptClass:
    """What the code/ files declare about a TorchScript class (read as text, never run)."""

    base: str
    parameters: list[str] = dataclasses.field(default_factory=list)
    buffers: list[str] = dataclasses.field(default_factory=list)
    has_setstate: bool = False


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage of the archive (``data/<key>``) as the reader's persistent_load returns it; a pickle
    cannot make one itself (no global names this class), so a tensor can only view the archive's bytes."""

    dtype: torch.dtype
    untyped: torch.UntypedStorage
    key: str


class _ScriptObject:
    """An inert stand-in for a pickled ``__torch__`` object: its class name and attribute dict."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):  # written by the class's own __getstate__: only its code reads it
            raise TorchScriptReadError(f"{self.qualname} keeps a custom state (its __setstate__ is code)")
        self.state = state


def _script_classes(zf: zipfile.ZipFile, prefix: str) -> dict[str, _ScriptClass]:
    """{qualified name: declarations} from ``<prefix>code/**.py``: ``code/__torch__/a/b.py`` holding
    ``class C(Module):`` is ``__torch__.a.b.C``."""
    import ast

    classes: dict[str, _ScriptClass] = {}
    code = prefix + "code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = name[len(code):-len(".py")].replace("/", ".")
        current: _ScriptClass | None = None
        for line in zf.read(name).decode("utf-8", errors="replace").splitlines():
            if m := _CLASS_RE.match(line):
                current = classes[f"{module}.{m.group(1)}"] = _ScriptClass(base=m.group(2))
            elif line and not line[0].isspace():
                current = None  # a top-level function: not part of a class
            elif current is not None and (m := _DECL_RE.match(line)):
                names = ast.literal_eval(m.group(2))  # a literal list of strings; nothing is evaluated
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise TorchScriptReadError(f"{name}: unreadable {m.group(1)} declaration")
                setattr(current, m.group(1).strip("_"), names)
            elif current is not None and line.startswith("  def __setstate__("):
                current.has_setstate = True
    return classes


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """torch._utils._rebuild_tensor_v2 for the reader, which first checks that the view stays inside
    its storage (Tensor.set_ does not: a crafted stride would read past it)."""
    if not isinstance(storage, _Storage):
        raise TorchScriptReadError(f"a tensor over a {type(storage).__name__}, not an archive storage")
    dtype, untyped, key = storage.dtype, storage.untyped, storage.key
    numbers = (offset, *size, *stride) if isinstance(size, tuple) and isinstance(stride, tuple) else (None,)
    if (not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers)
            or len(size) != len(stride)):
        raise TorchScriptReadError(f"tensor on storage {key}: malformed offset/size/stride")
    if metadata:  # conjugate / negative views: never in a state_dict of weights
        raise TorchScriptReadError(f"tensor on storage {key}: unsupported tensor metadata {sorted(metadata)}")
    # requires_grad and backward hooks are dropped: weights are read detached, hooks never restored
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for n in size:
        numel *= n
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else 0
    if end * itemsize > untyped.nbytes():
        raise TorchScriptReadError(f"tensor on storage {key} reaches past its {untyped.nbytes()} bytes")
    return torch.empty((0,), dtype=dtype).set_(untyped, offset, tuple(size), tuple(stride))


# globals a TorchScript data.pkl may name, each mapped to an inert stand-in (anything else is refused)
_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): lambda value, type_str: value,
}


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of a TorchScript archive, as ``torch.jit.load(path).state_dict()`` gives it
    (parameters and buffers of every module, tensors on the CPU), read without compiling or
    running any of the archive's code.

    ``data.pkl`` is unpickled with a closed list of globals: tensor rebuilding (bounds-checked), an
    OrderedDict, TorchScript's list helpers, storage types, and the archive's own ``__torch__``
    classes as inert attribute holders. Which attributes are parameters and buffers comes from the
    ``__parameters__`` / ``__buffers__`` lines of the class definitions in ``code/`` (read as text).
    Raises TorchScriptReadError (one line) for anything else: another global, a class with its own
    ``__setstate__`` (code that torch.jit.load would run), quantized or sparse tensors, a big-endian
    archive, a storage that is missing or too short."""
    import pickle
    import sys

    path = Path(path)
    with zipfile.ZipFile(path) as zf:
        roots = [n[: -len("data.pkl")] for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(roots) != 1:
            raise TorchScriptReadError(f"expected one <name>/data.pkl, found {len(roots)}")
        prefix = roots[0]
        names = set(zf.namelist())
        if prefix + "byteorder" in names:
            order = zf.read(prefix + "byteorder").decode(errors="replace").strip()
            if order != sys.byteorder:
                raise TorchScriptReadError(f"written {order}-endian, this machine is {sys.byteorder}-endian")
        classes = _script_classes(zf, prefix)
        holders: dict[str, type] = {}
        storages: dict[str, _Storage] = {}

        class Reader(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                if (module, name) in _SAFE_GLOBALS:
                    return _SAFE_GLOBALS[(module, name)]
                if module == "torch" and name in _STORAGE_DTYPES:
                    return _STORAGE_DTYPES[name]
                qualname = f"{module}.{name}"
                if module.split(".")[0] == "__torch__" and qualname in classes:
                    if classes[qualname].has_setstate:
                        raise TorchScriptReadError(f"its class {qualname} defines __setstate__, code torch.jit.load runs")
                    if qualname not in holders:
                        holders[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
                    return holders[qualname]
                raise TorchScriptReadError(f"data.pkl names {qualname}, which the weights-only reader does not load")

            def persistent_load(self, pid: Any) -> Any:
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                        and isinstance(pid[1], torch.dtype) and isinstance(pid[2], str)):
                    raise TorchScriptReadError(f"unexpected persistent id {str(pid)[:80]}")
                _, dtype, key, _location, numel = pid  # always read to the CPU
                if key not in storages:
                    entry = f"{prefix}data/{key}"
                    if entry not in names:
                        raise TorchScriptReadError(f"storage {key} is missing from the archive")
                    raw = bytearray(zf.read(entry))
                    itemsize = torch.empty((), dtype=dtype).element_size()
                    if not isinstance(numel, int) or len(raw) < numel * itemsize:
                        raise TorchScriptReadError(f"storage {key}: {len(raw)} bytes, fewer than announced")
                    storages[key] = _Storage(dtype, torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8)
                                             if raw else torch.UntypedStorage(0), key)
                elif storages[key].dtype != dtype:
                    raise TorchScriptReadError(f"storage {key} is read as two dtypes")
                return storages[key]

        with zf.open(prefix + "data.pkl") as fh:
            try:
                root = Reader(fh).load()
            except TorchScriptReadError:
                raise
            except Exception as e:  # noqa: BLE001 - a malformed pickle is an unreadable archive
                raise TorchScriptReadError(f"data.pkl: {type(e).__name__}: {str(e)[:120]}") from None

    state: dict[str, torch.Tensor] = {}

    def walk(obj: _ScriptObject, prefix: str, seen: frozenset[int]) -> None:
        declared = classes[obj.qualname]
        attrs = getattr(obj, "state", None)
        if attrs is None or declared.base != "Module" or id(obj) in seen:
            raise TorchScriptReadError(f"{obj.qualname} is not a module with attributes")
        for name in (*declared.parameters, *declared.buffers):
            value = attrs.get(name)
            if value is None:  # an unset optional parameter: state_dict leaves it out
                continue
            if not isinstance(value, torch.Tensor):
                raise TorchScriptReadError(f"{prefix}{name} is declared a parameter/buffer but is not a tensor")
            state[prefix + name] = value
        for name, value in attrs.items():
            if isinstance(value, _ScriptObject) and classes[value.qualname].base == "Module":
                walk(value, f"{prefix}{name}.", seen | {id(obj)})

    if not isinstance(root, _ScriptObject):
        raise TorchScriptReadError(f"data.pkl holds a {type(root).__name__}, not a module")
    walk(root, "", frozenset())
    return state


def read_openai_checkpoint(path: str | Path, *, allow_code: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, how it was read) of a TorchScript archive (OpenAI's ``*.pt`` releases) or a
    torch.save file; a ``{"state_dict": ...}`` wrapper is unwrapped.

    How: ``"torch.load(weights_only=True)"`` for a torch.save file; ``"torchscript weights-only"``
    for a TorchScript archive `read_torchscript_weights` reads; ``"torch.jit.load"`` for one it
    refuses, only when ``allow_code`` (the caller vouches for the file: it is pinned by hash, or
    trusted). Otherwise such an archive raises CodeRefused. UnsafeTorchError on a torch older
    than MIN_SAFE_TORCH."""
    check_safe_torch()
    path = Path(path)
    if _is_torchscript_archive(path):
        try:
            return read_torchscript_weights(path), "torchscript weights-only"
        except TorchScriptReadError as e:
            if not allow_code:
                raise CodeRefused(f"a TorchScript archive the weights-only reader cannot read ({e}); "
                                  "torch.jit.load would run its code") from None
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict()), "torch.jit.load"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path}: expected a state_dict, got {type(obj).__name__}")
    return dict(obj), "torch.load(weights_only=True)"


def read_openai_state_dict(path: str | Path, *, allow_code: bool = False) -> dict[str, torch.Tensor]:
    """The state_dict of `read_openai_checkpoint` (a TorchScript archive is read without running its
    code; torch.jit.load only with ``allow_code``)."""
    return read_openai_checkpoint(path, allow_code=allow_code)[0]


def load_openai_state_dict(sd_or_path: Mapping[str, torch.Tensor] | str | Path, *,
                           allow_code: bool = False) -> CLIP:
    """Build a CLIP (quick_gelu, fp32, eval mode) from an OpenAI-layout checkpoint.

    Accepts a state_dict, a torch.save file, or a TorchScript archive (`read_openai_checkpoint`:
    read without running its code; ``allow_code`` permits torch.jit.load). The metadata keys
    ``input_resolution`` / ``context_length`` / ``vocab_size`` are dropped, a ``module.``
    prefix (DDP) is stripped, floating tensors are cast to fp32, and loading is strict.
    Tensors that are already fp32 CPU tensors are used in place (not copied).
    """
    if isinstance(sd_or_path, (str, os.PathLike)):
        sd: Mapping[str, Any] = read_openai_state_dict(sd_or_path, allow_code=allow_code)
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
