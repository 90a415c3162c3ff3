"""The one typed configuration of a witclip pipeline run.

Defaults are the embedded demo (`configs/demo.yaml` spells the same values out). Every section forbids
unknown keys, so a typo fails before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from data.crawl.fetch import DEFAULT_USER_AGENT, DEFAULT_X_ROBOTS_DIRECTIVES
from data.dedup.phash import DEFAULT_MAX_DISTANCE
from flows.errors import UserError

STAGES: tuple[str, ...] = ("harvest", "crawl", "dedup", "shard", "train", "eval", "register")
SYNTHETIC_BENCHMARK_NAMES = ("colour", "shape", "count")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class WebConfig(Section):
    """The embedded synthetic web (no internet needed): served on 127.0.0.1 while harvest/crawl run."""

    enabled: bool = True
    seed: int = 0
    n_pages: int = Field(450, ge=1)
    images_per_page: int = Field(16, ge=1)
    links_per_page: int = Field(4, ge=1)
    image_size: int = Field(64, ge=16, le=1024)
    noisy_alt_rate: float = Field(0.08, ge=0, le=1)
    exact_duplicate_rate: float = Field(0.04, ge=0, le=1)
    near_duplicate_rate: float = Field(0.04, ge=0, le=1)
    fault_rate: float = Field(0.05, ge=0, le=1)
    slow_seconds: float = Field(3.0, ge=0)


class HarvestConfig(Section):
    # web: a bounded crawl of HTML pages from seed_url; urls: URL lists; warc: Common Crawl style WARC files
    source: Literal["web", "urls", "warc"] = "web"
    seed_url: str | None = None  # None: start from the embedded synthetic web's index page
    max_pages: int = Field(1000, ge=1)
    max_depth: int = Field(50, ge=0)
    allowed_hosts: list[str] = Field(default_factory=list)  # empty: the seed URL's host only
    timeout: float = Field(10.0, gt=0)
    urls: list[str] = Field(default_factory=list)  # source=urls: files or directories
    url_col: str = "url"
    caption_col: str = "caption"
    file_format: Literal["parquet", "csv", "tsv", "jsonl"] | None = None  # None: from the extension
    warc: list[str] = Field(default_factory=list)  # source=warc: .warc / .warc.gz files
    queries: str | None = None  # WIT-style balancing: a file with one query per line
    query_cap: int = Field(20_000, ge=1)  # pairs kept per query (the paper's figure)

    @model_validator(mode="after")
    def _source_inputs(self) -> "HarvestConfig":
        if self.source == "urls" and not self.urls:
            raise ValueError("harvest.source is 'urls' but harvest.urls is empty; expected URL list paths")
        if self.source == "warc" and not self.warc:
            raise ValueError("harvest.source is 'warc' but harvest.warc is empty; expected WARC file paths")
        return self

    @field_validator("seed_url")
    @classmethod
    def _http_only(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s):// URL, got {v!r}")
        return v


class CrawlConfig(Section):
    image_size: int = Field(64, ge=16, le=4096)
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    shard_size: int = Field(1000, ge=1)
    processes: int = Field(2, ge=1)  # Dask worker processes on the LocalCluster
    threads: int = Field(16, ge=1)  # download threads inside each img2dataset shard
    timeout: float = Field(2.0, gt=0)  # per blocking socket operation
    deadline: float | None = Field(None, gt=0)  # whole request incl. a trickling body; None: 4 x timeout
    retries: int = Field(0, ge=0)
    scheduler_address: str | None = None  # e.g. tcp://127.0.0.1:8786; None: a LocalCluster
    # Safety: private, loopback, link-local, CGNAT and cloud-metadata addresses are refused unless
    # listed here (IPs, CIDRs or host names). The embedded web's 127.0.0.1 is added automatically.
    allowed_addresses: list[str] = Field(default_factory=list)
    max_image_bytes: int = Field(32 << 20, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)  # read from the header: decompression bombs
    # Politeness, for the whole cluster (divided among worker processes).
    robots_txt: bool = True
    max_connections_per_host: int = Field(16, ge=1)
    max_requests_per_second_per_host: float = Field(0.0, ge=0)  # 0: unlimited
    max_retry_after: float = Field(30.0, ge=0)  # 429/503 Retry-After longer than this: give up
    user_agent: str = DEFAULT_USER_AGENT
    x_robots_directives: list[str] = Field(default_factory=lambda: list(DEFAULT_X_ROBOTS_DIRECTIVES))

    @field_validator("allowed_addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        import ipaddress

        for entry in v:
            if "/" in entry:
                try:
                    ipaddress.ip_network(entry, strict=False)
                except ValueError:
                    raise ValueError(f"expected an IP, CIDR or host name, got {entry!r}") from None
        return v


class DedupConfig(Section):
    """Exact duplicates (normalised URL, image sha256) are always dropped."""

    near_duplicates: bool = True  # perceptual-hash clusters keep one image each
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=32)  # Hamming bits of the 64-bit hash
    decontaminate: bool = True  # drop training images within max_distance of an eval benchmark image


class ShardConfig(Section):
    val_fraction: float = Field(0.05, ge=0, lt=1)
    samples_per_shard: int = Field(1000, ge=1)
    seed: int = 0


class TrainConfig(Section):
    model: str = "tiny"
    nproc: int = Field(1, ge=1)  # torchrun processes (DDP ranks) per node
    nnodes: int = Field(1, ge=1)  # >1: every node runs the same torchrun command (printed by the train stage)
    node_rank: int = Field(0, ge=0)  # this machine's node; only node 0 runs the pipeline around training
    rdzv_endpoint: str | None = None  # host:port of torchrun's c10d rendezvous; needed when nnodes > 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vocab_size: int = Field(1024, ge=300, le=100_000)  # BPE tokenizer trained on the crawled captions
    context_length: int = Field(24, ge=8, le=77)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=2)  # per rank and micro-batch; global = batch_size x ranks x grad_accum
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_accum: int = Field(1, ge=1)  # exact for the contrastive loss (features cached, then recomputed)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile (needs a C++ compiler on CPU)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0: no clipping
    max_bad_steps: int = Field(20, ge=1)  # non-finite steps in a row before training stops
    deterministic: bool = False
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
    shuffle_buffer: int = Field(1000, ge=0)  # samples per loader reader; <=1: no sample shuffle
    partition: Literal["auto", "shards", "samples"] = "auto"  # how ranks split the shards
    checkpoint_every: int = Field(200, ge=0)  # steps; 0: only at epoch ends
    keep_checkpoints: int = Field(3, ge=1)
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=0)  # steps between held-out zero-shot checks; 0: off
    system_metrics_interval: float = Field(10.0, ge=0)  # seconds between MLflow system metrics; 0: off
    progress: bool = True
    num_workers: int = Field(0, ge=0)
    seed: int = 0

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 1:
            raise ValueError(f"expected 0 < min <= max <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _nodes(self) -> "TrainConfig":
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("nnodes > 1 needs rdzv_endpoint (host:port of the rendezvous)")
        if self.node_rank >= self.nnodes:
            raise ValueError(f"node_rank {self.node_rank} must be < nnodes {self.nnodes}")
        return self


class EvalConfig(Section):
    # task names from the registry (`witclip benchmarks` lists them); the synthetic ones are generated
    benchmarks: list[str] = Field(default_factory=lambda: list(SYNTHETIC_BENCHMARK_NAMES), min_length=1)
    data_roots: list[str] = Field(default_factory=list)  # where benchmark data lies (wds, ImageFolder, torchvision)
    samples_per_class: int = Field(100, ge=1)  # synthetic benchmarks
    seed: int = 1234  # held-out: synthetic benchmarks are generated, never served by the web
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)  # DataLoader workers decoding benchmark images

    @field_validator("benchmarks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        from data.eval.registry import load_tasks, suggest_task_names

        known = load_tasks()
        for name in v:
            if name not in known:
                close = suggest_task_names(name, known)
                hint = f"did you mean {', '.join(close)}?" if close else "`witclip benchmarks` lists them"
                raise ValueError(f"unknown benchmark task {name!r} ({hint})")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate task names in {v}")
        return v


class MlflowConfig(Section):
    tracking_uri: str = "sqlite:///mlflow.db"  # MLflow's own default; a `mlflow server` URL works too
    experiment: str = "witclip"
    model_name: str = "witclip"
    alias: str = "champion"  # moves only when the eval gate passes
    candidate_alias: str = "candidate"  # every newly registered version
    promotion_margin: float = Field(0.005, ge=0, le=1)  # mean over common tasks must beat the champion's by this

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, v: str) -> str:
        # the URI is logged as a param and printed; credentials belong in the environment
        if "://" in v and "@" in v.split("://", 1)[1].split("/", 1)[0]:
            raise ValueError("expected no user:password@ in the URL; set MLFLOW_TRACKING_USERNAME and "
                             "MLFLOW_TRACKING_PASSWORD in the environment instead")
        return v


class PipelineConfig(Section):
    run_name: str = Field("demo", pattern=r"^[A-Za-z0-9_.-]+$")
    work_dir: Path = Path("runs")
    web: WebConfig = Field(default_factory=WebConfig)
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig)

    @property
    def run_dir(self) -> Path:
        return self.work_dir / self.run_name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage


def _format_validation_error(err: ValidationError) -> str:
    """One line naming the first offending key and what was expected."""
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    got = first.get("input")
    if isinstance(got, str):  # never echo credentials someone put into a URL
        got = re.sub(r"://[^/@]*@", "://***@", got)
    if isinstance(got, dict):  # a check across a section's keys: its message names them itself
        return f"config section '{key}' is invalid: {first['msg'].removeprefix('Value error, ')}"
    return f"config value {key}={got!r} is invalid: {first['msg'].removeprefix('Value error, ')}"


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {item!r}: expected section.key=value")
    # YAML parsing gives ints, floats, bools, lists ([a, b]) and null the obvious way.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (or the embedded default when path is None), apply --set overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist (expected a YAML file)")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise UserError(f"--set {item!r}: '{k}' is not a section")
            node = nxt
        node[keys[-1]] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_validation_error(e)) from None


def stage_config(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The config slice whose values change a stage's output (part of the stage's hash)."""
    dump = cfg.model_dump(mode="json")
    slices: dict[str, list[str]] = {
        "harvest": ["web", "harvest"],
        "crawl": ["crawl"],
        "dedup": ["dedup"],
        "shard": ["shard"],
        "train": ["train"],
        "eval": ["eval"],
        "register": ["mlflow"],
    }
    out = {name: dump[name] for name in slices[stage]}
    if stage == "harvest":
        h = cfg.harvest
        if h.source != "web":  # the synthetic web's settings don't change a URL-list or WARC harvest
            out.pop("web")
        # input files by content, so an edited URL list or query file is harvested again
        files = {"urls": h.urls if h.source == "urls" else [], "warc": h.warc if h.source == "warc" else [],
                 "queries": [h.queries] if h.queries else []}
        out["input_files"] = {kind: [_content_hash(f) for f in paths] for kind, paths in files.items() if paths}
    if stage == "crawl":
        # where work runs does not change what it produces
        out["crawl"] = {k: v for k, v in out["crawl"].items() if k not in ("scheduler_address", "processes")}
    if stage == "dedup" and cfg.dedup.decontaminate:
        # the benchmarks decontaminated against (the generated ones) are part of what decides the output;
        # adding a downloaded benchmark to eval.benchmarks re-runs eval, not dedup and what follows
        out["eval"] = {k: dump["eval"][k] for k in ("benchmarks", "samples_per_class", "seed")}
        out["eval"]["benchmarks"] = [b for b in cfg.eval.benchmarks if b in SYNTHETIC_BENCHMARK_NAMES]
        out["image_size"] = cfg.web.image_size
    if stage == "eval":
        # benchmark data fetched or converted after the last eval counts as a change (a cheap fingerprint:
        # where each task's data lies, its file count, size and newest mtime -- not its bytes)
        out["data"] = _benchmark_data_fingerprint(cfg)
    if stage == "train":
        # where training runs and what it reports do not change the weights (the rank count does)
        out["train"] = {k: v for k, v in out["train"].items() if k not in (
            "num_workers", "log_every", "node_rank", "rdzv_endpoint", "progress",
            "system_metrics_interval", "eval_every", "keep_checkpoints", "checkpoint_every")}
    return out


def _benchmark_data_fingerprint(cfg: PipelineConfig) -> dict[str, Any]:
    from data.eval.registry import locate

    roots = [Path(r) for r in cfg.eval.data_roots]
    found: dict[str, Any] = {}
    for name in cfg.eval.benchmarks:
        if name in SYNTHETIC_BENCHMARK_NAMES or not roots:
            continue  # generated from eval.seed, already in the key
        loc = locate(name, roots)
        if loc is None:
            found[name] = None
            continue
        files = [loc.path] if loc.path.is_file() else [f for f in loc.path.rglob("*") if f.is_file()]
        stats = [f.stat() for f in files]
        found[name] = {"path": str(loc.path.resolve()), "kind": loc.kind, "files": len(stats),
                       "bytes": sum(st.st_size for st in stats), "newest": max((st.st_mtime_ns for st in stats), default=0)}
    return found


def _content_hash(path: str) -> str:
    """sha256 of a file, or of a directory's files (names and contents, sorted); '' if missing."""
    from data.common.files import sha256_file
    from data.common.manifest import stable_hash

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        return stable_hash({str(f.relative_to(p)): sha256_file(f) for f in sorted(p.rglob("*")) if f.is_file()})
    return ""
