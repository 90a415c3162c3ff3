"""Forward+backward training throughput on CPU: witclip vs open_clip, same config, same process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/model.py

For each config (``tiny``, ``ViT-B-32``) both models are built randomly initialised (no
weights are downloaded) and timed on identical inputs with the same loss (witclip's
ClipLoss). Timing rounds alternate between the two implementations so that machine
noise hits both; samples/s is the median over rounds. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import statistics
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import clip  # noqa: E402
from clip.loss import ClipLoss  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

# name -> (batch, warmup iters per impl, rounds, iters per round)
PLAN = {"tiny": (32, 2, 8, 3), "ViT-B-32": (8, 1, 6, 1)}


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


def step(model: torch.nn.Module, loss_fn, images, tokens) -> None:
    img_f, txt_f, scale = model(images, tokens)[:3]
    loss_fn(img_f, txt_f, scale).backward()
    model.zero_grad(set_to_none=True)


def bench_config(name: str) -> dict:
    batch, warmup, rounds, iters = PLAN[name]
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
    for m in models.values():
        for _ in range(warmup):
            step(m, loss_fn, images, tokens)
    elapsed = {k: 0.0 for k in models}
    per_round = {k: [] for k in models}
    for r in range(rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # interleave, alternate
        for k in order:
            t0 = time.perf_counter()
            for _ in range(iters):
                step(models[k], loss_fn, images, tokens)
            dt = time.perf_counter() - t0
            elapsed[k] += dt
            per_round[k].append(batch * iters / dt)
    n = batch * iters * rounds
    return {
        "batch": batch,
        "samples": n,
        "params": params,
        # median over rounds: robust to the bursts of contention on shared cores
        "samples_s": {k: statistics.median(v) for k, v in per_round.items()},
        "mean_samples_s": {k: n / elapsed[k] for k in models},
        "round_min_max": {k: (min(v), max(v)) for k, v in per_round.items()},
        "skipped": why,
    }


def main() -> None:
    torch.set_num_threads(CORES)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    results = {name: bench_config(name) for name in PLAN}

    print(f"\nforward+backward on CPU, {CORES} torch threads, torch {torch.__version__}")
    hdr = f"{'config':<9} {'impl':<10} {'params (M)':>10} {'batch':>5} {'samples/s':>10} " \
          f"{'mean':>8} {'round min..max':>16} {'vs open_clip':>12}"
    print(hdr)
    print("-" * len(hdr))
    for name, res in results.items():
        base = res["samples_s"].get("open_clip")
        for impl, sps in res["samples_s"].items():
            lo, hi = res["round_min_max"][impl]
            rel = f"{sps / base:.3f}x" if base else "n/a"
            print(f"{name:<9} {impl:<10} {res['params'][impl] / 1e6:>10.2f} {res['batch']:>5} "
                  f"{sps:>10.2f} {res['mean_samples_s'][impl]:>8.2f} {f'{lo:.1f}..{hi:.1f}':>16} {rel:>12}")
    print(f"total wall time {time.perf_counter() - t_start:.1f}s")

    summary: dict = {"bench": "model", "threads": CORES}
    for name, key in (("ViT-B-32", "vitb32"), ("tiny", "tiny")):
        res = results[name]
        w = res["samples_s"]["witclip"]
        o = res["samples_s"].get("open_clip")
        summary[f"witclip_{key}_samples_s"] = round(w, 3)
        summary[f"open_clip_{key}_samples_s"] = round(o, 3) if o else None
        summary["ratio" if key == "vitb32" else f"ratio_{key}"] = round(w / o, 4) if o else None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
