"""crawl: img2dataset on Dask downloads the candidates through the guarded, polite fetcher."""

from __future__ import annotations

from typing import Any

from flows.stages.spec import ConfigView, StageContext, StageSpec


def run(ctx: StageContext) -> dict[str, Any]:
    from prefect.artifacts import create_table_artifact

    from data.crawl import crawl
    from data.harvest import CANDIDATES_FILE

    c = ctx.cfg.crawl
    counts = crawl(
        ctx.input_dir("harvest") / CANDIDATES_FILE, ctx.out_dir,
        image_size=c.image_size, resize_mode=c.resize_mode, shard_size=c.shard_size, threads=c.threads,
        retries=c.retries, processes=ctx.cfg.cluster.processes, scheduler_address=ctx.cfg.cluster.scheduler_address,
        policy=c.fetch_policy(ctx.cfg.http, ctx.embedded_web),
    )  # fmt: skip
    create_table_artifact(
        key="crawl-status",
        table=[{"reason": reason, "urls": n} for reason, n in counts.get("reasons", {}).items()],
        description=f"{counts.get('urls', 0)} candidate URLs, one status each (crawl/status.parquet)",
    )
    return counts


def accept(cfg: ConfigView, counts: dict[str, Any]) -> str | None:
    """An outage or a blocked crawler downloads (almost) nothing: not an output to cache."""
    urls, ok = counts.get("urls", 0), counts.get("successes", 0)
    floor = cfg.crawl.min_success_rate
    if urls and ok / urls >= floor:
        return None
    failures = [(r, n) for r, n in counts.get("reasons", {}).items() if r != "success"][:3]
    top = ", ".join(f"{r} {n}" for r, n in failures) or "none recorded"
    return (f"{ok} of {urls} URLs downloaded ({ok / max(urls, 1):.1%}), below crawl.min_success_rate "
            f"{floor:.0%}; top failure reasons: {top}")


SPEC = StageSpec(
    name="crawl",
    upstream=("harvest",),
    reads=lambda cfg: ("crawl", "http", "web.enabled", "cluster"),
    # where the work runs does not change what it downloads; the floor only judges the result
    runtime=("cluster", "crawl.min_success_rate"),
    run=run,
    accept=accept,
    engines=("img2dataset", "pillow", "opencv-python-headless", "albumentations", "pyarrow", "pandas"),
    figures=("urls", "successes", "failed_to_download", "failed_to_resize"),
    uses_embedded_web=True,
)
