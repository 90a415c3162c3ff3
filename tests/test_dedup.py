"""Dedup stage: near duplicates by perceptual hash on Dask, benchmark decontamination with an overlap
report, and byte-identical dedup + shard outputs on a re-run."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFilter

from data.common.manifest import hash_outputs
from data.dedup import dedup
from data.eval.synthetic import build_synthetic_benchmark
from data.shards import write_shards

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def scheduler():
    from distributed import LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1", silence_logs=logging.ERROR) as cluster:
        yield cluster.scheduler_address


def _photo(seed: int, size: int = 96) -> Image.Image:
    """A distinct 'photo': smooth random colour field with a few random ellipses."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = rng.integers(0, size, 2)
        r = int(rng.integers(8, 24))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img.filter(ImageFilter.GaussianBlur(1))


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _write_crawl(crawl_dir: Path, samples: list[tuple[str, str, bytes]], shard_size: int = 40) -> list[str]:
    """img2dataset's output layout: NNNNN.tar (jpg/txt/json per key) + NNNNN.parquet."""
    crawl_dir.mkdir(parents=True)
    keys = []
    for shard, start in enumerate(range(0, len(samples), shard_size)):
        rows = []
        with tarfile.open(crawl_dir / f"{shard:05d}.tar", "w") as tf:
            for i, (url, caption, data) in enumerate(samples[start:start + shard_size]):
                key = f"{shard:05d}{i:04d}"
                keys.append(key)
                meta = json.dumps({"url": url, "caption": caption, "key": key}).encode()
                for ext, payload in (("jpg", data), ("txt", caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
                rows.append((key, url, caption, hashlib.sha256(data).hexdigest(), "success", None))
        pd.DataFrame(rows, columns=["key", "url", "caption", "sha256", "status", "error_message"]).to_parquet(
            crawl_dir / f"{shard:05d}.parquet", index=False)
    return keys


def test_near_duplicates_are_dropped_with_their_representative(tmp_path, scheduler):
    originals = [_photo(i) for i in range(60)]
    samples = [(f"http://example.com/{i}.jpg", "a photo" if i % 2 else f"photo {i}", _jpeg(img))
               for i, img in enumerate(originals)]  # half share one caption: captions don't matter
    planted = {}  # copy index -> original index
    for i in range(0, 20):
        samples.append((f"http://mirror.example.com/q50/{i}.jpg", f"copy {i}", _jpeg(originals[i], 50)))
        planted[len(samples) - 1] = i
    for i in range(20, 40):
        half = originals[i].resize((48, 48), Image.BILINEAR)
        samples.append((f"http://mirror.example.com/half/{i}.jpg", f"small {i}", _jpeg(half, 85)))
        planted[len(samples) - 1] = i
    keys = _write_crawl(tmp_path / "crawl", samples)

    counts = dedup(tmp_path / "crawl", tmp_path / "out", scheduler_address=scheduler)
    dropped = pd.read_parquet(tmp_path / "out" / "dropped.parquet").set_index("key")
    keep = pd.read_parquet(tmp_path / "out" / "keep.parquet")
    assert counts["input"] == 100 and counts["dropped_near_duplicate"] == 40 and counts["kept"] == 60
    assert set(keep["key"]) == set(keys[:60])  # all distinct originals kept, the earlier copy each time
    for copy, orig in planted.items():
        row = dropped.loc[keys[copy]]
        assert row.reason == "near_duplicate" and row.duplicate_of == keys[orig] and row.distance >= 0
    assert keep["phash"].notna().all()
    assert len(pd.read_parquet(tmp_path / "out" / "phash.parquet")) == 100


def test_benchmark_images_in_the_crawl_are_dropped_and_reported(tmp_path, scheduler):
    bench_root = build_synthetic_benchmark("colour", tmp_path / "benchmarks", seed=99, samples_per_class=4,
                                           image_size=64)
    with tarfile.open(sorted((bench_root / "test").glob("*.tar"))[0]) as tf:
        bench_images = [(m.name.split(".")[0], tf.extractfile(m).read()) for m in tf if m.name.endswith((".jpg", ".png", ".webp"))]
    assert len(bench_images) >= 8
    samples = [(f"http://example.com/{i}.jpg", f"photo {i}", _jpeg(_photo(1000 + i))) for i in range(50)]
    rng = random.Random(0)
    leaked = rng.sample(range(len(bench_images)), 6)
    for j in leaked:  # the test image re-encoded (q90), as a scraper would find it
        samples.append((f"http://leak.example.com/{j}.jpg", "some caption",
                        _jpeg(Image.open(io.BytesIO(bench_images[j][1])), 90)))
    keys = _write_crawl(tmp_path / "crawl", samples)

    counts = dedup(tmp_path / "crawl", tmp_path / "out", benchmark_roots={"colour": bench_root},
                   scheduler_address=scheduler)
    dropped = pd.read_parquet(tmp_path / "out" / "dropped.parquet")
    contaminated = dropped[dropped.reason == "benchmark_overlap"]
    assert set(contaminated["key"]) == set(keys[50:])
    assert counts["dropped_benchmark_overlap"] == 6 and counts["kept"] == 50
    assert all(d.startswith("colour/") for d in contaminated["duplicate_of"])
    overlap = pd.read_parquet(tmp_path / "out" / "overlap.parquet")
    leaked_keys = {bench_images[j][0] for j in leaked}
    assert leaked_keys <= set(overlap["test_key"]) and set(overlap["train_key"]) <= set(keys[50:])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    n_test = report["overlap"]["colour"]["test_images"]
    assert report["overlap"]["colour"]["overlapping"] == counts["overlap_colour"] == overlap["test_key"].nunique()
    assert counts["overlap_colour_fraction"] == pytest.approx(overlap["test_key"].nunique() / n_test, abs=1e-6)
    print(f"\noverlap report: {report['overlap']}")


def test_dedup_and_shards_are_byte_identical_on_a_rerun(tmp_path, scheduler):
    base = [_photo(2000 + i) for i in range(30)]
    samples = [(f"http://example.com/{i}.jpg", f"photo {i}", _jpeg(img)) for i, img in enumerate(base)]
    samples += [(f"http://copy.example.com/{i}.jpg", f"copy {i}", _jpeg(base[i], 50)) for i in range(5)]
    _write_crawl(tmp_path / "crawl", samples, shard_size=16)
    hashes = []
    for run in ("a", "b"):
        dedup(tmp_path / "crawl", tmp_path / run / "dedup", scheduler_address=scheduler)
        write_shards(tmp_path / "crawl", tmp_path / run / "dedup" / "keep.parquet", tmp_path / run / "shard",
                     val_fraction=0.2, samples_per_shard=8, seed=3)
        hashes.append({stage: hash_outputs(tmp_path / run / stage, exclude=()) for stage in ("dedup", "shard")})
    assert hashes[0] == hashes[1]
    shards = json.loads((tmp_path / "a" / "shard" / "shards.json").read_text())
    assert sum(v["samples"] for v in shards.values()) == 30
    assert all(hashes[0]["shard"][name] == v["sha256"] for name, v in shards.items())


def test_trainer_reads_img2dataset_raw_shards(tmp_path):
    """flows.train_entry under torchrun (2 gloo ranks) trains straight from img2dataset's output."""
    import os
    import subprocess
    import sys

    from clip.tokenizer import train_caption_tokenizer

    samples = [(f"http://example.com/{i}.jpg", f"photo number {i} of a blob", _jpeg(_photo(3000 + i), 85))
               for i in range(64)]
    _write_crawl(tmp_path / "crawl", samples, shard_size=16)  # 00000.tar .. 00003.tar, no sizes.json
    tok = train_caption_tokenizer([c for _, c, _ in samples], vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    from flows.config import TrainConfig

    train = TrainConfig(nproc=2, device="cpu", vocab_size=300, context_length=16, epochs=1, batch_size=8,
                        warmup_steps=1, checkpoint_every=100, log_every=1)
    spec = train.train_spec(shard_dir=tmp_path / "crawl", out_dir=tmp_path / "train",
                            tokenizer=tmp_path / "tokenizer.json")
    (tmp_path / "spec.json").write_text(spec.to_json())
    from flows.stages.train import free_loopback_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_loopback_port()}", "-m", "flows.train_entry",
           str(tmp_path / "spec.json")]
    proc = subprocess.run(cmd, env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"}, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train" / "summary.json").read_text())
    assert summary["train_samples"] == 64 and summary["world_size"] == 2
    assert summary["steps_per_epoch"] == 4 and summary["steps"] == 4  # 64 // (2 ranks x 8)


def test_search_on_dask_gives_the_same_result(tmp_path, scheduler, monkeypatch):
    import data.dedup.deduplicate as dedup_module

    base = [_photo(4000 + i) for i in range(40)]
    samples = [(f"http://example.com/{i}.jpg", f"p {i}", _jpeg(img)) for i, img in enumerate(base)]
    samples += [(f"http://copy.example.com/{i}.jpg", f"c {i}", _jpeg(base[i], 50)) for i in range(0, 40, 4)]
    _write_crawl(tmp_path / "crawl", samples)
    local = dedup(tmp_path / "crawl", tmp_path / "local", scheduler_address=scheduler)
    monkeypatch.setattr(dedup_module, "DASK_SEARCH_MIN", 0)  # force the distributed search at this size
    distributed = dedup(tmp_path / "crawl", tmp_path / "dask", scheduler_address=scheduler)
    assert local == distributed and local["dropped_near_duplicate"] == 10
    assert (pd.read_parquet(tmp_path / "local" / "dropped.parquet")
            .equals(pd.read_parquet(tmp_path / "dask" / "dropped.parquet")))
