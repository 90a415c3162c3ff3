"""Training-step throughput on CPU: witclip's ``TrainStep`` vs open_clip's ``train_one_epoch``,
in bf16 autocast and in fp32, with achieved FLOP/s against measured matmul ceilings.

    .venv/bin/python bench/train.py                      # tiny (batch 32) and ViT-B-32 (batch 8)
    .venv/bin/python bench/train.py --quick              # fewer steps, a smoke run
    .venv/bin/python bench/train.py --models tiny        # comma-separated subset

(``make bench`` runs every script in bench/.)

What is timed is one whole optimizer step of each project's own training code, one process, in
two precision pairings per model:

* ``bf16``: witclip at its default precision (``TrainConfig(precision="auto")``, resolved by
  ``clip.precision``: bf16 autocast on a CPU with AVX512-BF16/AMX whose probe finds bf16 matmuls
  faster, else fp32; the resolution and its reason are printed) vs open_clip with
  ``args.precision = "amp_bf16"`` (its bf16 autocast; fp32 weights and inputs).
* ``fp32``: both in fp32 (witclip ``precision="fp32"``, open_clip ``"fp32"``).

The two sides:

* witclip: ``clip.train.TrainStep.step([(images, tokens)])`` -- forward, symmetric InfoNCE,
  backward, grad-norm clipping, AdamW (as TrainStep builds it: fused on CPU), warmup+cosine
  LambdaLR, temperature clamp, and the per-step loss / grad-norm read-back.
* open_clip: ``open_clip_train.train.train_one_epoch`` itself (open_clip_torch's real loop), fed
  an in-memory stand-in for its ``data['train']`` (``dataloader`` with ``num_batches`` /
  ``num_samples``, ``set_epoch``), an ``args`` namespace with every attribute the function reads
  (precision as above, accum_freq 1, grad_clip_norm 1.0, no wandb / tensorboard / distillation,
  rank 0 so its periodic log block runs as in real training; Python logging is left unconfigured
  so nothing is printed), open_clip's ``ClipLoss``, ``torch.optim.AdamW`` built exactly as
  ``open_clip_train.main`` builds it (its gain/bias param-group rule, no implementation flag: on
  CPU torch then runs its per-parameter loop), and ``open_clip_train.scheduler.cosine_lr``.

The open_clip model is ``open_clip.model.CLIP`` built from witclip's own config
(``clip/configs/<name>.json``) and loaded with witclip's initial weights (the state_dict keys
match, ``strict=True``), so both start from identical parameters; parameter counts are printed
and must be equal. Every (model, precision) pairing builds both models afresh from the same seed.
Both get the same pre-generated random batches (no data loading), the same hyper-parameters
(lr 5e-4, wd 0.1, betas (0.9, 0.98), eps 1e-6, warmup 10 of 1000 steps), and
``torch.set_num_threads(os.cpu_count())``. The process starts with
``clip.train.retain_freed_memory()`` (glibc malloc keeps freed memory instead of re-mapping it
every step), which witclip's ``TrainStep`` applies on CPU anyway; it is process-wide, so
open_clip's steps run under the same allocator policy.

Each step is timed on its own: for witclip around ``stepper.step``; for open_clip from one batch
request of its loop to the next (the stand-in loader stamps the clock whenever the loop asks
for a batch, and once more when the loop asks past the last one), so ``train_one_epoch``'s
per-call setup is not counted but everything it does per step is. After warm-up steps, timed
rounds interleave the two implementations (the one that goes first alternates), so slow
phases of a shared machine hit both. Reported samples/s is the median over all timed steps of
an implementation; the mean over round wall-clocks is printed too.

FLOP/s. A step's FLOPs are counted once per pairing, outside the timed steps, with
``torch.utils.flop_counter.FlopCounterMode`` over witclip's forward + loss + backward on one batch
(matrix products: linear layers, patch embedding, attention, logits; elementwise work and the
optimizer are not counted). The same count is charged to both sides -- same architecture, same
batch -- because FlopCounterMode has no formula for the CPU flash-attention op that open_clip's
``nn.MultiheadAttention`` reaches, so counting open_clip's run would leave out its attention
(~1.6 % of ViT-B-32's FLOPs). Achieved FLOP/s = that count / the median step time, so the whole
step (optimizer, clipping, casts) is charged. Ceilings: the best of
repeated 2048 x 2048 matmuls in bf16 and in fp32 (``clip.precision.measure_matmul``, same
threads), measured at the start and after every pairing; the highest measurement is the ceiling
(contention only lowers a best-of). Each row prints achieved FLOP/s as a fraction of both ceilings.

The last line printed is one JSON object: ``ratio`` is witclip (default precision) / open_clip
``amp_bf16`` for ViT-B-32; ``ratio_fp32`` the same for fp32 vs fp32; ``tiny_ratio`` /
``tiny_ratio_fp32`` for tiny; plus samples/s, GFLOP/s, ceiling fractions and the ceilings.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import clip  # noqa: E402
from bench.ceilings import MatmulCeilings  # noqa: E402
from clip.precision import autocast  # noqa: E402
from clip.train import TrainConfig, TrainStep, retain_freed_memory  # noqa: E402

THREADS = os.cpu_count() or 1

# hyper-parameters shared by both implementations
LR, WD, BETAS, EPS, WARMUP, TOTAL_STEPS, GRAD_CLIP = 5e-4, 0.1, (0.9, 0.98), 1e-6, 10, 1000, 1.0
N_BATCHES = 4  # distinct pre-generated batches, cycled

# name -> (batch, warm-up steps per impl, rounds, timed steps per round per impl); per precision pairing
PLAN = {"tiny": (32, 5, 3, 10), "ViT-B-32": (8, 2, 4, 2)}
QUICK_PLAN = {"tiny": (32, 2, 2, 4), "ViT-B-32": (8, 1, 2, 1)}
JSON_KEY = {"tiny": "tiny", "ViT-B-32": "vit_b32"}
# pairing -> (witclip TrainConfig.precision, open_clip args.precision)
PAIRINGS = {"bf16": ("auto", "amp_bf16"), "fp32": ("fp32", "fp32")}


# -----------------------------------------------------------------------------
# inputs


def make_batches(cfg, batch: int, n: int = N_BATCHES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random images and token rows whose EOT (the highest id, pooled by argmax) ends a random-length caption."""
    g = torch.Generator().manual_seed(0)
    v, t = cfg.vision, cfg.text
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, v.image_size, v.image_size, generator=g)
        tokens = torch.randint(1, t.vocab_size - 1, (batch, t.context_length), generator=g)
        eot = torch.randint(3, t.context_length, (batch,), generator=g)
        tokens[torch.arange(batch), eot] = t.vocab_size - 1
        tokens[torch.arange(t.context_length) > eot[:, None]] = 0  # padding after EOT
        out.append((images, tokens))
    return out


