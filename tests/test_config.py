"""The one pipeline config: defaults equal configs/demo.yaml, overrides work, mistakes are one clear line."""

from pathlib import Path

import pytest

from flows.config import PipelineConfig, load_config, stage_config
from flows.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_demo_yaml_equals_builtin_defaults():
    assert load_config(REPO / "configs" / "demo.yaml") == PipelineConfig()


def test_set_overrides_parse_types():
    cfg = load_config(None, ["train.epochs=3", "train.lr=2e-4", "web.enabled=false",
                             "eval.benchmarks=[colour, shape]", "harvest.seed_url=http://127.0.0.1:8000/"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(2e-4)
    assert cfg.web.enabled is False
    assert cfg.eval.benchmarks == ["colour", "shape"]
    assert cfg.harvest.seed_url == "http://127.0.0.1:8000/"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("trian.epochs=3", "unknown config key 'trian'"),
        ("train.epochs=0", "config value train.epochs=0 is invalid"),
        ("train.epochs=many", "config value train.epochs='many' is invalid"),
        ("eval.benchmarks=[colour, texture]", "config value eval.benchmarks=['colour', 'texture'] is invalid: unknown benchmark task 'texture'"),
        ("eval.benchmarks=[cifar01]", "unknown benchmark task 'cifar01' (did you mean cifar10"),
        ("harvest.seed_url=ftp://example", "config value harvest.seed_url='ftp://example' is invalid"),
        ("crawl.resize_mode=squash", "config value crawl.resize_mode='squash' is invalid"),
        ("epochs", "--set 'epochs': expected section.key=value"),
    ],
)
def test_bad_keys_and_values_are_one_line(override, expected):
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_unknown_section(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\nextras:\n  x: 1\n")
    with pytest.raises(UserError, match="unknown config key 'extras'"):
        load_config(p)


def test_stage_slices_ignore_where_work_runs():
    a = PipelineConfig()
    b = load_config(None, ["crawl.processes=8", "crawl.scheduler_address=tcp://127.0.0.1:8786",
                           "train.num_workers=2"])
    assert stage_config(a, "crawl") == stage_config(b, "crawl")
    assert stage_config(a, "train") == stage_config(b, "train")
    c = load_config(None, ["crawl.image_size=32"])
    assert stage_config(a, "crawl") != stage_config(c, "crawl")


def test_credentials_in_the_tracking_uri_are_refused_without_being_echoed():
    with pytest.raises(UserError) as err:
        load_config(None, ["mlflow.tracking_uri=http://bob:hunter2@127.0.0.1:5000"])
    assert "MLFLOW_TRACKING_USERNAME" in str(err.value) and "hunter2" not in str(err.value)
    assert load_config(None, ["mlflow.tracking_uri=http://127.0.0.1:5000"]).mlflow.tracking_uri.endswith(":5000")


def test_eval_key_changes_when_benchmark_data_arrives(tmp_path):
    """A nightly re-evaluation must not reuse yesterday's eval once new benchmark data is there."""
    from data.eval.registry import get_task

    cfg = load_config(None, ["eval.benchmarks=[colour,cifar10]", f"eval.data_roots=[{tmp_path}]"])
    before = stage_config(cfg, "eval")
    assert before["data"] == {"cifar10": None}
    split = tmp_path / get_task("cifar10").wds_dirs[0] / "test"
    split.mkdir(parents=True)
    (split / "0.tar").write_bytes(b"x" * 10)
    after = stage_config(cfg, "eval")
    assert after["data"]["cifar10"]["files"] == 1 and after["data"]["cifar10"]["bytes"] == 10
    (split / "1.tar").write_bytes(b"y" * 5)
    assert stage_config(cfg, "eval")["data"]["cifar10"]["bytes"] == 15
    assert stage_config(cfg, "dedup") == stage_config(load_config(None, ["eval.benchmarks=[colour]"]), "dedup")
