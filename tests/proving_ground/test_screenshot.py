"""The HTML evidence report, written by the CLI after a proving-ground run, opens in headless Chromium and its
timeline is drawn: the verdict colors are on screen inside the chart.

Needs Debian's `chromium` (.ci/run installs it); without it the test skips locally and fails under CI."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from kit.cli import clean_env, run_cli
from reaper.output.html import CHART_BG, REVOKED_COLOR, VERDICT_COLORS

from .clients import Scenario
from .conftest import CLASSIFY

CHROMIUM = Path("/usr/bin/chromium")
WIDTH, HEIGHT = 1200, 1600


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return int(hex_color[1:3], 16), int(hex_color[3:5], 16), int(hex_color[5:7], 16)


def _near(a: tuple[int, ...], b: tuple[int, int, int], tol: int = 4) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a[:3], b, strict=True))


def screenshot(html: Path, png: Path, profile_dir: Path) -> None:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must install Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile_dir}",
        f"--screenshot={png}",
        f"--window-size={WIDTH},{HEIGHT}",
        html.resolve().as_uri(),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=clean_env(HOME=str(profile_dir)))
    assert res.returncode == 0 and png.exists(), res.stderr[-2000:]


def chart_band(im: Image.Image) -> tuple[int, int, int, int]:
    """The first chart's box: from the first row mostly in the chart background, down its left margin."""
    bg = bytes(_rgb(CHART_BG))
    raw = im.tobytes()
    stride = im.width * 3
    top = next(y for y in range(im.height) if raw[y * stride : (y + 1) * stride].count(bg) >= 600)
    row = raw[top * stride : (top + 1) * stride]
    xs = [x for x in range(im.width) if row[3 * x : 3 * x + 3] == bg]
    left, right = min(xs), max(xs)
    bottom = top
    while bottom + 1 < im.height and im.getpixel((left + 3, bottom + 1))[:3] == tuple(bg):
        bottom += 1
    return left, top, right, bottom


@pytest.mark.chromium
@pytest.mark.slow
def test_html_report_timeline_renders(db, ground: Scenario, tmp_path):
    config = tmp_path / "dcr-reaper.toml"
    config.write_text(
        "[classify]\n"
        + "".join(f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n" for k, v in CLASSIFY.items()),
        encoding="utf-8",
    )
    html = tmp_path / "evidence.html"
    res = run_cli(
        [
            "report",
            "--config",
            str(config),
            "--profile",
            "authlib",
            "--database-url",
            db.url,
            "--format",
            "html",
            "-o",
            str(html),
        ],
        tmp_path,
    )
    assert res.returncode == 0, res.stderr
    png = tmp_path / "evidence.png"
    screenshot(html, png, tmp_path / "chromium-profile")

    assert png.stat().st_size > 30_000, "a real page, not a blank one"
    im = Image.open(png).convert("RGB")
    assert im.size == (WIDTH, HEIGHT)
    left, top, right, bottom = chart_band(im)
    assert right - left > 900 and 120 < bottom - top < 260, (left, top, right, bottom)
    chart = im.crop((left, top, right + 1, bottom + 1))
    colors = chart.getcolors(maxcolors=1 << 20)
    assert colors is not None

    def pixels(hex_color: str) -> int:
        want = _rgb(hex_color)
        return sum(n for n, c in colors if _near(c, want))

    # The first chart is the suspected loop's family: 8 orphans and 1 live registration, 8 revocations.
    orphan, live, revoked = (
        pixels(VERDICT_COLORS["orphan"]),
        pixels(VERDICT_COLORS["live"]),
        pixels(REVOKED_COLOR),
    )
    assert orphan >= 8 * 80, orphan
    assert 80 <= live < orphan, live
    assert revoked >= 8 * 10, revoked
    assert pixels(VERDICT_COLORS["abandoned"]) == 0, "the flood is charted separately, further down"
