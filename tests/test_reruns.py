"""Re-runs you can trust, end to end through `witclip run` (real Prefect, Dask, torchrun and MLflow):
an edit to one stage's code re-runs that stage and what follows; one writer per run name; two runs on one
work_dir at once give what they give one after the other, and what a fresh work_dir gives (byte for
byte); a changed output runs again; adopted outputs cannot be written through the CLI; an outage's
crawl is rejected, not cached."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from data.common.manifest import read_manifest
from flows.stages import STAGE_NAMES

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
# small and quick; the slow fault sleeps far past the timeout, so no image's fate depends on the load
TINY = [
    "web.n_pages=10",
    "web.images_per_page=12",
    "web.fault_rate=0.1",
    "web.slow_seconds=8",
    "crawl.timeout=2",
    "crawl.shard_size=50",
    "shard.samples_per_shard=40",
    "train.epochs=1",
    "train.batch_size=16",
    "train.vocab_size=300",
    "train.warmup_steps=2",
    "train.log_every=2",
    "train.eval_every=0",
    "train.system_metrics_interval=0",
    "eval.samples_per_class=2",
]


def witclip_run(sets: list[str], *, cwd: Path = REPO, pythonpath: Path | None = None,
                wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """`witclip run` in its own process, with a Prefect home of its own (its own ephemeral API)."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(Path(env.get("PREFECT_HOME", "/tmp")) / f"sub-{time.monotonic_ns()}")
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-m", "flows.cli", "run"] + [a for s in sets for a in ("--set", s)]
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def statuses(stdout: str) -> dict[str, str]:
    """{stage: ran|skipped|reused} from the end-of-run table."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in STAGE_NAMES and parts[1] in ("ran", "skipped", "reused"):
            out[parts[0]] = parts[1]
    return out


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def registered(tracking_uri: str, model: str = "witclip") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    return sorted(client.search_model_versions(f"name='{model}'"), key=lambda mv: int(mv.version))


# -- 2 and 6: one writer per run; concurrent runs equal sequential ones; byte-identical reruns ------------


@pytest.fixture(scope="module")
def shared_web():
    """One web for every run of this module, so URLs (and the port in them) are the same everywhere."""
    from data.synthetic import SiteSpec, SyntheticWeb

    web = SyntheticWeb(SiteSpec(seed=0, n_pages=10, images_per_page=12, fault_rate=0.1, slow_seconds=8))
    web.start()
    yield web
    web.stop()


def _sets(web, root: Path, run: str) -> list[str]:
    # a seed of the user's on loopback: its exact host:port must be allowed (only the embedded web is by itself)
    return TINY + [f"run_name={run}", f"harvest.seed_url={web.url}", f"work_dir={root / 'runs'}",
                   f"http.allowed_addresses=[{urlparse(web.url).netloc}]",
                   f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}"]


DETERMINISTIC = {  # outputs that must be byte-identical for the same config and seed
    "harvest": ("candidates.parquet",),
    "crawl": ("status.parquet",),
    "dedup": ("keep.parquet",),
    "shard": ("*.tar", "sizes.json"),
    "train": ("model.safetensors",),
}


def deterministic_files(run_dir: Path) -> dict[str, str]:
    found = {}
    for stage, patterns in DETERMINISTIC.items():
        for pattern in patterns:
            for f in sorted((run_dir / stage).glob(pattern)):
                found[f"{stage}/{f.name}"] = sha(f)
    return found


@pytest.fixture(scope="module")
def sequential(shared_web, tmp_path_factory):
    """Runs a then b, one after the other, in a fresh work_dir (b adopts every stage of a)."""
    root = tmp_path_factory.mktemp("sequential")
    a = ok(witclip_run(_sets(shared_web, root, "a")))
    b = ok(witclip_run(_sets(shared_web, root, "b")))
    return {"root": root, "a": a, "b": b}


def test_two_runs_on_one_work_dir_at_once_equal_the_same_runs_one_after_the_other(shared_web, sequential,
                                                                                   tmp_path):
    assert set(statuses(sequential["a"].stdout).values()) == {"ran"}
    assert set(statuses(sequential["b"].stdout).values()) == {"reused"}
    reference = deterministic_files(sequential["root"] / "runs" / "a")
    assert {"harvest/candidates.parquet", "crawl/status.parquet", "dedup/keep.parquet", "shard/sizes.json",
            "train/model.safetensors"} <= reference.keys() and any(k.endswith(".tar") for k in reference)
    assert deterministic_files(sequential["root"] / "runs" / "b") == reference

    run_a = witclip_run(_sets(shared_web, tmp_path, "a"), wait=False)
    lock = tmp_path / "runs" / "a" / ".lock"
    deadline = time.monotonic() + 60
    while not (lock.is_file() and lock.read_text().strip()):
        assert time.monotonic() < deadline and run_a.poll() is None, "run a never took its lock"
        time.sleep(0.05)
    run_b = witclip_run(_sets(shared_web, tmp_path, "b"), wait=False)
    t0 = time.monotonic()
    twin = witclip_run(_sets(shared_web, tmp_path, "a"))  # the same run name again: refused at once
    refused_in = time.monotonic() - t0
    assert twin.returncode == 2, twin.stderr[-2000:]
    assert refused_in < 2.0, refused_in
    assert twin.stderr.strip().splitlines()[-1].startswith(f"error: run_name 'a' is in use by pid {run_a.pid} on ")
    out_a, err_a = run_a.communicate(timeout=900)
    out_b, err_b = run_b.communicate(timeout=900)
    assert run_a.returncode == 0, (out_a[-2000:], err_a[-3000:])
    assert run_b.returncode == 0, (out_b[-2000:], err_b[-3000:])
    # a fresh work_dir, two writers at once: every deterministic file equals the sequential runs'
    assert deterministic_files(tmp_path / "runs" / "a") == reference
    assert deterministic_files(tmp_path / "runs" / "b") == reference

    # the registered versions of both work_dirs name the same data; each store's alias history is consistent
    from mlflow.tracking import MlflowClient

    hashes = set()
    for root in (sequential["root"], tmp_path):
        uri = f"sqlite:///{root / 'mlflow.db'}"
        versions = registered(uri)
        assert versions, root
        hashes |= {mv.tags["data_manifest_hash"] for mv in versions}
        client = MlflowClient(tracking_uri=uri)
        history = json.loads(client.get_registered_model("witclip").tags["witclip.champion_history.champion"])
        assert len(history) == len(set(history))
        assert history[-1] == str(client.get_model_version_by_alias("witclip", "champion").version)
    assert len(hashes) == 1


def test_a_truncated_shard_reruns_its_stage_and_nothing_downstream_of_equal_output(shared_web, sequential):
    run_dir = sequential["root"] / "runs" / "a"
    tar = sorted((run_dir / "shard").glob("*.tar"))[0]
    before = sha(tar)
    with open(tar, "r+b") as f:  # root may write a read-only file; a user would chmod first
        f.truncate(1000)
    again = ok(witclip_run(_sets(shared_web, sequential["root"], "a")))
    assert f"[shard] {tar} is 1000 bytes" in again.stdout + again.stderr, again.stderr[-3000:]
    st = statuses(again.stdout)
    assert st["shard"] == "ran" and st["harvest"] == st["crawl"] == st["dedup"] == "skipped"
    assert sha(tar) == before  # made again, byte for byte: so train's inputs are unchanged ...
    assert st["train"] == st["eval"] == "skipped"  # ... and nothing below runs again


def test_reports_cannot_be_written_into_an_adopted_stage_directory(sequential):
    runs = sequential["root"] / "runs"
    source = runs / "a" / "eval" / "results.json"
    before = sha(source)
    assert (runs / "b" / "eval" / "results.json").stat().st_ino == source.stat().st_ino  # adopted: one inode
    assert not source.stat().st_mode & 0o222  # complete outputs are read-only
    out = subprocess.run([sys.executable, "-m", "flows.cli", "eval", "--model", str(runs / "b" / "train"),
                          "--tasks", "colour", "--out", str(runs / "b" / "eval")],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip() == (f"error: --out {runs / 'b' / 'eval'} is inside the stage directory "
                                  f"{(runs / 'b' / 'eval').resolve()}; stage outputs may be shared with other "
                                  "runs: choose a directory outside them")
    assert sha(source) == before


# -- 4. nothing bad cached ----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Artifact creation outside")  # stages called one by one, outside a flow
def test_a_crawl_during_an_outage_fails_with_its_reasons_and_the_next_run_crawls_again(tmp_path, prefect_harness):
    from data.synthetic import SiteSpec, SyntheticWeb
    from flows import tracking
    from flows.config import load_config
    from flows.errors import RejectedOutput
    from flows.pipeline import EmbeddedWeb, execute_stage, find_reusable, run_pipeline

    web = SyntheticWeb(SiteSpec(seed=3, n_pages=4, images_per_page=10, fault_rate=0.0))
    web.start()
    port = urlparse(web.url).port
    sets = [f"harvest.seed_url={web.url}", f"work_dir={tmp_path / 'runs'}", "crawl.timeout=1",
            f"http.allowed_addresses=[127.0.0.1:{port}]",
            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"]
    cfg = load_config(None, sets + ["run_name=outage"])
    run_pipeline(cfg, ["harvest"])
    web.stop()  # the network goes down between harvest and crawl: every image fails
    with pytest.raises(RejectedOutput, match=r"stage 'crawl' rejected its output: 0 of 40 URLs downloaded "
                                             r"\(0\.0%\), below crawl\.min_success_rate 25%; top failure reasons: "):
        run_pipeline(cfg, ["crawl"])
    crawl_dir = cfg.stage_dir("crawl")
    assert read_manifest(crawl_dir) is None  # not complete ...
    assert read_manifest(crawl_dir, name=".attempt.json")["status"] == "rejected"  # ... and never resumed
    assert find_reusable(cfg, "crawl") is None  # nor adopted by another run

    web = SyntheticWeb(SiteSpec(seed=3, n_pages=4, images_per_page=10, fault_rate=0.0), port=port)
    web.start()  # the network is back
    try:
        later = load_config(None, sets + ["run_name=later"])
        uri = tracking.tracking_uri(later.mlflow.tracking_uri)
        run_id = tracking.get_or_create_run(uri, later.mlflow.experiment, later.run_name, "x", {})
        embedded = EmbeddedWeb(later)
        assert execute_stage(later, "harvest", embedded, run_id, uri, force=False).status == "reused"
        again = execute_stage(later, "crawl", embedded, run_id, uri, force=False)  # not forced: it would adopt
        assert again.status == "ran" and again.counts["successes"] == 40
        # the rejected run's next attempt adopts the good crawl; its rejected files are gone
        same = execute_stage(cfg, "crawl", embedded, run_id, uri, force=False)
        assert same.status == "reused" and read_manifest(crawl_dir)["counts"]["successes"] == 40
        assert not (crawl_dir / ".attempt.json").exists()
    finally:
        web.stop()


# -- 1. code-aware keys ----------------------------------------------------------------------------------


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, 1))


def _commit(tree: Path, message: str) -> None:
    subprocess.run(["git", "-C", str(tree), "add", "-A"], check=True, capture_output=True)
    subprocess.run(["git", "-C", str(tree), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message],
                   check=True, capture_output=True)


def test_editing_one_stage_reruns_it_and_what_follows_and_nothing_above(shared_web, sequential, tmp_path):
    tree = tmp_path / "witclip"  # a copy of the code, a git checkout of its own
    for part in ("clip", "data", "flows"):
        shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(tree)], check=True)
    _commit(tree, "as shipped")
    sets = _sets(shared_web, tmp_path, "a")
    # the code is the same as the sequential runs': their complete run, copied, is this tree's first run
    shutil.copytree(sequential["root"] / "runs" / "a", tmp_path / "runs" / "a", copy_function=os.link,
                    ignore=shutil.ignore_patterns(".lock", "logs"))
    first = ok(witclip_run(sets, cwd=tree, pythonpath=tree))
    # all but register, whose key holds the MLflow store: this test's store has no model yet
    assert statuses(first.stdout) == {**{stage: "skipped" for stage in STAGE_NAMES}, "register": "ran"}

    _edit(tree / "data/dedup/deduplicate.py", '"""', '"""An edited line.\n', )
    _commit(tree, "dedup edited")
    second = ok(witclip_run(sets, cwd=tree, pythonpath=tree))
    assert statuses(second.stdout) == {"harvest": "skipped", "crawl": "skipped", "dedup": "ran", "shard": "ran",
                                       "train": "ran", "eval": "ran", "register": "ran"}, second.stdout[-2000:]

    _edit(tree / "clip/train.py", '"""', '"""An edited line.\n')
    _commit(tree, "trainer edited")
    third = ok(witclip_run(sets, cwd=tree, pythonpath=tree))
    assert statuses(third.stdout) == {"harvest": "skipped", "crawl": "skipped", "dedup": "skipped",
                                      "shard": "skipped", "train": "ran", "eval": "ran", "register": "ran"}

    versions = registered(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [str(mv.version) for mv in versions] == ["1", "2", "3"]
    # each version names the code that made its model: v1 the copied run's (this repository), v2 and v3
    # the edited tree's commits
    tags = [mv.tags for mv in versions]
    commits = [t["code_version"] for t in tags]
    assert len(set(commits)) == 3 and all(len(c) == 40 for c in commits[1:]), commits
    assert len({t["source_fingerprint"] for t in tags}) == 3


def test_processes_opening_a_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Opening an MlflowClient creates and migrates a new sqlite store; four processes doing it at once
    (as two pipeline runs on one store do) all get a working store: flows.tracking.tracking_client takes
    the store's setup lock around it. (Bare MlflowClient constructions fail here with "table ... already
    exists" in most processes.)"""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = "import sys; from flows.tracking import tracking_client; tracking_client(sys.argv[1]).search_experiments()"
    procs = [subprocess.Popen([sys.executable, "-c", code, uri], cwd=REPO, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], [e[-600:] for e in errors if e]
