"""A model file (checkpoint, tokenizer vocab) from a local path or an http(s) URL.

    path = fetch_model_file("https://host/models/ViT-B-32.pt", downloads, what="checkpoint")

A URL is downloaded resumably and verified by `data.acquire.download` into
`downloads/<hash of the URL>/<its file name>`; a later call re-uses the file only while its bytes match
the manifest. With ``sha256=`` (the caller's pin) the bytes must have that digest before the file is
renamed into place, whatever digest the server publishes. Every failure is a `ModelFileError` with one
line that names the file or the host; URLs in it are redacted (`data.common.urls.redact_url`).

`pinned_sha256_from_url` reads the pin an OpenAI-style URL carries: the 64 hex digits of the path segment
before the file name (``https://openaipublic.azureedge.net/clip/models/<sha256>/ViT-B-32.pt``), which
OpenAI's own loader checks the download against. On any host it pins the bytes (they must have that
digest), but anyone can put a hash in their own URL: it says nothing about who published the file.
`openai_release_sha256` names it only for OpenAI's own release URLs (OPENAI_RELEASE_HOSTS, https, the
``/clip/models/<sha256>/<name>`` path), where only OpenAI can have put a file: the one URL hash that
vouches for the file as well as pinning it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote, urlparse, urlsplit

from data.common.files import SHA256_HEX
from data.common.urls import redact_url, redact_urls

OPENAI_RELEASE_HOSTS = ("openaipublic.azureedge.net", "openaipublic.blob.core.windows.net")
_OPENAI_RELEASE_PATH_RE = re.compile(r"/clip/models/([0-9a-fA-F]{64})/[A-Za-z0-9@_-][A-Za-z0-9@._-]*")


class ModelFileError(ValueError):
    """The file is missing, the URL unsupported, or the download failed; one line."""


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def pinned_sha256_from_url(url: str) -> str | None:
    """The sha256 an OpenAI-style URL names (lower-case): the path segment right before the file name
    when it is 64 hex digits, on any host; None otherwise, and for anything but an http(s) URL. It pins
    the bytes only: whether it also vouches for them is `openai_release_sha256`'s to say."""
    if not is_url(url):
        return None
    segments = unquote(urlsplit(url).path).split("/")
    if len(segments) >= 3 and SHA256_HEX.fullmatch(segments[-2]) and segments[-1]:
        return segments[-2].lower()
    return None


def openai_release_sha256(url: str) -> str | None:
    """The sha256 (lower-case) of an OpenAI CLIP release URL, ``https://<host>/clip/models/<sha256>/<name>``
    with ``host`` one of OPENAI_RELEASE_HOSTS and nothing else (no user, port, query or fragment, no
    escapes in the path); None for any other URL, however it looks otherwise. Only OpenAI can put a file
    there, so a download from it that has this digest is OpenAI's release."""
    if not url.isascii() or any(ord(c) <= 0x20 or c == "\x7f" for c in url):  # urlsplit would drop some
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # a malformed netloc
        return None
    if parts.scheme != "https" or host not in OPENAI_RELEASE_HOSTS or parts.netloc.lower() != host:
        return None
    if parts.query or parts.fragment or "#" in url or "?" in url:
        return None
    m = _OPENAI_RELEASE_PATH_RE.fullmatch(parts.path)
    return m.group(1).lower() if m else None


def download_path(url: str, downloads: Path) -> Path:
    """downloads/<hash of the URL>/<the URL's file name>: one place per URL, named like the remote file."""
    name = Path(unquote(urlparse(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download"
    return downloads / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch_model_file(source: str, downloads: Path, *, what: str, progress: bool = True,
                     sha256: str | None = None) -> Path:
    """A local file as is; an http(s) URL downloaded under `downloads`, its bytes checked against
    ``sha256`` when given (see the module docstring). A local file's digest is the caller's to check."""
    if is_url(source):
        from data.acquire.download import (
            FETCH_MANIFEST,
            DownloadError,
            DownloadItem,
            download_files,
        )

        dest = download_path(source, downloads)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shown = redact_url(source)
        host = urlsplit(source).netloc.rsplit("@", 1)[-1]  # never the user:password part
        try:
            download_files([DownloadItem(source, dest, sha256=sha256)], manifest=downloads / FETCH_MANIFEST,
                           progress=progress, desc=what)
        except DownloadError as e:  # one line naming the host (HostUnreachable: within ~5 s); URLs redacted
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFileError(msg if host in msg else f"{what} {shown}: {msg}") from None
        except (ValueError, OSError) as e:  # a malformed URL; anything the downloader did not wrap
            raise ModelFileError(f"{what} {shown}: download from {host or 'nowhere'} failed: "
                                 f"{redact_urls(str(e))}") from None
        if not dest.is_file():
            raise ModelFileError(f"{what} {shown}: download from {host} produced no file")
        return dest
    if "://" in source:
        raise ModelFileError(f"{what} {redact_url(source)}: unsupported URL scheme; expected a local file or an "
                             "http(s) URL")
    path = Path(source).expanduser()
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise ModelFileError(f"{what} {source} {state}; expected a local file or an http(s) URL")
    return path
