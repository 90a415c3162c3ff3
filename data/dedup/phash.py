"""Perceptual hashes and a sub-quadratic near-duplicate search over them.

`phash` is the classic 64-bit DCT hash: greyscale, shrink to 32x32, 2-D DCT-II, keep the
8x8 block of lowest frequencies and set one bit per coefficient that lies above the
block's median. Re-encoding and resizing move few bits (crops and added borders many more;
see DEFAULT_MAX_DISTANCE), unrelated images differ in ~32 of 64, so "near duplicate" means
a small Hamming distance.

`near_duplicate_pairs` finds every pair within a Hamming radius without comparing all
n^2/2 pairs, by multi-index hashing (Norouzi et al., "Fast search in Hamming space with
multi-index hashing", CVPR 2012): the 64 bits are split into m bands; two hashes within
distance k must agree within a small radius on at least one band (pigeonhole), so only
items whose band values are that close are ever compared. Band values are grouped with
a sort; close band values are found by XOR-ing every group value with every mask of at
most r bits and looking the result up (a dense table for narrow bands, `np.searchsorted`
otherwise). Every candidate is then verified on all 64 bits, so the search is exact.

Everything here is a pure function of its arguments; `near_duplicate_pairs_dask` only
spreads the same work over a Dask cluster and returns the same array.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from itertools import combinations
from typing import TYPE_CHECKING, Iterator

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # distributed is only needed by near_duplicate_pairs_dask
    from distributed import Client

__all__ = [
    "DEFAULT_MAX_DISTANCE",
    "HASH_SIZE",
    "RESAMPLE",
    "Band",
    "SearchPlan",
    "brute_force_pairs",
    "cluster_representatives",
    "hamming",
    "near_duplicate_pairs",
    "near_duplicate_pairs_dask",
    "phash",
    "phash_bytes",
    "plan_search",
    "popcount64",
]

# Chosen from tests/test_phash.py's measurement (1,350 distinct 128 px images: noise textures,
# gradients with shapes, synthetic scenes; one planted copy of each per transform):
#   re-encode JPEG q50 / half size + JPEG: 99th percentile 6 bits; recall 0.994 / 0.992 at 6
#   (0.996 / 0.996 at 8); crop 4-6% per side: median 8, recall 0.29 at 6, 0.51 at 8;
#   border 4%: median 14, recall 0.10 at 6, 0.20 at 8 (pHash is weak on crops and borders).
#   Distinct images (no single-object scenes) with no partner within k: 0.998 at 6, 0.990 at 8,
#   0.972 at 10; false pairs per distinct pair 1.4e-6 at 6, 8.3e-6 at 8, 2.4e-5 at 10.
# 6 is the smallest distance that keeps re-encodes and resizes (recall >= 0.99), and each +2
# bits roughly triples the false pairs, which grow with n^2 in a big crawl. Distances are
# almost always even (a hash has exactly 32 ones unless coefficients tie at the median), so
# 7 behaves like 6. Search cost at 1M hashes: 3 bands, radii 2/1/1.
DEFAULT_MAX_DISTANCE = 6

HASH_SIZE = 8  # the hash is the HASH_SIZE x HASH_SIZE lowest-frequency DCT block: 64 bits
_IMAGE_SIZE = 32  # the greyscale thumbnail the DCT runs on
# BOX = each thumbnail pixel is the plain average of the source pixels it covers: antialiased
# (a half-size copy averages to nearly the same thumbnail) with no negative lobes. BILINEAR and
# LANCZOS measured the same on the test's copies; NEAREST lost resize recall (0.97 vs 0.99).
# Pillow computes it in fixed point for 8-bit images.
RESAMPLE = Image.Resampling.BOX

# The orthonormal DCT-II basis, rows 0..7 only (the 8x8 block is all we keep), quantised to
# integers so that the transform is exact integer arithmetic: no BLAS summation order or
# platform libm can flip a bit. 2^20 scale: quantisation error ~1e-6 of a coefficient,
# and the largest intermediate (255 * 2^18 * 32 * 2^18 * 32 < 2^57) fits in int64.
_DCT_SCALE_BITS = 20


def _dct_basis(n: int, rows: int) -> np.ndarray:
    x = np.arange(n)
    k = np.arange(rows)[:, None]
    basis = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    basis[0] /= np.sqrt(2.0)
    return basis


_DCT_INT = np.round(_dct_basis(_IMAGE_SIZE, HASH_SIZE) * (1 << _DCT_SCALE_BITS)).astype(np.int64)
# bit 63 for the first coefficient (row-major), bit 0 for the last
_BIT_WEIGHTS = np.left_shift(np.uint64(1), np.arange(63, -1, -1, dtype=np.uint64))


# --------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------


def _hash_thumbnail(pixels: np.ndarray) -> int:
    """The 64-bit hash of one 32x32 greyscale thumbnail (uint8 values)."""
    p = pixels.astype(np.int64)
    block = _DCT_INT @ p @ _DCT_INT.T  # 8x8 low-frequency DCT-II coefficients, scaled by 2^40
    flat = block.ravel()
    # Threshold rule: the median of the 63 AC coefficients (the DC term, the mean brightness,
    # would bias it); 63 is odd, so the median is one of them, exactly. Bit = coefficient
    # strictly above it, for all 64 coefficients DC included: the 31 AC coefficients above
    # the median, and DC (bit 63), which is 1 unless the image is (nearly) black.
    median = np.partition(flat[1:], 31)[31]
    bits = (flat > median).astype(np.uint64)
    return int(np.bitwise_or.reduce(bits * _BIT_WEIGHTS))


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash of an image, as an unsigned int in [0, 2^64).

    Steps: `image.convert("L")` (ITU-R 601 luma; alpha is ignored, EXIF orientation is not
    applied), resize to 32x32 with `RESAMPLE` (BOX), 2-D DCT-II (orthonormal, integer
    basis), top-left 8x8 block, bit = coefficient > median of the 63 AC coefficients,
    packed row-major with bit 63 = coefficient (0, 0).

    Low-information images: any flat image hashes to 1 << 63 (only the DC bit) and a black
    one to 0, so all flat images are "duplicates" of each other; callers may want to set
    such hashes aside (a normal hash has exactly 32 bits set).
    """
    grey = image.convert("L")
    if grey.size != (_IMAGE_SIZE, _IMAGE_SIZE):
        grey = grey.resize((_IMAGE_SIZE, _IMAGE_SIZE), RESAMPLE)
    return _hash_thumbnail(np.asarray(grey, dtype=np.uint8))