# -----------------------------------------------------------------------------
# witclip


class WitclipRunner:
    name = "witclip"

    def __init__(self, model: torch.nn.Module, batches, precision: str) -> None:
        cfg = TrainConfig(precision=precision, grad_accum=1, lr=LR, weight_decay=WD, betas=BETAS, eps=EPS,
                          warmup_steps=WARMUP, epochs=1, grad_clip=GRAD_CLIP, progress=False)
        self.stepper = TrainStep(model, cfg, total_steps=TOTAL_STEPS, device=torch.device("cpu"), world_size=1)
        self.stepper.wrap()
        self.precision = self.stepper.precision  # as resolved ("auto" -> bf16 or fp32)
        self.batches = batches
        self.i = 0
        self.skipped = 0
        self.last_loss = math.nan

    def run(self, steps: int) -> list[float]:
        """Run ``steps`` optimizer steps; seconds of each."""
        times = []
        for _ in range(steps):
            batch = self.batches[self.i % len(self.batches)]
            self.i += 1
            t0 = time.perf_counter()
            result = self.stepper.step([batch])
            times.append(time.perf_counter() - t0)
            self.skipped += result.skipped
            self.last_loss = result.loss
        return times

    def count_flops(self) -> int:
        """FLOPs of forward + loss + backward on one batch, counted as TrainStep runs them (its
        autocast, its loss); the gradients are dropped afterwards, no update is applied."""
        st = self.stepper
        images, tokens = self.batches[0]
        with FlopCounterMode(display=False) as counter:
            with autocast(st.precision, st.device):
                loss = st.loss_fn(*st.model(images, tokens))
            loss.backward()
        st.optimizer.zero_grad(set_to_none=True)
        return counter.get_total_flops()


