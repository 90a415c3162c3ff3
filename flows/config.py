"""The one typed configuration of a witclip pipeline run.

Defaults are the embedded demo (`configs/demo.yaml` spells the same values out). Every section forbids
unknown keys, so a typo fails before any work starts instead of being silently ignored; a key that
moved to another section says where it went.

Config maps itself onto the engines: each section that feeds an engine object builds it in one
method (`WebConfig.site_spec`, `HarvestConfig.page_policy`, `CrawlConfig.fetch_policy`,
`TrainConfig.engine_config`) through `build_engine`, which demands that every field of the engine be
either mapped from the config or listed in that builder's `*_FIXED` table, so no engine default ever
fills in silently. Where a section and an engine share a setting, the section's default is the
engine's (one source of defaults).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from clip.train_config import TrainConfig as EngineTrainConfig
from data.common.http import DEFAULT_USER_AGENT, HttpPolicy, parse_allowed_address
from data.common.urls import redact_urls
from data.crawl.fetch import FetchPolicy
from data.dedup.phash import DEFAULT_MAX_DISTANCE
from data.eval.synthetic import SYNTHETIC_BENCHMARKS
from data.synthetic.site import SiteSpec
from flows.config_file import (
    DEFAULT_RUN_NAME,
    DEFAULT_WORK_DIR,
    RUN_NAME_PATTERN,
    read_config_data,
)
from flows.errors import UserError
from flows.tracking import DEFAULT_TRACKING_URI
from flows.train_spec import LoaderSpec, TrainSpec

# Keys that moved: an old config names its key and gets told where it lives now.
MOVED_KEYS = {
    "crawl.user_agent": "http.user_agent",
    "crawl.allowed_addresses": "http.allowed_addresses",
    "crawl.robots_txt": "http.robots_txt",
    "crawl.scheduler_address": "cluster.scheduler_address",
    "crawl.processes": "cluster.processes",
}

Engine = TypeVar("Engine")


def build_engine(cls: type[Engine], mapped: Mapping[str, Any], fixed: Mapping[str, Any]) -> Engine:
    """`cls(**mapped, **fixed)`, refusing unless the two name every field of the dataclass exactly once."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    twice = mapped.keys() & fixed.keys()
    unknown = (mapped.keys() | fixed.keys()) - names
    missing = names - mapped.keys() - fixed.keys()
    if twice or unknown or missing:
        raise TypeError(f"{cls.__name__}: fields mapped and fixed {sorted(twice)}, unknown {sorted(unknown)}, "
                        f"neither mapped nor fixed {sorted(missing)}")
    return cls(**mapped, **fixed)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SITE_SPEC_FIXED: dict[str, Any] = {
    "jpeg_quality": SiteSpec.jpeg_quality,
    "fault_kinds": SiteSpec.fault_kinds,  # the demo's faults; crawler tests switch on the hostile ones
    "drip_interval": SiteSpec.drip_interval,
    "drip_max_seconds": SiteSpec.drip_max_seconds,
    "throttle_times": SiteSpec.throttle_times,
    "retry_after_seconds": SiteSpec.retry_after_seconds,
    "hop_delay_seconds": SiteSpec.hop_delay_seconds,
}


class WebConfig(Section):
    """The embedded synthetic web (no internet needed): served on 127.0.0.1 while harvest/crawl run."""

    enabled: bool = True
    seed: int = SiteSpec.seed
    n_pages: int = Field(SiteSpec.n_pages, ge=1)
    images_per_page: int = Field(SiteSpec.images_per_page, ge=1)
    links_per_page: int = Field(SiteSpec.links_per_page, ge=1)
    image_size: int = Field(SiteSpec.image_size, ge=16, le=1024)
    noisy_alt_rate: float = Field(SiteSpec.noisy_alt_rate, ge=0, le=1)
    exact_duplicate_rate: float = Field(SiteSpec.exact_duplicate_rate, ge=0, le=1)
    near_duplicate_rate: float = Field(SiteSpec.near_duplicate_rate, ge=0, le=1)
    fault_rate: float = Field(SiteSpec.fault_rate, ge=0, le=1)
    slow_seconds: float = Field(SiteSpec.slow_seconds, ge=0)

    def site_spec(self) -> SiteSpec:
        """The synthetic site this section describes."""
        mapped = self.model_dump(exclude={"enabled"})
        return build_engine(SiteSpec, mapped, SITE_SPEC_FIXED)



