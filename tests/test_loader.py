"""The webdataset training loader (data/loader.py) and open_clip compatibility of our shards.

Shards come from a fake img2dataset crawl (tars written here in its layout) packed by
data.shards.write_shards: 100 samples -> 96 train (8 shards of 12) + 4 val. Sample i has caption
"sample <i> a picture" and a solid-colour image whose colour encodes i, so every check can tie an
image to its caption.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from torchvision import transforms as T

import data.shards.loader as loader_mod
from data.shards import write_shards
from data.shards.loader import (
    LoaderPosition,
    build_train_loader,
    count_tar_samples,
    list_shards,
)

N_CRAWL = 100
IMG = 16
_to_tensor = T.ToTensor()  # module level: picklable into DataLoader workers
_augment = T.Compose([T.RandomResizedCrop(12, scale=(0.5, 1.0)), T.ToTensor()])


# ----------------------------------------------------------------------------- fixtures
def _colour(i: int) -> tuple[int, int, int]:
    return (i * 37) % 256, (i * 91) % 256, (i * 53) % 256


def _caption(i: int) -> str:
    return f"sample {i:03d} a picture"


def _jpeg(i: int) -> bytes:
    """A flat colour with a black corner (so that random crops differ), no chroma subsampling (so
    that the far 8x8 block keeps the flat colour)."""
    img = Image.new("RGB", (IMG, IMG), _colour(i))
    img.paste((0, 0, 0), (0, 0, 5, 5))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, subsampling=0)
    return buf.getvalue()


def _noise_jpeg() -> bytes:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8, generator=g).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _ids(texts: list[str]) -> torch.Tensor:
    """tokenize stand-in: the sample number of each caption, [B, 1]."""
    return torch.tensor([[int(t.split()[1])] for t in texts], dtype=torch.long)


def _worker_seeds(texts: list[str]) -> torch.Tensor:
    """tokenize stand-in: the seed DataLoader gave the worker making the batch, [B, 1]."""
    return torch.full((len(texts), 1), get_worker_info().seed, dtype=torch.long)


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _sample(key: str, i: int) -> list[tuple[str, bytes]]:
    meta = json.dumps({"key": key, "caption": _caption(i), "status": "success"}).encode()
    return [(f"{key}.jpg", _jpeg(i)), (f"{key}.txt", _caption(i).encode()), (f"{key}.json", meta)]


@pytest.fixture(scope="module")
def crawl_dir(tmp_path_factory) -> Path:
    """img2dataset's output layout: NNNNN.tar (+ .parquet, _stats.json), keys SSSSSIIII."""
    d = tmp_path_factory.mktemp("crawl")
    per_shard = N_CRAWL // 2
    for s in range(2):
        rows, members = [], []
        for k in range(per_shard):
            i = s * per_shard + k
            key = f"{s:05d}{k:04d}"
            members += _sample(key, i)
            rows.append({"key": key, "caption": _caption(i), "url": f"http://x/{i}.jpg", "status": "success"})
        _write_tar(d / f"{s:05d}.tar", members)
        pd.DataFrame(rows).to_parquet(d / f"{s:05d}.parquet")
        (d / f"{s:05d}_stats.json").write_text(json.dumps({"count": per_shard, "successes": per_shard}))
    return d


@pytest.fixture(scope="module")
def shard_dir(crawl_dir, tmp_path_factory) -> Path:
    keep = pd.concat(pd.read_parquet(p) for p in sorted(crawl_dir.glob("*.parquet")))
    keep["tar"] = keep["key"].str[:5] + ".tar"
    keep_path = tmp_path_factory.mktemp("dedup") / "keep.parquet"
    keep[["key", "tar"]].to_parquet(keep_path)
    out = tmp_path_factory.mktemp("shards")
    counts = write_shards(crawl_dir, keep_path, out, val_fraction=0.04, samples_per_shard=12, seed=0)
    assert counts["train"] == 96 and counts["train_shards"] == 8 and counts["val"] == 4
    return out