# -----------------------------------------------------------------------------
# open_clip


class _StampedLoader:
    """What train_one_epoch reads of a DataLoader: iteration, ``num_batches``, ``num_samples``.
    Records the clock each time the loop asks for a batch (and when it asks past the last)."""

    def __init__(self, batches, start: int, steps: int) -> None:
        self.batches, self.start = batches, start
        self.num_batches = steps
        self.num_samples = steps * batches[0][0].shape[0]
        self.stamps: list[float] = []

    def __iter__(self):
        for k in range(self.num_batches):
            self.stamps.append(time.perf_counter())
            yield self.batches[(self.start + k) % len(self.batches)]
        self.stamps.append(time.perf_counter())


class _DataInfo:
    def __init__(self, loader: _StampedLoader) -> None:
        self.dataloader = loader
        self.epoch = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class OpenClipRunner:
    name = "open_clip"

    def __init__(self, model: torch.nn.Module, batches, batch_size: int, precision: str) -> None:
        from open_clip.loss import ClipLoss
        from open_clip_train.scheduler import cosine_lr
        from open_clip_train.train import train_one_epoch

        self.train_one_epoch = train_one_epoch
        self.model = model
        self.batches = batches
        # open_clip_train.main's rule: no weight decay on gains, biases, norms and the temperature
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
             {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}],
            lr=LR, betas=BETAS, eps=EPS,
        )
        self.scheduler = cosine_lr(self.optimizer, LR, WARMUP, TOTAL_STEPS)
        self.loss = ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
        # every attribute train_one_epoch reads (fp32 / amp_bf16: no scaler; no horovod, no distillation)
        self.precision = precision
        self.args = SimpleNamespace(
            device="cpu", precision=precision, distill=False, accum_freq=1, skip_scheduler=False,
            grad_clip_norm=GRAD_CLIP, horovod=False, rank=0, local_rank=0, world_size=1,
            batch_size=batch_size, log_every_n_steps=1_000_000, wandb=False,
        )
        self.epoch = 0
        self.i = 0

    @property
    def skipped(self) -> int:
        return 0  # open_clip applies every step

    def run(self, steps: int) -> list[float]:
        loader = _StampedLoader(self.batches, self.i, steps)
        self.i += steps
        data = {"train": _DataInfo(loader)}
        self.train_one_epoch(self.model, data, self.loss, self.epoch, self.optimizer, None, self.scheduler,
                             None, self.args, tb_writer=None)
        self.epoch += 1
        s = loader.stamps
        assert len(s) == steps + 1, "train_one_epoch did not consume every batch"
        return [b - a for a, b in zip(s, s[1:])]


