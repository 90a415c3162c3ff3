"""The training loader: webdataset stages shaped like open_clip's, with a deterministic epoch,
counted corruption and an exact resume point.

    loader = build_train_loader(shard_dir, image_transform=train_transform(64),
                                tokenize=partial(tok.__call__, context_length=24),
                                batch_size=64, seed=0, epoch=epoch, rank=rank, world_size=world)
    for images, tokens in loader:          # [B,3,H,W] float, [B,ctx] long; always B == batch_size
        ...
    loader.corrupted                       # {"missing_text": 2, ...}: samples dropped so far this epoch
    loader.position().to_dict()            # checkpoint this; pass it back as start_batch= to resume

Readers. A rank reads with ``nw = max(1, num_workers)`` readers (the DataLoader workers, or the
main process when num_workers == 0); over all ranks there are ``P = world_size * nw`` of them,
and reader ``L`` of rank ``r`` is partition ``p = r + world_size * L`` -- exactly what webdataset's
``split_by_node`` then ``split_by_worker`` hand out. Each reader runs its own
``webdataset.DataPipeline``, built inside the worker when iteration starts:

    passes, each a DataPipeline of:                   (a pass = the reader's whole partition once)
      SimpleShardList(shards, seed=(seed, epoch))     shard order shuffled, the same on every rank
      -> split by node -> split by worker             partition="shards": reader p gets shards i % P == p
      -> tarfile_to_samples                           image and txt members only; read errors
                                                      counted ("tar_errors")
      -> [stripe]                                     partition="samples": every reader reads every
                                                      shard and keeps samples i % P == p
      -> check (raw bytes)                            missing image/text, bad utf-8, bytes that are
                                                      no image (signature, else PIL's header parse)
      -> shuffle(buffer, rng=(seed, epoch, rank, L, pass))   drained at the end of the pass
    -> skip                                           resume: raw samples dropped before any decode
    -> batch                                          decode (PIL, RGB), image_transform, tokenize;
                                                      undecodable images dropped and counted

``partition="auto"`` takes whole shards when there are at least P of them (open_clip's
requirement) and falls back to striping samples when there are fewer, at the cost of each reader
reading every tar. ``resampled=True`` replaces the shard list with ``ResampledShards`` (shards
drawn with replacement, seeded per (seed, epoch, rank, L), infinite).

Epoch length (the rule, like open_clip's ``with_epoch``). ``N`` = ``samples_per_epoch`` if given,
else the samples in the shards (``sizes.json`` where it lists them, else counted once from the tar
headers). Every rank yields exactly ``T = N // (world_size * batch_size)`` batches per epoch
(``ceil`` instead of floor when ``drop_last=False``), every batch full. Batch ``j`` of a rank comes
from its reader ``j % nw``, which therefore owes ``len(range(L, T, nw))`` batches; a reader whose
samples run out starts another pass (shuffled anew), and one with samples to spare stops at its
quota -- so with unequal partitions some samples repeat and others wait for the next epoch, as in
open_clip. When every reader's partition holds exactly what it owes, every sample is seen exactly
once.

Corruption counter. Every batch travels from its reader with side information: the reader's
cumulative drop counts and its raw-sample cursor. ``TrainLoader`` strips it (callers see only
``(images, tokens)``) and keeps the latest per reader, so ``loader.corrupted`` is the sum over the
rank's readers of the drops met while producing the batches yielded so far (raw-level drops
include the samples read ahead into the shuffle buffer; a sample read in two passes counts twice).
It works the same with or without DataLoader workers, and is per rank (all-reduce it for a global
figure).

Resume. ``loader.position()`` is the number of batches yielded this epoch plus, per reader, how
many shuffled raw samples it consumed for them. ``build_train_loader(..., start_batch=position)``
for the same (seed, epoch, rank, world_size, num_workers, batch_size) skips those raw samples
without decoding and continues with exactly the batch the original loader would have yielded next
(image augmentation is seeded per batch, so the tensors are equal too). ``start_batch=k`` (an int)
assumes ``k_L * batch_size`` consumed samples per reader: exact unless an image that passed the
raw check failed to decode within the first k batches (the position knows; an int cannot).
DataLoader workers are rotated on resume (worker d plays reader (d + k) % nw) so that the first
batch DataLoader fetches, from worker 0, is batch k.

Determinism. Shard order, sample shuffle and augmentation are seeded from (seed, epoch, rank,
reader[, pass, batch]), and DataLoader workers' own seeds from (seed, epoch, rank); nothing reads
the clock or the caller's RNG. The same arguments (num_workers included) give the same batches,
tensor for tensor.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass
from functools import partial
from itertools import count, islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards.format import (
    CAPTION_EXT,
    IMAGE_EXTS,
    SIZES_FILE,
    image_ext,
    is_crawl_shard,
    split_glob,
)

DEFAULT_SHUFFLE_BUFFER = 1000

# Drop reasons. The first group is found on raw bytes (before the shuffle and the resume skip),
# the last one only when decoding; see the module docstring for why the split matters.
RAW_REASONS = ("tar_errors", "missing_image", "missing_text", "bad_text", "bad_image_header")
DECODE_REASONS = ("undecodable_image",)

Partition = Literal["auto", "shards", "samples"]
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")  # JPEG, PNG (WEBP: RIFF....WEBP)


def _looks_like_image(data: bytes) -> bool:
    """Signature check: free, unlike PIL's header parse (~50 us), which only unusual bytes pay."""
    if data.startswith(_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        return True
    try:  # another format PIL can read (a GIF named .jpg, say) is still an image
        Image.open(io.BytesIO(data))
        return True
    except Exception:  # noqa: BLE001 - PIL raises many types for non-images
        return False


_WANTED = frozenset((*IMAGE_EXTS, CAPTION_EXT))


def _wanted_member(fname: str) -> bool:
    """Read only image and caption members: img2dataset's .json (never used here) cost ~40% of
    the tar-reading time."""
    _, ext = wds.tariterators.base_plus_ext(fname)
    return ext is not None and ext.lower() in _WANTED


def _decode_pil_rgb(data: bytes) -> Image.Image:
    """What webdataset's decode("pilrgb") returns, without its second full-image convert (~40%
    of decode time at 64 px)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == "RGB" else img.convert("RGB")


# --------------------------------------------------------------------------------- shards
def list_shards(shard_paths_or_dir: str | Path | Sequence[str | Path], split: str = "train") -> list[Path]:
    """Shard paths: a list as given; a directory -> its ``{split}-*.tar`` (write_shards' layout),
    or, when it has none, its img2dataset ``NNNNN.tar`` files."""
    if isinstance(shard_paths_or_dir, (str, Path)):
        path = Path(shard_paths_or_dir)
        if not path.is_dir():
            return [path]
        named = sorted(path.glob(split_glob(split)))
        # only all-digit names: a dir holding val-*.tar but no train-*.tar must not fall through to val
        return named or sorted(p for p in path.glob("*.tar") if is_crawl_shard(p))
    return [Path(p) for p in shard_paths_or_dir]


_COUNT_CACHE: dict[tuple[str, int, int], int] = {}


def count_tar_samples(path: Path) -> int:
    """Samples in one tar from its headers alone (no member data is read), grouped the way
    webdataset groups them: consecutive members sharing the part of the name before the first dot."""
    st = path.stat()
    cache_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if cache_key in _COUNT_CACHE:
        return _COUNT_CACHE[cache_key]
    n, last = 0, None
    try:
        with tarfile.open(path, "r:") as tf:  # "r:" seeks over member data: headers only
            for m in tf:
                if not m.isreg():
                    continue
                key, _ = wds.tariterators.base_plus_ext(m.name)
                base = os.path.basename(m.name)
                if key is None or (base.startswith("__") and base.endswith("__")):
                    continue
                if key != last:
                    n, last = n + 1, key
    except tarfile.ReadError:
        pass  # truncated tar: what was readable counts; reading it later counts the error
    _COUNT_CACHE[cache_key] = n
    return n


def shard_sizes(paths: Sequence[Path]) -> dict[Path, int]:
    """Sample count per shard: from ``sizes.json`` next to the shard when it lists it (open_clip's
    format: file name -> count), else counted from the tar headers."""
    listed: dict[Path, dict[str, int]] = {}
    out: dict[Path, int] = {}
    for p in paths:
        d = p.parent
        if d not in listed:
            f = d / SIZES_FILE
            listed[d] = {k: int(v) for k, v in json.loads(f.read_text()).items()} if f.is_file() else {}
        out[p] = listed[d][p.name] if p.name in listed[d] else count_tar_samples(p)
    return out


# --------------------------------------------------------------------------------- position
@dataclass(frozen=True)
class LoaderPosition:
    """Where a rank's loader stands in an epoch; JSON-safe via to_dict()/from_dict()."""

    epoch: int
    batch: int  # batches yielded this epoch == index of the next batch
    cursors: tuple[int, ...]  # per reader: shuffled raw samples consumed for those batches
    decode_counts: tuple[dict[str, int], ...]  # per reader: decode-time drops (not recountable)
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cursors"], d["decode_counts"] = list(self.cursors), [dict(c) for c in self.decode_counts]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoaderPosition":
        return cls(**{**d, "cursors": tuple(int(c) for c in d["cursors"]),
                      "decode_counts": tuple({k: int(v) for k, v in c.items()} for c in d["decode_counts"])})


# --------------------------------------------------------------------------------- seeds
def _seed_int(*parts: Any) -> int:
    """A 63-bit seed from its parts; hashlib, not hash(): str hashing differs between processes."""
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


# --------------------------------------------------------------------------------- stages
class _ReaderState:
    """Counters one reader's stages share (they run in the same process, in one generator chain)."""

    def __init__(self, cursor: int, decode_counts: Mapping[str, int]) -> None:
        self.raw_counts: Counter[str] = Counter()
        self.decode_counts: Counter[str] = Counter(decode_counts)
        self.valid = 0  # samples that passed the raw check
        self.pass_urls: list[str] = []  # shards opened in the current pass (for error messages)
        self.cursor = cursor  # shuffled samples consumed (skipped, batched or dropped at decode)

    def counts(self) -> dict[str, int]:
        return dict(self.raw_counts + self.decode_counts)

    def tar_error(self, exn: Exception) -> bool:
        self.raw_counts["tar_errors"] += 1
        return True  # webdataset handler protocol: True = continue with the next member/shard


def _split(src: Iterable, part: int, parts: int) -> Iterator:
    # split_by_node / split_by_worker with explicit (rank, world) instead of env/torch.distributed,
    # so that ranks can be simulated and each reader's role survives the resume rotation.
    yield from islice(src, part, None, parts)


def _note_urls(src: Iterable[dict], state: _ReaderState) -> Iterator[dict]:
    for u in src:
        state.pass_urls.append(u["url"])
        yield u


def _watch(src: Iterable[dict], state: _ReaderState, limit: int, where: str) -> Iterator[dict]:
    """For resampled shards (an endless stream): raise after `limit` shards in a row gave nothing."""
    empty, last = 0, None
    for u in src:
        if last is not None:
            empty = empty + 1 if state.valid == last else 0
            if empty >= limit:
                raise RuntimeError(f"{where}: {limit} resampled shards in a row gave no valid sample "
                                   f"(last: {u['url']}; drops so far: {state.counts()})")
        last = state.valid
        yield u


def _check(src: Iterable[dict], state: _ReaderState) -> Iterator[dict]:
    """Raw-level validation, cheap enough to run on every sample (also on those a resume skips)."""
    for sample in src:
        ext = image_ext(sample)
        if ext is None:
            state.raw_counts["missing_image"] += 1
            continue
        if CAPTION_EXT not in sample:
            state.raw_counts["missing_text"] += 1
            continue
        try:
            text = sample[CAPTION_EXT].decode("utf-8")
        except UnicodeDecodeError:
            state.raw_counts["bad_text"] += 1
            continue
        if not _looks_like_image(sample[ext]):  # pixels are decoded later, for batched samples alone
            state.raw_counts["bad_image_header"] += 1
            continue
        state.valid += 1
        yield {"__key__": sample["__key__"], "ext": ext, "image": sample[ext], "text": text}


def _skip(src: Iterable[dict], n: int) -> Iterator[dict]:
    """Resume: drop n shuffled raw samples; nothing is decoded."""
    it = iter(src)
    for _ in islice(it, n):
        pass
    yield from it


def _batches(
    src: Iterable[dict],
    state: _ReaderState,
    *,
    reader: int,
    num_readers: int,
    first: int,
    quota: int,
    batch_size: int,
    image_transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    aug_seed: tuple,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
    it = iter(src)
    for local in range(first, quota):
        j = local * num_readers + reader  # the batch's index in the rank's epoch
        images: list[Image.Image] = []
        texts: list[str] = []
        while len(images) < batch_size:
            sample = next(it, None)
            if sample is None:
                return  # unreachable: passes repeat until the quota (or raise when empty)
            state.cursor += 1
            try:
                img = _decode_pil_rgb(sample["image"])
            except Exception:  # noqa: BLE001 - truncated/corrupt pixel data
                state.decode_counts["undecodable_image"] += 1
                continue
            images.append(img)
            texts.append(sample["text"])
        # Augmentation drawn from a per-batch seed, inside fork_rng so the caller's RNG (the
        # trainer's, when num_workers == 0) is untouched: a resumed loader reproduces the tensors.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_int("augment", *aug_seed, j))
            pixels = torch.stack([image_transform(im) for im in images])
        meta = {"reader": reader, "batch": j, "cursor": state.cursor,
                "counts": state.counts(), "decode_counts": dict(state.decode_counts)}
        yield pixels, tokenize(texts), meta


_split_stage = wds.pipelinefilter(_split)
_watch_stage = wds.pipelinefilter(_watch)
_note_urls_stage = wds.pipelinefilter(_note_urls)
_check_stage = wds.pipelinefilter(_check)
_skip_stage = wds.pipelinefilter(_skip)
_batches_stage = wds.pipelinefilter(_batches)


# --------------------------------------------------------------------------------- dataset
@dataclass
class _Plan:
    """Everything a reader needs to build its pipeline; plain data so it pickles into workers."""

    urls: list[str]
    mode: str  # "shards" | "samples" | "resampled"
    seed: int
    epoch: int
    rank: int
    world_size: int
    num_readers: int
    batches: int  # T, per rank
    batch_size: int
    shuffle_buffer: int
    start_batch: int
    start_cursors: tuple[int, ...]
    start_decode_counts: tuple[dict[str, int], ...]
    image_transform: Callable[[Image.Image], torch.Tensor]
    tokenize: Callable[[list[str]], torch.Tensor]

    def quota(self, reader: int) -> int:
        return len(range(reader, self.batches, self.num_readers))

    def first(self, reader: int) -> int:
        return len(range(reader, self.start_batch, self.num_readers))  # batches already yielded


class _EpochStream(IterableDataset):
    """One epoch of one rank; each DataLoader worker (or the main process) builds its reader."""

    def __init__(self, plan: _Plan) -> None:
        super().__init__()
        self.plan = plan

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        pl = self.plan
        info = get_worker_info()
        worker, n = (info.id, info.num_workers) if info else (0, 1)
        if n != pl.num_readers:
            raise RuntimeError(f"built for {pl.num_readers} readers, running with {n}")
        reader = (worker + pl.start_batch) % n  # rotation: DataLoader asks worker 0 first
        return iter(self.pipeline(reader))

    def pipeline(self, reader: int) -> wds.DataPipeline:
        pl = self.plan
        state = _ReaderState(pl.start_cursors[reader], pl.start_decode_counts[reader])
        return wds.DataPipeline(
            partial(self._samples, reader, state),  # a source stage is called with no argument
            _skip_stage(state.cursor),
            _batches_stage(state, reader=reader, num_readers=pl.num_readers, first=pl.first(reader),
                           quota=pl.quota(reader), batch_size=pl.batch_size,
                           image_transform=pl.image_transform, tokenize=pl.tokenize,
                           aug_seed=(pl.seed, pl.epoch, pl.rank)),
        )

    def _samples(self, reader: int, state: _ReaderState) -> Iterator[dict]:
        """The reader's shuffled raw samples: pass after pass over its partition (its quota decides
        when to stop), or one endless resampled stream."""
        pl = self.plan
        part, parts = pl.rank + pl.world_size * reader, pl.world_size * pl.num_readers
        where = f"rank {pl.rank} reader {reader}"
        for n_pass in count():
            if pl.mode == "resampled":
                source: list[Any] = [
                    wds.ResampledShards(pl.urls, seed=_seed_int("resample", pl.seed, pl.epoch),
                                        worker_seed=lambda: part, deterministic=True),
                    _watch_stage(state, 10 * len(pl.urls) + 10, where),
                ]
            else:
                source = [wds.SimpleShardList(pl.urls, seed=f"shards/{pl.seed}/{pl.epoch}")]
                if pl.mode == "shards":  # webdataset's split_by_node, then split_by_worker
                    source += [_split_stage(pl.rank, pl.world_size), _split_stage(reader, pl.num_readers)]
            stages: list[Any] = [*source, _note_urls_stage(state),
                                 wds.tarfile_to_samples(handler=state.tar_error, select_files=_wanted_member)]
            if pl.mode == "samples":
                stages.append(_split_stage(part, parts))
            stages.append(_check_stage(state))
            if pl.shuffle_buffer > 1:
                # One buffer per pass, drained at its end: a buffer larger than the partition must
                # not pull the next pass in (that would repeat samples inside the first pass).
                rng = random.Random(f"samples/{pl.seed}/{pl.epoch}/{pl.rank}/{reader}/{n_pass}")
                stages.append(wds.shuffle(pl.shuffle_buffer, initial=pl.shuffle_buffer, rng=rng))
            before, state.pass_urls = state.valid, []
            yield from wds.DataPipeline(*stages)
            if state.valid == before:  # raise rather than spin on shards with nothing usable
                raise RuntimeError(f"{where}: a full pass over {state.pass_urls} gave no valid sample "
                                   f"(drops so far: {state.counts()})")


# --------------------------------------------------------------------------------- loader
class TrainLoader:
    """One epoch of one rank's batches: iterate for ``(images, tokens)``; see the module docstring."""

    def __init__(self, plan: _Plan, *, num_workers: int, num_samples: int, shard_counts: dict[str, int],
                 pin_memory: bool, prefetch_factor: int | None) -> None:
        self._plan = plan
        self.num_workers = num_workers
        self.num_samples = num_samples  # N, the epoch-length basis
        self.shard_counts = shard_counts  # shard path -> samples, for the shards in use
        self.batches_per_epoch = plan.batches  # T: what every rank yields in a full epoch
        self.partition = plan.mode
        self._pin_memory = pin_memory
        self._prefetch_factor = prefetch_factor
        self._reset()

    def _reset(self) -> None:
        pl = self._plan
        self._next = pl.start_batch
        self._cursors = list(pl.start_cursors)
        self._decode_counts = [dict(c) for c in pl.start_decode_counts]
        # until a reader reports, only its carried decode-time drops are known
        self._counts = [dict(c) for c in pl.start_decode_counts]

    def __len__(self) -> int:
        """Batches one iteration yields (the rest of the epoch after a resume)."""
        return max(0, self.batches_per_epoch - self._plan.start_batch)

    @property
    def batches_yielded(self) -> int:
        """Index in the epoch of the next batch (start_batch + batches yielded by this iteration)."""
        return self._next

    @property
    def corrupted(self) -> dict[str, int]:
        """Samples dropped, by reason, while producing the batches yielded so far (this rank)."""
        total: Counter[str] = Counter()
        for c in self._counts:
            total.update(c)
        return {k: v for k, v in sorted(total.items()) if v}

    @property
    def n_corrupted(self) -> int:
        return sum(self.corrupted.values())

    def position(self) -> LoaderPosition:
        pl = self._plan
        return LoaderPosition(
            epoch=pl.epoch, batch=self._next, cursors=tuple(self._cursors),
            decode_counts=tuple(dict(c) for c in self._decode_counts), seed=pl.seed, rank=pl.rank,
            world_size=pl.world_size, num_workers=self.num_workers, batch_size=pl.batch_size,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._reset()
        pl = self._plan
        dataset = _EpochStream(pl)
        if self.num_workers == 0:
            stream: Iterable = iter(dataset.pipeline(0))
        else:
            # batch_size=None: batches are made by the readers; each worker's batches come back
            # round-robin in worker order, which is what reader = j % nw relies on.
            # DataLoader seeds its workers' torch and `random` RNGs from a draw on `generator`; left
            # unset that draw comes from the caller's global RNG (the trainer's): the workers' seeds
            # would then depend on it, and every epoch would advance it.
            workers = torch.Generator().manual_seed(_seed_int("workers", pl.seed, pl.epoch, pl.rank))
            stream = DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                                pin_memory=self._pin_memory, prefetch_factor=self._prefetch_factor,
                                persistent_workers=False, generator=workers)
        for images, tokens, meta in stream:
            if meta["batch"] != self._next:  # guards the resume arithmetic, never expected
                raise RuntimeError(f"expected batch {self._next}, reader {meta['reader']} sent {meta['batch']}")
            r = meta["reader"]
            self._cursors[r] = meta["cursor"]
            self._counts[r] = meta["counts"]
            self._decode_counts[r] = meta["decode_counts"]
            self._next += 1
            yield images, tokens


def build_train_loader(
    shard_paths_or_dir: str | Path | Sequence[str | Path],
    *,
    image_transform: Callable[[Image.Image], torch.Tensor],
    tokenize: Callable[[list[str]], torch.Tensor],
    batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    drop_last: bool = True,
    start_batch: int | LoaderPosition | Mapping[str, Any] = 0,
    partition: Partition = "auto",
    split: str = "train",
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> TrainLoader:
    """One epoch of rank ``rank``'s training batches from webdataset shards.

    ``image_transform``: PIL RGB image -> tensor [3,H,W]; its randomness must come from torch's RNG
    (torchvision's does), which is seeded per batch. ``tokenize``: a *batch* of captions (list[str])
    -> LongTensor [B, ctx], e.g. ``partial(tokenizer.__call__, context_length=ctx)``; it runs in
    the reader, once per batch (HF tokenizers encode a batch faster than B single calls). Both are
    pickled into DataLoader workers under the spawn/forkserver start methods (a lambda then fails;
    under fork, Linux's default up to Python 3.13, nothing is pickled).

    ``shuffle_buffer``: raw samples per reader (<= 1: no sample shuffle). ``start_batch``: an int,
    or a ``LoaderPosition`` / its dict from ``loader.position()``. ``partition``: "auto" | "shards"
    | "samples" (ignored when resampled). ``split``: which ``{split}-*.tar`` when given a directory.
    Raises ValueError when the epoch would have no batch.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad batch_size={batch_size} rank={rank} world_size={world_size} "
                         f"num_workers={num_workers}")
    paths = list_shards(shard_paths_or_dir, split)
    if not paths:
        raise FileNotFoundError(f"no shards in {shard_paths_or_dir}")
    sizes = shard_sizes(paths)
    paths = [p for p in paths if sizes[p] > 0]  # empty shards would only idle a reader
    if not paths:
        raise ValueError(f"all shards in {shard_paths_or_dir} are empty")
    n = samples_per_epoch if samples_per_epoch is not None else sum(sizes[p] for p in paths)
    per_step = world_size * batch_size
    batches = n // per_step if drop_last else math.ceil(n / per_step)
    if batches < 1:
        raise ValueError(f"{n} samples make no full batch of {batch_size} x {world_size} ranks")

    nw = max(1, num_workers)
    if resampled:
        mode = "resampled"
    elif partition == "auto":
        mode = "shards" if len(paths) >= world_size * nw else "samples"
    elif partition in ("shards", "samples"):
        mode = partition
        if mode == "shards" and len(paths) < world_size * nw:
            raise ValueError(f"partition='shards' needs >= {world_size * nw} shards, have {len(paths)}")
    else:
        raise ValueError(f"unknown partition {partition!r}")

    if isinstance(start_batch, Mapping):
        start_batch = LoaderPosition.from_dict(start_batch)
    if isinstance(start_batch, LoaderPosition):
        pos = start_batch
        want = dict(epoch=epoch, seed=seed, rank=rank, world_size=world_size, num_workers=num_workers,
                    batch_size=batch_size)
        got = {k: getattr(pos, k) for k in want}
        if got != want or len(pos.cursors) != nw:
            raise ValueError(f"position is for {got}, this loader is {want}")
        start, cursors, decode_counts = pos.batch, pos.cursors, pos.decode_counts
    else:
        start = int(start_batch)
        if start < 0:
            raise ValueError("start_batch must be >= 0")
        cursors = tuple(len(range(r, start, nw)) * batch_size for r in range(nw))
        decode_counts = tuple({} for _ in range(nw))

    plan = _Plan(
        urls=[str(p) for p in paths], mode=mode, seed=seed, epoch=epoch, rank=rank,
        world_size=world_size, num_readers=nw, batches=batches, batch_size=batch_size,
        shuffle_buffer=shuffle_buffer, start_batch=start, start_cursors=tuple(cursors),
        start_decode_counts=tuple(decode_counts), image_transform=image_transform, tokenize=tokenize,
    )
    return TrainLoader(plan, num_workers=num_workers, num_samples=n,
                       shard_counts={str(p): sizes[p] for p in paths},
                       pin_memory=pin_memory, prefetch_factor=prefetch_factor if num_workers else None)