def _check_images(images: torch.Tensor, ids: list[int]) -> None:
    """Each image's colour (its bottom-right 8x8 block) is its caption's colour, within a few levels."""
    means = (images[:, :, 8:, 8:].mean(dim=(2, 3)) * 255).tolist()
    for mean, i in zip(means, ids):
        assert all(abs(m - c) <= 4 for m, c in zip(mean, _colour(i))), (i, mean, _colour(i))


def _epoch(loader) -> list[list[int]]:
    """Sample numbers per batch; checks images against captions on the way."""
    batches = []
    for images, tokens in loader:
        ids = tokens[:, 0].tolist()
        if images.shape[-1] == IMG:
            _check_images(images, ids)
        batches.append(ids)
    return batches


def _build(src, **kw):
    args = dict(image_transform=_to_tensor, tokenize=_ids, batch_size=4, seed=0, epoch=0)
    return build_train_loader(src, **{**args, **kw})


# ----------------------------------------------------------------------------- open_clip's way
def test_open_clip_pipeline_reads_write_shards(shard_dir):
    """The pipeline open_clip's get_wds_dataset builds, on webdataset alone, over our shards."""
    urls = [str(p) for p in sorted(shard_dir.glob("train-*.tar"))]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.reraise_exception),
        wds.shuffle(50, initial=10),
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;webp", text="txt"),
        wds.map_dict(image=_to_tensor, text=str),
        wds.to_tuple("image", "text"),
        wds.batched(10, partial=True),
    )
    seen: list[str] = []
    for images, texts in DataLoader(pipeline, batch_size=None, num_workers=2):
        assert images.shape[1:] == (3, IMG, IMG) and len(texts) == images.shape[0]
        ids = [int(t.split()[1]) for t in texts]
        assert texts == [_caption(i) for i in ids]
        _check_images(images, ids)
        seen += texts
    assert len(seen) == len(set(seen)) == 96  # every train sample exactly once
    sizes = json.loads((shard_dir / "sizes.json").read_text())
    assert sum(v for k, v in sizes.items() if k.startswith("train-")) == len(seen)
    assert sum(sizes.values()) == N_CRAWL  # + 4 val

    # open_clip's resampled variant: shards drawn with replacement, epoch set by with_epoch
    resampled = wds.DataPipeline(
        wds.ResampledShards(urls), wds.tarfile_to_samples(), wds.decode("pilrgb"),
        wds.rename(image="jpg;png;webp", text="txt"), wds.to_tuple("image", "text"), wds.batched(8),
    ).with_epoch(5)
    got = [t for _, texts in resampled for t in texts]
    assert len(got) == 40 and set(got) <= {_caption(i) for i in range(N_CRAWL)}


# ----------------------------------------------------------------------------- witclip's loader
def test_reads_img2dataset_raw_shards(crawl_dir):
    paths = list_shards(crawl_dir)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar"] and not (crawl_dir / "sizes.json").exists()
    assert [count_tar_samples(p) for p in paths] == [50, 50]  # from the headers
    loader = _build(crawl_dir, batch_size=10, num_workers=2)
    assert len(loader) == 10 and loader.num_samples == N_CRAWL and loader.partition == "shards"
    ids = [i for b in _epoch(loader) for i in b]
    assert sorted(ids) == list(range(N_CRAWL))
    assert loader.corrupted == {}


