"""data.synthetic.server.MultiHostWeb: one synthetic site on several loopback addresses (as bench/crawl.py
serves it), each bound to its own address only; and the crawl's fetcher over those hosts (robots.txt
once per host, the header it read handed on to the decode budget)."""

from __future__ import annotations

import socket
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from data.synthetic import SiteSpec
from data.synthetic.server import MultiHostWeb

HOSTS = ["127.0.0.10", "127.0.0.11", "127.0.0.12"]
SPEC = SiteSpec(seed=3, n_pages=2, images_per_page=6, fault_rate=0.0)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read()


def test_each_address_serves_the_site_and_binds_only_itself():
    port = _free_port(HOSTS[0])
    with MultiHostWeb(SPEC, HOSTS[:2], port=port) as web:  # one port on both: two sockets, not one wildcard
        assert web.urls == [f"http://{h}:{port}/" for h in HOSTS[:2]]
        path = next(iter(web.site.images))
        bodies = {_get(url.rstrip("/") + path) for url in web.urls}
        assert len(bodies) == 1 and next(iter(bodies))[0] == 200  # the same site, one render cache
        assert _get(web.urls[0] + "robots.txt") == (200, b"User-agent: *\nAllow: /\n")
        with pytest.raises(ConnectionRefusedError):  # an address not listed is not served
            socket.create_connection((HOSTS[2], port), timeout=2).close()
        assert {urlsplit(r.path).path for r in web.requests()} == {path, "/robots.txt"}


def test_wildcard_addresses_are_refused():
    with pytest.raises(ValueError, match="wildcard"):
        MultiHostWeb(SPEC, ["127.0.0.10", "0.0.0.0"])
    with pytest.raises(ValueError, match="at least one"):
        MultiHostWeb(SPEC, [])


def test_fetcher_over_many_hosts_reads_robots_once_per_host_and_hands_on_the_header():
    from data.crawl.crawler import FetchedImage, make_download_image
    from data.crawl.decode import decode_cost, header_cost
    from data.crawl.fetch import Fetcher, FetchPolicy

    with MultiHostWeb(SPEC, HOSTS) as web:
        allowed = tuple(urlsplit(url).netloc for url in web.urls)  # "127.0.0.x:port", exactly
        fetcher = Fetcher(FetchPolicy(allowed_addresses=allowed))
        paths = list(web.site.images)
        urls = [web.urls[i % len(HOSTS)].rstrip("/") + p for i, p in enumerate(paths)]
        download = make_download_image(fetcher)
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda row: download(row, 2, None, []), enumerate(urls)))
        assert [err for _, _, err in results] == [None] * len(urls)
        for (_, stream, _), path in zip(results, paths):
            assert isinstance(stream, FetchedImage) and stream.getvalue() == web.site.image_bytes(path)
            assert header_cost(stream.image_header) == decode_cost(stream.getvalue()) > 0
        robots_per_host = [sum(r.path == "/robots.txt" for r in host.requests()) for host in web.webs]
        assert robots_per_host == [1] * len(HOSTS)
