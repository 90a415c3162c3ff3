"""Forward+backward training throughput on CPU: witclip vs open_clip, same config, same process,
in bf16 autocast and in fp32, with achieved FLOP/s against measured matmul ceilings.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/model.py
    .venv/bin/python bench/model.py --quick              # fewer rounds, a smoke run

For each config (``tiny``, ``ViT-B-32``) both models are built randomly initialised (no
weights are downloaded) and timed on identical inputs with the same loss (witclip's
ClipLoss, whose logits are fp32). What is timed is one forward, loss and backward, then
``zero_grad(set_to_none=True)``; no optimizer. Two precision pairings per config:

* ``bf16``: witclip at its default precision (``clip.precision.resolve_precision("auto")``: bf16
  autocast on a CPU with AVX512-BF16/AMX whose probe finds bf16 matmuls faster, else fp32; printed)
  vs open_clip under ``torch.autocast("cpu", dtype=torch.bfloat16)``, which is what its
  ``amp_bf16`` precision does.
* ``fp32``: both without autocast.

Timing rounds alternate between the two implementations (the one that goes first alternates)
so that machine noise hits both; samples/s is the median over rounds.

FLOP/s. One forward + loss + backward of witclip's model is counted once per config with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products only) and charged to both models
(same architecture, same batch; FlopCounterMode has no formula for the CPU flash-attention op
open_clip's attention reaches, so its own count would leave attention out). Ceilings: best of
repeated 2048 x 2048 matmuls in bf16 and fp32 (``clip.precision.measure_matmul``), at the start
and after every config, the highest kept (contention only lowers a best-of). Prints a table, then one JSON object as the last line:
``ratio`` is witclip / open_clip for ViT-B-32 in the bf16 pairing, ``ratio_fp32`` in fp32,
``ratio_tiny`` / ``ratio_tiny_fp32`` for tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import clip  # noqa: E402
from bench.ceilings import MatmulCeilings  # noqa: E402
from clip.loss import ClipLoss  # noqa: E402
from clip.precision import autocast, resolve_precision  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# name -> (batch, warmup iters per impl, rounds, iters per round); per precision pairing
PLAN = {"tiny": (32, 2, 8, 3), "ViT-B-32": (8, 1, 6, 1)}
QUICK_PLAN = {"tiny": (32, 1, 2, 2), "ViT-B-32": (8, 1, 2, 1)}
PAIRINGS = ("bf16", "fp32")


def open_clip_model(name: str, cfg) -> tuple[torch.nn.Module | None, str]:
    """open_clip's model of the same architecture, or (None, reason)."""
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover
        return None, f"open_clip not importable: {e}"
    if name == "ViT-B-32":
        return open_clip.create_model("ViT-B-32-quickgelu", pretrained=None), ""
    v, t = cfg.vision, cfg.text
    if v.is_resnet:
        return None, "ResNet tower comparison not implemented"
    if v.width % v.heads:
        return None, "vision width not divisible by heads"
    model = open_clip.CLIP(
        embed_dim=cfg.embed_dim,
        quick_gelu=cfg.act == "quick_gelu",
        vision_cfg=dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                        layers=v.layers, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio),
        text_cfg=dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                      layers=t.layers, heads=t.heads, mlp_ratio=t.mlp_ratio),
    )
    return model, ""


