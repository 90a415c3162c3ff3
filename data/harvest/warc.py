"""The same HTML parsing over pages already captured in WARC files."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data.common.errors import one_line
from data.common.urls import is_http_url
from data.harvest.candidates import rows_frame, write_candidates
from data.harvest.html import (
    HTML_TYPES,
    MAX_PAGE_BYTES,
    page_rows,
    parse_content_type,
    parse_page,
    resolve_url,
)


# ------------------------------------------------------------------------------- WARC
def _warc_records(path: Path) -> Iterator[Any]:
    """warcio's records of one WARC file; a damaged or non-WARC file is one ValueError naming it."""
    from warcio.archiveiterator import ArchiveIterator
    from warcio.exceptions import ArchiveLoadFailed

    n = 0
    with open(path, "rb") as fh:
        records = iter(ArchiveIterator(fh))
        while True:
            try:
                record = next(records)
            except StopIteration:
                break
            # Only next() is guarded: warcio fails on damaged input in several ways (a file cut inside
            # a record's headers trips an AttributeError in its parser), none of them our bug.
            except (ArchiveLoadFailed, zlib.error, EOFError, OSError, AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}: not a readable WARC file after {n} records ({one_line(err)})") from None
            if record.format != "warc":  # warcio also takes any 5-word line for an ARC header
                raise ValueError(f"{path}: not a WARC file (record {n + 1} is not a WARC record)")
            n += 1
            yield record
    if n == 0:
        raise ValueError(f"{path}: not a WARC file (no WARC records in it)")


def harvest_warc(
    paths: str | Path | Sequence[str | Path],
    out_dir: Path,
    *,
    allowed_content_types: Sequence[str] = HTML_TYPES,
    queries: Sequence[str] | None = None,
    query_cap: int = 20_000,
) -> dict[str, Any]:
    """Harvest <img> URL + alt pairs from the HTML pages captured in WARC files (gzipped or not).

    Each `response` record with HTTP status 200 and a content type in
    `allowed_content_types` is parsed like a crawled page: image URLs resolve against the
    record's WARC-Target-URI and the page's <base href>, and source is the target URI.
    Pages are decoded and tokenized by `data.harvest.html.parse_page`: a record whose charset
    label is bogus (`undefined`, `idna`, unknown, ...) is read as UTF-8 and counted (bad_charset),
    one whose markup outruns the parse budget keeps what was read (parse_budget_exceeded); neither
    stops the harvest. Other record types (request, warcinfo, metadata, revisit, ...) are only counted.
    A missing file is a FileNotFoundError (all are checked before any is read); a file
    that is not a WARC (ARC files included), or breaks off into garbage, a ValueError naming
    it (found while reading; a WARC truncated at a record boundary is not detectable). Returns
    counts: files, records, responses, non_200, non_html, html_responses, bad_charset,
    parse_budget_exceeded, img_tags, empty_alt, non_http_img, duplicate_candidates, candidates
    (+ the balancing counts with `queries`).
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ValueError("no WARC files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"WARC file not found: {f}")
    wanted = {t.lower() for t in allowed_content_types}
    counts: dict[str, Any] = dict(
        files=len(files), records=0, responses=0, non_200=0, non_html=0, html_responses=0,
        bad_charset=0, parse_budget_exceeded=0, img_tags=0, empty_alt=0, non_http_img=0,
    )  # fmt: skip
    rows: list[tuple[str, str, str]] = []
    for f in files:
        for record in _warc_records(f):
            counts["records"] += 1
            if record.rec_type != "response":
                continue
            counts["responses"] += 1
            http = record.http_headers
            # dns:, whois: ... responses carry no HTTP headers
            if http is None or http.get_statuscode() != "200":
                counts["non_200"] += 1
                continue
            ctype, charset = parse_content_type(http.get_header("Content-Type"))
            if ctype not in wanted:
                counts["non_html"] += 1
                continue
            target = (record.rec_headers.get_header("WARC-Target-URI") or "").strip().strip("<>")
            page = resolve_url("", target)
            if not is_http_url(page):
                counts["non_html"] += 1
                continue
            counts["html_responses"] += 1
            body = record.content_stream().read(MAX_PAGE_BYTES)  # de-chunked and decompressed by warcio
            rows.extend(page_rows(parse_page(body, charset, counts), page, counts))

    write_candidates(
        rows_frame(rows), out_dir, counts=counts, empty_key="empty_alt", queries=queries, query_cap=query_cap
    )
    return counts