def open_clip_model(witclip_model: clip.CLIP) -> torch.nn.Module:
    """open_clip.model.CLIP with witclip's architecture, holding witclip's initial weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    cfg = witclip_model.config
    v, t = cfg.vision, cfg.text
    if v.is_resnet:
        raise ValueError("only ViT image towers are compared")
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio,
                           patch_size=v.patch_size, image_size=v.image_size)
    text = CLIPTextCfg(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                       layers=t.layers, mlp_ratio=t.mlp_ratio)
    model = CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.act == "quick_gelu",
                 init_logit_scale=cfg.init_logit_scale, output_dict=True)
    model.load_state_dict(witclip_model.state_dict(), strict=True)  # same names, same shapes: same model
    return model


# -----------------------------------------------------------------------------
# benchmark


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), Linux only: to tell
    whether other processes competed for the cores while we measured."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest is inside user
    t = os.times()
    return busy, t.user + t.system


def bench_config(name: str, pairing: str, plan: tuple[int, int, int, int]) -> dict:
    batch, warmup, rounds, per_round = plan
    w_precision, o_precision = PAIRINGS[pairing]
    torch.manual_seed(0)
    w_model = clip.create_model(name)
    o_model = open_clip_model(w_model)
    params = {"witclip": sum(p.numel() for p in w_model.parameters()),
              "open_clip": sum(p.numel() for p in o_model.parameters())}
    if params["witclip"] != params["open_clip"]:
        raise SystemExit(f"[{name}] parameter counts differ: {params}")
    cfg = w_model.config
    batches = make_batches(cfg, batch)
    runners = [WitclipRunner(w_model, batches, w_precision), OpenClipRunner(o_model, batches, batch, o_precision)]
    print(f"[{name} {pairing}] batch {batch}, params {params['witclip']:,} (both), act {cfg.act}, "
          f"image {cfg.vision.image_size}px, ctx {cfg.text.context_length}; witclip precision "
          f"{runners[0].stepper.precision_choice}, open_clip {o_precision}; "
          f"{warmup} warm-up + {rounds}x{per_round} timed steps per impl", flush=True)

    flops = runners[0].count_flops()  # the model's FLOPs, charged to both sides (see the docstring)
    for r in runners:
        r.run(warmup)
    step_times: dict[str, list[float]] = {r.name: [] for r in runners}
    round_sps: dict[str, list[float]] = {r.name: [] for r in runners}
    for k in range(rounds):
        order = runners if k % 2 == 0 else runners[::-1]
        for r in order:
            t0 = time.perf_counter()
            times = r.run(per_round)
            wall = time.perf_counter() - t0
            step_times[r.name] += times
            round_sps[r.name].append(batch * per_round / wall)
    res = {
        "pairing": pairing,
        "batch": batch,
        "params": params["witclip"],
        "steps": rounds * per_round,
        "precision": {r.name: r.precision for r in runners},
        "flops": flops,
        "samples_s": {n: batch / statistics.median(ts) for n, ts in step_times.items()},
        "step_ms": {n: 1e3 * statistics.median(ts) for n, ts in step_times.items()},
        "step_ms_range": {n: (1e3 * min(ts), 1e3 * max(ts)) for n, ts in step_times.items()},
        "round_samples_s": {n: statistics.mean(v) for n, v in round_sps.items()},
        "skipped": {r.name: r.skipped for r in runners},
    }
    res["gflops_s"] = {n: flops / ms / 1e6 for n, ms in res["step_ms"].items()}
    del runners, w_model, o_model
    gc.collect()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer warm-up and timed steps")
    ap.add_argument("--models", default="tiny,ViT-B-32", help="comma-separated subset of " + ",".join(PLAN))
    opts = ap.parse_args()
    names = [m.strip() for m in opts.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in PLAN]
    if unknown or not names:
        ap.error(f"unknown model(s) {unknown}; choose from {list(PLAN)}")
    plan = QUICK_PLAN if opts.quick else PLAN

    import open_clip

    torch.set_num_threads(THREADS)
    retained = retain_freed_memory()  # before anything is timed: both sides share the policy
    busy0 = _cpu_seconds()
    t_start = time.perf_counter()
    # measured before and after every pairing: noise only lowers a best-of, so the highest is kept
    ceilings = MatmulCeilings()
    results = {}
    for name in names:
        for pairing in PAIRINGS:
            results[name, pairing] = bench_config(name, pairing, plan[name])
            ceilings.measure()
    ceil = {"bf16": ceilings.bf16, "fp32": ceilings.fp32}

    print(f"\ntraining step (fwd + InfoNCE + bwd + clip + AdamW + schedule), CPU, {THREADS} threads, "
          f"torch {torch.__version__}, open_clip {open_clip.__version__}")
    print(f"glibc malloc retains freed memory (clip.train.retain_freed_memory): {retained}")
    print(ceilings.describe())
    hdr = (f"{'config':<9} {'pair':<5} {'impl':<10} {'precision':<9} {'batch':>5} {'steps':>5} {'ms/step':>9} "
           f"{'min..max ms':>13} {'samples/s':>10} {'round avg':>10} {'GFLOP/step':>10} {'GFLOP/s':>8} "
           f"{'%bf16 ceil':>10} {'%fp32 ceil':>10} {'vs open_clip':>12}")
    print(hdr)
    print("-" * len(hdr))
    for (name, pairing), res in results.items():
        base = res["samples_s"]["open_clip"]
        for impl, sps in res["samples_s"].items():
            lo, hi = res["step_ms_range"][impl]
            g = res["gflops_s"][impl]
            print(f"{name:<9} {pairing:<5} {impl:<10} {res['precision'][impl]:<9} {res['batch']:>5} "
                  f"{res['steps']:>5} {res['step_ms'][impl]:>9.1f} {f'{lo:.0f}..{hi:.0f}':>13} {sps:>10.2f} "
                  f"{res['round_samples_s'][impl]:>10.2f} {res['flops'] / 1e9:>10.1f} {g:>8.1f} "
                  f"{100 * g / ceil['bf16']:>9.1f}% {100 * g / ceil['fp32']:>9.1f}% {f'{sps / base:.3f}x':>12}")
        if res["skipped"]["witclip"]:
            print(f"  note: witclip skipped {res['skipped']['witclip']} non-finite steps (cheaper than a real update)")
    wall = time.perf_counter() - t_start
    print(f"total wall time {wall:.1f}s")
    busy1 = _cpu_seconds()
    if busy0 is not None and busy1 is not None:
        others = (busy1[0] - busy0[0]) - (busy1[1] - busy0[1])
        share = max(0.0, others) / (wall * (os.cpu_count() or 1))
        print(f"other processes used {100 * share:.0f}% of the machine's CPU time during the run")
        if share > 0.1:
            print("warning: the cores were shared with other work; the numbers (either implementation's) "
                  "may be skewed -- rerun on a quiet machine")

    summary: dict = {"bench": "train", "device": "cpu", "threads": THREADS, "malloc_retains": retained,
                     "ceiling_gflops_bf16": round(ceil["bf16"], 1), "ceiling_gflops_fp32": round(ceil["fp32"], 1)}
    for (name, pairing), res in results.items():
        key = f"{JSON_KEY[name]}_bs{res['batch']}_{pairing}"
        for impl in ("witclip", "open_clip"):
            g = res["gflops_s"][impl]
            summary[f"{key}_{impl}_samples_s"] = round(res["samples_s"][impl], 3)
            summary[f"{key}_{impl}_gflops_s"] = round(g, 1)
            summary[f"{key}_{impl}_frac_bf16_ceiling"] = round(g / ceil["bf16"], 3)
            summary[f"{key}_{impl}_frac_fp32_ceiling"] = round(g / ceil["fp32"], 3)
        if pairing == "bf16":
            summary[f"{key}_witclip_precision"] = res["precision"]["witclip"]
        ratio = round(res["samples_s"]["witclip"] / res["samples_s"]["open_clip"], 4)
        prefix = "" if name == "ViT-B-32" else f"{JSON_KEY[name]}_"
        summary[f"{prefix}ratio" if pairing == "bf16" else f"{prefix}ratio_fp32"] = ratio
    summary.setdefault("ratio", None)  # ViT-B-32 not run
    summary["gpu"] = None
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
