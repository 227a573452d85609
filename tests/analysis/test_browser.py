"""A real browser renders the report: headless Chromium screenshot that is not blank."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if shutil.os.path.exists("/usr/bin/chromium") else None)


@pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="Chromium is not installed (bash scripts/setup.sh --with-browser)",
)
def test_headless_chromium_screenshot_is_not_blank(analysis, tmp_path):
    assert CHROMIUM is not None, "CI must run the browser test: bash scripts/setup.sh --with-browser installs Chromium"
    import matplotlib.image

    shot = tmp_path / "out.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
             f"--screenshot={shot}", "--window-size=1200,2000", analysis.report.resolve().as_uri()],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
    assert shot.is_file(), "Chromium wrote no screenshot"
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert float(pixels.var()) > 0.01  # text, plots and colours, not a blank page
    # The header band is the dark-blue gradient; the plots below are mostly light with colour.
    assert pixels[:60].mean() < 0.5 and pixels[300:].mean() > 0.6
