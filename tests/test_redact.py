"""Redacting URLs before they leave the process (`data.common.urls.redact_url` / `redact_urls`): in MLflow
params (`flows.tracking.param_value`) and in the downloader's one-line errors; and the downloader's sha256
pin (`DownloadItem.sha256`), which wins over a server's digest and over a manifest's word."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from data.acquire.download import (
    FETCH_MANIFEST,
    DownloadError,
    DownloadItem,
    HostUnreachable,
    download_files,
)
from data.acquire.weights import pinned_sha256_from_url
from data.common.urls import is_secret_param, redact_url, redact_urls
from flows.tracking import param_value

SHA = "a" * 64


@pytest.mark.parametrize("url, expected", [
    ("https://user:pa55@host/x.pt", "https://***@host/x.pt"),
    ("https://ghp_token@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("https://h/x?token=abc&page=2", "https://h/x?token=***&page=2"),
    ("https://h/x?access_token=a&api_key=b&apikey=c&key=d&sig=e&signature=f&secret=g&password=h&pwd=i"
     "&auth=j&credential=k&credentials=l&session=m&code=n&keep=o",
     "https://h/x?access_token=***&api_key=***&apikey=***&key=***&sig=***&signature=***&secret=***"
     "&password=***&pwd=***&auth=***&credential=***&credentials=***&session=***&code=***&keep=o"),
    ("https://b.s3.amazonaws.com/m.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2024&X-Amz-Date=1"
     "&X-Amz-Expires=60&X-Amz-Security-Token=tok&X-Amz-SignedHeaders=host&X-Amz-Signature=beef",
     "https://b.s3.amazonaws.com/m.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***&X-Amz-Date=1"
     "&X-Amz-Expires=60&X-Amz-Security-Token=***&X-Amz-SignedHeaders=host&X-Amz-Signature=***"),
    ("https://storage.googleapis.com/b/m.pt?X-Goog-Algorithm=GOOG4&X-Goog-Credential=sa%40p&X-Goog-Signature=0f",
     "https://storage.googleapis.com/b/m.pt?X-Goog-Algorithm=GOOG4&X-Goog-Credential=***&X-Goog-Signature=***"),
    ("https://a.blob.core.windows.net/c/m.pt?sv=2022-11-02&se=2030-01-01&sr=b&sp=r&sig=AbC%3D&page=1",
     "https://a.blob.core.windows.net/c/m.pt?sv=***&se=***&sr=***&sp=***&sig=***&page=1"),
    ("https://h/cb#access_token=t&state=s", "https://h/cb#access_token=***&state=s"),
    ("https://u:p@h:8443/x?Token=1", "https://***@h:8443/x?Token=***"),
    ("https://h/x?sp=keep&sv=keep", "https://h/x?sp=keep&sv=keep"),  # no sig: not an Azure SAS
    ("https://h/x?a=1;token=s&b=2", "https://h/x?a=1;token=***&b=2"),  # ";" separates parameters too
    ("https://h/x?bearer=abc", "https://h/x?bearer=***"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected
    assert redact_url(expected) == expected  # idempotent


@pytest.mark.parametrize("text", [
    "https://h/x.pt?page=2&sort=asc#top",  # nothing secret: byte for byte as given
    "HTTPS://H//x?b=1&a=2",
    "/data/ViT-B-32.pt",
    "not a url at all",
    "http://[::1/x?token=abc",  # unparsable (unclosed IPv6 bracket): unchanged
    "",
])
def test_redact_url_keeps_what_has_no_secret(text):
    assert redact_url(text) == text


def test_secret_names():
    for name in ("TOKEN", "X-Amz-Signature", "client_secret", "AWSAccessKeyId", "api-key", "Password"):
        assert is_secret_param(name), name
    for name in ("page", "size", "format", "v", "author", "sort"):
        assert not is_secret_param(name), name


def test_redact_urls_in_text_and_params():
    text = ("cannot fetch https://u:pw@h/m.pt?token=s3cret: HTTP 404; mirrors ['https://m/x?sig=s3cret&v=1', "
            "'file:///x'] (see http://h/y?key=s3cret).")
    assert redact_urls(text) == ("cannot fetch https://***@h/m.pt?token=***: HTTP 404; mirrors "
                                 "['https://m/x?sig=***&v=1', 'file:///x'] (see http://h/y?key=***).")
    assert param_value(["https://h/a?token=s3cret", "https://h/b"]) == "['https://h/a?token=***', 'https://h/b']"
    assert param_value(3) == "3" and len(param_value("x" * 7000)) == 6000


def test_pinned_sha256_from_openai_style_urls():
    url = f"https://openaipublic.azureedge.net/clip/models/{SHA.upper()}/ViT-B-32.pt"
    assert pinned_sha256_from_url(url) == SHA
    assert pinned_sha256_from_url(f"http://127.0.0.1:8000/{SHA}/m.pt?x=1") == SHA
    for other in (f"https://h/{SHA}/", f"https://h/{SHA}", f"https://h/{SHA[:-1]}/m.pt", f"/local/{SHA}/m.pt",
                  "https://h/models/ViT-B-32.pt"):
        assert pinned_sha256_from_url(other) is None, other


# ----------------------------------------------------------------------------- the downloader
class _Handler(http.server.SimpleHTTPRequestHandler):
    """The directory; a path under /linked/ publishes a wrong sha256 (X-Linked-Etag)."""

    def end_headers(self) -> None:
        if self.path.startswith("/linked/"):
            self.send_header("X-Linked-Etag", f'"{SHA}"')
        super().end_headers()

    def translate_path(self, path: str) -> str:
        return super().translate_path(path.removeprefix("/linked"))

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def site(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "m.bin").write_bytes(b"model bytes" * 100)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}",
               "sha": hashlib.sha256((root / "m.bin").read_bytes()).hexdigest()}
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def test_download_errors_are_redacted(site, tmp_path):
    with pytest.raises(DownloadError) as err:
        download_files([(f"{site['url']}/missing.bin?token=s3cret&v=2", tmp_path / "x")], progress=False)
    msg = str(err.value)
    assert "s3cret" not in msg and "token=***&v=2" in msg and "HTTP 404" in msg
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(HostUnreachable) as err:
        download_files([(f"http://me:pw@127.0.0.1:{port}/m.bin?sig=s3cret", tmp_path / "y")], progress=False)
    msg = str(err.value)
    assert ":pw@" not in msg and "s3cret" not in msg and f"***@127.0.0.1:{port}" in msg
    with pytest.raises(ValueError, match="expected 64 hex digits") as err:
        download_files([DownloadItem(f"{site['url']}/m.bin?key=s3cret", tmp_path / "z", sha256="abc")], progress=False)
    assert "s3cret" not in str(err.value)


def test_pin_wins_over_the_server_and_the_manifest(site, tmp_path):
    manifest = tmp_path / FETCH_MANIFEST
    dest = tmp_path / "m.bin"
    good = DownloadItem(f"{site['url']}/m.bin", dest, sha256=site["sha"].upper())
    assert download_files([good], manifest=manifest, progress=False)["downloaded"] == 1
    assert download_files([good], manifest=manifest, progress=False)["verified"] == 1

    # the same file under a pin it does not match: the manifest's word is not enough, the bytes fail at once
    with pytest.raises(DownloadError, match=f"sha256 {site['sha']} of the downloaded bytes does not match the "
                                            f"pinned {'b' * 64}$"):
        download_files([DownloadItem(good.url, dest, sha256="b" * 64)], manifest=manifest, progress=False)
    assert not dest.exists() and not list(tmp_path.glob("m.bin*"))

    # a server publishing another digest than the pin: refused before a byte is kept
    linked = DownloadItem(f"{site['url']}/linked/m.bin", tmp_path / "l.bin", sha256=site["sha"])
    with pytest.raises(DownloadError, match=f"the server publishes sha256 {SHA}, not the pinned {site['sha']}"):
        download_files([linked], progress=False)
    assert not list(tmp_path.glob("l.bin*"))
    # without a pin the server's digest is checked (and, not matching, fails after its retries)
    with pytest.raises(DownloadError, match="does not match the published"):
        download_files([(linked.url, tmp_path / "l.bin")], progress=False, retries=0)
    assert not Path(tmp_path / "l.bin").exists()
