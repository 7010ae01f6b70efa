"""notebooks/walkthrough.ipynb: it runs top to bottom in a fresh copy of the repository after `dvc repro`, the
outputs committed with it are what that run prints, here and under an emulated CPU, and rendered as HTML it
shows its plots in Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

from tests import browser
from tests.helpers import REPO, clone, pipeline_env

pytestmark = pytest.mark.system
NOTEBOOK = Path("notebooks/walkthrough.ipynb")


def text_outputs(nb: object) -> list[list[tuple[str, str]]]:
    """Each code cell's outputs as (kind, text): streams (however the kernel cut them up) and text/plain, errors
    by name. Not execution counts,
    nor the PNG bytes (they carry the fonts and the matplotlib build, not the lesson): images by kind only."""
    cells = []
    for cell in nb.cells:  # type: ignore[attr-defined]
        if cell.cell_type != "code":
            continue
        out = []
        for o in cell.outputs:
            if o.output_type == "stream" and out and out[-1][0] == o.name:  # one stream, however it was sent
                out[-1] = (o.name, out[-1][1] + o.text)
            elif o.output_type == "stream":
                out.append((o.name, o.text))
            elif o.output_type == "error":
                out.append(("error", o.ename))
            else:
                out += [(kind, o.data[kind] if kind == "text/plain" else "") for kind in sorted(o.data)]
        cells.append(out)
    return cells


def execute(repo: Path, kernel: str = "python3", **env: str) -> object:
    """The committed notebook run in `repo` by `kernel`, with no outside MLflow or DVC settings."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(repo / NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=600, startup_timeout=300, kernel_name=kernel)
    with mock.patch.dict(os.environ, pipeline_env(**env), clear=True):
        client.execute(cwd=str(repo / NOTEBOOK.parent))  # a failing assert fails here, with its cell
    return nb


def without_emulator(cells: list[list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """text_outputs less qemu's lines ("qemu-x86_64: warning: TCG doesn't support ..."), and the streams they
    leave empty."""
    kept = []
    for cell in cells:
        out = [
            (kind, "".join(x for x in text.splitlines(True) if not x.startswith("qemu-x86_64: ")))
            for kind, text in cell
        ]
        kept.append([(kind, text) for kind, text in out if text or kind != "stderr"])
    return kept


@pytest.fixture(scope="module")
def site(reproduced: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the reproduced repository: the notebook's last section reads its outputs and its MLflow run."""
    return clone(reproduced, tmp_path_factory.mktemp("notebook") / "repo")


@pytest.fixture(scope="module")
def executed(site: Path) -> object:
    return execute(site)


def test_the_notebook_runs_and_its_committed_outputs_are_what_it_prints(executed: object) -> None:
    import nbformat

    committed = nbformat.read(REPO / NOTEBOOK, as_version=4)
    fresh, stored = text_outputs(executed), text_outputs(committed)
    assert all(stored), "a code cell was committed without its output: run `make notebook`"
    for i, (a, b) in enumerate(zip(fresh, stored, strict=True)):
        assert a == b, f"code cell {i + 1} prints something else now: run `make notebook` and look at the change"
    assert not any(kind == "stderr" for cell in fresh for kind, _ in cell), "the notebook writes warnings"
    assert sum(kind == "image/png" for cell in fresh for kind, _ in cell) == 4


def test_under_an_emulated_cpu_it_prints_the_same(site: Path, tmp_path: Path) -> None:
    """Its kernel run as an Intel Haswell (AVX2, no AVX-512; qemu-x86_64 -cpu, as tests/test_cpus.py does):
    every printed digit the same as committed. The emulator's own warnings (one set per process it starts) go
    to stderr and are left out."""
    import nbformat

    if shutil.which("qemu-x86_64") is None:
        message = "qemu-x86_64 is missing: make qemu (apt-get install qemu-user)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    spec = tmp_path / "kernels" / "haswell"
    spec.mkdir(parents=True)
    argv = ["qemu-x86_64", "-cpu", "Haswell", sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "Haswell", "language": "python"}))
    emulated = execute(site, "haswell", JUPYTER_PATH=str(tmp_path))

    committed = nbformat.read(REPO / NOTEBOOK, as_version=4)
    assert without_emulator(text_outputs(emulated)) == text_outputs(committed)


def test_rendered_as_html_it_shows_its_plots(executed: object, tmp_path: Path) -> None:
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_notebook_node(executed)
    page = tmp_path / "walkthrough.html"
    page.write_text(html)
    dom = browser.dom(page.as_uri())
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,[A-Za-z0-9+/]{1000}', dom)) == 4
    assert "def train_step(" in browser.page_text(dom)
    # The whole notebook in one tall window (headless Chromium draws a blank page when scrolled to an anchor).
    shot = browser.screenshot(page.as_uri(), "notebook.png", size=(1100, 7200))
    assert browser.inked_fraction(shot) > 0.03
