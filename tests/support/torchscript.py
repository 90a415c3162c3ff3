"""Test-only TorchScript archives in OpenAI's layout (never imported by witclip itself).

`scripted_holder(sd)` is a scripted module tree whose state_dict is exactly `sd` (as OpenAI's releases,
which are TorchScript programs); `save_code_running_archive(sd, path)` adds a submodule with its own
``__setstate__``, which torch.jit.load runs while loading: the kind of archive witclip's weights-only
reader refuses and loads only when the file is pinned by hash or trusted. Running it is harmless: it
counts its loads in `Guard.loads`.

`assemble` and `write_archive` hand-make the archives torch never writes (hostile pickles, zip bombs) that
the reader must refuse without changing anything outside it.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from pathlib import Path

import torch
import torch.nn as nn


class Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Guard(nn.Module):
    """No weights; a TorchScript ``__setstate__`` (code run by torch.jit.load) that counts loads."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @torch.jit.export
    def __getstate__(self) -> tuple[int, bool]:
        return (self.loads, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[int, bool]) -> None:
        self.loads = state[0] + 1
        self.training = state[1]


def holder_tree(sd: dict[str, torch.Tensor]) -> nn.Module:
    """An eager module tree whose state_dict has exactly ``sd``'s keys."""
    root = Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, Holder())
            mod = getattr(mod, part)
        if value.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:  # OpenAI's integer entries (input_resolution, context_length, vocab_size)
            mod.register_buffer(leaf, value.clone())
    return root


