"""Harvest (image URL, caption) candidates from three kinds of source, into one file format.

- `harvest_site`: a bounded breadth-first crawl of live HTML pages (`<img alt>` texts).
- `harvest_warc`: the same HTML parsing over pages already captured in WARC files.
- `harvest_url_list`: ready-made (url, caption) lists: parquet, csv, tsv or jsonl.

Every source ends in `write_candidates`, which writes `out_dir/candidates.parquet`:

    url            str   absolute http(s) image URL (fragment dropped, scheme/host lower-cased)
    caption        str   whitespace-normalised alt text / caption, never empty
    source         str   where the pair came from: the page URL for HTML (crawl: the page's
                         final URL after redirects; WARC: the record's WARC-Target-URI); for a
                         URL list "<file name>:<row>", row counted from 1 over data rows
    matched_query  str?  the query that selected the pair when query balancing ran
                         (`queries=`, see data.harvest.queries), else null

with (url, caption) unique (the first occurrence kept) and, with `queries=`, at most
`query_cap` pairs per query. Pages are read by witclip's own linear-time tokenizer
(`data.harvest.html`; no browser, no JS, a step budget per page); requests go through
`data.common.http`.
"""

from data.harvest.candidates import (
    CANDIDATE_COLUMNS,
    CANDIDATE_SCHEMA,
    CANDIDATES_FILE,
    write_candidates,
)
from data.harvest.html import parse_srcset
from data.harvest.pages import harvest_site
from data.harvest.queries import QueryIndex, balance_by_queries, load_queries
from data.harvest.url_lists import URL_LIST_FORMATS, check_url_lists, harvest_url_list
from data.harvest.warc import harvest_warc

__all__ = [
    "CANDIDATE_COLUMNS", "CANDIDATE_SCHEMA", "CANDIDATES_FILE", "write_candidates", "parse_srcset", "harvest_site",
    "QueryIndex", "balance_by_queries", "load_queries", "URL_LIST_FORMATS", "check_url_lists", "harvest_url_list",
    "harvest_warc",
]
