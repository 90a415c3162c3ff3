"""Each stage's key follows exactly the config it reads: changing any config field changes the keys of the
stages that read it (as their specs in flows/stages/ declare, enforced by ConfigView) and of every stage
below them, and no other key. Where a stage runs, and how it reports, never changes a key."""

from __future__ import annotations

import pytest

from flows.config import PipelineConfig, load_config
from flows.pipeline import stage_key
from flows.stages import STAGE_NAMES, STAGES, UndeclaredRead, downstream, get_stage
from flows.stages.spec import covers


def _keys(cfg: PipelineConfig) -> dict[str, str]:
    return {name: stage_key(cfg, name) for name in STAGE_NAMES}


def _readers(cfg: PipelineConfig, path: str) -> set[str]:
    """Stages whose key covers `path`: declared, and not one of their runtime paths."""
    return {spec.name for spec in STAGES
            if covers(spec.declared(cfg), path) and not covers(frozenset(spec.runtime), path)}


def test_each_config_field_changes_the_keys_of_its_readers_and_their_downstream_only(tmp_path):
    from support.config_walk import changed_configs

    reached: dict[str, set[str]] = {}
    for path, before, after in changed_configs(tmp_path):
        old, new = _keys(before), _keys(after)
        changed = {name for name in STAGE_NAMES if old[name] != new[name]}
        readers = _readers(before, path) | _readers(after, path)
        expected = readers | {d for r in readers for d in downstream(r)}
        assert changed == expected, (path, sorted(changed), sorted(expected))
        reached[path] = changed
    # the drift this replaced: harvest sends the user agent (robots.txt matches it), so it re-harvests
    assert reached["http.user_agent"] == set(STAGE_NAMES)
    assert reached["crawl.threads"] == {"crawl", "dedup", "shard", "train", "eval", "register"}
    # dedup decontaminates against the benchmarks generated from it (train reads it only to report)
    assert reached["eval.seed"] == {"dedup", "shard", "train", "eval", "register"}
    assert reached["mlflow.promotion_margin"] == {"register"}
    # where work runs, what it is called, and how it reports change nothing
    for path in ("cluster.processes", "cluster.scheduler_address", "run_name", "work_dir", "train.num_workers",
                 "train.log_every", "train.progress", "train.node_rank", "eval.batch_size", "eval.num_workers"):
        assert reached[path] == set(), path


def test_adding_a_downloaded_benchmark_reruns_eval_not_dedup(tmp_path):
    here = f"work_dir={tmp_path / 'runs'}"
    base = load_config(None, [here, "eval.benchmarks=[colour,shape,count]"])
    more = load_config(None, [here, "eval.benchmarks=[colour,shape,count,cifar10]", f"eval.data_roots=[{tmp_path}]"])
    old, new = _keys(base), _keys(more)
    assert {n for n in STAGE_NAMES if old[n] != new[n]} == {"eval", "register"}


def test_eval_key_changes_when_benchmark_data_arrives(tmp_path):
    """A nightly re-evaluation must not reuse yesterday's eval once new benchmark data is there."""
    from data.eval.registry import get_task

    cfg = load_config(None, [f"work_dir={tmp_path / 'runs'}", "eval.benchmarks=[colour,cifar10]",
                             f"eval.data_roots=[{tmp_path}]"])
    eval_spec = get_stage("eval")
    assert eval_spec.config_slice(cfg)["benchmark_data"] == {"cifar10": None}
    before = stage_key(cfg, "eval")
    split = tmp_path / get_task("cifar10").wds_dirs[0] / "test"
    split.mkdir(parents=True)
    (split / "0.tar").write_bytes(b"x" * 10)
    data = eval_spec.config_slice(cfg)["benchmark_data"]["cifar10"]
    assert data["files"] == 1 and data["bytes"] == 10 and stage_key(cfg, "eval") != before
    (split / "1.tar").write_bytes(b"y" * 5)
    assert eval_spec.config_slice(cfg)["benchmark_data"]["cifar10"]["bytes"] == 15


def test_a_stage_sees_only_what_its_spec_declares():
    cfg = PipelineConfig()
    crawl = get_stage("crawl").view(cfg)
    assert crawl.crawl.threads == 16 and crawl.web.enabled is True and crawl.http.user_agent
    with pytest.raises(UndeclaredRead, match="stage 'crawl' read config 'web.n_pages'"):
        _ = crawl.web.n_pages
    with pytest.raises(UndeclaredRead, match="stage 'crawl' read config 'train'"):
        _ = crawl.train
    with pytest.raises(AttributeError):
        crawl.crawl = None  # the stage may not change the config
    shard = get_stage("shard").view(cfg)
    with pytest.raises(UndeclaredRead, match="'work_dir'"):
        _ = shard.work_dir


def test_every_spec_is_consistent():
    cfg = PipelineConfig()
    seen: set[str] = set()
    for spec in STAGES:
        declared = spec.declared(cfg)
        assert all(covers(declared, path) for path in spec.runtime), spec.name
        assert set(spec.key_values) <= declared, spec.name
        assert set(spec.upstream) <= seen, f"{spec.name}: upstream stages come first"
        seen.add(spec.name)
    assert downstream("crawl") == {"dedup", "shard", "train", "eval", "register"}