def scripted_holder(sd: dict[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """A scripted module tree whose state_dict has exactly ``sd``'s keys."""
    return torch.jit.script(holder_tree(sd))


def save_code_running_archive(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A TorchScript archive with state_dict ``sd`` whose loading runs `Guard.__setstate__`."""
    root = holder_tree(sd)
    root.add_module("guard", Guard())  # no weights: the state_dict stays exactly sd
    torch.jit.save(torch.jit.script(root), str(path))


# ----------------------------------------------------------------------------- hand-made (hostile) archives
# Pickles that torch.jit.save never writes, assembled opcode by opcode with the pure-Python pickler (whose
# dispatch table can take these node types), and zips around them. Nothing here imports or calls what a
# pickle names: a `Global` is only written out as text.


class Global:
    """``GLOBAL module name``, written as is (no import, no check that it exists)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name


class Call:
    """``func(*args)`` (REDUCE), then ``BUILD state`` when a state is given."""

    NO_STATE = object()

    def __init__(self, func: object, args: tuple, state: object = NO_STATE) -> None:
        self.func, self.args, self.state = func, args, state


class Build:
    """``target`` then ``BUILD state``: sets the state of whatever ``target`` unpickles to."""

    def __init__(self, target: object, state: object) -> None:
        self.target, self.state = target, state


class New:
    """``cls`` ``args`` NEWOBJ."""

    def __init__(self, cls: object, args: tuple = ()) -> None:
        self.cls, self.args = cls, args


class Obj:
    """A ``__torch__`` object as TorchScript pickles one: GLOBAL, EMPTY_TUPLE, NEWOBJ, then BUILD with the
    attribute dict ``state`` (which may hold this very object: it is memoized before its state)."""

    def __init__(self, module: str, name: str, state: dict | None = None) -> None:
        self.cls, self.state = Global(module, name), {} if state is None else state


class Storage:
    """The persistent id of archive storage ``data/<key>``: ("storage", torch.<kind>Storage, key, "cpu", numel)."""

    def __init__(self, key: str, numel: int, kind: str = "Float") -> None:
        self.pid = ("storage", Global("torch", f"{kind}Storage"), key, "cpu", numel)


class Raw:
    """Opcodes written as they are."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def tensor(storage: Storage, offset: int, size: tuple, stride: tuple, state: object = Call.NO_STATE) -> Call:
    """A tensor as TorchScript pickles one: torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
    requires_grad, OrderedDict()), then ``BUILD state`` when a state is given."""
    hooks = Call(Global("collections", "OrderedDict"), ())
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), (storage, offset, size, stride, False, hooks), state)


class _Assembler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def persistent_id(self, obj: object) -> object:
        return obj.pid if isinstance(obj, Storage) else None

    def _global(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def _call(self, obj: Call) -> None:
        self.save(obj.func)
        self.save(obj.args)
        self.write(pickle.REDUCE)
        self.memoize(obj)
        if obj.state is not Call.NO_STATE:
            self.save(obj.state)
            self.write(pickle.BUILD)

    def _build(self, obj: Build) -> None:
        self.save(obj.target)
        self.save(obj.state)
        self.write(pickle.BUILD)

    def _new(self, obj: New) -> None:
        self.save(obj.cls)
        self.save(obj.args)
        self.write(pickle.NEWOBJ)
        self.memoize(obj)

    def _obj(self, obj: Obj) -> None:
        self.save(obj.cls)
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)
        self.memoize(obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    def _raw(self, obj: Raw) -> None:
        self.write(obj.data)

    dispatch.update({Global: _global, Call: _call, Build: _build, New: _new, Obj: _obj, Raw: _raw})


def assemble(obj: object) -> bytes:
    """The protocol-2 pickle of ``obj``, whose `Global`, `Call`, `Build`, `New`, `Obj`, `Storage` and `Raw`
    nodes are written as their docstrings say (each object once: a second use is a memo reference)."""
    buf = io.BytesIO()
    _Assembler(buf, protocol=2).dump(obj)
    return buf.getvalue()


NODE_CODE = """class Node(Module):
  __parameters__ = ["w", ]
  __buffers__ = []
  w : Tensor
  training : bool
  def forward(self: __torch__.evil.Node) -> Tensor:
    return self.w
"""


def write_archive(path: Path, data_pkl: bytes, *, code: dict[str, str] | None = None,
                  storages: dict[str, bytes] | None = None, deflated: tuple[str, ...] = ()) -> Path:
    """A TorchScript-layout zip ``evil/...``: ``data.pkl``, ``code/<name>`` (default: ``__torch__/evil.py``
    with `NODE_CODE`), ``data/<key>`` (default: "0", four float32 0.0 1.0 2.0 3.0) and ``byteorder``.
    Entries are stored, as torch writes them, except code files and those named in ``deflated``."""
    code = {"__torch__/evil.py": NODE_CODE} if code is None else code
    storages = {"0": struct.pack("<4f", 0, 1, 2, 3)} if storages is None else storages
    entries = [("evil/data.pkl", data_pkl), *((f"evil/code/{k}", v.encode()) for k, v in code.items()),
               *((f"evil/data/{k}", v) for k, v in storages.items()), ("evil/byteorder", b"little")]
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries:
            deflate = "/code/" in name or name.removeprefix("evil/") in deflated
            zf.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED)
    return path


def node_archive(path: Path, state: dict | None = None, **kwargs) -> Path:
    """`write_archive` whose data.pkl is one ``__torch__.evil.Node`` with attributes ``state`` (default: its
    parameter ``w``, a float32 tensor of 4 over storage "0"); a readable archive as it stands."""
    state = {"w": tensor(Storage("0", 4), 0, (4,), (1,)), "training": True} if state is None else state
    return write_archive(path, assemble(Obj("__torch__.evil", "Node", state)), **kwargs)


def claim_size(path: Path, name: str, size: int) -> None:
    """Rewrite the central directory of zip ``path`` so that entry ``name`` claims ``size`` bytes (compressed
    and not): what a reader believes before it reads anything."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        pos = zf.start_dir
    while data[pos:pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, pos + 28)
        if data[pos + 46:pos + 46 + name_len].decode() == name:
            struct.pack_into("<II", data, pos + 20, size, size)
            path.write_bytes(bytes(data))
            return
        pos += 46 + name_len + extra_len + comment_len
    raise KeyError(name)
