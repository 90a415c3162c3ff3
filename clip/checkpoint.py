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
import pickle
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
# `read_torchscript_weights`, which never compiles or runs the code/ files (it only reads their
# ``__parameters__`` / ``__buffers__`` declarations, as text) and unpickles data.pkl into inert
# stand-ins only (`_WeightsUnpickler`): no real torch callable, class or tensor is ever handed to the
# pickle. Tensors are made afterwards, from checked descriptions, over bytes read from the archive.
# torch.jit.load is used only when the caller allows code (`read_openai_checkpoint(allow_code=True)`):
# for an archive that reader refuses.
#
# Untrusted files reach the reader before any pin or trust check, so everything it reads is bounded
# by the archive itself: storages must be stored uncompressed (as torch writes them) and together fit
# in the archive's size, tensors must fit in their storage without overlapping, the code it reads as
# text and data.pkl have fixed caps, the module tree is walked once per module. Whatever goes wrong is
# a TorchScriptReadError, so that no failure slips past the caller's refusal (`read_openai_checkpoint`).

MIN_SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) is bypassable below this (CVE-2025-32434)

_MAX_PICKLE_BYTES = 64 << 20  # data.pkl (OpenAI's largest releases: well under 1 MiB)
_MAX_CODE_FILE_BYTES = 16 << 20  # one code/**.py, uncompressed (they are deflated: a bomb would inflate)
_MAX_CODE_BYTES = 64 << 20  # all of code/**.py together
_MAX_DECLARATION_CHARS = 1 << 20  # one ``__parameters__ = [...]`` list, before ast.literal_eval parses it
_MAX_DEPTH = 64  # module nesting (OpenAI's: under 10)
_MAX_STATE_KEYS = 200_000  # state_dict entries (OpenAI's largest: a few thousand)
_MAX_DIMS = 64  # tensor dimensions (weights have at most a handful)
_MAX_MESSAGE = 300  # characters of a TorchScriptReadError (parts of it come from the archive)


class UnsafeTorchError(RuntimeError):
    """The installed torch cannot load weights safely; one line."""


class TorchScriptReadError(ValueError):
    """A TorchScript archive holds something the weights-only reader does not read; one line (the
    message is folded onto one line and shortened, as parts of it come from the archive)."""

    def __init__(self, message: str) -> None:
        line = " ".join(str(message).split())
        super().__init__(line if len(line) <= _MAX_MESSAGE else line[: _MAX_MESSAGE - 3] + "...")


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
_CLASS_RE = re.compile(r"class (\w+)\((\w+)\):.*")
_DECL_RE = re.compile(r"  (__parameters__|__buffers__) = (\[.*\])\s*")
_STORAGE_KEY_RE = re.compile(r"\w{1,64}")  # torch names them 0, 1, 2, ...


@dataclasses.dataclass
class _ScriptClass:
    """What the code/ files declare about a TorchScript class (read as text, never run)."""

    base: str
    parameters: list[str] = dataclasses.field(default_factory=list)
    buffers: list[str] = dataclasses.field(default_factory=list)
    has_setstate: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class _StorageType:
    """What ``torch.<X>Storage`` stands for in data.pkl: a dtype. A fresh one per load (by identity)."""

    dtype: torch.dtype


