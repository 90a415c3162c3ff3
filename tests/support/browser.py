"""Headless Chromium for integration tests (no tests here): render a loopback page, return its DOM and
keep a screenshot, to prove the MLflow and Prefect UIs show the pipeline's runs as a browser draws them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

BINARIES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_TIMEOUT_S = 600
CHROMIUM_TIMEOUT_S = 120
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Nothing may leave the machine: no proxy for loopback, every other hostname unresolvable, and none of
# Chromium's own calls home (sync, updates, metrics upload, safe-browsing lists, translate, ...).
OFFLINE_FLAGS = [
    "--no-proxy-server", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-extensions", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--metrics-recording-only", "--no-first-run", "--no-default-browser-check", "--no-pings",
]
# Containers run as root (hence no sandbox), have no GPU and often a tiny /dev/shm.
HEADLESS_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--hide-scrollbars", "--mute-audio", "--run-all-compositor-stages-before-draw"]
# apt-get's ways of saying its package lists are missing or stale.
STALE_LISTS = ("Unable to locate package", "has no installation candidate", "apt-get update")


def chromium_path() -> str | None:
    """The first Chromium/Chrome binary on PATH, or None."""
    return next((p for p in map(shutil.which, BINARIES) if p), None)


def ensure_chromium() -> str:
    """Chromium's path, installing Debian's `chromium` package first if it is missing and we may."""
    if found := chromium_path():
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + INSTALL_TIMEOUT_S

    def apt(*args: str) -> subprocess.CompletedProcess:
        left = max(1.0, deadline - time.monotonic())  # one budget for update + install together
        return subprocess.run(["apt-get", *args], env=env, capture_output=True, text=True, timeout=left,
                              stdin=subprocess.DEVNULL)

    install = ("install", "-y", "--no-install-recommends", "chromium")
    try:
        proc = apt(*install)
        # Only pay for `apt-get update` when the install failed for want of (fresh) package lists.
        if proc.returncode != 0 and any(s in proc.stderr for s in STALE_LISTS) and apt("update").returncode == 0:
            proc = apt(*install)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"installing chromium with apt-get took over {INSTALL_TIMEOUT_S} s") from None
    found = chromium_path()
    if proc.returncode != 0 or not found:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"apt-get install chromium failed (rc={proc.returncode}): {last}")
    return found


def _chromium(args: list[str]) -> str:
    """Run one headless Chromium command, returning stdout; stderr noise is kept for the error only."""
    # Its own process group, so a hung browser can be killed together with its renderer/zygote children
    # (a browser that exits normally takes them down itself).
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the leader is not reaped yet, so this group is still ours
        proc.communicate()
        raise RuntimeError(f"chromium ran over {CHROMIUM_TIMEOUT_S} s: {args[-1]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode} on {args[-1]}: {err.strip()[-1500:]}")
    return out


def render(url: str, screenshot: Path, *, wait_ms: int = 15000, window: tuple[int, int] = (1600, 1000)) -> str:
    """Render `url` headless; write a PNG of it to `screenshot` and return the rendered DOM.

    `wait_ms` is a virtual-time budget: Chromium runs the page's timers and fetches until that much
    (virtual) time has passed, so single-page apps get to fetch their data and draw it.
    """
    assert urlsplit(url).hostname in LOOPBACK, f"render() only opens loopback URLs, not {url!r}"
    if wait_ms <= 0:  # chromium 150 never finishes with a zero budget; fail now, not after the timeout
        raise ValueError(f"wait_ms must be positive, got {wait_ms}")
    binary = ensure_chromium()
    screenshot = Path(screenshot).resolve()
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    screenshot.unlink(missing_ok=True)  # a stale PNG must not pass for a fresh one
    with tempfile.TemporaryDirectory(prefix="witclip-chromium-", ignore_cleanup_errors=True) as profile:
        # A fresh profile each time: no cache, cookies or service workers carried between renders.
        base = [binary, *HEADLESS_FLAGS, *OFFLINE_FLAGS, f"--user-data-dir={profile}",
                f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={wait_ms}"]
        dom = _chromium([*base, "--dump-dom", url])
        _chromium([*base, f"--screenshot={screenshot}", url])
    if not screenshot.is_file() or screenshot.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot of {url} to {screenshot}")
    return dom


def wait_for_text(url: str, text: str, screenshot: Path, attempts: int = 3, wait_ms: int = 15000) -> str:
    """Render `url` until `text` is in its DOM, with a longer budget each try; return that DOM."""
    dom = ""
    for attempt in range(1, attempts + 1):
        dom = render(url, screenshot, wait_ms=wait_ms * attempt)
        if text in dom:
            return dom
    # The page's visible text says more about what went wrong (error toast, empty table) than its <head>.
    visible = " ".join(re.sub(r"<(script|style)\b.*?</\1>|<[^>]+>", " ", dom, flags=re.S | re.I).split())
    raise AssertionError(f"{text!r} never appeared in the DOM of {url} ({attempts} renders); "
                         f"page text: {visible[:1500]}")
