"""ClipLoss (full-matrix and local_loss modes) and SigLipLoss: values and DDP gradients."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from clip.loss import ClipLoss, SigLipLoss

N, D, WORLD = 8, 16, 2  # global batch, feature dim, ranks
MODES = ("clip_full", "clip_local", "siglip")


def _loss_fn(mode: str):
    if mode == "siglip":
        return SigLipLoss()
    return ClipLoss(local_loss=(mode == "clip_local"))


def _inputs():
    """Global-batch leaves, identical in every process (like DDP-replicated parameters)."""
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    # correlate the pairs a little so the positives matter
    txt = F.normalize(txt + 0.8 * img, dim=-1)
    scale = torch.tensor(3.0, dtype=torch.float64)
    bias = torch.tensor(-2.0, dtype=torch.float64)
    return [t.clone().requires_grad_() for t in (img, txt, scale, bias)]


def _call(mode, img, txt, scale, bias):
    if mode == "siglip":
        return _loss_fn(mode)(img, txt, scale, bias)
    return _loss_fn(mode)(img, txt, scale)


# -----------------------------------------------------------------------------
# single process


def test_siglip_matches_hand_computed_3x3():
    img = F.normalize(torch.tensor([[1.0, 0.0, 0.5], [0.2, 1.0, 0.0], [0.0, 0.3, 1.0]],
                                   dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.tensor([[0.9, 0.1, 0.4], [0.0, 1.0, 0.2], [0.5, 0.0, 1.0]],
                                   dtype=torch.float64), dim=-1)
    t, b = 10.0, -4.0
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = t * float(img[i] @ txt[j]) + b
            y = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-y * z))  # -log sigmoid(y z)
    expected = total / 3
    got = SigLipLoss()(img, txt, torch.tensor(t, dtype=torch.float64),
                       torch.tensor(b, dtype=torch.float64))
    assert math.isclose(got.item(), expected, rel_tol=1e-12)


def test_local_loss_equals_full_mode_in_one_process():
    img, txt, scale, _ = _inputs()
    grads = []
    for local in (False, True):
        for t in (img, txt, scale):
            t.grad = None
        loss = ClipLoss(local_loss=local)(img, txt, scale)
        loss.backward()
        grads.append((loss.detach(), img.grad.clone(), txt.grad.clone(), scale.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_default_mode_is_full_matrix():
    assert ClipLoss().local_loss is False


def test_float64_is_kept_and_bf16_upcast():
    img, txt, scale, bias = (t.detach() for t in _inputs())
    assert ClipLoss()(img, txt, scale).dtype == torch.float64
    assert SigLipLoss()(img, txt, scale, bias).dtype == torch.float64
    out = ClipLoss()(img.bfloat16(), txt.bfloat16(), scale.bfloat16())
    assert out.dtype == torch.float32


def test_matches_open_clip_losses():
    oc_loss = pytest.importorskip("open_clip.loss")
    img, txt, scale, bias = (t.detach() for t in _inputs())
    torch.testing.assert_close(ClipLoss()(img, txt, scale), oc_loss.ClipLoss()(img, txt, scale),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(SigLipLoss()(img, txt, scale, bias),
                               oc_loss.SigLipLoss()(img, txt, scale, bias), rtol=0, atol=1e-12)


# -----------------------------------------------------------------------------
# 2 real gloo processes


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        n = N // world
        results = {}
        for mode in MODES:
            leaves = _inputs()
            img, txt, scale, bias = leaves
            sl = slice(rank * n, (rank + 1) * n)
            loss = _call(mode, img[sl], txt[sl], scale, bias)
            loss.backward()
            # mirror DDP: all-reduce the per-rank gradients and average over ranks
            grads = []
            for t in leaves:
                g = t.grad if t.grad is not None else torch.zeros_like(t)
                dist.all_reduce(g)  # SUM (gloo has no AVG)
                grads.append(g / world)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            results[mode] = {"loss": mean_loss / world, "grads": grads}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_full_batch(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_ddp_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for mode in MODES:
        leaves = _inputs()
        ref = _call(mode, *leaves)
        ref.backward()
        for res in ranks:
            got = res[mode]
            torch.testing.assert_close(got["loss"], ref.detach(), rtol=0, atol=1e-6,
                                       msg=lambda m: f"{mode} loss: {m}")
            names = ("image_features", "text_features", "logit_scale", "logit_bias")
            for name, g, t in zip(names, got["grads"], leaves):
                if mode != "siglip" and name == "logit_bias":
                    continue
                assert t.grad is not None and t.grad.abs().max() > 1e-4  # non-trivial
                torch.testing.assert_close(g, t.grad, rtol=0, atol=1e-6,
                                           msg=lambda m: f"{mode} d/d{name}: {m}")
