"""What users look at, in a real browser with no internet: the MLflow UI over a store the pipeline filled, and
the page `dvc plots show` writes.

Screenshots land in test-artifacts/ (TEST_ARTIFACTS to change it; `make screenshots` puts them in docs/images/
for the README and docs/).
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from dvc_render.html import PAGE_HTML

from pipeline import config, summary, tracking
from tests import browser
from tests.helpers import logged_params, mlflow_server, rest, sh, yaml_params

pytestmark = pytest.mark.system

VEGA_PLOTS = 3  # the trajectory plots of dvc.yaml (loss, parameters, gradients); the rest are PNG images


class References(HTMLParser):
    """Every src and href in a page: what a browser would fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.found += [v for k, v in attrs if k in ("src", "href") and v]


def plots_page(repo: Path, out: Path, *template: str) -> Path:
    sh(repo, "dvc", "plots", "show", "-o", str(out), *template)
    return out / "index.html"


def test_dvc_plots_page_loads_nothing_from_the_internet_and_draws_every_plot(repo: Path, tmp_path: Path) -> None:
    page = plots_page(repo, tmp_path / "plots")
    refs = References()
    refs.feed(page.read_text())
    assert refs.found, "the page should at least show the PNG plots"
    assert not [r for r in refs.found if re.match(r"(?i)(https?:)?//", r)], refs.found
    dom, console = browser.dom_and_console(page.as_uri())
    assert len(re.findall(r'<canvas[^>]*class="marks"', dom)) == VEGA_PLOTS, "vega drew fewer plots than dvc.yaml has"
    # Nothing on the console either: no error, and none of vega-embed's warnings that the plots' specs were written
    # for other major versions of vega-lite or vega than the page carries (web/build_template.py, VL_VERSION). Bar
    # one kind: DVC's templates draw the hovered point from data filtered by a selection that is empty until the
    # mouse is over the plot, and vega warns that the extent of that empty data is infinite.
    assert [m for m in console if not m.startswith("WARN Infinite extent for field")] == [], console
    shot = browser.screenshot(page.as_uri(), "dvc-plots.png", size=(1280, 1400))
    assert browser.inked_fraction(shot) > 0.01  # not a blank page (the DOM check above is the sharp one)


def test_dvc_default_page_stays_blank_offline(repo: Path, tmp_path: Path) -> None:
    """The control for the test above: with DVC's own page, whose libraries come from a CDN, the same check
    finds no plot. So it is the template that makes the difference, not a browser with a way out."""
    default = tmp_path / "default.html"
    default.write_text(PAGE_HTML)
    page = plots_page(repo, tmp_path / "plots", "--html-template", str(default))
    assert "cdn.jsdelivr.net" in page.read_text()
    dom, console = browser.dom_and_console(page.as_uri())
    assert not re.findall(r'<canvas[^>]*class="marks"', dom)
    # And the console check above sees what goes wrong: each plot's script finds no vegaEmbed.
    assert sum("vegaEmbed is not defined" in message for message in console) == VEGA_PLOTS, console


GLOBALS_PROBE = (
    '<pre id="globals"></pre><script>document.getElementById("globals").textContent = Object.keys(window)</script>'
)


def window_globals(html: str, path: Path) -> set[str]:
    """The names a page's scripts have set on window (var, function, assignment) once they have run."""
    head, end, tail = html.rpartition("</body>")  # the last: vega-embed's code holds a "</body>" of its own
    path.write_text(f"{head}{GLOBALS_PROBE}\n{end}{tail}")
    found = re.search(r'<pre id="globals">([^<]*)</pre>', browser.dom(path.as_uri()))
    assert found, "the probe did not run"
    return set(found.group(1).split(","))


def test_dvc_plots_page_adds_only_vega_embed_to_the_pages_globals(repo: Path, tmp_path: Path) -> None:
    """The libraries' bundle is an ES module's minified code: run as a plain script, its thousands of top-level
    names would be globals beside those of DVC's scripts. web/build_template.py wraps it in a function."""
    page = plots_page(repo, tmp_path / "plots").read_text()
    blank = window_globals("<!DOCTYPE html><html><body></body></html>", tmp_path / "blank.html")
    # vegaEmbed from the bundle; spec from DVC's `var spec = ...` in each plot's script.
    assert window_globals(page, tmp_path / "probed.html") - blank == {"vegaEmbed", "spec"}


def line_points(dom: str) -> list[tuple[float, float]]:
    """The (x, y) screen points of the first Plotly line in the page."""
    paths = re.findall(r'<path class="js-line" d="M([^"]+)"', dom)
    assert paths, "no line drawn in the chart"
    return [(float(x), float(y)) for x, y in (p.split(",") for p in paths[0].split("L"))]


