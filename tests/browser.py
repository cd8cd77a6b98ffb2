"""A real headless Chromium for the operator-page tests: Debian's, driven by Playwright.

No test tool may download a browser of its own, so Playwright is pointed at the system's Chromium
(``apt-get install chromium``; ``./dev test`` installs it when missing). A missing browser fails
the tests, it never skips them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Where the tests keep their screenshots (gitignored; CI may keep them as artifacts).
SCREENSHOTS = Path(__file__).resolve().parent.parent / "artifacts" / "screenshots"

#: Flags for a quiet, sandbox-less headless run as root, with no calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """The system Chromium: ``CHROMIUM`` if set, else Debian's."""
    configured = os.environ.get("CHROMIUM")
    if configured:
        return configured
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


#: Screenshots kept in the repository (the dead-letter pages at scale, for the README and review).
KEPT_SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"


def kept_screenshot_path(name: str) -> Path:
    KEPT_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return KEPT_SCREENSHOTS / f"{name}.png"


def screenshot_path(name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS / f"{name}.png"
