"""Resumable, verified, parallel HTTP(S) downloads on the standard library (http.client).

    from data.acquire.download import download_files
    result = download_files([(url, dest), ...], manifest=out_dir / FETCH_MANIFEST)

Per file:

* bytes stream to ``<dest>.part``; an existing ``.part`` is resumed with ``Range: bytes=<size>-``
  (plus ``If-Range`` with the ETag / Last-Modified seen when it was started, so a file that changed
  on the server is sent whole). A server that ignores Range (200 instead of 206) sends the whole
  file, which replaces the part.
* the part is renamed to ``dest`` only once complete: as many bytes as Content-Length (or the total
  of Content-Range) announced and, where the caller pinned the file's sha256 (``DownloadItem.sha256``)
  or else the server publishes one (Hugging Face's ``X-Linked-Etag`` for LFS files), that sha256.
  Whatever is under a final name is whole. The caller's pin always wins: a server publishing another
  digest is refused before any byte is kept, and bytes that do not match the pin fail at once (no
  retry: the same file would come again), while a mismatch with a server's own digest is retried as
  a transfer fault.
* its size and sha256 then go into the JSON manifest, rewritten atomically after every file. On the
  next run a file whose bytes match its entry is "verified" without asking the server; one whose
  bytes no longer match ("corrupt") is deleted and fetched again. Without a manifest a file under its
  final name is taken as complete. Optional files that answer 404/410 are recorded as missing.

Before any parallel work, every host with something to fetch is probed once (a HEAD with
``connect_timeout`` for connecting and for the answer): a dead mirror (connection refused, no DNS,
connect timeout, a server that accepts and never answers) fails within about ``connect_timeout``
seconds, raising `HostUnreachable` with one line: ``cannot reach HOST:PORT (what happened) while
fetching URL``. Later transient errors (timeouts, resets, 429, 5xx, short bodies, a published
sha256 not matched) are retried ``retries`` times, resuming what arrived. The first file that still
fails stops the others (their parts stay for the next run) and raises `DownloadError` naming it.
URLs in these messages are shown through `data.common.urls.redact_urls`: no credentials or signed
query tokens reach a log.

Requests go through the shared HTTP layer (`data.common.http`: user agent, redirects, timeouts,
Retry-After) with the policy for files the user named: no address guard (a mirror on the company
network is fine), and proxies from the environment (``http_proxy``, ``https_proxy``, ``no_proxy``)
except for loopback hosts. Content is requested with ``Accept-Encoding: identity``: the bytes on
disk are the bytes of the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import json
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from data.common.errors import one_line
from data.common.files import SHA256_HEX, atomic_write_json, sha256_file, sha256_hasher
from data.common.http import (
    HttpClient,
    HttpError,
    HttpPolicy,
    Response,
    hostport,
    parse_retry_after,
    split_url,
)
from data.common.urls import redact_urls

FETCH_MANIFEST = ".witclip-fetch.json"  # the usual manifest name: what was downloaded into a directory, with sha256s
CHUNK_BYTES = 256 * 1024
MAX_RETRY_AFTER_S = 30.0
MANIFEST_VERSION = 1
PART_SUFFIX = ".part"
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)


class DownloadError(ValueError):
    """A file could not be downloaded; the message is one line naming the URL and why."""


class HostUnreachable(DownloadError):
    """Nothing answered at a host (or its proxy): refused, no DNS, connect timeout, no HTTP answer."""


class LocalWriteError(DownloadError):
    """A downloaded file could not be written here (disk full, permissions)."""


@dataclass(frozen=True)
class DownloadItem:
    """One file to fetch. `sha256`: the caller's pin, the digest the bytes must have (64 hex digits; checked
    before the rename, and against a vouching manifest entry; it overrides any digest the server sends)."""

    url: str
    dest: Path
    optional: bool = False  # a 404/410 is recorded as missing instead of failing
    sha256: str | None = None


# ----------------------------------------------------------------------------- internal errors
class _Transient(Exception):
    """Worth another attempt. `where` is set for connection-level failures (host:port or proxy)."""

    def __init__(self, reason: str, *, where: str | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.where, self.retry_after = reason, where, retry_after
        self.received = 0  # bytes this attempt had written to the part before it failed


class _Permanent(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _Restart(Exception):
    """The part on disk cannot be continued: start the file over (does not use up an attempt)."""


class _Stopped(Exception):
    """Another file failed (or the user interrupted): leave this one's part for the next run."""


# ----------------------------------------------------------------------------- connections
@dataclass
class _Opened:
    response: Response
    linked_sha256: str | None  # a sha256 the server published for the file (Hugging Face LFS)