@pytest.mark.parametrize("partition", ["shards", "samples"])
def test_exactly_once_over_ranks_and_workers(shard_dir, partition):
    def run(rank: int, epoch: int) -> list[list[int]]:
        loader = _build(shard_dir, rank=rank, world_size=2, num_workers=2, epoch=epoch, partition=partition)
        assert loader.partition == partition and len(loader) == 12  # 96 / (2 ranks x 4)
        batches = _epoch(loader)
        assert len(batches) == 12 and all(len(b) == 4 for b in batches)
        return batches

    per_rank = [run(r, 0) for r in (0, 1)]
    ids = [i for batches in per_rank for b in batches for i in b]
    train_ids = sorted(ids)
    assert len(set(ids)) == len(ids) == 96  # exactly once over 2 ranks x 2 workers
    assert run(0, 0) == per_rank[0]  # same (seed, epoch): same order
    other = [run(r, 1) for r in (0, 1)]
    assert other[0] != per_rank[0]  # another epoch: another order ...
    assert sorted(i for batches in other for b in batches for i in b) == train_ids  # ... same coverage


def test_worker_seeds_derive_from_the_loader_seed_and_leave_the_callers_rng_alone(shard_dir):
    def worker_seeds(seed: int, epoch: int, caller_seed: int) -> set[int]:
        torch.manual_seed(caller_seed)  # the trainer's RNG, in the process iterating the loader
        before = torch.get_rng_state()
        loader = _build(shard_dir, tokenize=_worker_seeds, num_workers=2, seed=seed, epoch=epoch)
        seeds = {int(s) for _, tokens in loader for s in tokens[:, 0]}
        assert torch.equal(torch.get_rng_state(), before)
        return seeds

    first = worker_seeds(0, 0, caller_seed=1)
    assert len(first) == 2  # one per worker
    assert worker_seeds(0, 0, caller_seed=2) == first  # whatever the trainer's RNG holds
    assert worker_seeds(1, 0, caller_seed=1) != first and worker_seeds(0, 1, caller_seed=1) != first


def test_epoch_length_rule(shard_dir):
    floor = _build(shard_dir, batch_size=10)
    ceil = _build(shard_dir, batch_size=10, drop_last=False)
    assert (len(floor), len(ceil)) == (9, 10)  # 96 samples: floor(9.6), ceil(9.6)
    ids_floor = [i for b in _epoch(floor) for i in b]
    ids_ceil = [i for b in _epoch(ceil) for i in b]
    assert len(set(ids_floor)) == 90  # truncated: 6 wait for the next epoch
    assert len(ids_ceil) == 100 and len(set(ids_ceil)) == 96  # padded: 4 repeat, from a second pass

    # resampled: shards with replacement, epoch length from samples_per_epoch, deterministic per seed
    res = [_epoch(_build(shard_dir, resampled=True, samples_per_epoch=40, num_workers=2)) for _ in range(2)]
    assert len(res[0]) == 10 and res[0] == res[1]
    with pytest.raises(ValueError):
        _build(shard_dir, batch_size=200)


