"""OpenAI-layout checkpoints: ModifiedResNet tower, config inference from tensor shapes,
loading state_dicts / torch.save files / TorchScript archives, and numerical parity with
open_clip (a test-only dependency; those tests skip without it)."""

from __future__ import annotations

import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import support.torchscript as hostile
import torch
import torch.nn as nn
from support.torchscript import save_code_running_archive, scripted_holder

import clip
from clip.checkpoint import (
    CodeRefused,
    TorchScriptReadError,
    UnsafeTorchError,
    check_safe_torch,
    config_from_state_dict,
    load_openai_state_dict,
    read_openai_checkpoint,
    read_torchscript_weights,
)


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)


def _meta_model(name: str) -> clip.CLIP:
    with torch.device("meta"):
        return clip.create_model(name)


def _as_openai(cfg: clip.CLIPConfig) -> clip.CLIPConfig:
    """What inference can recover: heads = width // 64 and quick_gelu."""
    v = cfg.vision
    return replace(
        cfg,
        act="quick_gelu",
        vision=replace(v, heads=v.attention_width // 64),
        text=replace(cfg.text, heads=cfg.text.width // 64),
    )


# -----------------------------------------------------------------------------
# ModifiedResNet


def test_rn50_param_count_and_openai_keys():
    model = _meta_model("RN50")
    assert model.num_params() == 102_007_137
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "visual.conv1.weight": (32, 3, 3, 3),
        "visual.bn1.weight": (32,),
        "visual.conv3.weight": (64, 32, 3, 3),
        "visual.bn3.running_var": (64,),
        "visual.layer1.0.conv1.weight": (64, 64, 1, 1),
        "visual.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "visual.layer1.0.downsample.1.weight": (256,),
        "visual.layer2.0.downsample.0.weight": (512, 256, 1, 1),
        "visual.layer3.5.conv2.weight": (256, 256, 3, 3),
        "visual.layer4.2.bn3.bias": (2048,),
        "visual.attnpool.positional_embedding": (50, 2048),
        "visual.attnpool.q_proj.weight": (2048, 2048),
        "visual.attnpool.k_proj.bias": (2048,),
        "visual.attnpool.v_proj.weight": (2048, 2048),
        "visual.attnpool.c_proj.weight": (1024, 2048),
        "text_projection": (512, 1024),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert "visual.layer1.1.downsample.0.weight" not in shapes
    assert "visual.layer3.6.conv1.weight" not in shapes
    assert "visual.proj" not in shapes


def test_rn_configs_and_validation():
    assert {"RN50", "RN101"} <= set(clip.list_models())
    cfg = clip.get_config("RN101")
    assert cfg.vision.is_resnet and cfg.vision.layers == [3, 4, 23, 3]
    assert _round_trips(cfg)
    assert _meta_model("RN101").num_params() == 119_688_033
    with pytest.raises(ValueError):
        clip.create_model("RN50", vision_layers=[3, 4, 6])
    with pytest.raises(ValueError):
        clip.create_model("RN50", vision_heads=30)  # 2048 not divisible by 30


def _round_trips(cfg: clip.CLIPConfig) -> bool:
    return clip.CLIPConfig.from_dict(cfg.to_dict()) == cfg


def test_small_resnet_forward():
    torch.manual_seed(0)
    model = clip.create_model("RN50", image_size=64, vision_width=16, vision_layers=[1, 1, 1, 1],
                              vision_heads=4, embed_dim=32, text_width=64, text_heads=2,
                              text_layers=1, vocab_size=100, context_length=8).eval()
    with torch.no_grad():
        img, txt, scale = model(torch.randn(2, 3, 64, 64), torch.randint(1, 100, (2, 8)))
    assert img.shape == txt.shape == (2, 32)
    assert torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)


# -----------------------------------------------------------------------------
# config inference and loading


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32", "RN50", "RN101"])
def test_config_from_state_dict_round_trip(name):
    model = _meta_model(name)  # inference reads shapes only
    assert config_from_state_dict(model.state_dict()) == _as_openai(model.config)


def _tiny_openai_state(dtype=torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = clip.create_model(_as_openai(clip.get_config("tiny")))
    return {k: v.detach().to(dtype) for k, v in model.state_dict().items()}


def _assert_state_equal(model: clip.CLIP, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k].dtype == torch.float32, k
        assert torch.equal(got[k], v.float()), k


def test_load_plain_fp16_and_torch_save(tmp_path):
    sd = _tiny_openai_state()
    extras = {"input_resolution": torch.tensor(64), "context_length": torch.tensor(24),
              "vocab_size": torch.tensor(1024)}
    model = load_openai_state_dict({**sd, **extras})
    assert not model.training and model.config.act == "quick_gelu"
    _assert_state_equal(model, sd)

    half = {k: v.half() for k, v in sd.items()}
    _assert_state_equal(load_openai_state_dict({**half, **extras}), half)

    path = tmp_path / "plain.pt"
    torch.save(half, path)
    _assert_state_equal(load_openai_state_dict(path), half)
    _assert_state_equal(load_openai_state_dict(str(path)), half)

    with pytest.raises(RuntimeError):  # strict: an unexpected key is an error
        load_openai_state_dict({**sd, "visual.bogus": torch.zeros(1)})


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_load_torchscript_archive(tmp_path):
    half = {k: v.half() for k, v in _tiny_openai_state().items()}
    path = tmp_path / "openai-style.pt"
    torch.jit.save(scripted_holder(half), str(path))
    _assert_state_equal(load_openai_state_dict(path), half)


class _Mixed(nn.Module):
    """Parameters (one fp16, one a strided view), a buffer, a plain tensor attribute that is not state,
    an unset optional parameter (MultiheadAttention's bias_k) and a ModuleList."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("ctx", torch.tensor(7))
        self.attn_mask = torch.ones(2, 2)  # an attribute, not a buffer: not in the state_dict
        self.mha = nn.MultiheadAttention(4, 1)
        self.blocks = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
        self.hp = nn.Parameter(torch.randn(3).half())
        self.view = nn.Parameter(torch.randn(4, 4)[:, 1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.attn_mask.sum()


def _assert_same_state(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for k, v in ref.items():
        assert (got[k].dtype, got[k].shape, got[k].stride()) == (v.dtype, v.shape, v.stride()), k
        assert torch.equal(got[k], v), k


def _no_jit_load(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_weights_only_reader_matches_jit_load(tmp_path, monkeypatch):
    """The reader gives torch.jit.load's state_dict (keys, order, dtypes, strides, values) for scripted
    and traced archives, ViT and ModifiedResNet (BatchNorm buffers), fp32 and fp16, without calling it."""
    torch.manual_seed(0)
    vit = clip.create_model(_as_openai(clip.get_config("tiny"))).eval()
    size, ctx = vit.config.vision.image_size, vit.config.text.context_length
    rn = clip.create_model("RN50", image_size=64, vision_width=16, vision_layers=[1, 1, 1, 1], vision_heads=4,
                           embed_dim=32, text_width=64, text_heads=2, text_layers=1, vocab_size=100,
                           context_length=8).eval()
    archives = {
        "mixed": torch.jit.script(_Mixed()),
        "vit": torch.jit.trace(vit, (torch.randn(1, 3, size, size), torch.randint(1, 100, (1, ctx))),
                               check_trace=False),
        "rn": torch.jit.trace(rn, (torch.randn(1, 3, 64, 64), torch.randint(1, 100, (1, 8))), check_trace=False),
    }
    for name, module in archives.items():
        torch.jit.save(module, str(tmp_path / f"{name}.pt"))
    torch.jit.save(torch.jit.load(str(tmp_path / "rn.pt")).half(), str(tmp_path / "rn-fp16.pt"))
    refs = {name: torch.jit.load(str(tmp_path / f"{name}.pt")).state_dict() for name in [*archives, "rn-fp16"]}
    assert "attn_mask" not in refs["mixed"] and "mha.bias_k" not in refs["mixed"]
    _no_jit_load(monkeypatch)
    for name, ref in refs.items():
        _assert_same_state(read_torchscript_weights(tmp_path / f"{name}.pt"), ref)
    got, how = read_openai_checkpoint(tmp_path / "vit.pt")
    assert how == "torchscript weights-only"
    _assert_same_state(load_openai_state_dict(tmp_path / "rn.pt").state_dict(), rn.state_dict())


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_code_running_archive_needs_allow_code(tmp_path, monkeypatch):
    sd = _tiny_openai_state()
    path = tmp_path / "setstate.pt"
    save_code_running_archive(sd, path)
    assert torch.jit.load(str(path)).guard.loads == 1  # torch.jit.load does run its __setstate__
    with monkeypatch.context() as m:
        _no_jit_load(m)
        with pytest.raises(TorchScriptReadError, match="__setstate__"):
            read_torchscript_weights(path)
        with pytest.raises(CodeRefused, match="torch.jit.load would run its code") as err:
            load_openai_state_dict(path)
        assert "\n" not in str(err.value)
    got, how = read_openai_checkpoint(path, allow_code=True)
    assert how == "torch.jit.load" and set(got) == set(sd)
    _assert_state_equal(load_openai_state_dict(path, allow_code=True), sd)


def _rewrite_data_pkl(src: Path, dst: Path, payload: bytes, drop: tuple[str, ...] = ()) -> None:
    """A copy of archive `src` whose data.pkl is `payload` (and without the entries in `drop`)."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            if info.filename.endswith(drop):
                continue
            data = payload if info.filename.endswith("/data.pkl") else zin.read(info.filename)
            zout.writestr(info, data)


class _RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _StoragePickler:
    """Pickles a tensor rebuild over archive storage "0" with any offset/size/stride."""

    @staticmethod
    def dumps(offset: int, size: tuple, stride: tuple) -> bytes:
        import collections
        import io
        import pickle

        marker = object()

        class P(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is marker else None

        class Rebuild:
            def __reduce__(self):
                return (torch._utils._rebuild_tensor_v2, (marker, offset, size, stride, False,
                                                          collections.OrderedDict()))

        buf = io.BytesIO()
        P(buf, protocol=2).dump(Rebuild())
        return buf.getvalue()


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_reader_refuses_what_it_does_not_know(tmp_path):
    import pickle

    good = tmp_path / "good.pt"
    torch.jit.save(scripted_holder({"w": torch.arange(4, dtype=torch.float32)}), str(good))
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    _rewrite_data_pkl(good, evil, pickle.dumps(_RunsShell(marker), protocol=2))
    with pytest.raises(TorchScriptReadError, match="posix.system|os.system"):
        read_torchscript_weights(evil)
    with pytest.raises(CodeRefused):
        read_openai_checkpoint(evil)
    assert not marker.exists()

    inside = tmp_path / "inside.pt"
    _rewrite_data_pkl(good, inside, _StoragePickler.dumps(1, (3,), (1,)))  # elements 1..3 of 4: fine
    with pytest.raises(TorchScriptReadError, match="not a module"):  # (a bare tensor is no module)
        read_torchscript_weights(inside)
    past = tmp_path / "past.pt"
    _rewrite_data_pkl(good, past, _StoragePickler.dumps(1, (2, 2), (3, 1)))  # would read element 5 of 4
    with pytest.raises(TorchScriptReadError, match="reaches past"):
        read_torchscript_weights(past)
    short = tmp_path / "short.pt"
    _rewrite_data_pkl(good, short, _StoragePickler.dumps(0, (4,), (1,)), drop=("/data/0",))
    with pytest.raises(TorchScriptReadError, match="missing"):
        read_torchscript_weights(short)


# -----------------------------------------------------------------------------
# hand-made hostile archives: refused in one line, nothing outside the reader changed


def _assert_refused(path: Path, match: str) -> str:
    """read_torchscript_weights(path) raises one TorchScriptReadError line matching ``match``, and the
    import refuses (CodeRefused, never another error) without torch.jit.load; torch's rebuild function and
    the reader's own functions keep their defaults (a BUILD on a shared function would change them for
    every later load)."""
    import inspect

    import clip.checkpoint as ckpt

    rebuild = torch._utils._rebuild_tensor_v2
    defaults = rebuild.__defaults__
    ours = {name: f.__defaults__ for name, f in vars(ckpt).items() if inspect.isfunction(f)}
    with pytest.MonkeyPatch.context() as m:
        _no_jit_load(m)
        with pytest.raises(TorchScriptReadError, match=match) as err:
            read_torchscript_weights(path)
        with pytest.raises(CodeRefused) as refused:
            read_openai_checkpoint(path)
    assert "\n" not in str(err.value) and "\n" not in str(refused.value)
    assert torch._utils._rebuild_tensor_v2 is rebuild and rebuild.__defaults__ == defaults
    assert {name: f.__defaults__ for name, f in vars(ckpt).items() if inspect.isfunction(f)} == ours
    return str(err.value)


def test_hand_made_archive_reads(tmp_path):
    """The hand-made layout itself reads (so each refusal below is the hostile part's); a tensor under two
    names stays one tensor."""
    got = read_torchscript_weights(hostile.node_archive(tmp_path / "ok.pt"))
    assert list(got) == ["w"] and torch.equal(got["w"], torch.arange(4, dtype=torch.float32))
    two = hostile.NODE_CODE.replace('["w", ]', '["w", "v", ]')
    w = hostile.tensor(hostile.Storage("0", 4), 1, (3,), (1,))
    got = read_torchscript_weights(hostile.node_archive(tmp_path / "tied.pt", {"w": w, "v": w},
                                                        code={"__torch__/evil.py": two}))
    assert got["w"] is got["v"] and got["w"].tolist() == [1.0, 2.0, 3.0]


def test_build_on_a_tensor_is_refused(tmp_path):
    """BUILD on a rebuilt tensor would be Tensor.__setstate__, i.e. set_ with the pickle's sizes: an 8-byte
    storage viewed (and grown) as millions of elements."""
    storage = hostile.Storage("0", 4)
    source = hostile.tensor(storage, 0, (4,), (1,))
    grown = hostile.tensor(storage, 0, (4,), (1,), state=(source, 0, (2048, 2048), (2048, 1)))
    msg = _assert_refused(hostile.node_archive(tmp_path / "grow.pt", {"w": grown}), "BUILD")
    assert "_TensorRef" in msg


@pytest.mark.parametrize("module,name,state", [
    ("torch._utils", "_rebuild_tensor_v2", (None, {"__defaults__": (1, 2)})),
    ("collections", "OrderedDict", (None, {"fromkeys": None})),
    ("torch.jit._pickle", "restore_type_tag", (None, {"__code__": None})),
    ("torch", "FloatStorage", {"dtype": None}),
    ("__torch__.evil", "Node", (None, {"__init__": None})),
])
def test_build_on_a_global_is_refused(tmp_path, module, name, state):
    """BUILD on a global would set attributes of the object the name stands for; the reader hands out only
    its own per-load stand-ins and refuses BUILD on them (torch's functions stay untouched)."""
    import collections

    w = hostile.tensor(hostile.Storage("0", 4), 0, (4,), (1,))
    evil = hostile.Build(hostile.Global(module, name), state)
    _assert_refused(hostile.node_archive(tmp_path / "global.pt", {"w": w, "x": evil}), "BUILD")
    assert collections.OrderedDict.fromkeys("ab") == {"a": None, "b": None}
    assert read_torchscript_weights(hostile.node_archive(tmp_path / "after.pt"))["w"].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("evil,match", [
    (hostile.New(hostile.Global("torch._utils", "_rebuild_tensor_v2")), "makes a"),
    (hostile.Call(hostile.Global("__torch__.evil", "Node"), ()), "calls a"),
    (hostile.Call(hostile.Global("torch", "FloatStorage"), ()), "calls a"),
    (hostile.Call(hostile.tensor(hostile.Storage("0", 4), 0, (4,), (1,)), ()), "calls a"),
    (hostile.Raw(pickle.EXT1 + b"\x01"), "EXT1"),
    (hostile.Build(hostile.Obj("__torch__.evil", "Node", {}), {"w": None}), "set twice"),
    (hostile.Build(hostile.New(hostile.Global("__torch__.evil", "Node")), (None, {"w": 1})), "custom state"),
])
def test_other_pickle_tricks_are_refused(tmp_path, evil, match):
    w = hostile.tensor(hostile.Storage("0", 4), 0, (4,), (1,))
    _assert_refused(hostile.node_archive(tmp_path / "trick.pt", {"w": w, "x": evil}), match)


@pytest.mark.parametrize("offset,size,stride,match", [
    (0, (1 << 20, 1 << 20), (0, 0), "overlapping"),  # 16 bytes read as 2^40 elements, expanded when copied
    (0, (8,), (0,), "overlapping"),
    (0, (4,), (-1,), "malformed"),
    (0, (True,), (1,), "malformed"),
    (0, (2, 2), (1,), "malformed"),
    (100, (0,), (1,), "reaches past"),
    (1, (2, 2), (3, 1), "reaches past"),
])
def test_views_outside_or_overlapping_their_storage_are_refused(tmp_path, offset, size, stride, match):
    w = hostile.tensor(hostile.Storage("0", 4), offset, size, stride)
    _assert_refused(hostile.node_archive(tmp_path / "view.pt", {"w": w}), match)


def test_module_tree_is_walked_once_per_module(tmp_path, monkeypatch):
    """A submodule shared at every level makes 2^depth paths (a 1 KB file, 262,144 keys at depth 18): a
    module met twice is refused at once, and so is a cycle; depth and keys are capped."""
    import time

    import clip.checkpoint as ckpt

    w = hostile.tensor(hostile.Storage("0", 4), 0, (4,), (1,))
    node = hostile.Obj("__torch__.evil", "Node", {"w": w})
    for _ in range(18):
        node = hostile.Obj("__torch__.evil", "Node", {"w": w, "a": node, "b": node})
    path = hostile.write_archive(tmp_path / "shared.pt", hostile.assemble(node))
    assert path.stat().st_size < 2000
    t0 = time.monotonic()
    _assert_refused(path, "same object as one met before")
    assert time.monotonic() - t0 < 5

    cycle = hostile.Obj("__torch__.evil", "Node", {"w": w})
    cycle.state["self"] = cycle
    _assert_refused(hostile.write_archive(tmp_path / "cycle.pt", hostile.assemble(cycle)), "same object")

    def chain(depth: int) -> bytes:
        node = hostile.Obj("__torch__.evil", "Node", {"w": w})
        for _ in range(depth):
            node = hostile.Obj("__torch__.evil", "Node", {"w": w, "a": node})
        return hostile.assemble(node)

    _assert_refused(hostile.write_archive(tmp_path / "deep.pt", chain(ckpt._MAX_DEPTH + 1)), "nested deeper")
    assert len(read_torchscript_weights(hostile.write_archive(tmp_path / "four.pt", chain(3)))) == 4
    monkeypatch.setattr(ckpt, "_MAX_STATE_KEYS", 3)
    _assert_refused(hostile.write_archive(tmp_path / "keys.pt", chain(3)), "over 3 parameters")


def test_zip_bombs_are_refused(tmp_path):
    """Storages must be stored (a deflated one could inflate; torch never deflates them); no entry may
    claim more than the archive holds; code files are capped (they are deflated)."""
    _assert_refused(hostile.node_archive(tmp_path / "deflated.pt", deflated=("data/0",)), "stored uncompressed")
    for entry in ("evil/data/0", "evil/data.pkl", "evil/byteorder"):
        path = hostile.node_archive(tmp_path / "claims.pt")
        hostile.claim_size(path, entry, 1 << 31)
        _assert_refused(path, f"{entry}: 2147483648 bytes uncompressed, over the")
    bomb = {"__torch__/evil.py": hostile.NODE_CODE, "__torch__/bomb.py": "#\n" * (9 << 20)}  # 18 MiB, 18 KB zipped
    path = hostile.node_archive(tmp_path / "bomb.pt", code=bomb)
    assert path.stat().st_size < 100_000
    _assert_refused(path, "bomb.py: 18874368 bytes uncompressed, over the 16777216")


@pytest.mark.parametrize("declaration,match", [
    ('["w", (]', "SyntaxError"),
    ("[w]", "ValueError"),
    ("[" * 300 + "]" * 300, "SyntaxError|RecursionError|MemoryError"),
])
def test_malformed_code_or_pickle_is_a_read_error(tmp_path, declaration, match):
    """Whatever fails inside the reader is a one-line TorchScriptReadError, so the import refuses (never an
    error that slips past the refusal, nor a fallback to torch.jit.load)."""
    code = hostile.NODE_CODE.replace('["w", ]', declaration)
    _assert_refused(hostile.node_archive(tmp_path / "code.pt", code={"__torch__/evil.py": code}), match)
    _assert_refused(hostile.write_archive(tmp_path / "junk.pt", b"\x80\x02\xff"), "KeyError")
    _assert_refused(hostile.write_archive(tmp_path / "cut.pt", hostile.assemble({"a": 1})[:-4]), "Error")


def test_old_torch_is_refused():
    check_safe_torch("2.6.0")
    check_safe_torch("2.14.1+cu130")
    for old in ("2.5.1", "1.13.1+cpu", "not-a-version"):
        with pytest.raises(UnsafeTorchError, match=r"expected torch>=2\.6") as err:
            check_safe_torch(old)
        assert "CVE-2025-32434" in str(err.value) and "\n" not in str(err.value)


# -----------------------------------------------------------------------------
# parity with open_clip


@pytest.fixture(scope="module")
def open_clip_mod():
    os.environ["HF_HUB_OFFLINE"] = "1"  # random init only; never download
    return pytest.importorskip("open_clip")


@torch.no_grad()
def _randomize_(model: nn.Module) -> None:
    """Move every tensor off its structured init (zero biases, zero-init BN gammas,
    unit running stats) so that every weight matters to the comparison."""
    g = torch.Generator().manual_seed(0)

    def noise(t: torch.Tensor, scale: float) -> torch.Tensor:
        return scale * torch.randn(t.shape, generator=g)

    bn_tensors = set()
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.copy_(0.5 + 0.5 * torch.rand(mod.weight.shape, generator=g))
            mod.running_var.copy_(0.5 + 0.5 * torch.rand(mod.running_var.shape, generator=g))
            mod.bias.add_(noise(mod.bias, 0.05))
            mod.running_mean.add_(noise(mod.running_mean, 0.05))
            bn_tensors.update(id(t) for t in (mod.weight, mod.bias))
    for name, p in model.named_parameters():
        if id(p) in bn_tensors or name == "logit_scale":
            continue
        std = p.std().item() if p.numel() > 1 else 0.0
        p.add_(noise(p, 0.1 * std if std > 0 else 0.02))


@pytest.mark.parametrize("name", ["ViT-B-32", "RN50"])
def test_parity_with_open_clip(open_clip_mod, name):
    torch.manual_seed(0)
    ref = open_clip_mod.create_model(f"{name}-quickgelu", pretrained=None).eval()
    _randomize_(ref)
    sd = ref.state_dict()
    ours = load_openai_state_dict(sd)
    assert ours.config == clip.get_config(name)

    images = torch.randn(2, 3, 224, 224)  # positional embeddings fix the resolution
    tokens = torch.randint(1, 49406, (2, 77))
    tokens[0, 9:] = 0
    tokens[0, 8] = 49407  # EOT (highest id) mid-sequence, padding after
    tokens[1, 76] = 49407
    with torch.no_grad():
        diffs = {
            "image": (ref.encode_image(images) - ours.encode_image(images)).abs().max().item(),
            "text": (ref.encode_text(tokens) - ours.encode_text(tokens)).abs().max().item(),
        }
    assert max(diffs.values()) <= 1e-4, diffs

    # an fp16 copy (as OpenAI ships) loads strictly and lands in fp32
    half = load_openai_state_dict({k: v.half() if v.is_floating_point() else v
                                   for k, v in sd.items()})
    assert all(p.dtype == torch.float32 for p in half.parameters())
    assert half.config == ours.config
