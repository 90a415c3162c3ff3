"""The rules that make re-runs trustworthy, checked piece by piece (the whole pipeline: test_reruns.py):
code-aware keys, the run lock, verified outputs, rejected outputs, no writes into stage directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.common.manifest import (
    enclosing_stage_dir,
    hash_outputs,
    output_stats,
    verify_outputs,
)
from flows.code_version import code_files, code_version, git_version, source_fingerprint
from flows.errors import UserError
from flows.locks import LockHeld, hold, read_holder, run_lock
from flows.stages import STAGES, get_stage


def _files(stage: str) -> set[str]:
    spec = get_stage(stage)
    return set(code_files([spec.run.__module__], spec.code))


def test_each_stage_key_covers_the_code_it_runs_and_nothing_upstream_covers_downstream_code():
    assert "data/dedup/deduplicate.py" in _files("dedup") and "data/dedup/deduplicate.py" in _files("shard")
    for upstream in ("harvest", "crawl"):
        assert not any(f.startswith("data/dedup/") for f in _files(upstream)), upstream
    # the trainer runs under torchrun (flows.train_entry), outside the stage module's imports
    assert {"clip/train.py", "flows/train_entry.py", "clip/configs/tiny.json"} <= _files("train")
    for upstream in ("harvest", "crawl", "dedup", "shard"):
        assert "clip/train.py" not in _files(upstream), upstream
    assert "data/crawl/crawler.py" in _files("crawl") and "data/crawl/crawler.py" not in _files("harvest")
    assert "data/eval/tasks/cifar10.json" in _files("eval")
    # every stage names its own module first and declares the engines whose versions can change its output
    for spec in STAGES:
        fp = spec.code_fingerprint()
        assert f"flows/stages/{spec.name}.py" in _files(spec.name)
        assert len(fp["sources"]) == 64 and fp["engines"]["python"].count(".") == 1


def test_code_version_is_the_git_commit_in_a_checkout_and_the_fingerprint_always():
    fp = source_fingerprint()
    assert len(fp) == 64
    version = code_version()
    commit = git_version()
    if commit is None:  # an installed copy, not a checkout
        assert version == f"source-{fp[:16]}"
    else:
        assert version == commit and len(commit.removesuffix("-dirty")) == 40


HOLD_SCRIPT = """
import sys, time
from flows.locks import hold
with hold(sys.argv[1], purpose="test"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_held_lock_names_its_holder_and_a_killed_holder_never_blocks(tmp_path):
    lock = tmp_path / "run" / ".lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as refused:
            with hold(lock, purpose="second"):
                pass
        assert refused.value.holder["pid"] == proc.pid and f"pid {proc.pid} on " in str(refused.value)
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"run_name 'x' is in use by pid {proc.pid} on .* since "):
            with run_lock(tmp_path / "run", "x"):
                pass
        assert time.monotonic() - t0 < 1.0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with hold(lock, purpose="after the kill") as me:  # the kernel released it with the process
        assert me["pid"] == os.getpid() and read_holder(lock)["purpose"] == "after the kill"
        with hold(lock, purpose="nested"):  # re-entrant within one process
            pass
        assert read_holder(lock)["pid"] == os.getpid()
    assert read_holder(lock) == {}  # released: nobody is named


def _written(tmp_path: Path) -> tuple[Path, dict]:
    out = tmp_path / "stage"
    (out / "sub").mkdir(parents=True)
    (out / "a.bin").write_bytes(b"x" * 100)
    (out / "sub" / "b.txt").write_text("hello")
    outputs = hash_outputs(out)
    return out, {"outputs": outputs, "stats": output_stats(out, outputs)}


def test_verify_outputs_names_a_missing_truncated_or_edited_file(tmp_path):
    out, manifest = _written(tmp_path)
    assert verify_outputs(out, manifest) is None and verify_outputs(out, manifest, deep=True) is None
    st = (out / "sub" / "b.txt").stat()
    (out / "sub" / "b.txt").write_text("HELLO")  # same size
    os.utime(out / "sub" / "b.txt", ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime
    assert verify_outputs(out, manifest) is None  # the cheap check cannot see it ...
    assert "b.txt does not match its sha256" in verify_outputs(out, manifest, deep=True)  # ... --verify does
    (out / "sub" / "b.txt").write_text("hello!")
    assert verify_outputs(out, manifest).endswith("b.txt is 6 bytes, 5 when the stage completed")
    with open(out / "a.bin", "r+b") as f:
        f.truncate(10)
    assert "a.bin is 10 bytes, 100 when" in verify_outputs(out, manifest)
    (out / "a.bin").unlink()
    assert verify_outputs(out, manifest).endswith("a.bin is missing")
    assert verify_outputs(out, {"outputs": manifest["outputs"]}) == "its manifest predates output checks"


def test_enclosing_stage_dir_finds_a_stage_directory_from_inside_it(tmp_path):
    stage = tmp_path / "runs" / "a" / "eval"
    (stage / "deep").mkdir(parents=True)
    assert enclosing_stage_dir(stage) is None
    (stage / "manifest.json").write_text("{}")
    assert enclosing_stage_dir(stage / "deep" / "new") == stage.resolve()
    assert enclosing_stage_dir(tmp_path / "elsewhere") is None


def test_a_crawl_that_downloaded_almost_nothing_is_rejected_with_its_top_reasons():
    from flows.config import load_config

    spec = get_stage("crawl")
    view = spec.view(load_config(None, []))
    outage = {"urls": 200, "successes": 3,
              "reasons": {"connection_refused": 150, "timeout": 40, "success": 3, "http_404": 5, "dns": 2}}
    why = spec.accept(view, outage)
    assert why == ("3 of 200 URLs downloaded (1.5%), below crawl.min_success_rate 25%; top failure reasons: "
                   "connection_refused 150, timeout 40, http_404 5")
    assert spec.accept(view, {"urls": 200, "successes": 120, "reasons": {}}) is None
    assert spec.accept(view, {"urls": 0, "successes": 0, "reasons": {}}).startswith("0 of 0 URLs")
    low = spec.view(load_config(None, ["crawl.min_success_rate=0.01"]))
    assert spec.accept(low, outage) is None
