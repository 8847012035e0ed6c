"""Render an onnxshrink HTML report to a PNG with headless Chromium, to look at it.

    python bench/render_report.py report.html out.png [--width 1280] [--height 0]

Chromium runs offline (no network, no GPU, a throwaway profile), as the report must work with
no network. Chromium's `--screenshot` captures the window, not the page, so unless `--height`
is given the window height is estimated from the report's content on the large side, and the
blank rows below the page are trimmed afterwards (with Pillow, when installed). Needs the
Debian package `chromium` (`apt-get install chromium`); the script says so when it is missing.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium (or Chrome) binary on PATH, or None."""
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def estimate_height(html: str) -> int:
    """A window height that fits the report: table rows, paragraphs and embedded charts."""
    rows = len(re.findall(r"<tr[ >]", html))
    blocks = len(re.findall(r"<(?:p|li|h[123]|dt)[ >]", html))
    charts = 0
    for match in re.finditer(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', html):
        svg = base64.b64decode(match.group(1)).decode("utf-8", "replace")
        h = re.search(r'<svg[^>]*\sheight="(\d+)"', svg)
        charts += int(h.group(1)) + 24 if h else 400
    # Header and cards ~260 px, a table row ~27 px (more when cells wrap), a text block ~30 px
    # (more when it wraps); doubled, since the blank rows are trimmed afterwards.
    return max(800, 2 * (260 + rows * 30 + blocks * 40 + charts) + 400)


def render(html_path: Path, png_path: Path, width: int = 1280, height: int = 0) -> Path:
    """Screenshot `html_path` into `png_path`; raises SystemExit with a message on failure."""
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit(
            "error: chromium not found; install it with `apt-get install -y chromium` "
            "(Debian) and run again"
        )
    if not html_path.is_file():
        raise SystemExit(f"error: {html_path}: no such file")
    if height <= 0:
        height = estimate_height(html_path.read_text(encoding="utf-8"))
    png_path = png_path.resolve()
    with tempfile.TemporaryDirectory(prefix="onnxshrink-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            html_path.resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not png_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: chromium failed (exit {proc.returncode}): {' | '.join(tail)}")
    _trim_bottom(png_path)
    return png_path


def _trim_bottom(png_path: Path, margin: int = 40) -> None:
    """Cut the blank rows below the page's content (the window is sized generously).

    Uses Pillow when it is installed (the `dev` extra); otherwise the PNG keeps the blank rows.
    """
    try:
        from PIL import Image, ImageChops
    except ImportError:
        print("note: Pillow not installed; the PNG keeps the blank space below the page")
        return
    with Image.open(png_path) as im:
        rgb = im.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, background).getbbox()
    if box is None:
        return
    bottom = min(rgb.height, box[3] + margin)
    if bottom < rgb.height:
        rgb.crop((0, 0, rgb.width, bottom)).save(png_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("html", type=Path, help="the report (.html)")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=0, help="0: estimate from the page")
    args = parser.parse_args(argv)
    out = render(args.html, args.png, args.width, args.height)
    print(f"{out} ({out.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
