"""Headless Chromium (Debian's `chromium`, which `make test` installs, or Chrome) for the tests that look at pages.

Every call starts a fresh browser with an empty profile and no way out: --host-resolver-rules sends every host
but 127.0.0.1 nowhere, so a page that needs the internet fails here as it would offline. The flags come from
../shared/docs/MEASURED.md; without --run-all-compositor-stages-before-draw the MLflow charts stay spinners.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

FLAGS = [
    "--headless",
    "--no-sandbox",  # the tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--run-all-compositor-stages-before-draw",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")  # Debian's first


def chromium() -> str:
    """The browser's path; a test that needs it fails in CI without it, and is skipped elsewhere."""
    path = next(filter(None, map(shutil.which, BROWSERS)), None)
    if path is None:
        message = f"no Chromium ({', '.join(BROWSERS)}): make test installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _run(url: str, *mode: str, budget_ms: int, size: tuple[int, int]) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}",  # page time, run faster than the clock when idle
                *mode,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )


def dom(url: str, budget_ms: int = 15_000, size: tuple[int, int] = (1600, 1000)) -> str:
    """The page's DOM once its scripts have run for `budget_ms` of page time."""
    return _run(url, "--dump-dom", budget_ms=budget_ms, size=size).stdout


# How Chromium logs a console message to stderr (--enable-logging=stderr): [...:INFO:CONSOLE:12] "text", source: ...
# ("CONSOLE(12)" in older versions); the text may run over several lines (a stack trace).
CONSOLE = re.compile(r'^\[[^\]\n]*:CONSOLE[:(]\d+\)?\] "(.*?)", source: ', re.M | re.S)


def dom_and_console(url: str, budget_ms: int = 15_000, size: tuple[int, int] = (1600, 1000)) -> tuple[str, list[str]]:
    """The page's DOM, as dom() has it, and what its scripts wrote to the console: logs, warnings, uncaught errors."""
    run = _run(url, "--dump-dom", "--enable-logging=stderr", "--v=0", budget_ms=budget_ms, size=size)
    return run.stdout, CONSOLE.findall(run.stderr)


def screenshot(url: str, name: str, budget_ms: int = 15_000, size: tuple[int, int] = (1600, 1000)) -> Path:
    """A PNG of the page, saved as ARTIFACTS/name (test-artifacts/ unless TEST_ARTIFACTS says otherwise)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    out = ARTIFACTS / name
    _run(url, f"--screenshot={out}", budget_ms=budget_ms, size=size)
    assert out.is_file(), f"chromium wrote no screenshot of {url}"
    return out


def inked_fraction(png: Path) -> float:
    """Share of the pixels that are not (nearly) white: 0 for a blank page."""
    from PIL import Image

    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
    return float(np.mean(pixels < 230))


def metric_page(url: str, experiment: str, runs: list[str], keys: list[str], scale: str = "linear") -> str:
    """The MLflow UI's chart of these metrics' histories for these runs, step by step: one line per run and key,
    on a linear or a log y axis."""
    query = {
        "runs": json.dumps(runs),
        "metric": json.dumps(keys[0]),
        "experiments": json.dumps([experiment]),
        "plot_metric_keys": json.dumps(keys),
        "plot_layout": "{}",
        "x_axis": "step",
        "y_axis_scale": scale,
        "line_smoothness": "1",
        "show_point": "false",
        "deselected_curves": "[]",
        "last_linear_y_axis_range": "[]",
        "workflowType": "machine_learning",  # the UI's model-training mode, as make ui links to it
    }
    return f"{url}/#/metric?" + "&".join(f"{k}={v}" for k, v in query.items())


def page_text(dom: str) -> str:
    """What a reader sees of a page: its text without tags, styles and scripts, spaces collapsed."""
    text = re.sub(r"<(style|script)\b.*?</\1>|<[^>]+>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", text)
