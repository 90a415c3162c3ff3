"""A model file (checkpoint, tokenizer vocab) from a local path or an http(s) URL.

    path = fetch_model_file("https://host/models/ViT-B-32.pt", downloads, what="checkpoint")

A URL is downloaded resumably and verified by `data.acquire.download` into
`downloads/<hash of the URL>/<its file name>`; a later call re-uses the file only while its bytes match
the manifest. Every failure is a `ModelFileError` with one line that names the file or the host.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from urllib.parse import unquote, urlparse


class ModelFileError(ValueError):
    """The file is missing, the URL unsupported, or the download failed; one line."""


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def download_path(url: str, downloads: Path) -> Path:
    """downloads/<hash of the URL>/<the URL's file name>: one place per URL, named like the remote file."""
    name = Path(unquote(urlparse(url).path)).name
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "download"
    return downloads / hashlib.sha256(url.encode()).hexdigest()[:16] / name


def fetch_model_file(source: str, downloads: Path, *, what: str, progress: bool = True) -> Path:
    """A local file as is; an http(s) URL downloaded under `downloads` (see the module docstring)."""
    if is_url(source):
        from data.acquire.download import FETCH_MANIFEST, DownloadError, download_files

        dest = download_path(source, downloads)
        dest.parent.mkdir(parents=True, exist_ok=True)
        host = urlparse(source).netloc
        try:
            download_files([(source, dest)], manifest=downloads / FETCH_MANIFEST, progress=progress, desc=what)
        except DownloadError as e:  # one line naming the host (HostUnreachable: within ~5 s)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelFileError(msg if host in msg else f"{what} {source}: {msg}") from None
        except (ValueError, OSError) as e:  # a malformed URL; anything the downloader did not wrap
            raise ModelFileError(f"{what} {source}: download from {host or 'nowhere'} failed: {e}") from None
        if not dest.is_file():
            raise ModelFileError(f"{what} {source}: download from {host} produced no file")
        return dest
    if "://" in source:
        raise ModelFileError(f"{what} {source}: unsupported URL scheme; expected a local file or an http(s) URL")
    path = Path(source).expanduser()
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise ModelFileError(f"{what} {source} {state}; expected a local file or an http(s) URL")
    return path