def _corrupt_shards(d: Path) -> None:
    trunc = _noise_jpeg()
    trunc = trunc[: len(trunc) * 2 // 3]  # header intact, pixel data cut: passes the raw check
    Image.open(io.BytesIO(trunc))
    _write_tar(d / "train-000000.tar", [
        ("bad-trunc.jpg", trunc), ("bad-trunc.txt", _caption(900).encode()),  # first: always pulled
        *[m for i in range(0, 5) for m in _sample(f"a{i:03d}", i)],
        ("bad-notxt.jpg", _jpeg(901)),
        ("bad-html.jpg", b"<html>not an image</html>"), ("bad-html.txt", _caption(902).encode()),
        *[m for i in range(5, 10) for m in _sample(f"a{i:03d}", i)],
    ])
    _write_tar(d / "train-000001.tar", [
        *[m for i in range(10, 15) for m in _sample(f"b{i:03d}", i)],
        ("bad-noimg.txt", _caption(903).encode()),
        ("bad-utf8.jpg", _jpeg(904)), ("bad-utf8.txt", b"\xff\xfe not utf-8"),
        *[m for i in range(15, 20) for m in _sample(f"b{i:03d}", i)],
    ])


def test_corrupted_samples_skipped_and_counted(tmp_path):
    _corrupt_shards(tmp_path)
    expected = {"missing_text": 1, "bad_image_header": 1, "undecodable_image": 1, "missing_image": 1,
                "bad_text": 1}
    # two workers, one shard each: the counter is aggregated over both (shuffle off: the truncated
    # JPEG, first in its shard, is always decoded)
    loader = _build(tmp_path, batch_size=5, num_workers=2, samples_per_epoch=20, shuffle_buffer=0)
    assert loader.partition == "shards"
    ids = [i for b in _epoch(loader) for i in b]
    assert sorted(ids) == list(range(20))
    assert loader.corrupted == expected and loader.n_corrupted == 5

    # a truncated tar: the sample before the cut is read, the read error counted
    members = _sample("c020", 20) + _sample("c021", 21)
    _write_tar(tmp_path / "train-000002.tar", members)
    with tarfile.open(tmp_path / "train-000002.tar") as tf:
        cut = tf.getmember("c021.jpg").offset_data + 100  # into c021.jpg's data
    raw = (tmp_path / "train-000002.tar").read_bytes()
    (tmp_path / "train-000002.tar").write_bytes(raw[:cut])
    loader = _build(tmp_path, batch_size=7, samples_per_epoch=21)  # one reader, buffer holds it all
    ids = [i for b in _epoch(loader) for i in b]
    assert sorted(ids) == list(range(21))
    counts = loader.corrupted
    assert counts.pop("tar_errors") >= 1 and counts == expected


def test_resume_is_exact(shard_dir, tmp_path):
    """A loader built at a position yields exactly the batches the original yields from there."""
    def full(src, **kw):
        loader = _build(src, image_transform=_augment, **kw)
        out, positions = [], []
        for images, tokens in loader:
            positions.append(loader.position())
            out.append((images, tokens))
        assert json.loads(json.dumps(positions[0].to_dict())) == positions[0].to_dict()
        return out, positions

    def same(a, b):
        assert len(a) == len(b)
        for (ia, ta), (ib, tb) in zip(a, b):
            assert torch.equal(ta, tb) and torch.equal(ia, ib)

    kw = dict(num_workers=2, shuffle_buffer=30)
    ref, pos = full(shard_dir, **kw)
    for k in (1, 5, 18):  # start_batch as an int (clean data: exact)
        resumed = _build(shard_dir, image_transform=_augment, start_batch=k, **kw)
        assert len(resumed) == 24 - k
        same(list(resumed), ref[k:])
        assert resumed.batches_yielded == 24
    # from a checkpointed position (its dict), on one reader, counting decodes: the skip decodes nothing
    ref0, pos0 = full(shard_dir, shuffle_buffer=30)
    calls = Counter()
    real = loader_mod._decode_pil_rgb

    def counting(data):
        calls["n"] += 1
        return real(data)

    k = 10
    loader_mod._decode_pil_rgb = counting
    try:
        resumed = _build(shard_dir, image_transform=_augment, shuffle_buffer=30,
                         start_batch=pos0[k - 1].to_dict())
        same(list(resumed), ref0[k:])
    finally:
        loader_mod._decode_pil_rgb = real
    assert calls["n"] == (24 - k) * 4

    # a decode failure inside the skipped prefix: the position (not the int) carries it
    _corrupt_shards(tmp_path)
    ckw = dict(batch_size=5, num_workers=2, samples_per_epoch=20, shuffle_buffer=0)
    cref, cpos = full(tmp_path, **ckw)
    assert cpos[-1].decode_counts[0] or cpos[-1].decode_counts[1]
    for k in (1, 2, 3):
        resumed = _build(tmp_path, image_transform=_augment, start_batch=cpos[k - 1], **ckw)
        same(list(resumed), cref[k:])
        assert resumed.corrupted["undecodable_image"] == 1
    with pytest.raises(ValueError):  # a position is only valid for the loader it came from
        _build(tmp_path, image_transform=_augment, start_batch=cpos[0], **{**ckw, "num_workers": 0})
    assert isinstance(LoaderPosition.from_dict(cpos[0].to_dict()), LoaderPosition)