def phash_bytes(data: bytes) -> int | None:
    """`phash` of encoded image bytes; None when they do not decode (truncated, not an image, bomb)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Pillow raises past 2x its pixel limit and only warns between 1x and 2x: skip both
            # (checked here rather than with a warnings filter, which is not thread-safe).
            if image.width * image.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                return None
            image.load()
            return phash(image)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None


# --------------------------------------------------------------------------------------
# Bit counting
# --------------------------------------------------------------------------------------

_M1, _M2, _M4, _H01 = (
    np.uint64(v) for v in (0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F, 0x0101010101010101)
)


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element of a uint64 array, as uint8 of the same shape."""
    x = np.asarray(x, dtype=np.uint64)
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: one hardware popcount per element
        return np.bitwise_count(x).astype(np.uint8, copy=False)
    return _popcount_swar(x)


def _popcount_swar(x: np.ndarray) -> np.ndarray:
    """popcount64 for numpy < 2: sum bits in pairs, nibbles, bytes, then add the bytes with one multiply."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return ((x * _H01) >> np.uint64(56)).astype(np.uint8)


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (int(a) ^ int(b)).bit_count()


def _as_hashes(hashes: np.ndarray | list[int], name: str) -> np.ndarray:
    """uint64 view of the input; int64 arrays (e.g. hashes stored signed in parquet) keep their bits."""
    if not isinstance(hashes, np.ndarray):
        # A list of Python ints >= 2^63 would become float64 (lossy) in np.asarray.
        try:
            return np.array([int(v) for v in hashes], dtype=np.uint64)
        except (OverflowError, TypeError) as e:
            raise ValueError(f"{name} must be integers in [0, 2^64): {e}") from None
    arr = hashes
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of 64-bit hashes, got shape {arr.shape}")
    if arr.dtype == object:
        return _as_hashes(arr.tolist(), name)
    if arr.size and arr.dtype.kind not in "ui":
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.uint64, copy=False)


def _check_distance(max_distance: int) -> int:
    k = int(max_distance)
    if k != max_distance or not 0 <= k <= 64:
        raise ValueError(f"max_distance must be an integer in [0, 64], got {max_distance!r}")
    return k


def _empty_pairs() -> np.ndarray:
    return np.empty((0, 2), dtype=np.int64)


def _sorted_pairs(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    order = np.lexsort((right, left))
    return np.stack([left[order], right[order]], axis=1).astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------
# Reference: all pairs
# --------------------------------------------------------------------------------------


def brute_force_pairs(
    hashes: np.ndarray, max_distance: int, *, queries: np.ndarray | None = None, block: int = 1 << 24
) -> np.ndarray:
    """Every pair within `max_distance`, by comparing all pairs (the reference; O(n^2)).

    Same contract as `near_duplicate_pairs`: [P, 2] int64, (i, j) with i < j, or (query, hash)
    with `queries`, sorted. Rows are compared in chunks of about `block` pairs.
    """
    k = _check_distance(max_distance)
    h = _as_hashes(hashes, "hashes")
    q = h if queries is None else _as_hashes(queries, "queries")
    self_join = queries is None
    lefts, rights = [], []
    rows = max(1, block // max(1, len(h)))
    for start in range(0, len(q), rows):
        stop = min(len(q), start + rows)
        # self-join: only the columns right of the chunk's first row are needed
        first = start + 1 if self_join else 0
        dist = popcount64(q[start:stop, None] ^ h[None, first:])
        i, j = np.nonzero(dist <= k)
        i += start
        j += first
        if self_join:
            keep = j > i
            i, j = i[keep], j[keep]
        lefts.append(i)
        rights.append(j)
    if not lefts:
        return _empty_pairs()
    return _sorted_pairs(np.concatenate(lefts).astype(np.int64), np.concatenate(rights).astype(np.int64))


# --------------------------------------------------------------------------------------
# Multi-index hashing: the plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Band:
    """Bits [lo, lo + width) of the hash, probed within Hamming `radius`."""

    lo: int
    width: int
    radius: int

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1


@dataclass(frozen=True)
class SearchPlan:
    """How `near_duplicate_pairs` splits the search; `estimate` is relative cost (no unit)."""

    max_distance: int
    n_bands: int  # m: the hash is cut into this many bands ...
    bands: tuple[Band, ...]  # ... of which these are probed (radius >= 0)
    estimate: float
    expected_candidates: float  # pairs verified on all 64 bits, for uniformly random hashes
    expected_probes: float  # (group value, mask) lookups, for uniformly random hashes


def _ball(width: int, radius: int) -> int:
    """Number of `width`-bit values within `radius` of a given one (incl. itself)."""
    return sum(math.comb(width, d) for d in range(0, min(radius, width) + 1))


# Relative costs per unit of work, fitted to timings of every m at 1e5..1e6 random hashes on
# this project's 2-core machine (numpy 2.x), in units of one verified candidate pair: a probe
# (one group value x one mask) through the dense table ~2, through np.searchsorted (bands wider
# than _TABLE_BITS) ~6; grouping one item into one band (sort + table) ~12.
_COST_PROBE, _COST_PROBE_SEARCH, _COST_CANDIDATE, _COST_SORT = 2.0, 6.0, 1.0, 12.0
_TABLE_BITS = 22
# Work arrays of ~2^16 elements (512 KiB of int64) stay in cache: 2^15..2^17 ran fastest here
# (2^13..2^21 tried). Dask nannies start workers with MALLOC_TRIM_THRESHOLD_ set, which pins
# glibc's mmap threshold at 128 KiB: every bigger array is then a fresh mmap whose pages fault
# in (2.5-8x slower here), so tasks in such a process keep their arrays under it.
_BATCH = 1 << 16
_BATCH_PINNED_MALLOC = 1 << 13
_COUNT_BITS = 16  # dense table entry: group start << 16 | min(group size, 2^16 - 1)
_COUNT_MAX = (1 << _COUNT_BITS) - 1
_MAX_PROBE_MASKS = 1 << 20  # never enumerate more masks than this per band


def _bands_for(m: int, k: int) -> tuple[Band, ...]:
    """Cut 64 bits into m contiguous bands (the wider ones first) with refined pigeonhole radii.

    With k = r*m + a (0 <= a < m): if every one of the first a+1 bands differed in >= r+1 bits
    and every other band in >= r, the total would be >= m*r + a + 1 > k. So a pair within k
    matches within r on one of the first a+1 bands, or within r-1 on one of the others;
    bands whose radius would be -1 are not probed at all.
    """
    r, a = divmod(k, m)
    base, extra = divmod(64, m)
    bands, lo = [], 0
    for i in range(m):
        width = base + (1 if i < extra else 0)
        radius = r if i <= a else r - 1
        if radius >= 0:
            bands.append(Band(lo, width, radius))
        lo += width
    return tuple(bands)


def plan_search(n: int, max_distance: int, n_queries: int | None = None) -> SearchPlan:
    """Pick the number of bands m for n hashes (and n_queries query hashes, if any).

    For each m in 1..k+1 (more bands than k+1 only narrows them), estimate for uniformly
    random hashes: the probes (distinct band values x masks within the band radius, halved
    for a self-join), the candidate pairs (pairs x masks / 2^width) and the per-band sort,
    weighted by measured costs, and keep the cheapest. Few wide bands mean many masks; many
    narrow bands mean many candidates. E.g. k=6: 100K hashes -> 4 bands of 16 bits, radii
    1/1/1/0; 1M -> 22/21/21 bits, radii 2/1/1. The choice only affects speed: every m is exact.
    """
    k = _check_distance(max_distance)
    self_join = n_queries is None
    nq = n if self_join else n_queries
    pairs = n * (n - 1) / 2 if self_join else float(n) * nq
    best: SearchPlan | None = None
    for m in range(1, min(k + 1, 64) + 1):
        bands = _bands_for(m, k)
        cost = candidates = lookups = 0.0
        feasible = True
        for band in bands:
            ball = _ball(band.width, band.radius)
            if ball > _MAX_PROBE_MASKS:
                feasible = False
                break
            space = 2.0**band.width
            distinct = space * -math.expm1(-nq / space) if nq else 0.0
            # a self-join probes each nonzero mask from one side of a value pair only
            probes = distinct * ((ball - 1) / 2 if self_join else ball)
            per_probe = _COST_PROBE if band.width <= _TABLE_BITS else _COST_PROBE_SEARCH
            candidates += pairs * ball / space
            lookups += probes
            cost += per_probe * probes + _COST_SORT * (n + (0 if self_join else nq))
        if not feasible:
            continue
        cost += _COST_CANDIDATE * candidates
        if best is None or cost < best.estimate:
            best = SearchPlan(k, m, bands, cost, candidates, lookups)
    assert best is not None  # m = k + 1 (radius 0 everywhere) is always feasible
    return best


# --------------------------------------------------------------------------------------
# Multi-index hashing: one band
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _BandIndex:
    """One side's hashes grouped by one band's value."""

    band: Band
    order: np.ndarray  # item indices sorted by band value
    sorted_hashes: np.ndarray  # hashes[order]: candidates read nearby memory, not random
    values: np.ndarray  # distinct band values, ascending (uint64)
    starts: np.ndarray  # group g = order[starts[g] : starts[g] + counts[g]]
    counts: np.ndarray
    table: np.ndarray | None  # narrow bands: value -> start << _COUNT_BITS | size, or -1


def _band_values(hashes: np.ndarray, band: Band) -> np.ndarray:
    return (hashes >> np.uint64(band.lo)) & np.uint64(band.mask)  # uint64: a band may be all 64 bits


def _build_index(hashes: np.ndarray, band: Band, with_table: bool) -> _BandIndex:
    values = _band_values(hashes, band)
    order = np.argsort(values, kind="stable")
    sv = values[order]
    new_group = np.empty(len(sv), dtype=bool)
    new_group[:1] = True
    np.not_equal(sv[1:], sv[:-1], out=new_group[1:])
    starts = np.flatnonzero(new_group)
    counts = np.diff(np.append(starts, len(sv)))
    table = None
    if with_table and band.width <= _TABLE_BITS:
        # One gather answers "is it there, where does its group start, how big is it".
        table = np.full(1 << band.width, -1, dtype=np.int64)
        table[sv[starts]] = (starts << _COUNT_BITS) | np.minimum(counts, _COUNT_MAX)
    return _BandIndex(band, order, hashes[order], sv[starts], starts, counts, table)


def _lookup(index: _BandIndex, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(which targets are present, their groups' start positions, their group sizes) in `index`."""
    if index.table is not None:
        entry = index.table[targets]
        hit = np.flatnonzero(entry >= 0)
        entry = entry[hit]
        start, count = entry >> _COUNT_BITS, entry & _COUNT_MAX
        big = np.flatnonzero(count == _COUNT_MAX)  # saturated: the true size is in `counts`
        if len(big):
            count[big] = index.counts[np.searchsorted(index.starts, start[big])]
        return hit, start, count
    pos = np.minimum(np.searchsorted(index.values, targets), len(index.values) - 1)
    hit = np.flatnonzero(index.values[pos] == targets)
    group = pos[hit]
    return hit, index.starts[group], index.counts[group]