def make_inputs(cfg, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    v, t = cfg.vision, cfg.text
    images = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
    tokens = torch.randint(1, t.vocab_size - 1, (batch, t.context_length), generator=g)
    lengths = torch.randint(4, t.context_length, (batch,), generator=g)
    tokens[torch.arange(batch), lengths] = t.vocab_size - 1  # EOT: highest id, pooled by argmax
    return images, tokens


def step(model: torch.nn.Module, loss_fn, images, tokens, amp) -> None:
    with amp():
        img_f, txt_f, scale = model(images, tokens)[:3]
        loss = loss_fn(img_f, txt_f, scale)
    loss.backward()
    model.zero_grad(set_to_none=True)


def count_flops(model: torch.nn.Module, loss_fn, images, tokens, amp) -> int:
    with FlopCounterMode(display=False) as counter:
        step(model, loss_fn, images, tokens, amp)
    return counter.get_total_flops()


def bench_config(name: str, plan: tuple[int, int, int, int], witclip_precision: str) -> dict:
    batch, warmup, rounds, iters = plan
    cfg = clip.get_config(name)
    models = {"witclip": clip.create_model(name)}
    oc, why = open_clip_model(name, cfg)
    if oc is None:
        print(f"[{name}] skipping open_clip comparison: {why}")
    else:
        models["open_clip"] = oc
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    for m in models.values():
        m.train()
    images, tokens = make_inputs(cfg, batch)
    loss_fn = ClipLoss()
    # the context each (pairing, impl) runs under
    amps = {
        "bf16": {"witclip": lambda: autocast(witclip_precision, "cpu"),
                 "open_clip": lambda: torch.autocast("cpu", dtype=torch.bfloat16)},
        "fp32": {"witclip": nullcontext, "open_clip": nullcontext},
    }
    precision = {"bf16": {"witclip": witclip_precision, "open_clip": "amp_bf16"},
                 "fp32": {"witclip": "fp32", "open_clip": "fp32"}}
    flops = count_flops(models["witclip"], loss_fn, images, tokens, nullcontext)
    out: dict = {"batch": batch, "params": params, "flops": flops, "skipped": why, "pairings": {}}
    for pairing in PAIRINGS:
        for k, m in models.items():
            for _ in range(warmup):
                step(m, loss_fn, images, tokens, amps[pairing][k])
        elapsed = {k: 0.0 for k in models}
        per_round: dict[str, list[float]] = {k: [] for k in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))  # interleave, alternate
            for k in order:
                t0 = time.perf_counter()
                for _ in range(iters):
                    step(models[k], loss_fn, images, tokens, amps[pairing][k])
                dt = time.perf_counter() - t0
                elapsed[k] += dt
                per_round[k].append(batch * iters / dt)
        n = batch * iters * rounds
        # median over rounds: robust to the bursts of contention on shared cores
        sps = {k: statistics.median(v) for k, v in per_round.items()}
        out["pairings"][pairing] = {
            "precision": {k: precision[pairing][k] for k in models},
            "samples": n,
            "samples_s": sps,
            "mean_samples_s": {k: n / elapsed[k] for k in models},
            "round_min_max": {k: (min(v), max(v)) for k, v in per_round.items()},
            "gflops_s": {k: flops * s / batch / 1e9 for k, s in sps.items()},
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    opts = ap.parse_args()
    plan = QUICK_PLAN if opts.quick else PLAN

    torch.set_num_threads(CORES)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    choice = resolve_precision("auto", "cpu")
    print(f"witclip default precision: {choice}")
    # measured before and after every config: noise only lowers a best-of, so the highest is kept
    ceilings = MatmulCeilings()
    results = {}
    for name in plan:
        results[name] = bench_config(name, plan[name], choice.precision)
        ceilings.measure()
    ceil = {"bf16": ceilings.bf16, "fp32": ceilings.fp32}

    print(f"\nforward+backward on CPU, {CORES} torch threads, torch {torch.__version__}")
    print(ceilings.describe())
    hdr = (f"{'config':<9} {'pair':<5} {'impl':<10} {'precision':<9} {'params (M)':>10} {'batch':>5} "
           f"{'samples/s':>10} {'mean':>8} {'round min..max':>16} {'GFLOP/s':>8} {'%bf16 ceil':>10} "
           f"{'%fp32 ceil':>10} {'vs open_clip':>12}")
    print(hdr)
    print("-" * len(hdr))
    for name, res in results.items():
        for pairing, pr in res["pairings"].items():
            base = pr["samples_s"].get("open_clip")
            for impl, sps in pr["samples_s"].items():
                lo, hi = pr["round_min_max"][impl]
                g = pr["gflops_s"][impl]
                rel = f"{sps / base:.3f}x" if base else "n/a"
                print(f"{name:<9} {pairing:<5} {impl:<10} {pr['precision'][impl]:<9} "
                      f"{res['params'][impl] / 1e6:>10.2f} {res['batch']:>5} {sps:>10.2f} "
                      f"{pr['mean_samples_s'][impl]:>8.2f} {f'{lo:.1f}..{hi:.1f}':>16} {g:>8.1f} "
                      f"{100 * g / ceil['bf16']:>9.1f}% {100 * g / ceil['fp32']:>9.1f}% {rel:>12}")
        print(f"{name}: {res['flops'] / 1e9:.1f} GFLOP per forward+backward (FlopCounterMode, witclip's model)")
    print(f"total wall time {time.perf_counter() - t_start:.1f}s")

    summary: dict = {"bench": "model", "threads": CORES, "witclip_precision": choice.precision,
                     "ceiling_gflops_bf16": round(ceil["bf16"], 1), "ceiling_gflops_fp32": round(ceil["fp32"], 1)}
    for name, key in (("ViT-B-32", "vitb32"), ("tiny", "tiny")):
        for pairing, pr in results[name]["pairings"].items():
            w = pr["samples_s"]["witclip"]
            o = pr["samples_s"].get("open_clip")
            sfx = "" if pairing == "bf16" else "_fp32"
            summary[f"witclip_{key}{sfx}_samples_s"] = round(w, 3)
            summary[f"open_clip_{key}{sfx}_samples_s"] = round(o, 3) if o else None
            for impl, g in pr["gflops_s"].items():
                summary[f"{impl}_{key}{sfx}_frac_bf16_ceiling"] = round(g / ceil["bf16"], 3)
                summary[f"{impl}_{key}{sfx}_frac_fp32_ceiling"] = round(g / ceil["fp32"], 3)
            ratio_key = "ratio" if key == "vitb32" else f"ratio_{key}"
            summary[ratio_key + sfx] = round(w / o, 4) if o else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