def embedded_web_allowance(netloc: str | None) -> tuple[str, ...]:
    """What the address guard must let through for the embedded web: exactly its `host:port` while a
    run serves it (`netloc`), nothing otherwise. Never all of loopback: a URL list naming
    127.0.0.1:5000 must not reach the MLflow server on the same machine."""
    return (netloc,) if netloc else ()


class HttpConfig(Section):
    """Every request witclip sends while harvesting and crawling (data.common.http)."""

    user_agent: str = DEFAULT_USER_AGENT  # robots.txt rules are matched against it
    # Safety: private, loopback, link-local, CGNAT and cloud-metadata addresses are refused unless
    # listed here (IPs, CIDRs, host names, or any of them with :port for that port only). The embedded web's
    # exact 127.0.0.1:<port> is added while a run serves it.
    allowed_addresses: list[str] = Field(default_factory=list)
    robots_txt: bool = True  # obey robots.txt (harvest pages and crawled images)

    @field_validator("allowed_addresses")
    @classmethod
    def _addresses(cls, v: list[str]) -> list[str]:
        for entry in v:  # the guard's own parser: what passes here is what the guard understands
            try:
                parse_allowed_address(entry)
            except ValueError:
                raise ValueError(f"expected an IP, CIDR or host name, optionally with :port, got {entry!r}") from None
        return v


class ClusterConfig(Section):
    """Where Dask work runs (crawl and dedup): a running scheduler, or a LocalCluster on this machine."""

    scheduler_address: str | None = None  # e.g. tcp://127.0.0.1:8786; None: a LocalCluster
    processes: int = Field(2, ge=1)  # worker processes of the LocalCluster


PAGE_POLICY_FIXED: dict[str, Any] = {
    "connect_timeout": None,  # = harvest.timeout
    "guard": True,
    "use_env_proxies": False,
    "max_redirects": HttpPolicy.max_redirects,
}


class HarvestConfig(Section):
    # web: a bounded crawl of HTML pages from seed_url; urls: URL lists; warc: Common Crawl style WARC files
    source: Literal["web", "urls", "warc"] = "web"
    seed_url: str | None = None  # None: start from the embedded synthetic web's index page
    max_pages: int = Field(1000, ge=1)
    max_depth: int = Field(50, ge=0)
    allowed_hosts: list[str] = Field(default_factory=list)  # empty: the seed URL's host only
    timeout: float = Field(HttpPolicy.timeout, gt=0)  # per blocking socket operation of a page request
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

    def page_policy(self, http: HttpConfig, embedded_web: str | None) -> HttpPolicy:
        """How harvest requests pages (and their robots.txt); `embedded_web` is the `host:port` of the
        embedded web when this run serves it (`embedded_web_allowance`)."""
        mapped = {"timeout": self.timeout, "user_agent": http.user_agent,
                  "allowed_addresses": (*http.allowed_addresses, *embedded_web_allowance(embedded_web))}
        return build_engine(HttpPolicy, mapped, PAGE_POLICY_FIXED)


FETCH_POLICY_FIXED: dict[str, Any] = {
    "max_redirects": FetchPolicy.max_redirects,
    "x_robots_agent": FetchPolicy.x_robots_agent,
    "throttle_retries": FetchPolicy.throttle_retries,
    "backoff_base": FetchPolicy.backoff_base,
}


class CrawlConfig(Section):
    image_size: int = Field(64, ge=16, le=4096)
    resize_mode: Literal["center_crop", "border", "keep_ratio", "no"] = "center_crop"
    shard_size: int = Field(1000, ge=1)
    threads: int = Field(16, ge=1)  # download threads inside each img2dataset shard
    timeout: float = Field(FetchPolicy.timeout, gt=0)  # per blocking socket operation
    deadline: float | None = Field(FetchPolicy.deadline, gt=0)  # whole request incl. a trickling body; None: 4 x timeout
    retries: int = Field(0, ge=0)
    # below this share of URLs downloaded the crawl is rejected, not cached (an outage, a blocked crawler);
    # old URL lists lose links to rot: LAION-era lists still download at about half
    min_success_rate: float = Field(0.25, ge=0, le=1)
    max_image_bytes: int = Field(FetchPolicy.max_bytes, ge=1024)
    max_image_pixels: int = Field(FetchPolicy.max_pixels, ge=1)  # read from the header: decompression bombs
    # Politeness, for the whole cluster (divided among worker processes).
    max_connections_per_host: int = Field(FetchPolicy.max_connections_per_host, ge=1)
    max_requests_per_second_per_host: float = Field(FetchPolicy.max_requests_per_second_per_host, ge=0)  # 0: unlimited
    max_retry_after: float = Field(FetchPolicy.max_retry_after, ge=0)  # 429/503 Retry-After longer than this: give up
    x_robots_directives: list[str] = Field(default_factory=lambda: list(FetchPolicy.x_robots_directives))

    def fetch_policy(self, http: HttpConfig, embedded_web: str | None) -> FetchPolicy:
        """How the crawl fetches each image; `embedded_web` as for `HarvestConfig.page_policy`."""
        mapped = {
            "timeout": self.timeout, "deadline": self.deadline, "max_bytes": self.max_image_bytes,
            "max_pixels": self.max_image_pixels, "user_agent": http.user_agent, "robots_txt": http.robots_txt,
            "allowed_addresses": (*http.allowed_addresses, *embedded_web_allowance(embedded_web)),
            "x_robots_directives": tuple(self.x_robots_directives),
            "max_connections_per_host": self.max_connections_per_host,
            "max_requests_per_second_per_host": self.max_requests_per_second_per_host,
            "max_retry_after": self.max_retry_after,
        }  # fmt: skip
        return build_engine(FetchPolicy, mapped, FETCH_POLICY_FIXED)


