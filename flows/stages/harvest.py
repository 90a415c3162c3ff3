"""harvest: the pages of a site (the embedded web by default), URL lists or WARC files -> candidates.parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.errors import UserError
from flows.stages.spec import ConfigView, StageContext, StageSpec


def reads(cfg) -> tuple[str, ...]:
    # URL lists and WARC files are read from disk: no requests, so neither the web nor http settings count
    return ("harvest", "http", "web") if cfg.harvest.source == "web" else ("harvest",)


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


def input_files(cfg: ConfigView) -> dict[str, Any]:
    """The input files by content, so an edited URL list, WARC or query file is harvested again."""
    h = cfg.harvest
    files = {"urls": h.urls if h.source == "urls" else [], "warc": h.warc if h.source == "warc" else [],
             "queries": [h.queries] if h.queries else []}
    return {"input_files": {kind: [_content_hash(f) for f in paths] for kind, paths in files.items() if paths}}


def preflight(cfg: ConfigView, complete: bool) -> None:
    """Missing inputs, wrong columns and an unreachable seed, in one line each, before any work."""
    h = cfg.harvest
    if h.source != "web":
        for key, paths in (("harvest.urls", h.urls if h.source == "urls" else []),
                           ("harvest.warc", h.warc if h.source == "warc" else [])):
            for path in paths:
                if not Path(path).exists():
                    raise UserError(f"{key}: {path} does not exist; expected a file or directory to harvest from")
    if h.source == "urls":
        from data.harvest import check_url_lists

        try:  # headers only: a wrong column name fails here, not after minutes of reading
            check_url_lists(h.urls, url_col=h.url_col, caption_col=h.caption_col, file_format=h.file_format)
        except (FileNotFoundError, ValueError) as err:
            raise UserError(f"harvest.urls: {err}") from None
    if h.queries is not None and not Path(h.queries).is_file():
        raise UserError(f"harvest.queries: {h.queries} does not exist; expected a file with one query per line")
    if h.source == "web" and h.seed_url is None and not cfg.web.enabled:
        raise UserError("harvest.seed_url is not set; expected an http(s) URL to crawl from "
                        "(or web.enabled: true for the embedded synthetic web)")
    if h.source == "web" and h.seed_url is not None and not complete:
        from data.common.http import HttpError
        from data.harvest.pages import check_seed, seed_error

        try:  # the same request harvest will make: same guard, user agent and redirects
            check_seed(h.seed_url, h.page_policy(cfg.http, None))  # a seed of the user's: no embedded web
        except HttpError as err:
            message = str(seed_error(h.seed_url, err)).replace("seed URL", "harvest.seed_url", 1)
            hint = "" if err.reason == "private_address" else "; expected a reachable http(s) URL"
            raise UserError(message + hint) from None


def run(ctx: StageContext) -> dict[str, Any]:
    from data.harvest import harvest_site, harvest_url_list, harvest_warc, load_queries

    h = ctx.cfg.harvest
    out = ctx.out_dir
    balance = {"queries": load_queries(h.queries) if h.queries else None, "query_cap": h.query_cap}
    if h.source == "urls":
        return harvest_url_list(h.urls, out, url_col=h.url_col, caption_col=h.caption_col,
                                file_format=h.file_format, **balance)
    if h.source == "warc":
        return harvest_warc(h.warc, out, **balance)
    seed = h.seed_url or ctx.seed_url
    counts = harvest_site(seed, out, max_pages=h.max_pages, max_depth=h.max_depth,
                          allowed_hosts=h.allowed_hosts or None, policy=h.page_policy(ctx.cfg.http, ctx.embedded_web),
                          respect_robots=ctx.cfg.http.robots_txt, **balance)
    counts["seed_url"] = seed
    return counts


def accept(cfg: ConfigView, counts: dict[str, Any]) -> str | None:
    if counts.get("candidates", 0) == 0:
        return "no (image URL, caption) pair found" + (
            f" in {counts['pages_fetched']} page(s)" if "pages_fetched" in counts else "")
    return None


SPEC = StageSpec(
    name="harvest",
    upstream=(),
    reads=reads,
    run=run,
    key_extras=input_files,
    preflight=preflight,
    figures=("pages_fetched", "candidates"),
    uses_embedded_web=True,
    accept=accept,
    engines=("pandas", "pyarrow", "warcio"),
)
