"""The one pipeline config: defaults equal configs/demo.yaml, overrides work, mistakes are one clear line;
it maps itself onto the engines (every engine field mapped or fixed), and each stage's key follows exactly
the config it reads (tests/test_stage_keys.py)."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.config import PipelineConfig, load_config
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
        ("crawl.user_agent=bot", "config key 'crawl.user_agent' moved to 'http.user_agent'"),
        ("crawl.scheduler_address=tcp://h:1", "config key 'crawl.scheduler_address' moved to 'cluster.scheduler_address'"),
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


def test_credentials_in_the_tracking_uri_are_refused_without_being_echoed():
    with pytest.raises(UserError) as err:
        load_config(None, ["mlflow.tracking_uri=http://bob:hunter2@127.0.0.1:5000"])
    assert "MLFLOW_TRACKING_USERNAME" in str(err.value) and "hunter2" not in str(err.value)
    assert load_config(None, ["mlflow.tracking_uri=http://127.0.0.1:5000"]).mlflow.tracking_uri.endswith(":5000")


# ------------------------------------------------------------------ the config maps itself onto the engines
def test_the_config_defaults_are_the_engines_defaults():
    """One source of defaults: the demo config builds exactly the engines' default objects."""
    from clip.train_config import TrainConfig as EngineTrainConfig
    from data.common.http import HttpPolicy
    from data.crawl.fetch import FetchPolicy
    from data.synthetic import SiteSpec

    cfg = PipelineConfig()
    assert cfg.web.site_spec() == SiteSpec()
    assert cfg.crawl.fetch_policy(cfg.http, None) == FetchPolicy()
    assert cfg.harvest.page_policy(cfg.http, None) == HttpPolicy()
    assert cfg.train.engine_config() == EngineTrainConfig()


def test_loopback_is_let_through_only_for_the_embedded_web_host_and_port():
    """While a run serves the embedded web, the guard lets exactly its host:port through, on top of what
    http.allowed_addresses lists; 127.0.0.1 as a whole never (the MLflow server listens there too)."""
    cfg = load_config(None, ["http.allowed_addresses=[10.1.0.0/16]"])
    assert cfg.crawl.fetch_policy(cfg.http, "127.0.0.1:8123").allowed_addresses == ("10.1.0.0/16", "127.0.0.1:8123")
    assert cfg.harvest.page_policy(cfg.http, "127.0.0.1:8123").allowed_addresses == ("10.1.0.0/16", "127.0.0.1:8123")
    assert cfg.crawl.fetch_policy(cfg.http, None).allowed_addresses == ("10.1.0.0/16",)


@pytest.mark.parametrize("engine", sorted(__import__("flows.config", fromlist=["x"]).ENGINE_BUILDERS))
def test_every_engine_field_is_mapped_from_the_config_or_listed_as_fixed(engine, tmp_path):
    """Build the engine from the demo config, then from the config with each field changed in turn: the
    engine fields that moved must be exactly those not in its table of fixed fields."""
    from support.config_walk import changed_configs

    from flows.config import ENGINE_BUILDERS

    build, fixed = ENGINE_BUILDERS[engine]
    base = build(PipelineConfig())
    names = {f.name for f in dataclasses.fields(base)}
    assert set(fixed) <= names and all(getattr(base, k) == v for k, v in fixed.items())
    moved: set[str] = set()
    for _path, before, after in changed_configs(tmp_path):
        a, b = build(before), build(after)
        moved |= {n for n in names if getattr(a, n) != getattr(b, n)}
    assert moved == names - set(fixed), (sorted(names - set(fixed) - moved), sorted(moved & set(fixed)))


def test_build_engine_refuses_a_field_neither_mapped_nor_fixed():
    from data.synthetic import SiteSpec
    from flows.config import SITE_SPEC_FIXED, build_engine

    mapped = PipelineConfig().web.model_dump(exclude={"enabled"})
    assert build_engine(SiteSpec, mapped, SITE_SPEC_FIXED) == SiteSpec()
    with pytest.raises(TypeError, match=r"neither mapped nor fixed \['jpeg_quality'\]"):
        build_engine(SiteSpec, mapped, {k: v for k, v in SITE_SPEC_FIXED.items() if k != "jpeg_quality"})
    with pytest.raises(TypeError, match=r"mapped and fixed \['seed'\]"):
        build_engine(SiteSpec, mapped, {**SITE_SPEC_FIXED, "seed": 1})


# ------------------------------------------------------------------ spec.json, read strictly by every rank
def _spec(tmp_path):
    from flows.config import TrainConfig

    return TrainConfig().train_spec(shard_dir=tmp_path / "shard", out_dir=tmp_path / "train",
                                    tokenizer=tmp_path / "tokenizer.json")


def test_spec_json_round_trips(tmp_path):
    from flows.train_spec import TrainSpec

    spec = _spec(tmp_path)
    path = tmp_path / "spec.json"
    path.write_text(spec.to_json())
    assert TrainSpec.load(path) == spec


@pytest.mark.parametrize("where", ["top", "engine", "loader"])
@pytest.mark.parametrize("fault", ["unknown", "missing"])
def test_spec_json_with_an_unknown_or_missing_key_fails_with_one_line(tmp_path, where, fault):
    from flows.train_spec import SpecError, TrainSpec

    data = json.loads(_spec(tmp_path).to_json())
    part = data if where == "top" else data[where]
    if fault == "unknown":
        part["learning_rate"] = 0.1  # say, a renamed field
    else:
        del part["seed" if where != "top" else "model"]
    with pytest.raises(SpecError) as err:
        TrainSpec.from_dict(data)
    message = str(err.value)
    assert "\n" not in message and ("unknown key(s) learning_rate" if fault == "unknown" else "missing key(s)") in message


def test_a_rank_given_a_bad_spec_json_stops_with_one_line(tmp_path):
    data = json.loads(_spec(tmp_path).to_json())
    data["engine"]["learning_rate"] = data["engine"].pop("lr")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    out = subprocess.run([sys.executable, "-m", "flows.train_entry", str(path)], capture_output=True, text=True,
                         timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: {path} engine: unknown key(s) learning_rate; missing key(s) lr")


@pytest.mark.parametrize("entry", ["host:99999", "a b", "10.0.0.1:0"])
def test_an_allowed_address_the_guard_would_not_understand_is_refused_at_load(entry):
    with pytest.raises(UserError, match="expected an IP, CIDR or host name, optionally with :port"):
        load_config(None, [f"http.allowed_addresses=[{entry}]"])
    assert load_config(None, ["http.allowed_addresses=[10.0.0.0/8:80, '[::1]:8080', example.com:443]"])