class DedupConfig(Section):
    """Exact duplicates (normalised URL, image sha256) are always dropped."""

    near_duplicates: bool = True  # perceptual-hash clusters keep one image each
    max_distance: int = Field(DEFAULT_MAX_DISTANCE, ge=0, le=32)  # Hamming bits of the 64-bit hash
    decontaminate: bool = True  # drop training images within max_distance of an eval benchmark image


class ShardConfig(Section):
    val_fraction: float = Field(0.05, ge=0, lt=1)
    samples_per_shard: int = Field(1000, ge=1)
    seed: int = 0


TRAIN_ENGINE_FIXED: dict[str, Any] = {
    "betas": EngineTrainConfig.betas,  # the paper's AdamW betas and eps
    "eps": EngineTrainConfig.eps,
}


class TrainConfig(Section):
    """The train stage: the model, how torchrun launches it, the loader, and the engine's settings
    (`engine_config`)."""

    model: str = "tiny"
    nproc: int = Field(1, ge=1)  # torchrun processes (DDP ranks) per node
    nnodes: int = Field(1, ge=1)  # >1: every node runs the same torchrun command (printed by the train stage)
    node_rank: int = Field(0, ge=0)  # this machine's node; only node 0 runs the pipeline around training
    rdzv_endpoint: str | None = None  # host:port of torchrun's c10d rendezvous; needed when nnodes > 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    vocab_size: int = Field(1024, ge=300, le=100_000)  # BPE tokenizer trained on the crawled captions
    context_length: int = Field(24, ge=8, le=77)
    epochs: int = Field(EngineTrainConfig.epochs, ge=1)
    batch_size: int = Field(EngineTrainConfig.batch_size, ge=2)  # per rank and micro-batch; global = batch_size x ranks x grad_accum
    lr: float = Field(EngineTrainConfig.lr, gt=0)
    weight_decay: float = Field(EngineTrainConfig.weight_decay, ge=0)
    warmup_steps: int = Field(EngineTrainConfig.warmup_steps, ge=0)
    grad_accum: int = Field(EngineTrainConfig.grad_accum, ge=1)  # exact for the contrastive loss (features cached, then recomputed)
    # auto: bf16 autocast where the device multiplies bf16 natively (CUDA with bf16; a CPU with AMX or
    # AVX512-BF16 where a start-up matmul probe finds bf16 faster), else fp32 (clip/precision.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = EngineTrainConfig.precision
    grad_checkpointing: bool = EngineTrainConfig.grad_checkpointing
    compile: bool = EngineTrainConfig.compile  # torch.compile (needs a C++ compiler on CPU)
    grad_clip: float = Field(EngineTrainConfig.grad_clip, ge=0)  # max global gradient norm; 0: no clipping
    max_bad_steps: int = Field(EngineTrainConfig.max_bad_steps, ge=1)  # non-finite steps in a row before training stops
    deterministic: bool = EngineTrainConfig.deterministic
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
    shuffle_buffer: int = Field(1000, ge=0)  # samples per loader reader; <=1: no sample shuffle
    partition: Literal["auto", "shards", "samples"] = "auto"  # how ranks split the shards
    checkpoint_every: int = Field(EngineTrainConfig.checkpoint_every, ge=0)  # steps; 0: only at epoch ends
    keep_checkpoints: int = Field(EngineTrainConfig.keep_checkpoints, ge=1)
    log_every: int = Field(EngineTrainConfig.log_every, ge=1)
    eval_every: int = Field(EngineTrainConfig.eval_every, ge=0)  # steps between held-out zero-shot checks; 0: off
    system_metrics_interval: float = Field(10.0, ge=0)  # seconds between MLflow system metrics; 0: off
    progress: bool = EngineTrainConfig.progress
    num_workers: int = Field(0, ge=0)  # DataLoader workers of the training loader
    seed: int = EngineTrainConfig.seed

    def engine_config(self) -> EngineTrainConfig:
        """The training engine's settings (`clip.train.TrainConfig`)."""
        names = {f.name for f in dataclasses.fields(EngineTrainConfig)} - TRAIN_ENGINE_FIXED.keys()
        return build_engine(EngineTrainConfig, {name: getattr(self, name) for name in names}, TRAIN_ENGINE_FIXED)

    def train_spec(self, *, shard_dir: Path, out_dir: Path, tokenizer: Path, mlflow: dict[str, str] | None = None,
                   zeroshot: dict[str, Any] | None = None) -> TrainSpec:
        """What every torchrun rank reads from spec.json (`flows.train_spec`)."""
        loader = LoaderSpec(batch_size=self.batch_size, seed=self.seed, num_workers=self.num_workers,
                            shuffle_buffer=self.shuffle_buffer, partition=self.partition, crop_scale=self.crop_scale)
        return TrainSpec(shard_dir=str(Path(shard_dir).resolve()), out_dir=str(Path(out_dir).resolve()),
                         tokenizer=str(Path(tokenizer).resolve()), model=self.model,
                         context_length=self.context_length, device=self.device, nnodes=self.nnodes,
                         system_metrics_interval=self.system_metrics_interval, loader=loader,
                         engine=self.engine_config(), mlflow=mlflow, zeroshot=zeroshot)

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
    benchmarks: list[str] = Field(default_factory=lambda: list(SYNTHETIC_BENCHMARKS), min_length=1)
    data_roots: list[str] = Field(default_factory=list)  # where benchmark data lies (wds, ImageFolder, torchvision)
    samples_per_class: int = Field(100, ge=1)  # synthetic benchmarks
    seed: int = 1234  # held-out: synthetic benchmarks are generated, never served by the web
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)  # DataLoader workers decoding benchmark images
    # the image and text towers under bf16 autocast or not; features, logits and metrics are fp32 either
    # way. auto: as train.precision decides it (clip/precision.py)
    precision: Literal["auto", "fp32", "bf16"] = "auto"

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
    tracking_uri: str = DEFAULT_TRACKING_URI  # MLflow's own default; a `mlflow server` URL works too
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
    run_name: str = Field(DEFAULT_RUN_NAME, pattern=RUN_NAME_PATTERN)
    work_dir: Path = Path(DEFAULT_WORK_DIR)
    web: WebConfig = Field(default_factory=WebConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
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
        if key in MOVED_KEYS:
            return f"config key '{key}' moved to '{MOVED_KEYS[key]}'"
        return f"unknown config key '{key}'"
    got = first.get("input")
    if isinstance(got, str):  # never echo credentials or tokens someone put into a URL
        got = redact_urls(got)
    if isinstance(got, dict):  # a check across a section's keys: its message names them itself
        return f"config section '{key}' is invalid: {first['msg'].removeprefix('Value error, ')}"
    return f"config value {key}={got!r} is invalid: {first['msg'].removeprefix('Value error, ')}"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read YAML (or the embedded default when path is None), apply --set overrides, validate."""
    data = read_config_data(path, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(_format_validation_error(e)) from None


# Every engine object the config builds, with its table of fixed fields: tests/test_config.py checks that
# each field of each engine is mapped from the config or fixed, never left to the engine's default.
ENGINE_BUILDERS: dict[str, tuple[Callable[[PipelineConfig], Any], Mapping[str, Any]]] = {
    "SiteSpec": (lambda c: c.web.site_spec(), SITE_SPEC_FIXED),
    "HttpPolicy (harvest pages)": (lambda c: c.harvest.page_policy(c.http, None), PAGE_POLICY_FIXED),
    "FetchPolicy (crawl)": (lambda c: c.crawl.fetch_policy(c.http, None), FETCH_POLICY_FIXED),
    "clip.train.TrainConfig": (lambda c: c.train.engine_config(), TRAIN_ENGINE_FIXED),
}
