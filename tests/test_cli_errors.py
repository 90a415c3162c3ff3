"""User mistakes end in one clear line on stderr, exit != 0, before any work: no stage directory appears."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

WITCLIP = str(Path(sys.executable).parent / "witclip")


def _run(tmp_path: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [WITCLIP, "run", "--set", f"work_dir={tmp_path / 'runs'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize(
    "sets, expected",
    [
        (["train.epoch=3"], "error: unknown config key 'train.epoch'"),
        (["train.batch_size=-4"], "error: config value train.batch_size=-4 is invalid"),
        (["web.enabled=false"], "error: harvest.seed_url is not set"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, sets, expected):
    out = _run(tmp_path, *sets)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(expected), out.stderr
    assert not (tmp_path / "runs").exists()


def test_unreachable_seed_url(tmp_path, capsys):
    url = f"http://127.0.0.1:{_closed_port()}/"
    base = ["run", "--set", f"work_dir={tmp_path / 'runs'}", "--set", "web.enabled=false", "--set", f"harvest.seed_url={url}"]
    code = main(base + ["--set", "http.allowed_addresses=[127.0.0.1]"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"error: harvest.seed_url {url} is unreachable") and "\n" not in err
    # without the allowance the address guard refuses loopback before any request is sent
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: harvest.seed_url {url} is refused by the address guard (127.0.0.1 -> 127.0.0.1 "
                   "(loopback)); list its address in http.allowed_addresses to crawl it")
    assert not (tmp_path / "runs").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_unknown_stage_and_missing_upstream(tmp_path, capsys):
    base = ["run", "--set", f"work_dir={tmp_path / 'runs'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(base + ["--stages", "eval,polish"]) == 2
    assert "unknown stage 'polish'" in capsys.readouterr().err
    assert main(base + ["--stages", "eval"]) == 2
    assert "stage 'eval' needs the output of 'dedup'" in capsys.readouterr().err
    assert main(base + ["--from", "polish"]) == 2
    assert "--from 'polish': expected one of harvest, crawl" in capsys.readouterr().err
    assert main(base + ["--from", "train"]) == 2  # train, eval, register: train needs shard's output
    assert "stage 'train' needs the output of 'shard'" in capsys.readouterr().err


def test_classify_missing_image(tmp_path, capsys):
    assert main(["classify", "--labels", "a,b", str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _main_err(capsys, tmp_path: Path, *sets: str) -> tuple[int, str]:
    args = ["run", "--set", f"work_dir={tmp_path / 'runs'}",
            "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    for s in sets:
        args += ["--set", s]
    code = main(args)
    return code, capsys.readouterr().err.strip()


def test_url_list_mistakes_are_caught_before_any_stage(tmp_path, capsys):
    lst = tmp_path / "list.csv"
    lst.write_text("link,text\nhttp://example.com/a.jpg,a cat\n")
    cases = [
        (["harvest.source=urls"], "error: config section 'harvest' is invalid: harvest.source is 'urls' but harvest.urls is empty"),
        (["harvest.source=urls", f"harvest.urls=[{tmp_path / 'nope.csv'}]"], f"error: harvest.urls: {tmp_path / 'nope.csv'} does not exist"),
        (["harvest.source=urls", f"harvest.urls=[{lst}]"], f"error: harvest.urls: {lst}: no column 'url' (columns present: 'link', 'text')"),
        (["harvest.source=warc", f"harvest.warc=[{tmp_path / 'x.warc.gz'}]"], "error: harvest.warc:"),
        ([f"harvest.queries={tmp_path / 'q.txt'}"], f"error: harvest.queries: {tmp_path / 'q.txt'} does not exist"),
    ]
    for sets, expected in cases:
        code, err = _main_err(capsys, tmp_path, *sets)
        assert code == 2 and "\n" not in err and err.startswith(expected), (sets, err)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_harvest_stage_from_a_url_list_with_query_balancing(tmp_path, capsys):
    import pandas as pd

    from data.common.manifest import read_manifest

    lst = tmp_path / "pairs.tsv"
    rows = ["url\tcaption"] + [f"http://example.com/{i}.jpg\ta red cat number {i}" for i in range(5)] + [
        "http://example.com/dog.jpg\ta dog", "http://example.com/none.jpg\tno match here"]
    lst.write_text("\n".join(rows) + "\n")
    (tmp_path / "q.txt").write_text("cat\ndog\n")
    code = main(["run", "--stages", "harvest", "--set", f"work_dir={tmp_path / 'runs'}",
                 "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "--set", "run_name=lists",
                 "--set", "harvest.source=urls", "--set", f"harvest.urls=[{lst}]",
                 "--set", f"harvest.queries={tmp_path / 'q.txt'}", "--set", "harvest.query_cap=3"])
    assert code == 0, capsys.readouterr().err
    stage = tmp_path / "runs" / "lists" / "harvest"
    df = pd.read_parquet(stage / "candidates.parquet")
    assert sorted(df["matched_query"]) == ["cat", "cat", "cat", "dog"]
    assert set(df["source"]) == {f"pairs.tsv:{i}" for i in (1, 2, 3, 6)}
    manifest = read_manifest(stage)
    assert manifest["status"] == "complete" and manifest["counts"]["over_cap"] == 2
    assert "web" not in manifest["config"] and manifest["config"]["input_files"]["urls"]


def test_serve_mistakes_are_one_line_before_anything_is_served(tmp_path, capsys):
    assert main(["serve", "--cron", "every night"]) == 2
    assert "--cron 'every night' is not a valid cron expression; expected five fields" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "give exactly one of --cron" in capsys.readouterr().err
    assert main(["serve", "--interval", "60", "--set", "train.epoch=3"]) == 2
    assert "unknown config key 'train.epoch'" in capsys.readouterr().err
    url = f"http://127.0.0.1:{_closed_port()}/api"
    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([WITCLIP, "serve", "--interval", "60", "--set", f"work_dir={tmp_path / 'runs'}"],
                         env={**env, "PREFECT_API_URL": url}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == (
        f"error: PREFECT_API_URL {url} is unreachable ([Errno 111] Connection refused); "
        "expected a running `prefect server start`"), out.stderr
    out = subprocess.run([WITCLIP, "serve", "--interval", "60"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: serve needs a Prefect server: set PREFECT_API_URL")
    assert not (tmp_path / "runs").exists()
