"""Reproducibility of the data stages (issue 16): the same config and seed, run twice into two fresh
directories against the same web, give byte-identical outputs at every stage.

One synthetic web (every fault kind on) serves both runs, so the URLs, ports included, are the same.
Each run calls the stages as flows/stages/*.py do, with the pipeline's defaults where the test has no
reason to differ: harvest_site -> crawl (img2dataset on a LocalCluster of 2 processes, 16 threads) ->
dedup (near duplicates on, decontaminated against a generated benchmark) -> write_shards. Each run is
its own Python process with its own PYTHONHASHSEED (its Dask workers inherit it), as two pipeline
runs would be: output that followed set or str-keyed hash order would differ. The last two tests check
the crawl's shard writer alone, fast and without a web: samples in key order, no wall clock.

Faults whose outcome depends on timing are decided with a wide margin here, so that a loaded machine
cannot flip them between the runs: "slow" stalls 8x the socket timeout, "drip" would need ~36x the
deadline to finish, and pages, robots.txt and clean images get a 5-10 s socket timeout on loopback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.policies import loopback

from data.common.manifest import hash_outputs
from data.crawl import STATUS_FILE, crawl
from data.crawl.fetch import FetchPolicy
from data.crawl.writer import OrderedWebDatasetWriter, write_stats
from data.dedup import KEEP_FILE, dedup
from data.eval.synthetic import build_synthetic_benchmark
from data.harvest import CANDIDATES_FILE, harvest_site
from data.shards import write_shards
from data.synthetic import ALL_FAULT_KINDS, SiteSpec, SyntheticWeb

TIMEOUT, DEADLINE = 5.0, 10.0  # crawl: per socket operation, per request hop
SPEC = SiteSpec(
    seed=16, n_pages=12, images_per_page=12, fault_rate=0.15, fault_kinds=ALL_FAULT_KINDS,
    slow_seconds=8 * TIMEOUT,  # a "slow" image is a timeout on any machine, never a late success
    drip_interval=0.2,  # its ~1.8 KB JPEG one byte per 0.2 s: ~360 s, far past the 10 s deadline
)
POLICY = FetchPolicy(timeout=TIMEOUT, deadline=DEADLINE, allowed_addresses=("127.0.0.1",))
PROCESSES = 2  # cluster.processes' default
BENCHMARK = "colour"  # the generated benchmark dedup decontaminates against (eval.seed's default)
EVAL_SEED, SAMPLES_PER_CLASS = 1234, 10
STAGES = ("harvest", "crawl", "dedup", "shard")
HASH_SEEDS = {"first": 1, "second": 2}  # str hashes, so set and dict-of-hash orders, differ between the runs
COUNTS_FILE = "counts.json"  # beside the stage folders, not in them: it holds the wall-clock figures
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def web():
    with SyntheticWeb(SPEC) as served:
        yield served


def _run(seed_url: str, run_dir: Path) -> dict[str, dict[str, Any]]:
    """The four data stages, called as the pipeline calls them; their counts by stage."""
    out = {stage: run_dir / stage for stage in STAGES}
    counts = {"harvest": harvest_site(seed_url, out["harvest"], max_pages=1000, max_depth=50, policy=loopback(10.0))}
    counts["crawl"] = crawl(out["harvest"] / CANDIDATES_FILE, out["crawl"], image_size=64, resize_mode="center_crop",
                            shard_size=40, threads=16, retries=0, processes=PROCESSES, policy=POLICY)
    # like flows.stages.generated: generated per run under the run's work_dir, so its path differs too
    bench = build_synthetic_benchmark(BENCHMARK, run_dir / "benchmarks", seed=EVAL_SEED,
                                      samples_per_class=SAMPLES_PER_CLASS, image_size=SPEC.image_size)
    counts["dedup"] = dedup(out["crawl"], out["dedup"], near_duplicates=True, benchmark_roots={BENCHMARK: bench},
                            processes=PROCESSES)
    counts["shard"] = write_shards(out["crawl"], out["dedup"] / KEEP_FILE, out["shard"], val_fraction=0.1,
                                   samples_per_shard=32, seed=0)
    return counts


def _run_in_a_process(seed_url: str, run_dir: Path, hash_seed: int) -> dict[str, dict[str, Any]]:
    """`_run` in a fresh interpreter with PYTHONHASHSEED=hash_seed; its counts."""
    script = ("import json, sys, pathlib; from test_reproducible_data import _run, COUNTS_FILE; "
              "run_dir = pathlib.Path(sys.argv[2]); "
              "(run_dir / COUNTS_FILE).write_text(json.dumps(_run(sys.argv[1], run_dir)))")
    path = os.pathsep.join(p for p in (str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed), "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", script, seed_url, str(run_dir)], env=env, cwd=TESTS.parent,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((run_dir / COUNTS_FILE).read_text())


@pytest.fixture(scope="module")
def runs(web, tmp_path_factory):
    """Two complete runs of the same config, each in a fresh directory: [(run_dir, counts), ...]."""
    out = []
    for name, hash_seed in HASH_SEEDS.items():
        web.site.reset_throttles()  # "429" URLs refuse their first GET again: the same web for each run
        run_dir = tmp_path_factory.mktemp(f"reproducible-{name}")
        out.append((run_dir, _run_in_a_process(web.url, run_dir, hash_seed)))
    return out


def _differing(a: dict[str, str], b: dict[str, str]) -> list[str]:
    return sorted(name for name in a.keys() | b.keys() if a.get(name) != b.get(name))


@pytest.mark.slow  # with the others on `runs`: two full runs, four LocalCluster starts
@pytest.mark.integration
def test_the_web_and_runs_exercise_faults_shards_and_dedup(web, runs):
    # the check below is only worth something if both runs see failures, several shards and drops
    assert {e.fault for e in web.site.images.values()} - {None} == set(ALL_FAULT_KINDS)
    counts = runs[0][1]
    assert counts["crawl"]["shards"] >= 3 and counts["crawl"]["successes"] > 0
    assert len(counts["crawl"]["reasons"]) >= 8, counts["crawl"]["reasons"]
    assert counts["dedup"]["kept"] < counts["dedup"]["input"]
    assert counts["shard"]["train_shards"] >= 2 and counts["shard"]["val"] >= 1


@pytest.mark.slow  # with the others on `runs`: two full runs, four LocalCluster starts
@pytest.mark.integration
def test_crawl_status_is_the_same_row_for_row(runs):
    # row by row first: a fault that flipped between the runs is named here, not just a hash
    (a, _), (b, _) = runs
    first, second = (pd.read_parquet(run / "crawl" / STATUS_FILE) for run in (a, b))
    merged = first.merge(second, on=["key", "url"], how="outer", suffixes=("_1", "_2"), indicator=True)
    flipped = merged[(merged["_merge"] != "both") | (merged["reason_1"] != merged["reason_2"])]
    assert flipped.empty, flipped[["url", "reason_1", "reason_2"]].to_string()


@pytest.mark.slow  # with the others on `runs`: two full runs, four LocalCluster starts
@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_every_output_file_is_byte_identical_across_runs(runs, stage):
    (a, _), (b, _) = runs
    first, second = hash_outputs(a / stage, exclude=()), hash_outputs(b / stage, exclude=())
    assert first, f"{stage} wrote nothing"
    assert _differing(first, second) == [], f"{stage}: these files differ between two identical runs"


@pytest.mark.slow  # with the others on `runs`: two full runs, four LocalCluster starts
@pytest.mark.integration
def test_the_named_outputs_are_present_and_identical(runs):
    # the files issue 16 names, spelled out: harvest's candidates, crawl's status and image shards,
    # dedup's keep list, shard's tars and sizes.json
    (a, _), (b, _) = runs
    named = [f"harvest/{CANDIDATES_FILE}", f"crawl/{STATUS_FILE}", f"dedup/{KEEP_FILE}", "shard/sizes.json"]
    named += [p.relative_to(a).as_posix() for stage in ("crawl", "shard") for p in sorted((a / stage).glob("*.tar"))]
    assert any(n.startswith("crawl/") and n.endswith(".tar") for n in named)
    assert any(n.startswith("shard/train-") for n in named)
    for name in named:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.slow  # with the others on `runs`: two full runs, four LocalCluster starts
@pytest.mark.integration
def test_counts_differ_only_in_timings(runs):
    (_, first), (_, second) = runs
    timings = {"elapsed_s", "images_per_s"}  # wall clock: returned to the caller, never written to a compared file
    for stage in STAGES:
        assert {k: v for k, v in first[stage].items() if k not in timings} == \
               {k: v for k, v in second[stage].items() if k not in timings}, stage


# ------------------------------------------------------------------ the crawl's shard writer alone
def _write_shard(folder: Path, order: list[int]) -> None:
    """One img2dataset shard of 4 samples (sample 2 failed), handed to the writer in `order`."""
    schema = pa.schema([("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
                        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32())])
    writer = OrderedWebDatasetWriter(7, str(folder), True, 5, schema, "jpg")
    for i in order:
        key, ok = f"0000700{i}", i != 2
        meta = {"url": f"http://h/{i}.jpg", "caption": f"c{i}", "key": key, "status": "success" if ok else
                "failed_to_download", "error_message": None if ok else "http_404", "width": 64 if ok else None}
        writer.write(bytes([i]) * 100 if ok else None, key, f"c{i}", meta)
    writer.close()


def test_crawl_shards_hold_samples_in_key_order_whatever_order_threads_finish(tmp_path):
    _write_shard(tmp_path / "a", [3, 0, 2, 1])
    _write_shard(tmp_path / "b", [1, 2, 0, 3])
    for name in ("00007.tar", "00007.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    with tarfile.open(tmp_path / "a" / "00007.tar") as tf:
        members = tf.getmembers()
        assert [m.name for m in members] == [f"0000700{i}.{ext}" for i in (0, 1, 3) for ext in ("jpg", "json", "txt")]
        assert {(m.mtime, m.mode, m.uname, m.gname, m.uid, m.gid) for m in members} == {(0, 0o444, "bigdata", "bigdata", 0, 0)}
        assert json.loads(tf.extractfile("00007001.json").read())["caption"] == "c1"  # type: ignore[union-attr]
    assert pq.read_table(tmp_path / "a" / "00007.parquet").column("key").to_pylist() == [f"0000700{i}" for i in range(4)]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["00007.parquet", "00007.tar", "_tmp"]
    assert not list((tmp_path / "a" / "_tmp").iterdir())  # the spool is gone


def test_crawl_shard_stats_hold_counts_but_no_wall_clock(tmp_path):
    from img2dataset.logger import CappedCounter

    for folder, reasons, start in (("a", ["x", "success", "y", "success"], 1.0), ("b", ["success", "y", "x", "success"], 9.0)):
        counter = CappedCounter()
        for reason in reasons:
            counter.increment(reason)
        write_stats(str(tmp_path / folder), 3, 4, 2, 2, 0, start, start + 5, counter, 5)
    a, b = ((tmp_path / f / "00003_stats.json").read_bytes() for f in ("a", "b"))
    assert a == b
    assert json.loads(a) == {"count": 4, "successes": 2, "failed_to_download": 2, "failed_to_resize": 0,
                             "status_dict": {"success": 2, "x": 1, "y": 1}}