def _probe_masks(band: Band) -> np.ndarray:
    """Every `band.width`-bit value with at most `band.radius` bits set, 0 first, then by weight."""
    masks = [0]
    for d in range(1, min(band.radius, band.width) + 1):
        masks.extend(sum(1 << b for b in bits) for bits in combinations(range(band.width), d))
    return np.array(masks, dtype=np.uint64)


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """concat(arange(l) for l in lengths), without a Python loop."""
    total = int(lengths.sum())
    starts = np.cumsum(lengths) - lengths
    return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def _candidate_batches(
    left_start: np.ndarray, left_len: np.ndarray, right_start: np.ndarray, right_len: np.ndarray, target: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Positions (in sorted order) of every pair of a left block x right block, ~`target` at a time.

    Block pair t covers left positions [left_start, +left_len) x right positions
    [right_start, +right_len). Batches end on block-pair boundaries, except that one huge
    block pair is cut into row slices, so memory stays bounded however big a group is.
    """
    sizes = left_len * right_len
    cum = np.cumsum(sizes)
    t, n_pairs = 0, len(sizes)
    while t < n_pairs:
        done = cum[t - 1] if t else 0
        stop = int(np.searchsorted(cum, done + target, side="right"))
        if stop <= t:  # block pair t alone exceeds the target: slice its rows
            rows_per = max(1, target // int(right_len[t]))
            for row in range(0, int(left_len[t]), rows_per):
                rows = min(rows_per, int(left_len[t]) - row)
                left = np.repeat(np.arange(rows, dtype=np.int64) + left_start[t] + row, right_len[t])
                right = np.tile(np.arange(right_len[t], dtype=np.int64) + right_start[t], rows)
                yield left, right
            t += 1
            continue
        ls, ll, rs, rl = left_start[t:stop], left_len[t:stop], right_start[t:stop], right_len[t:stop]
        # one row per left item, then one pair per (left item, right item)
        row_pos = np.repeat(ls, ll) + _ragged_arange(ll)
        row_len = np.repeat(rl, ll)
        row_right = np.repeat(rs, ll)
        yield np.repeat(row_pos, row_len), np.repeat(row_right, row_len) + _ragged_arange(row_len)
        t = stop


def _probe_band(
    left: _BandIndex,
    right: _BandIndex,
    masks: np.ndarray,
    earlier: tuple[Band, ...],
    max_distance: int,
    self_join: bool,
    target: int = _BATCH,
) -> tuple[np.ndarray, np.ndarray]:
    """Verified pairs (left item, right item) whose band values differ by one of `masks`.

    A pair within `max_distance` that some earlier band's radius also covers is dropped:
    that band reports it, so each pair comes out exactly once overall (no global dedup).
    In a self-join, mask 0 pairs items within a group (a < b), and a pair of distinct
    band values {v, v ^ mask} is probed only from the value whose bit at the mask's top
    bit is 0 (the smaller one): half the lookups, each value pair once.
    """
    k = np.uint64(max_distance)
    out_left: list[np.ndarray] = []
    out_right: list[np.ndarray] = []

    def verify(lpos: np.ndarray, rpos: np.ndarray) -> None:
        x = left.sorted_hashes[lpos] ^ right.sorted_hashes[rpos]
        ok = np.flatnonzero(popcount64(x) <= k)
        if len(ok) == 0:
            return
        x, lpos, rpos = x[ok], lpos[ok], rpos[ok]
        if earlier:
            first = np.ones(len(x), dtype=bool)
            for band in earlier:
                in_band = (x >> np.uint64(band.lo)) & np.uint64(band.mask)
                first &= popcount64(in_band) > band.radius
            lpos, rpos = lpos[first], rpos[first]
        li, ri = left.order[lpos], right.order[rpos]
        if self_join:
            li, ri = np.minimum(li, ri), np.maximum(li, ri)
        out_left.append(li)
        out_right.append(ri)

    def join_groups(ls: np.ndarray, lc: np.ndarray, rs: np.ndarray, rc: np.ndarray) -> None:
        """Verify every pair of left block [ls, ls + lc) x right block [rs, rs + rc)."""
        # Wide bands: most groups hold one item, so most block pairs are one candidate each.
        single = (lc == 1) & (rc == 1)
        one = np.flatnonzero(single)
        for s in range(0, len(one), target):
            sel = one[s : s + target]
            verify(ls[sel], rs[sel])
        rest = np.flatnonzero(~single)
        if len(rest):
            for lpos, rpos in _candidate_batches(ls[rest], lc[rest], rs[rest], rc[rest], target):
                verify(lpos, rpos)

    n_groups = len(left.values)
    if n_groups == 0 or len(right.values) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    all_groups = np.arange(n_groups, dtype=np.int64)
    if self_join:
        if (masks == 0).any():
            # Items sharing a band value: row p pairs with the rest of its group after it.
            ends = np.repeat(left.starts + left.counts, left.counts)
            pos = np.arange(len(left.order), dtype=np.int64)
            after = ends - pos - 1
            has = np.flatnonzero(after > 0)
            rows = _candidate_batches(pos[has], np.ones(len(has), np.int64), pos[has] + 1, after[has], target)
            for lpos, rpos in rows:
                verify(lpos, rpos)
        nonzero = masks[masks != 0]
        top = np.zeros(len(nonzero), dtype=np.int64)
        for bit in range(1, left.band.width):
            top[nonzero >> bit > 0] = bit
        plan = [(nonzero[top == bit], int(bit)) for bit in np.unique(top)]
    else:
        plan = [(masks, -1)]
    for bit_masks, bit in plan:
        if bit < 0:
            groups = all_groups
        else:  # values with a 0 at the mask's top bit: v < v ^ mask
            groups = np.flatnonzero((left.values >> np.uint64(bit)) & np.uint64(1) == 0)
        for g in range(0, len(groups), target):
            part = groups[g : g + target]
            values, starts, counts = left.values[part], left.starts[part], left.counts[part]
            chunk = max(1, target // len(part))
            for c in range(0, len(bit_masks), chunk):
                # every (group value, mask) of this slice in one vectorised lookup
                hit, rs, rc = _lookup(right, (values[None, :] ^ bit_masks[c : c + chunk, None]).ravel())
                if len(hit):
                    lg = hit % len(part) if chunk > 1 else hit
                    join_groups(starts[lg], counts[lg], rs, rc)
    if not out_left:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(out_left).astype(np.int64), np.concatenate(out_right).astype(np.int64)


# --------------------------------------------------------------------------------------
# Multi-index hashing: public entry points
# --------------------------------------------------------------------------------------


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, *, queries: np.ndarray | None = None) -> np.ndarray:
    """Every pair of hashes within Hamming distance `max_distance`, exactly, in sub-quadratic time.

    Without `queries`: [P, 2] int64 rows (i, j), i < j, indices into `hashes`.
    With `queries`: rows (query index, hash index) for every close pair between the two sets
    (e.g. benchmark images vs training images, for decontamination).
    Rows are sorted (lexicographically), so the result is deterministic. The plan (how many
    bands, which radii) comes from `plan_search(len(hashes), max_distance, ...)`.
    """
    k = _check_distance(max_distance)
    h = _as_hashes(hashes, "hashes")
    q = None if queries is None else _as_hashes(queries, "queries")
    if len(h) == 0 or (q is not None and len(q) == 0):
        return _empty_pairs()
    return _search(h, q, plan_search(len(h), k, None if q is None else len(q)))


def _search(h: np.ndarray, q: np.ndarray | None, plan: SearchPlan) -> np.ndarray:
    """Run one plan in this process (any plan built by `_bands_for` is exact)."""
    lefts, rights = [], []
    for b, band in enumerate(plan.bands):
        right = _build_index(h, band, with_table=True)
        left = right if q is None else _build_index(q, band, with_table=False)
        li, ri = _probe_band(left, right, _probe_masks(band), plan.bands[:b], plan.max_distance, self_join=q is None)
        lefts.append(li)
        rights.append(ri)
    return _sorted_pairs(np.concatenate(lefts), np.concatenate(rights))


def _dask_index(hashes: np.ndarray, band: Band, with_table: bool) -> _BandIndex:
    return _build_index(hashes, band, with_table)


def _dask_probe(
    left: _BandIndex | None,
    right: _BandIndex,
    masks: np.ndarray,
    earlier: tuple[Band, ...],
    max_distance: int,
) -> np.ndarray:
    target = _BATCH_PINNED_MALLOC if "MALLOC_TRIM_THRESHOLD_" in os.environ else _BATCH
    self_join = left is None
    li, ri = _probe_band(right if self_join else left, right, masks, earlier, max_distance, self_join, target)
    return np.stack([li, ri], axis=1)


def near_duplicate_pairs_dask(
    hashes: np.ndarray,
    max_distance: int,
    client: "Client",
    *,
    queries: np.ndarray | None = None,
    tasks_per_worker: int = 4,
) -> np.ndarray:
    """`near_duplicate_pairs` with the work spread over a Dask cluster; the same array comes back.

    The hashes are scattered once; one task per band groups them (its result stays on a
    worker), then one task per (band, chunk of probe masks) probes and verifies. Since a
    pair is reported only by the first band that can find it, and within a band by the
    single mask equal to its band difference, the tasks' results are disjoint: they are
    only concatenated and sorted. Workers must be able to import `data.dedup.phash`.

    Speed: Dask nannies export MALLOC_TRIM_THRESHOLD_=65536 to workers, which makes numpy's
    large temporaries page-fault on every allocation; tasks then use smaller batches, but a
    cluster started with `dask.config.set({"distributed.nanny.pre-spawn-environ.
    MALLOC_TRIM_THRESHOLD_": None})` ran the 1M-hash search 1.5-2.5x faster here (bench/dedup.py).
    """
    k = _check_distance(max_distance)
    h = _as_hashes(hashes, "hashes")
    q = None if queries is None else _as_hashes(queries, "queries")
    if len(h) == 0 or (q is not None and len(q) == 0):
        return _empty_pairs()
    plan = plan_search(len(h), k, None if q is None else len(q))
    n_workers = max(1, len(client.scheduler_info().get("workers", {})))
    all_masks = [_probe_masks(band) for band in plan.bands]
    # about tasks_per_worker tasks per worker, split over the bands by their number of masks
    total_masks = sum(len(m) for m in all_masks)
    n_tasks = n_workers * tasks_per_worker
    h_future = client.scatter(h)
    q_future = None if q is None else client.scatter(q)
    futures = []
    for b, (band, masks) in enumerate(zip(plan.bands, all_masks)):
        right = client.submit(_dask_index, h_future, band, True)
        left = None if q_future is None else client.submit(_dask_index, q_future, band, False)
        chunks = max(1, min(len(masks), round(n_tasks * len(masks) / total_masks)))
        # mask 0 (a whole group join) is the heaviest single mask: interleave so chunks balance
        for c in range(chunks):
            futures.append(client.submit(_dask_probe, left, right, masks[c::chunks], plan.bands[:b], k))
    results = client.gather(futures)
    pairs = np.concatenate([_empty_pairs(), *results]).astype(np.int64)
    return _sorted_pairs(pairs[:, 0], pairs[:, 1])


# --------------------------------------------------------------------------------------
# Clusters
# --------------------------------------------------------------------------------------


def cluster_representatives(n: int, pairs: np.ndarray, order_key: np.ndarray | None = None) -> np.ndarray:
    """For each of n items, the index of its cluster's representative (connected components of `pairs`).

    The representative is the member with the smallest `order_key` (any sortable array of
    length n; default: the index itself), ties broken by the smaller index. Items in no pair
    represent themselves.
    """
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= n):
        raise ValueError(f"pair indices must lie in [0, {n})")
    if order_key is None:
        by_rank = np.arange(n, dtype=np.int64)  # rank -> item
    else:
        key = np.asarray(order_key)
        if len(key) != n:
            raise ValueError(f"order_key has {len(key)} entries for {n} items")
        by_rank = np.argsort(key, kind="stable").astype(np.int64)  # stable: ties by index
    rank = np.empty(n, dtype=np.int64)
    rank[by_rank] = np.arange(n, dtype=np.int64)
    # Work in rank space, so "smallest label" = "preferred representative".
    u, v = rank[pairs[:, 0]], rank[pairs[:, 1]]
    parent = np.arange(n, dtype=np.int64)  # invariant: parent[x] <= x, roots are component minima
    while True:
        pu, pv = parent[u], parent[v]
        differ = pu != pv
        if not differ.any():
            break
        # hook the larger root under the smaller one (several hooks: the smallest wins) ...
        np.minimum.at(parent, np.maximum(pu, pv)[differ], np.minimum(pu, pv)[differ])
        # ... then jump pointers until every item points straight at its root
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return by_rank[parent[rank]]
