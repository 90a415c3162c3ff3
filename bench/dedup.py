"""Near-duplicate search over 64-bit hashes: multi-index hashing vs all pairs.

    .venv/bin/python bench/dedup.py

100,000 and 1,000,000 uniformly random hashes, 1% of which are planted copies of another
item with 1..DEFAULT_MAX_DISTANCE random bits flipped; every planted pair must be found
(recall 1.0). Timed: `near_duplicate_pairs` in this process and `near_duplicate_pairs_dask`
on a LocalCluster of 2 worker processes (cluster start-up timed separately, not included),
each best of a few rounds, interleaved so that noise on the shared cores hits both; the
JSON's seconds_100k / seconds_1m / scaling_ratio come from whichever engine is faster at 1M. Naive
all-pairs (`brute_force_pairs`) is timed at 20,000 hashes and extrapolated quadratically.
Prints a table, then one JSON object as the last line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from data.dedup.phash import (  # noqa: E402
    DEFAULT_MAX_DISTANCE,
    brute_force_pairs,
    near_duplicate_pairs,
    near_duplicate_pairs_dask,
    plan_search,
)

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
SIZES = (100_000, 1_000_000)
ROUNDS = {100_000: 7, 1_000_000: 3}  # best of: the 100K figure is small and noise-prone
NAIVE_N = 20_000
PLANT_RATE = 0.01


def planted_hashes(n: int, max_flips: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random hashes; 1% of them overwritten by a copy of another with 1..max_flips bits flipped."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64)
    m = int(n * PLANT_RATE)
    chosen = rng.choice(n, 2 * m, replace=False)  # sources and copies disjoint: each pair planted once
    src, dst = chosen[:m], chosen[m:]
    n_flips = rng.integers(1, max_flips + 1, m)
    positions = np.argsort(rng.random((m, 64)), axis=1).astype(np.uint64)  # a random bit order per copy
    bits = np.where(np.arange(64)[None, :] < n_flips[:, None], np.uint64(1) << positions, np.uint64(0))
    hashes[dst] = hashes[src] ^ np.bitwise_or.reduce(bits, axis=1)
    return hashes, np.sort(np.stack([src, dst], axis=1), axis=1).astype(np.int64)


def recall(found: np.ndarray, planted: np.ndarray, n: int) -> float:
    return float(np.isin(planted[:, 0] * n + planted[:, 1], found[:, 0] * n + found[:, 1]).mean())


def start_cluster(tuned: bool):
    """A 2-process LocalCluster; `tuned` drops the nanny's MALLOC_TRIM_THRESHOLD_ (see data.dedup.phash._BATCH)."""
    import dask
    from distributed import Client, LocalCluster

    settings = {"distributed.worker.profile.enabled": False}
    if tuned:
        settings["distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"] = None
        os.environ.pop("MALLOC_TRIM_THRESHOLD_", None)  # a nanny exports it into this process too
    with dask.config.set(settings):
        cluster = LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # a random port: concurrent clusters must not fight over :8787
            host="127.0.0.1",
            silence_logs=logging.CRITICAL,
        )
    return cluster, Client(cluster, set_as_default=False)