@dataclasses.dataclass(frozen=True, eq=False)
class _StorageRef:
    """The archive entry ``data/<key>`` as the reader's persistent_load returns it: where the bytes are
    (checked: stored uncompressed, no bigger than the archive), not the bytes. A pickle cannot make one
    (no global names this class), so a tensor can only view the archive's own storages."""

    key: str
    dtype: torch.dtype
    nbytes: int  # the extent the pickle announces (numel * itemsize); the entry holds at least that
    info: zipfile.ZipInfo


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRef:
    """A tensor as data.pkl describes it (what the reader's ``_rebuild_tensor_v2`` returns): a view of a
    storage, checked to lie inside it; made into a tensor only after unpickling (`_materialise`)."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    requires_grad: bool  # recorded, not applied: weights are read detached
    nbytes: int  # numel * itemsize


class _ScriptObject:
    """An inert stand-in for a pickled ``__torch__`` object: its class name and attribute dict (set once,
    by BUILD). Each load makes its own subclass per class, so no two loads share one."""

    __slots__ = ("state",)
    qualname = ""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _checked_entry(info: zipfile.ZipInfo, cap: int, archive_size: int, *, stored: bool = False) -> zipfile.ZipInfo:
    """``info`` when reading it yields at most ``cap`` bytes, and no more than the archive's size when it
    is stored uncompressed (zipfile never returns more than an entry's file_size), without a
    decompressor that ignores its output cap (bzip2, lzma); TorchScriptReadError otherwise.
    ``stored``: it must be uncompressed, as torch writes storages (a deflated one could inflate)."""
    allowed = (zipfile.ZIP_STORED,) if stored else (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
    if info.compress_type not in allowed:
        how = "stored uncompressed" if stored else "stored or deflated"
        raise TorchScriptReadError(f"{info.filename}: compression method {info.compress_type}; expected {how}")
    if info.flag_bits & 0x1:
        raise TorchScriptReadError(f"{info.filename}: encrypted")
    limit = min(cap, archive_size) if info.compress_type == zipfile.ZIP_STORED else cap
    if info.file_size > limit:
        raise TorchScriptReadError(f"{info.filename}: {info.file_size} bytes uncompressed, over the {limit} "
                                   "this reader reads")
    return info


def _script_classes(zf: zipfile.ZipFile, prefix: str, archive_size: int) -> dict[str, _ScriptClass]:
    """{qualified name: declarations} from ``<prefix>code/**.py``: ``code/__torch__/a/b.py`` holding
    ``class C(Module):`` is ``__torch__.a.b.C``. Each file and all together are capped
    (_MAX_CODE_FILE_BYTES, _MAX_CODE_BYTES): they are deflated, and a small one can inflate a lot."""
    import ast

    classes: dict[str, _ScriptClass] = {}
    code = prefix + "code/"
    total = 0
    for info in zf.infolist():
        name = info.filename
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        total += _checked_entry(info, _MAX_CODE_FILE_BYTES, archive_size).file_size
        if total > _MAX_CODE_BYTES:
            raise TorchScriptReadError(f"code/ holds over {_MAX_CODE_BYTES} bytes uncompressed")
        module = name[len(code):-len(".py")].replace("/", ".")
        current: _ScriptClass | None = None
        with zf.open(info) as fh:
            text = fh.read(_MAX_CODE_FILE_BYTES + 1).decode("utf-8", errors="replace")
        for line in text.splitlines():
            if m := _CLASS_RE.fullmatch(line):
                current = classes[f"{module}.{m.group(1)}"] = _ScriptClass(base=m.group(2))
            elif line and not line[0].isspace():
                current = None  # a top-level function: not part of a class
            elif current is not None and (m := _DECL_RE.fullmatch(line)):
                if len(m.group(2)) > _MAX_DECLARATION_CHARS:
                    raise TorchScriptReadError(f"{name}: a {m.group(1)} declaration of {len(m.group(2))} characters")
                names = ast.literal_eval(m.group(2))  # a literal list of strings; nothing is evaluated
                if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                    raise TorchScriptReadError(f"{name}: unreadable {m.group(1)} declaration")
                setattr(current, m.group(1).strip("_"), names)
            elif current is not None and line.startswith("  def __setstate__("):
                current.has_setstate = True
    return classes


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, metadata: Any) -> _TensorRef:
    """A checked `_TensorRef`: non-negative integer offset, sizes and strides; no more elements than the
    storage holds (saved weights never overlap, so a view that repeats elements, e.g. stride 0, and
    would grow when copied is refused); the whole view, first to last element, inside the storage
    (Tensor.set_ checks only the last element's offset against a size it is told)."""
    if type(storage) is not _StorageRef:
        raise TorchScriptReadError(f"a tensor over a {type(storage).__name__}, not an archive storage")
    key, dtype = storage.key, storage.dtype
    if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= _MAX_DIMS
            and all(type(n) is int and n >= 0 for n in (offset, *size, *stride))
            and type(requires_grad) is bool):
        raise TorchScriptReadError(f"tensor on storage {key}: malformed offset/size/stride")
    if metadata:  # conjugate / negative views: never in a state_dict of weights
        raise TorchScriptReadError(f"tensor on storage {key}: unsupported tensor metadata")
    itemsize = _itemsize(dtype)
    numel = 1
    for n in size:
        numel *= n
    if numel * itemsize > storage.nbytes:
        raise TorchScriptReadError(f"tensor on storage {key}: {numel} elements of {itemsize} bytes, more than "
                                   f"its storage's {storage.nbytes} bytes (an overlapping view)")
    end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
    if end * itemsize > storage.nbytes:
        raise TorchScriptReadError(f"tensor on storage {key} reaches past its {storage.nbytes} bytes")
    return _TensorRef(storage, offset, size, stride, requires_grad, numel * itemsize)


def _refusing(opcode: str) -> Callable[[Any], None]:
    def refuse(unpickler: Any) -> None:
        raise TorchScriptReadError(f"data.pkl uses the pickle opcode {opcode}, which TorchScript never writes")

    return refuse


class _WeightsUnpickler(pickle._Unpickler):
    """data.pkl's unpickler. The pure-Python one, because its opcode table can be narrowed (the C one's
    cannot), and the pickle is handed only fresh, inert stand-ins, never a real torch callable, class or
    tensor:

    - a global is one of this load's own functions (`globals`: they return plain data or a checked
      `_TensorRef`), a ``torch.<X>Storage`` (a `_StorageType`) or one of the archive's ``__torch__``
      classes (this load's own `_ScriptObject` subclass); anything else is refused;
    - REDUCE calls only those functions; NEWOBJ makes only those classes, without arguments;
    - BUILD sets, once, the attribute dict of such an object and does nothing else: on any other object
      it would run that object's ``__setstate__`` (Tensor.__setstate__ is Tensor.set_, unchecked) or set
      attributes of a shared object (a module function's ``__defaults__``);
    - INST, OBJ, NEWOBJ_EX and EXT1/2/4 (never in a TorchScript pickle; EXT would also fill pickle's
      process-wide extension cache) are refused.

    ``storage(key, dtype, numel)`` gives the `_StorageRef` of a persistent id (the caller checks the entry).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, classes: Mapping[str, _ScriptClass],
                 storage: Callable[[str, torch.dtype, int], _StorageRef]) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self.classes = classes
        self.storage = storage
        self.storage_types = {name: _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()}
        self.globals: dict[tuple[str, str], Callable[..., Any]] = {
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor,
            ("collections", "OrderedDict"): self.ordered_dict,
            ("torch.jit._pickle", "build_intlist"): self.build_list,
            ("torch.jit._pickle", "build_doublelist"): self.build_list,
            ("torch.jit._pickle", "build_boollist"): self.build_list,
            ("torch.jit._pickle", "build_tensorlist"): self.build_list,
            ("torch.jit._pickle", "restore_type_tag"): self.restore_type_tag,
        }
        # by identity: the pickle's objects are never hashed or compared by their own methods
        self.callables = {id(f): f for f in self.globals.values()}
        self.holders: dict[str, type[_ScriptObject]] = {}
        self.holder_types: dict[int, type[_ScriptObject]] = {}

    # the globals a TorchScript data.pkl names, as this load's own functions
    def rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                       backward_hooks: Any = None, metadata: Any = None) -> _TensorRef:
        return _tensor_ref(storage, offset, size, stride, requires_grad, metadata)  # backward hooks: never run

    def ordered_dict(self, *args: Any) -> collections.OrderedDict:
        return collections.OrderedDict(*args)

    def build_list(self, items: Any) -> list:
        if type(items) is not list:
            raise TorchScriptReadError(f"a typed list built from a {type(items).__name__}")
        return list(items)

    def restore_type_tag(self, value: Any, type_str: Any) -> Any:
        return value

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.globals:
            return self.globals[(module, name)]
        if module == "torch" and name in self.storage_types:
            return self.storage_types[name]
        qualname = f"{module}.{name}"
        if module.split(".")[0] == "__torch__" and qualname in self.classes:
            if self.classes[qualname].has_setstate:
                raise TorchScriptReadError(f"its class {qualname} defines __setstate__, code torch.jit.load runs")
            if qualname not in self.holders:
                holder = type(name, (_ScriptObject,), {"__slots__": (), "qualname": qualname})
                self.holders[qualname] = holder
                self.holder_types[id(holder)] = holder
            return self.holders[qualname]
        raise TorchScriptReadError(f"data.pkl names {qualname[:120]}, which the weights-only reader does not load")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"
                and any(pid[1] is t for t in self.storage_types.values())
                and type(pid[2]) is str and _STORAGE_KEY_RE.fullmatch(pid[2])
                and type(pid[4]) is int and pid[4] >= 0):
            raise TorchScriptReadError(f"unexpected persistent id (a {type(pid).__name__})")
        _, storage_type, key, _location, numel = pid  # always read to the CPU
        return self.storage(key, storage_type.dtype, numel)

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if self.callables.get(id(func)) is not func or type(args) is not tuple:
            raise TorchScriptReadError(f"data.pkl calls a {type(func).__name__}, not one of the reader's builders")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if self.holder_types.get(id(cls)) is not cls or type(args) is not tuple or args:
            raise TorchScriptReadError(f"data.pkl makes a {type(cls).__name__} object, not a __torch__ class's")
        self.append(object.__new__(cls))

    def load_build(self) -> None:
        state = self.stack.pop()
        obj = self.stack[-1]
        kind = type(obj)
        if self.holder_types.get(id(kind)) is not kind:
            raise TorchScriptReadError(f"data.pkl sets the state of a {kind.__name__} (BUILD), not of a "
                                       "__torch__ object")
        if type(state) is not dict:  # written by the class's own __getstate__: only its code reads it
            raise TorchScriptReadError(f"{obj.qualname} keeps a custom state (its __setstate__ is code)")
        if getattr(obj, "state", None) is not None or not all(type(k) is str for k in state):
            raise TorchScriptReadError(f"{obj.qualname}: its state is set twice or has names that are not strings")
        obj.state = state

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build
    for _name in ("INST", "OBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _name)[0]] = _refusing(_name)
    del _name


def _module_tensors(root: Any, classes: Mapping[str, _ScriptClass]) -> dict[str, _TensorRef]:
    """{state_dict key: tensor} of the module tree under ``root``, in torch.jit.load's order (a module's
    parameters, then its buffers, then its submodules in attribute order). Each module object is walked
    once: one met twice (a shared submodule, a cycle) is refused, or a small file would describe an
    exponential number of keys; depth and keys are capped (_MAX_DEPTH, _MAX_STATE_KEYS)."""
    if not isinstance(root, _ScriptObject):
        raise TorchScriptReadError(f"data.pkl holds a {type(root).__name__}, not a module")
    state: dict[str, _TensorRef] = {}
    seen: set[int] = set()  # ids of module objects walked (all alive until the walk ends)

    def walk(obj: _ScriptObject, prefix: str, depth: int) -> None:
        declared = classes[obj.qualname]
        attrs = getattr(obj, "state", None)
        if attrs is None or declared.base != "Module":
            raise TorchScriptReadError(f"{obj.qualname} is not a module with attributes")
        if id(obj) in seen:
            raise TorchScriptReadError(f"module {prefix[:-1] or obj.qualname} is the same object as one met "
                                       "before (a shared submodule or a cycle)")
        if depth > _MAX_DEPTH:
            raise TorchScriptReadError(f"modules nested deeper than {_MAX_DEPTH}")
        seen.add(id(obj))
        for name in (*declared.parameters, *declared.buffers):
            value = attrs.get(name)
            if value is None:  # an unset optional parameter: state_dict leaves it out
                continue
            if type(value) is not _TensorRef:
                raise TorchScriptReadError(f"{prefix}{name} is declared a parameter/buffer but is not a tensor")
            if len(state) >= _MAX_STATE_KEYS:
                raise TorchScriptReadError(f"over {_MAX_STATE_KEYS} parameters and buffers")
            state[prefix + name] = value
        for name, value in attrs.items():
            if isinstance(value, _ScriptObject) and classes[value.qualname].base == "Module":
                walk(value, f"{prefix}{name}.", depth + 1)

    walk(root, "", 0)
    return state


def _read_storage(zf: zipfile.ZipFile, ref: _StorageRef) -> torch.Tensor:
    """The first ``ref.nbytes`` bytes of its entry as a uint8 tensor, read in chunks straight into the
    one buffer (no second copy of a storage in memory)."""
    if not ref.nbytes:
        return torch.empty((0,), dtype=torch.uint8)
    buf = bytearray(ref.nbytes)
    view = memoryview(buf)
    with zf.open(ref.info) as fh:
        done = 0
        while done < ref.nbytes:
            got = fh.readinto(view[done:done + min(ref.nbytes - done, 1 << 20)])
            if not got:
                raise TorchScriptReadError(f"storage {ref.key}: the archive ends inside it")
            done += got
    return torch.frombuffer(buf, dtype=torch.uint8)  # shares buf's memory and keeps it alive


def _materialise(zf: zipfile.ZipFile, refs: Mapping[str, _TensorRef], budget: int) -> dict[str, torch.Tensor]:
    """The tensors ``refs`` describe, over their storages' bytes. Both the storages and the tensors (each
    counted once) must fit in ``budget`` bytes (the archive's size: its storages are stored, so they
    cannot hold more, unless entries overlap)."""
    tensors = {id(ref): ref for ref in refs.values()}
    storages = {ref.storage.key: ref.storage for ref in tensors.values()}
    for what, total in (("storages", sum(s.nbytes for s in storages.values())),
                        ("tensors", sum(ref.nbytes for ref in tensors.values()))):
        if total > budget:
            raise TorchScriptReadError(f"its {what} take {total} bytes, more than the archive's {budget}")
    data = {key: _read_storage(zf, ref).untyped_storage() for key, ref in storages.items()}
    made = {i: torch.empty((0,), dtype=ref.storage.dtype).set_(data[ref.storage.key], ref.offset, ref.size,
                                                                ref.stride)
            for i, ref in tensors.items()}
    return {name: made[id(ref)] for name, ref in refs.items()}  # a tensor under two names stays one tensor


def _read_archive(path: Path) -> dict[str, torch.Tensor]:
    """`read_torchscript_weights`, whose errors are not all TorchScriptReadError yet."""
    import sys

    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        infos = {info.filename: info for info in zf.infolist()}
        roots = [n[: -len("data.pkl")] for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(roots) != 1:
            raise TorchScriptReadError(f"expected one <name>/data.pkl, found {len(roots)}")
        prefix = roots[0]
        if prefix + "byteorder" in infos:
            with zf.open(_checked_entry(infos[prefix + "byteorder"], 16, size)) as fh:
                order = fh.read(17).decode(errors="replace").strip()
            if order != sys.byteorder:
                raise TorchScriptReadError(f"written {order}-endian, this machine is {sys.byteorder}-endian")
        classes = _script_classes(zf, prefix, size)
        storages: dict[str, _StorageRef] = {}

        def storage(key: str, dtype: torch.dtype, numel: int) -> _StorageRef:
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in infos:
                    raise TorchScriptReadError(f"storage {key} is missing from the archive")
                info = _checked_entry(infos[entry], size, size, stored=True)
                if info.file_size < numel * _itemsize(dtype):
                    raise TorchScriptReadError(f"storage {key}: {info.file_size} bytes, fewer than announced")
                storages[key] = _StorageRef(key, dtype, numel * _itemsize(dtype), info)
            elif storages[key].dtype != dtype or storages[key].nbytes != numel * _itemsize(dtype):
                raise TorchScriptReadError(f"storage {key} is announced twice, differently")
            return storages[key]

        with zf.open(_checked_entry(infos[prefix + "data.pkl"], _MAX_PICKLE_BYTES, size)) as fh:
            data = fh.read(_MAX_PICKLE_BYTES + 1)
        root = _WeightsUnpickler(data, classes, storage).load()
        return _materialise(zf, _module_tensors(root, classes), size)


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict of a TorchScript archive, as ``torch.jit.load(path).state_dict()`` gives it
    (parameters and buffers of every module, tensors on the CPU, detached), read without compiling or
    running any of the archive's code.

    ``data.pkl`` is unpickled into inert stand-ins (`_WeightsUnpickler`): tensor descriptions, an
    OrderedDict, TorchScript's typed lists, storage types, and the archive's own ``__torch__`` classes
    as attribute holders. Which attributes are parameters and buffers comes from the ``__parameters__``
    / ``__buffers__`` lines of the class definitions in ``code/`` (read as text). Each tensor is checked
    to lie inside its storage without overlapping itself, and made only after unpickling, over bytes
    read from the archive (at most its size in all).

    Raises TorchScriptReadError (one line) for anything else, and for every failure of its own: another
    global or pickle operation, a class with its own ``__setstate__`` (code that torch.jit.load would
    run), quantized or sparse tensors, a big-endian archive, a storage that is missing, compressed or
    too short, a shared submodule, an entry or module tree over the caps, a malformed zip or code file."""
    try:
        return _read_archive(Path(path))
    except TorchScriptReadError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed or hostile archive: unreadable, never past the refusal
        try:
            detail = str(e)
        except Exception:  # noqa: BLE001 - a message that cannot be shown (e.g. an int too long to print)
            detail = ""
        raise TorchScriptReadError(f"{type(e).__name__}: {detail[:200]}".rstrip(": ")) from None


def read_openai_checkpoint(path: str | Path, *, allow_code: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, how it was read) of a TorchScript archive (OpenAI's ``*.pt`` releases) or a
    torch.save file; a ``{"state_dict": ...}`` wrapper is unwrapped.

    How: ``"torch.load(weights_only=True)"`` for a torch.save file; ``"torchscript weights-only"``
    for a TorchScript archive `read_torchscript_weights` reads; ``"torch.jit.load"`` for one it
    refuses, only when ``allow_code`` (the caller vouches for the file: the user pinned its hash, it
    is an OpenAI release, or the user trusts it). Otherwise such an archive raises CodeRefused, and so
    does one that fails to read in any way. UnsafeTorchError on a torch older than MIN_SAFE_TORCH."""
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