def _as_download_error(err: HttpError) -> Exception:
    """The shared layer's error as this module's internal ones: permanent or worth another attempt."""
    if err.permanent:
        return _Permanent(err.detail or err.reason)
    return _Transient(err.detail or err.reason, where=err.where)


def _open(client: HttpClient, url: str, method: str, headers: dict[str, str], *, follow: bool = True) -> _Opened:
    """Send the request (after redirects, when `follow`), noting a published sha256 on any hop."""
    linked: list[str] = []

    def note_linked_sha256(response: Response) -> None:
        tag = (response.header("X-Linked-Etag") or "").strip().strip('"').lower()
        if SHA256_HEX.fullmatch(tag):
            linked.append(tag)

    try:
        response = client.open(url, method, headers, follow_redirects=follow, on_response=note_linked_sha256)
    except HttpError as err:
        raise _as_download_error(err) from None
    return _Opened(response, linked[-1] if linked else None)


def _retry_after(value: str | None) -> float | None:
    seconds = parse_retry_after(value)
    return None if seconds is None else min(seconds, MAX_RETRY_AFTER_S)


# ----------------------------------------------------------------------------- manifest
class _Manifest:
    """{"version", "files": {key: entry}, "partial": {key: meta}} in one JSON file, saved atomically.
    Keys are dest paths relative to the manifest's directory (absolute when outside it)."""

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self.lock = threading.Lock()
        self.data: dict[str, Any] = {"version": MANIFEST_VERSION, "files": {}, "partial": {}}
        if self.path is not None and self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                loaded = None  # unreadable: every file is fetched again, which is safe
            if isinstance(loaded, dict) and isinstance(loaded.get("files"), dict):
                self.data["files"] = loaded["files"]
                if isinstance(loaded.get("partial"), dict):
                    self.data["partial"] = loaded["partial"]

    def key(self, dest: Path) -> str:
        dest = Path(os.path.abspath(dest))
        if self.path is not None:
            base = Path(os.path.abspath(self.path.parent))
            try:
                return dest.relative_to(base).as_posix()
            except ValueError:
                pass
        return dest.as_posix()

    def entry(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            value = self.data["files"].get(key)
            return dict(value) if isinstance(value, dict) else None

    def partial(self, key: str) -> dict[str, Any] | None:
        with self.lock:
            value = self.data["partial"].get(key)
            return dict(value) if isinstance(value, dict) else None

    def update(self, key: str, *, entry: dict[str, Any] | None = None, partial: dict[str, Any] | None = None,
               drop_entry: bool = False, drop_partial: bool = False) -> None:
        with self.lock:
            if entry is not None:
                self.data["files"][key] = entry
            if drop_entry:
                self.data["files"].pop(key, None)
            if partial is not None:
                self.data["partial"][key] = partial
            if drop_partial:
                self.data["partial"].pop(key, None)
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        payload = {"version": MANIFEST_VERSION, "files": dict(sorted(self.data["files"].items())),
                   "partial": dict(sorted(self.data["partial"].items()))}
        try:
            atomic_write_json(self.path, payload, indent=1)
        except OSError as err:
            raise LocalWriteError(f"cannot write the download manifest {self.path}: {err.strerror or err}") from None


def forget(manifest: Path, dest: Path) -> None:
    """Delete `dest` and its manifest entry (e.g. its content turned out unusable)."""
    m = _Manifest(manifest)
    Path(dest).unlink(missing_ok=True)
    m.update(m.key(Path(dest)), drop_entry=True, drop_partial=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the downloader
class _Progress:
    def __init__(self, enabled: bool, desc: str):
        self.lock = threading.Lock()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            # disable=None: only on a terminal (no carriage-return debris in logs)
            self.bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            disable=None, file=sys.stderr, leave=False, dynamic_ncols=True)

    def expect(self, n: int) -> None:
        if self.bar is not None and n:
            with self.lock:
                self.bar.total = (self.bar.total or 0) + n
                self.bar.refresh()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            with self.lock:
                self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _Downloader:
    def __init__(self, manifest: _Manifest, policy: HttpPolicy, retries: int, progress: _Progress):
        self.m, self.retries, self.progress = manifest, retries, progress
        self.client = HttpClient(policy)
        # the probe waits for an answer no longer than for a connection
        self.probe_client = HttpClient(dataclasses.replace(policy, timeout=policy.connect_seconds))
        self.stop = threading.Event()

    # ---- before any request
    def check(self, item: DownloadItem) -> str | None:
        """'verified', 'present', 'missing_optional' (nothing to do), 'corrupt' or None (fetch it)."""
        key = self.m.key(item.dest)
        entry = self.m.entry(key)
        if entry and entry.get("missing"):
            if item.optional and entry.get("url") == item.url and not item.dest.exists():
                return "missing_optional"
            self.m.update(key, drop_entry=True)
            entry = None
        if not item.dest.is_file():
            return None
        if self.m.path is None:  # no manifest to trust: a pinned file is hashed, anything else taken as is
            if item.sha256 is not None and sha256_file(item.dest) != item.sha256.lower():
                item.dest.unlink(missing_ok=True)
                return None
            return "present"
        if entry is None:
            return None  # not fetched by us (or the manifest was lost): fetched again, replaced when whole
        size = item.dest.stat().st_size
        ok = entry.get("size") == size and sha256_file(item.dest) == entry.get("sha256")
        if ok and (item.sha256 is None or item.sha256.lower() == entry.get("sha256")):
            return "verified"
        item.dest.unlink(missing_ok=True)
        self.m.update(key, drop_entry=True)
        return "corrupt"

    def probe(self, url: str) -> None:
        """One HEAD with short timeouts: any HTTP answer means the host is there."""
        try:
            _open(self.probe_client, url, "HEAD", {}, follow=False).response.close()
        except _Transient as err:
            where = err.where or hostport(*split_url(url)[1:3])
            raise HostUnreachable(f"cannot reach {where} ({err.reason}) while fetching {url}") from None
        except _Permanent as err:
            raise DownloadError(f"cannot fetch {url}: {err.reason}") from None

    # ---- one file
    def fetch(self, item: DownloadItem) -> tuple[str, int]:
        """('downloaded' | 'resumed' | 'missing_optional', bytes received); raises DownloadError."""
        last: _Transient | None = None
        attempt = restarts = 0
        received = 0
        while attempt <= self.retries:
            if self.stop.is_set():
                raise _Stopped
            try:
                status, n = self._attempt(item)
                return status, received + n
            except _Restart:
                restarts += 1
                if restarts > 3:
                    raise DownloadError(f"cannot fetch {item.url}: the server keeps answering resumes "
                                        "with the wrong byte range") from None
                continue
            except _Transient as err:
                last = err
                received += err.received
                attempt += 1
                if attempt <= self.retries:
                    delay = err.retry_after if err.retry_after is not None else min(0.5 * 2 ** (attempt - 1), 4.0)
                    if self.stop.wait(delay):
                        raise _Stopped from None
            except _Permanent as err:
                raise DownloadError(f"cannot fetch {item.url}: {err.reason}") from None
        assert last is not None
        tries = f"{self.retries + 1} attempt{'s' if self.retries else ''}"
        if last.where is not None:
            raise HostUnreachable(f"cannot reach {last.where} ({last.reason}) while fetching {item.url} "
                                  f"({tries})")
        raise DownloadError(f"cannot fetch {item.url}: {last.reason} ({tries})")

    def _attempt(self, item: DownloadItem) -> tuple[str, int]:
        key = self.m.key(item.dest)
        part = item.dest.with_name(item.dest.name + PART_SUFFIX)
        offset = part.stat().st_size if part.is_file() else 0
        meta = self.m.partial(key)
        if offset and self.m.path is not None and (meta is None or meta.get("url") != item.url):
            part.unlink()  # a part we cannot vouch for (other URL, or no record of starting it)
            offset = 0
        headers: dict[str, str] = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            etag = (meta or {}).get("etag") or ""
            validator = etag if etag and not etag.startswith("W/") else (meta or {}).get("last_modified")
            if validator:
                headers["If-Range"] = validator
        opened = _open(self.client, item.url, "GET", headers)
        try:
            return self._receive(item, key, part, offset, meta, opened)
        finally:
            opened.response.close()

    def _receive(self, item: DownloadItem, key: str, part: Path, offset: int, meta: dict | None,
                 opened: _Opened) -> tuple[str, int]:
        resp = opened.response.raw
        status = resp.status
        if status == 416 and offset:
            part.unlink(missing_ok=True)
            self.m.update(key, drop_partial=True)
            raise _Restart
        if status in (404, 410) and item.optional:
            self.m.update(key, entry={"url": item.url, "missing": True, "status": status, "checked_at": _now()},
                          drop_partial=True)
            return "missing_optional", 0
        if status == 429 or status >= 500:
            raise _Transient(f"HTTP {status} {resp.reason}".strip(), retry_after=_retry_after(resp.getheader("Retry-After")))
        if status not in (200, 206):
            raise _Permanent(f"HTTP {status} {resp.reason}".strip())
        length_header = resp.getheader("Content-Length")
        length = int(length_header) if length_header and length_header.strip().isdigit() else None
        resumed = False
        if status == 206:
            match = _CONTENT_RANGE_RE.match(resp.getheader("Content-Range") or "")
            if not offset or match is None or int(match.group(1)) != offset:
                part.unlink(missing_ok=True)  # a range we did not ask for
                self.m.update(key, drop_partial=True)
                raise _Restart
            total = None if match.group(3) == "*" else int(match.group(3))
            if meta and meta.get("total") and total and meta["total"] != total:
                part.unlink(missing_ok=True)  # the file changed size on the server since the part began
                self.m.update(key, drop_partial=True)
                raise _Restart
            resumed = True
        else:  # 200: the whole file (first time, or a server that ignores Range)
            offset = 0
            total = length
        pin = item.sha256.lower() if item.sha256 else None
        if pin is not None and opened.linked_sha256 is not None and opened.linked_sha256 != pin:
            raise _Permanent(f"the server publishes sha256 {opened.linked_sha256}, not the pinned {pin}")
        expected_sha = pin or opened.linked_sha256  # the caller's pin wins over the server's word
        if not resumed:
            self.m.update(key, partial={"url": item.url, "etag": resp.getheader("ETag"),
                                        "last_modified": resp.getheader("Last-Modified"), "total": total,
                                        "started_at": _now()})
        try:
            item.dest.parent.mkdir(parents=True, exist_ok=True)
            hasher = sha256_hasher(part, limit=offset) if resumed else hashlib.sha256()
            # unbuffered: what was received is on disk (page cache) even if this process is killed
            fh = open(part, "ab" if resumed else "wb", buffering=0)
        except OSError as err:
            raise LocalWriteError(f"cannot write {part}: {err.strerror or err}") from None
        got = 0
        expecting = (total - offset) if total is not None else 0
        self.progress.expect(expecting)
        try:
            with fh:
                while True:
                    if self.stop.is_set():
                        raise _Stopped
                    try:
                        chunk = resp.read1(CHUNK_BYTES)
                    except (socket.timeout, TimeoutError):
                        err = _Transient(f"stalled: no data for {self.client.policy.timeout:g}s after "
                                         f"{offset + got} of {total if total is not None else '?'} bytes")
                        err.received = got
                        raise err from None
                    except (http.client.HTTPException, OSError) as exc:
                        err = _Transient(f"connection broken after {offset + got} bytes ({one_line(exc, 117, with_type=False)})")
                        err.received = got
                        raise err from None
                    if not chunk:
                        break
                    try:
                        view = memoryview(chunk)
                        while view:
                            view = view[fh.write(view):]
                    except OSError as exc:
                        raise LocalWriteError(f"cannot write {part}: {exc.strerror or exc}") from None
                    hasher.update(chunk)
                    got += len(chunk)
                    self.progress.advance(len(chunk))
                try:
                    os.fsync(fh.fileno())
                except OSError as exc:
                    raise LocalWriteError(f"cannot write {part}: {exc.strerror or exc}") from None
        finally:
            if expecting > got:
                self.progress.expect(-(expecting - got))
        size = offset + got
        if total is not None and size != total:
            err = _Transient(f"connection closed after {size} of {total} bytes")
            err.received = got
            raise err
        digest = hasher.hexdigest()
        if expected_sha is not None and digest != expected_sha:
            part.unlink(missing_ok=True)
            self.m.update(key, drop_partial=True)
            if pin is not None:  # whole and as announced, yet other bytes: fetching again brings the same
                raise _Permanent(f"sha256 {digest} of the downloaded bytes does not match the pinned {pin}")
            err = _Transient(f"sha256 {digest[:12]}... does not match the published {expected_sha[:12]}...")
            err.received = got
            raise err
        try:
            os.replace(part, item.dest)
        except OSError as exc:
            raise LocalWriteError(f"cannot move {part} to {item.dest}: {exc.strerror or exc}") from None
        self.m.update(key, entry={"url": item.url, "size": size, "sha256": digest, "fetched_at": _now()},
                      drop_partial=True)
        return ("resumed" if resumed else "downloaded"), got


def _redacted(err: DownloadError, more: str = "") -> DownloadError:
    """The same error, its URLs redacted (`data.common.urls.redact_urls`) and `more` appended."""
    return type(err)(redact_urls(str(err)) + more)


def _as_item(value: DownloadItem | Sequence[Any]) -> DownloadItem:
    if isinstance(value, DownloadItem):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (2, 3):
        return DownloadItem(str(value[0]), Path(value[1]), bool(value[2]) if len(value) == 3 else False)
    raise TypeError(f"expected DownloadItem or (url, dest[, optional]), got {value!r}")


def download_files(
    items: Iterable[DownloadItem | Sequence[Any]],
    *,
    workers: int = 4,
    connect_timeout: float = 5.0,
    read_timeout: float = 10.0,
    retries: int = 2,
    manifest: Path | str | None = None,
    progress: bool = True,
    desc: str = "download",
) -> dict[str, Any]:
    """Fetch every (url, dest[, optional]) / DownloadItem; see the module doc.

    Returns counts: files, downloaded, resumed, verified (skipped: the manifest vouches for them),
    refetched (corrupt on disk, fetched again), missing_optional, present (no manifest, file
    there), bytes_downloaded (this run), bytes (of all the files now on disk), seconds, and
    status: {dest: one of those words}. Raises HostUnreachable, DownloadError (one line each, URLs
    redacted), LocalWriteError; ValueError for bad arguments.
    """
    t0 = time.monotonic()
    todo = [_as_item(i) for i in items]
    if workers < 1 or retries < 0 or connect_timeout <= 0 or read_timeout <= 0:
        raise ValueError("workers must be >= 1, retries >= 0 and timeouts > 0")
    for it in todo:
        try:
            split_url(it.url)
        except HttpError as err:
            raise ValueError(redact_urls(err.detail)) from None
        if it.sha256 is not None and not SHA256_HEX.fullmatch(it.sha256.lower()):
            raise ValueError(f"sha256 {it.sha256!r} for {redact_urls(it.url)}: expected 64 hex digits")
    dests = [os.path.abspath(it.dest) for it in todo]
    if len(set(dests)) != len(dests):
        dup = next(d for d in dests if dests.count(d) > 1)
        raise ValueError(f"two downloads write the same file {dup}")

    bar = _Progress(progress, desc)
    # files the user named: any address, proxies from the environment (the guard is for crawled URLs)
    policy = HttpPolicy(timeout=read_timeout, connect_timeout=connect_timeout, guard=False, use_env_proxies=True)
    d = _Downloader(_Manifest(Path(manifest) if manifest is not None else None), policy, retries, bar)
    status: dict[str, str] = {}
    received = 0
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="verify") as pool:
            checks = list(pool.map(d.check, todo))
        pending = []
        for it, state in zip(todo, checks):
            if state in ("verified", "present", "missing_optional"):
                status[str(it.dest)] = state
            else:
                pending.append((it, state))

        probed: set[tuple[str, str, int]] = set()
        for it, _ in pending:
            scheme, host, port, _target = split_url(it.url)
            if (scheme, host, port) not in probed:
                try:
                    d.probe(it.url)
                except DownloadError as err:
                    raise _redacted(err) from None
                probed.add((scheme, host, port))

        first_error: BaseException | None = None
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download") as pool:
            futures = {pool.submit(d.fetch, it): (it, state) for it, state in pending}
            try:
                for fut in as_completed(futures):
                    it, state = futures[fut]
                    try:
                        word, n = fut.result()
                        received += n
                        status[str(it.dest)] = "refetched" if state == "corrupt" and word != "missing_optional" else word
                    except _Stopped:
                        status[str(it.dest)] = "stopped"
                    except BaseException as err:  # noqa: BLE001 - the first one is re-raised below
                        status[str(it.dest)] = "failed"
                        if first_error is None:
                            first_error = err
                            d.stop.set()
            except BaseException:  # KeyboardInterrupt: parts stay, the workers stop at their next chunk
                d.stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    finally:
        bar.close()
    if first_error is not None:
        left = sum(1 for s in status.values() if s in ("stopped", "failed")) - 1
        if isinstance(first_error, DownloadError):
            more = f"; {left} other file(s) stopped unfinished" if left > 0 else ""
            raise _redacted(first_error, more) from None
        raise first_error

    counts: dict[str, Any] = {k: 0 for k in ("downloaded", "resumed", "verified", "refetched",
                                             "missing_optional", "present")}
    for word in status.values():
        counts[word] += 1
    on_disk = sum(it.dest.stat().st_size for it in todo if it.dest.is_file())
    return {"files": len(todo), **counts, "bytes_downloaded": received, "bytes": on_disk,
            "seconds": round(time.monotonic() - t0, 3), "status": status}
