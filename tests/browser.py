"""A real browser for the web view's tests: headless Chromium (Debian's `chromium` package), asked for
the DOM it built from a page (`--dump-dom`), with every network feature but the page's own off."""

from __future__ import annotations

import shutil
import subprocess
import tempfile

_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(chromium: str, url: str, timeout_s: float = 120) -> str:
    """The page's DOM once loaded, serialized: scripts, had any run, would have changed it."""
    with tempfile.TemporaryDirectory(prefix="coopt-chromium-") as profile:
        done = subprocess.run([chromium, *_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                              capture_output=True, text=True, timeout=timeout_s, check=False)
    if done.returncode != 0 or not done.stdout.strip():
        raise AssertionError(f"chromium failed on {url} (exit {done.returncode}): {done.stderr[-2000:]}")
    return done.stdout
