"""notebooks/walkthrough.ipynb: it runs top to bottom in a fresh copy of the repository after `dvc repro`, the
outputs committed with it are what that run prints, and rendered as HTML it shows its plots in Chromium.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from unittest import mock

import pytest

from tests import browser
from tests.conftest import REPO, copy_repo, pipeline_env, sh

pytestmark = pytest.mark.slow
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


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> object:
    """The committed notebook, run again in a fresh copy after `dvc repro` (its last section reads the outputs
    and the MLflow run), by a kernel of this venv with no outside MLflow or DVC settings."""
    import nbformat
    from nbclient import NotebookClient

    repo = copy_repo(tmp_path_factory.mktemp("notebook"))
    sh(repo, "dvc", "repro")
    nb = nbformat.read(repo / NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(repo)}})
    with mock.patch.dict(os.environ, pipeline_env(), clear=True):
        client.execute(cwd=str(repo / NOTEBOOK.parent))  # a failing assert fails here, with its cell
    return nb


def test_the_notebook_runs_and_its_committed_outputs_are_what_it_prints(executed: object) -> None:
    import nbformat

    committed = nbformat.read(REPO / NOTEBOOK, as_version=4)
    fresh, stored = text_outputs(executed), text_outputs(committed)
    assert all(stored), "a code cell was committed without its output: run `make notebook`"
    for i, (a, b) in enumerate(zip(fresh, stored, strict=True)):
        assert a == b, f"code cell {i + 1} prints something else now: run `make notebook` and look at the change"
    assert not any(kind == "stderr" for cell in fresh for kind, _ in cell), "the notebook writes warnings"
    assert sum(kind == "image/png" for cell in fresh for kind, _ in cell) == 4


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