def test_mlflow_ui_serves_the_run_and_draws_its_weight_history(repo: Path, tmp_path: Path) -> None:
    cfg = config.load(repo / "params.yaml")
    trajectory = pd.read_csv(repo / "data" / "model" / "trajectory.csv")
    params = yaml_params(repo / "params.yaml")
    with mlflow_server(tmp_path, backend=tracking.default_uri(repo)) as url:
        api = f"{url}/api/2.0/mlflow"
        name = urllib.parse.quote(cfg.tracking.experiment)
        experiment = rest(f"{api}/experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
        runs = rest(f"{api}/runs/search", {"experiment_ids": [experiment]})["runs"]
        mine = [r for r in runs if logged_params({p["key"]: p["value"] for p in r["data"]["params"]}) == params]
        assert len(mine) == 1, f"{len(mine)} runs with params equal to params.yaml"
        run_id = mine[0]["info"]["run_id"]
        history = rest(f"{api}/metrics/get-history?run_id={run_id}&metric_key=weight")["metrics"]
        by_step = {m["step"]: m["value"] for m in history}
        # The oracle: the trajectory the stage wrote to its DVC output, with the initial weight as step 0.
        assert sorted(by_step) == list(range(cfg.train.epochs + 1))
        assert [by_step[s] for s in trajectory["epoch"]] == pytest.approx(trajectory["weight"].tolist(), abs=1e-6)
        init = next(p["value"] for p in mine[0]["data"]["params"] if p["key"] == "init.weight")
        assert by_step[0] == pytest.approx(float(init), abs=1e-7)

        metric_page = browser.metric_page(url, experiment, [run_id], ["weight"])
        dom = browser.dom(metric_page)
        assert "js-plotly-plot" in dom, "the weight chart is not on the page"
        points = line_points(dom)
        assert len(points) >= 10 and points[-1][0] > points[0][0]
        # The weight rises from its initial value to about 3, and screen y grows downwards.
        rise = trajectory["weight"].iloc[-1] - by_step[0]
        assert rise > 1 and points[-1][1] < points[0][1]
        shot = browser.screenshot(metric_page, "mlflow-ui-weight.png", size=(1800, 800))
        assert browser.inked_fraction(shot) > 0.02
        # The training and the held-out loss on one chart (log scale): two curves, each named, the test loss
        # ending above the training loss as test_loss.csv and trajectory.csv do.
        losses = browser.metric_page(url, experiment, [run_id], ["loss", "test_loss"], scale="log")
        dom = browser.dom(losses)
        curves = {d for d in re.findall(r'<path class="js-line" d="(M[^"]+)"', dom) if "L" in d}
        assert len(curves) == 2, f"{len(curves)} curves, not the training and the test loss"
        text = browser.page_text(dom)
        held_out = pd.read_csv(repo / "data" / "metrics" / "test_loss.csv")
        last = cfg.train.epochs
        assert "(loss)" in text and "(test_loss)" in text
        assert f"test_loss {float(held_out['test_loss'].iloc[-1])!r} (step={last})" in text, text[:1500]
        assert held_out["test_loss"].iloc[-1] > trajectory["loss"].iloc[-1]
        assert browser.inked_fraction(browser.screenshot(losses, "mlflow-ui-loss.png", size=(1800, 800))) > 0.02

        # The experiment in the UI's model-training mode, as make ui and the summary link to it; without the
        # parameter, MLflow 3.17 opens its GenAI mode (the control: the check tells the two apart).
        runs_page = f"{url}/#/experiments/{experiment}?{summary.UI_MODE}"
        listed = browser.page_text(browser.dom(runs_page))
        assert "Model registry" in listed and "Judges" not in listed, listed[:600]
        assert "Judges" in browser.page_text(browser.dom(f"{url}/#/experiments/{experiment}"))
        # Named after what ran; under `dvc exp` (other tests here may run some in this copy), the experiment.
        t, tags = cfg.train, {tag["key"]: tag["value"] for tag in mine[0]["data"]["tags"]}
        assert tags.get("dvc_exp_name", f"{t.method}-{t.optimizer}-lr{t.lr:g}-{t.epochs}ep") in listed
        browser.screenshot(runs_page, "mlflow-ui-runs.png", size=(1800, 700))
        # The run's page renders its description: the result as a table, beside the files the stages wrote.
        run_page = f"{url}/#/experiments/{experiment}/runs/{run_id}?{summary.UI_MODE}"
        shown = browser.dom(run_page)
        metrics = json.loads((repo / "data" / "metrics" / "metrics.json").read_text())
        assert "<table" in shown and "optimisation gap" in shown
        assert f"{metrics['weight']['learned']:.6g}" in browser.page_text(shown)
        assert browser.inked_fraction(browser.screenshot(run_page, "mlflow-ui-run.png", size=(1800, 1300))) > 0.02
        # The registered model: this run's version holds @champion, tagged with the gate's verdict.
        name = cfg.tracking.registered_model
        version = rest(f"{api}/registered-models/alias?name={name}&alias=champion")["model_version"]
        assert version["run_id"] == run_id
        registry = browser.page_text(
            browser.dom(f"{url}/#/models/{name}/versions/{version['version']}?{summary.UI_MODE}")
        )
        assert f"Registered Models {name} Version {version['version']}" in registry
        assert "Aliases : @&nbsp;champion" in registry and "gate passed" in registry, registry[:1500]
        browser.screenshot(f"{url}/#/models/{name}?{summary.UI_MODE}", "mlflow-ui-champion.png", size=(1800, 700))
        # The logged model's page lists its own test scores, each measured on the test table (its md5).
        model_id = next(i["model_id"] for i in mine[0]["outputs"]["model_outputs"])
        model_page = f"{url}/#/experiments/{experiment}/models/{model_id}?{summary.UI_MODE}"
        shown = browser.page_text(browser.dom(model_page))
        test_md5 = hashlib.md5((repo / "data" / "generated" / "test.parquet").read_bytes()).hexdigest()
        for key in ("mse_learned", "r2_learned"):
            row = f"test.{key} test (#{test_md5}) {mine[0]['info']['run_name']} {metrics['test'][key]!r}"
            assert row in shown, shown[:2000]
        browser.screenshot(model_page, "mlflow-ui-model.png", size=(1800, 1000))
