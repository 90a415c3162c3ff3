"""Training-loader throughput vs. the trainer's consumption rate, same machine, same batch size.

    .venv/bin/python bench/loader.py

Generates 5,000 synthetic (image, caption) pairs (data.synthetic's scenes, 64x64 JPEG) as webdataset
shards in write_shards' layout (5 x train-NNNNNN.tar + sizes.json) in a temp dir, trains the
byte-level BPE tokenizer on their captions, then times

* the loader (data.shards.loader.build_train_loader with clip.transform.train_transform and the
  tokenizer, exactly what training uses), a full epoch per round -- worker start-up and the
  shuffle-buffer fill included -- for num_workers=0 and num_workers=2;
* the trainer: the ``tiny`` model's forward + ClipLoss + backward + AdamW step on a batch from that
  loader, after warm-up steps, in windows of a few steps;

in interleaved rounds, reporting medians.

The loader must outrun the trainer (target >= 3x), since with num_workers=0 the two share a
process and with workers they share the cores. Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the loader forks after the tokenizer ran
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import clip  # noqa: E402
from clip.loss import ClipLoss  # noqa: E402
from clip.tokenizer import CaptionTokenizer, train_caption_tokenizer  # noqa: E402
from clip.transform import train_transform  # noqa: E402
from data.shards.format import CAPTION_EXT, METADATA_EXT, SIZES_FILE, shard_file_name  # noqa: E402
from data.shards.loader import build_train_loader  # noqa: E402
from data.synthetic import describe_scene, encode_jpeg, random_scene, render_scene  # noqa: E402

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
N_SAMPLES = 5000
PER_SHARD = 1000
BATCH = 64  # configs/demo.yaml's train.batch_size
MODEL = "tiny"
ROUNDS = 3  # each: one full loader epoch per num_workers setting, then trainer windows
WORKER_SETTINGS = (0, 2)
TRAIN_WARMUP, TRAIN_WINDOWS_PER_ROUND, TRAIN_STEPS_PER_WINDOW = 3, 3, 4


class Tokenize:
    """Batch tokenizer for the loader (a class, not a lambda: picklable under any start method)."""

    def __init__(self, tokenizer: CaptionTokenizer, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, context_length=self.context_length)


def make_shards(out: Path, image_size: int) -> list[str]:
    """write_shards' layout: train-NNNNNN.tar of <key>.jpg/.txt/.json, plus sizes.json."""
    rng = random.Random(0)
    captions, sizes = [], {}
    for shard in range(N_SAMPLES // PER_SHARD):
        name = shard_file_name("train", shard)
        with tarfile.open(out / name, "w") as tf:
            for k in range(PER_SHARD):
                i = shard * PER_SHARD + k
                scene = random_scene(rng)
                jpg = encode_jpeg(render_scene(scene, image_size, rng), 90)
                caption = describe_scene(scene, rng)
                captions.append(caption)
                key = f"{i:09d}"
                meta = json.dumps({"key": key, "caption": caption}).encode()
                for ext, data in (("jpg", jpg), (CAPTION_EXT, caption.encode()), (METADATA_EXT, meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tf.addfile(info, io.BytesIO(data))
        sizes[name] = PER_SHARD
    (out / SIZES_FILE).write_text(json.dumps(sizes, indent=2) + "\n")
    return captions


def loader_epoch(shard_dir: Path, transform, tokenize, num_workers: int, epoch: int) -> tuple[float, float]:
    """One full epoch, worker start-up and shuffle-buffer fill included: (samples/s, first batch s)."""
    loader = build_train_loader(shard_dir, image_transform=transform, tokenize=tokenize,
                                batch_size=BATCH, seed=0, epoch=epoch, num_workers=num_workers)
    t0 = time.perf_counter()
    first, n_batches = 0.0, 0
    for _images, _tokens in loader:
        if n_batches == 0:
            first = time.perf_counter() - t0
        n_batches += 1
    dt = time.perf_counter() - t0
    assert n_batches == len(loader) and loader.n_corrupted == 0
    return n_batches * BATCH / dt, first


class Trainer:
    """The tiny model's optimizer step: forward, ClipLoss, backward, AdamW."""

    def __init__(self, model, images: torch.Tensor, tokens: torch.Tensor) -> None:
        self.model, self.images, self.tokens = model.train(), images, tokens
        self.loss_fn = ClipLoss()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        for _ in range(TRAIN_WARMUP):
            self.step()

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        img_f, txt_f, scale = self.model(self.images, self.tokens)
        self.loss_fn(img_f, txt_f, scale).backward()
        self.opt.step()

    def window(self) -> float:
        t0 = time.perf_counter()
        for _ in range(TRAIN_STEPS_PER_WINDOW):
            self.step()
        return BATCH * TRAIN_STEPS_PER_WINDOW / (time.perf_counter() - t0)


def main() -> None:
    torch.set_num_threads(CORES)  # as flows/train_entry.py does for one rank per machine
    t_start = time.perf_counter()
    load_before = os.getloadavg()[0]  # other processes on the shared cores skew both rates
    cfg = clip.get_config(MODEL)
    image_size, ctx = cfg.vision.image_size, cfg.text.context_length
    with tempfile.TemporaryDirectory(prefix="witclip-bench-loader-") as tmp:
        shard_dir = Path(tmp)
        t0 = time.perf_counter()
        captions = make_shards(shard_dir, image_size)
        gen_s = time.perf_counter() - t0
        tokenizer = train_caption_tokenizer(captions, vocab_size=cfg.text.vocab_size)
        tokenize = Tokenize(tokenizer, ctx)
        transform = train_transform(image_size)
        images, tokens = next(iter(build_train_loader(
            shard_dir, image_transform=transform, tokenize=tokenize, batch_size=BATCH, seed=0, epoch=0)))
        model = clip.create_model(MODEL, vocab_size=tokenizer.vocab_size, context_length=ctx)
        trainer_obj = Trainer(model, images, tokens)
        # Rounds interleave the loader settings and the trainer, so that bursts of load from other
        # processes on the shared cores hit all of them; medians over rounds.
        rates: dict[int, list[float]] = {nw: [] for nw in WORKER_SETTINGS}
        firsts: dict[int, list[float]] = {nw: [] for nw in WORKER_SETTINGS}
        train_rates: list[float] = []
        for r in range(ROUNDS):
            for nw in WORKER_SETTINGS:
                rate, first = loader_epoch(shard_dir, transform, tokenize, nw, epoch=r)
                rates[nw].append(rate)
                firsts[nw].append(first)
            train_rates += [trainer_obj.window() for _ in range(TRAIN_WINDOWS_PER_ROUND)]
    loader_res = {nw: {"samples_s": statistics.median(rates[nw]), "rounds": rates[nw],
                       "first_batch_s": statistics.median(firsts[nw])} for nw in WORKER_SETTINGS}
    trainer = {"samples_s": statistics.median(train_rates), "rounds": train_rates}

    tr = trainer["samples_s"]
    print(f"\nloader vs trainer on CPU: {CORES} cores, torch {torch.__version__}, model {MODEL} "
          f"(image {image_size}px, context {ctx}), batch {BATCH}, {N_SAMPLES} samples in "
          f"{N_SAMPLES // PER_SHARD} shards (generated in {gen_s:.1f}s)")
    hdr = f"{'what':<22} {'samples/s':>10} {'min..max':>26} {'1st batch s':>11} {'vs trainer':>10}"
    print(hdr)
    print("-" * len(hdr))
    for nw, res in loader_res.items():
        rounds = "..".join(f"{r:.0f}" for r in (min(res["rounds"]), max(res["rounds"])))
        print(f"{f'loader num_workers={nw}':<22} {res['samples_s']:>10.1f} {rounds:>26} "
              f"{res['first_batch_s']:>11.2f} {res['samples_s'] / tr:>9.2f}x")
    rounds = "..".join(f"{r:.0f}" for r in (min(trainer["rounds"]), max(trainer["rounds"])))
    print(f"{'trainer fwd+bwd+AdamW':<22} {tr:>10.1f} {rounds:>26} {'':>11} {1.0:>9.2f}x")
    print(f"total wall time {time.perf_counter() - t_start:.1f}s; 1-min load average "
          f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after")

    base = loader_res[0]["samples_s"]
    summary = {
        "bench": "loader",
        "loader_samples_s": round(base, 1),  # num_workers=0: the demo's setting
        "trainer_samples_s": round(tr, 1),
        "ratio": round(base / tr, 2),
        "batch": BATCH,
        "model": MODEL,
        "cores": CORES,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # before, after
    }
    for nw, res in loader_res.items():
        if nw:
            summary[f"loader_samples_s_nw{nw}"] = round(res["samples_s"], 1)
            summary[f"ratio_nw{nw}"] = round(res["samples_s"] / tr, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
