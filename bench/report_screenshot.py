"""A headless-Chromium screenshot of a report.html, to look at the page as a person would.

Usage: python bench/report_screenshot.py REPORT_HTML [--out PNG] [--width 1200] [--height 4000]

Needs Chromium (Debian: ``apt-get install chromium``; ``chromium-headless-shell`` works too).
The page is opened from disk with the network switched off (``--proxy-server`` to nowhere), so
the screenshot shows only what the file holds itself.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-headless-shell", "chromium-browser", "google-chrome")


def find_browser() -> str:
    """The first of BROWSERS on PATH; SystemExit naming them when there is none."""
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    raise SystemExit(f"no headless browser found (tried {', '.join(BROWSERS)}); "
                     "apt-get install chromium")


def screenshot(report: Path, out: Path, width: int = 1200, height: int = 4000) -> Path:
    """Render ``report`` headless and offline into the PNG ``out`` (width x height px)."""
    with tempfile.TemporaryDirectory() as profile:
        command = [find_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                   "--hide-scrollbars", f"--user-data-dir={profile}",
                   "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                   f"--window-size={width},{height}", f"--screenshot={out}",
                   report.resolve().as_uri()]
        subprocess.run(command, check=True, capture_output=True, timeout=120)
    if not out.is_file():
        raise SystemExit(f"{out}: the browser wrote no screenshot")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--out", type=Path, default=None,
                        help="the PNG (default: report_screenshot.png beside the report)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=4000)
    args = parser.parse_args()
    out = args.out or args.report.with_name("report_screenshot.png")
    print(f"wrote {screenshot(args.report, out, args.width, args.height)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