def timed(fn, *args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main() -> None:
    k = DEFAULT_MAX_DISTANCE
    t_start = time.perf_counter()
    data = {n: planted_hashes(n, k, seed=n) for n in (*SIZES, NAIVE_N)}

    t0 = time.perf_counter()
    cluster, client = start_cluster(tuned=True)
    cluster_start = time.perf_counter() - t0

    times: dict[str, dict[int, list[float]]] = {"single": {}, "dask": {}}
    recalls: dict[int, float] = {}
    extra: dict[int, int] = {}
    try:
        for n in SIZES:
            hashes, planted = data[n]
            times["single"][n], times["dask"][n] = [], []
            for r in range(ROUNDS[n]):
                order = ("single", "dask") if r % 2 == 0 else ("dask", "single")
                results = {}
                for engine in order:
                    if engine == "single":
                        dt, results[engine] = timed(near_duplicate_pairs, hashes, k)
                    else:
                        dt, results[engine] = timed(near_duplicate_pairs_dask, hashes, k, client)
                    times[engine][n].append(dt)
                assert np.array_equal(results["single"], results["dask"]), "dask and single-process results differ"
            recalls[n] = recall(results["single"], planted, n)
            extra[n] = len(results["single"]) - len(planted)  # chance pairs among the random hashes
    finally:
        client.close()
        cluster.close()

    # The same cluster with Dask's default worker environment, once at 1M, to show what it costs.
    cluster, client = start_cluster(tuned=False)
    try:
        default_env_1m, _ = timed(near_duplicate_pairs_dask, data[SIZES[-1]][0], k, client)
    finally:
        client.close()
        cluster.close()

    hashes, planted = data[NAIVE_N]
    naive_runs = []
    for _ in range(2):
        dt, naive = timed(brute_force_pairs, hashes, k)
        naive_runs.append(dt)
    mih_20k, fast = timed(near_duplicate_pairs, hashes, k)
    assert np.array_equal(naive, fast), "multi-index hashing disagrees with all pairs"
    naive_20k = min(naive_runs)
    big = SIZES[-1]
    naive_1m = naive_20k * (big * (big - 1)) / (NAIVE_N * (NAIVE_N - 1))

    best = {e: {n: min(v) for n, v in by_n.items()} for e, by_n in times.items()}
    ratio = {e: best[e][SIZES[1]] / best[e][SIZES[0]] for e in best}
    engine = min(best, key=lambda e: best[e][SIZES[1]])  # the faster at 1M reports both sizes

    print(f"\nnear-duplicate search, max_distance={k}, {CORES} cores, 1% planted neighbours (1..{k} bits)")
    print(f"LocalCluster(2 processes) start-up: {cluster_start:.1f}s (not included below)")
    hdr = (f"{'hashes':>10} {'engine':<20} {'best s':>8} {'rounds':>36} {'bands (width/radius)':>24} "
           f"{'recall':>7} {'extra':>6}")
    print(hdr)
    print("-" * len(hdr))
    for n in SIZES:
        plan = plan_search(n, k)
        bands = " ".join(f"{b.width}/{b.radius}" for b in plan.bands)
        for e in ("single", "dask"):
            rounds = " ".join(f"{t:.2f}" for t in times[e][n])
            label = "single process" if e == "single" else "dask, 2 processes"
            print(f"{n:>10,} {label:<20} {best[e][n]:>8.2f} {rounds:>36} {bands:>24} {recalls[n]:>7.3f} {extra[n]:>6}")
    print(f"{big:>10,} {'dask, default env':<20} {default_env_1m:>8.2f} {'':>36} {'':>24}")
    print(f"{NAIVE_N:>10,} {'naive all pairs':<20} {naive_20k:>8.2f} {' '.join(f'{t:.2f}' for t in naive_runs):>36}"
          f"   (multi-index: {mih_20k:.3f}s, same pairs)")
    scale = big * (big - 1) / (NAIVE_N * (NAIVE_N - 1))
    print(f"{big:>10,} {'naive, extrapolated':<20} {naive_1m:>8.0f}   (x{scale:.0f} pairs: quadratic extrapolation)")
    for e in ("single", "dask"):
        print(f"scaling {e}: {best[e][SIZES[1]]:.2f}s / {best[e][SIZES[0]]:.2f}s = {ratio[e]:.2f} for 10x hashes")
    # Why not 10x: exact search grows faster than n (the planner's expected work, random hashes).
    small, large = plan_search(SIZES[0], k), plan_search(SIZES[1], k)
    for n, plan in ((SIZES[0], small), (SIZES[1], large)):
        print(f"expected work at {n:>9,}: {plan.expected_probes / 1e6:7.1f}M table probes, "
              f"{plan.expected_candidates / 1e6:7.1f}M candidate pairs, {n * len(plan.bands) / 1e6:4.1f}M items sorted")
    probe_ratio = large.expected_probes / small.expected_probes
    candidate_ratio = large.expected_candidates / small.expected_candidates
    print(f"total wall time {time.perf_counter() - t_start:.1f}s")

    summary = {
        "bench": "dedup",
        "max_distance": k,
        "cores": CORES,
        "engine": engine,
        "seconds_100k": round(best[engine][SIZES[0]], 3),
        "seconds_1m": round(best[engine][SIZES[1]], 3),
        "scaling_ratio": round(ratio[engine], 2),
        "recall_100k": recalls[SIZES[0]],
        "recall_1m": recalls[SIZES[1]],
        "single_seconds_100k": round(best["single"][SIZES[0]], 3),
        "single_seconds_1m": round(best["single"][SIZES[1]], 3),
        "single_scaling_ratio": round(ratio["single"], 2),
        "dask_seconds_100k": round(best["dask"][SIZES[0]], 3),
        "dask_seconds_1m": round(best["dask"][SIZES[1]], 3),
        "dask_scaling_ratio": round(ratio["dask"], 2),
        "dask_default_env_seconds_1m": round(default_env_1m, 3),
        "cluster_start_seconds": round(cluster_start, 2),
        "naive_seconds_20k": round(naive_20k, 3),
        "naive_seconds_1m_extrapolated": round(naive_1m, 1),
        "speedup_vs_naive_1m": round(naive_1m / best[engine][SIZES[1]], 1),
        "probes_ratio_expected": round(probe_ratio, 1),
        "candidates_ratio_expected": round(candidate_ratio, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
