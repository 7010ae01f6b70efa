"""When one machine is not enough: a DVC remote shared by clones, and sweeps of queued experiments that land
in one MLflow store, grouped for the UI. The team's tracking server is in tests/test_team_server.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from pipeline import config, tracking
from tests import browser
from tests.helpers import clone, mlflow_server, sh

pytestmark = pytest.mark.system


def outputs(repo: Path) -> list[Path]:
    """Every file DVC tracks as a stage output, from dvc.lock (directories expanded)."""
    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())
    paths = [repo / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    assert files, "dvc.lock names no outputs"
    return files


def test_push_from_one_clone_and_pull_into_another_restores_every_output_without_running(
    reproduced: Path, tmp_path: Path
) -> None:
    first = clone(reproduced, tmp_path / "first")
    assert sh(first, "dvc", "remote", "default").stdout.strip() == "local", "the project ships a default remote"
    sh(first, "git", "commit", "-q", "-am", "repro", check=False)  # dvc.lock, if this checkout's was older
    remote = tmp_path / "remote"
    # Where the remote lives is a per-clone setting (.dvc/config.local, ignored by git), as it would be for
    # a real team: the committed default is ../linreg-dvc-remote beside the repository.
    sh(first, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(first, "dvc", "push")

    second = tmp_path / "second"
    sh(tmp_path, "git", "clone", "-q", str(first), str(second))
    assert not (second / "data" / "model" / "model.safetensors").exists()
    sh(second, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(second, "dvc", "pull")

    theirs = outputs(first)
    ours = outputs(second)
    assert [p.relative_to(second) for p in ours] == [p.relative_to(first) for p in theirs]
    for a, b in zip(theirs, ours, strict=True):
        assert a.read_bytes() == b.read_bytes(), f"{b.relative_to(second)} differs after dvc pull"
    assert "up to date" in sh(second, "dvc", "status").stdout
    assert "Running stage" not in sh(second, "dvc", "repro").stdout
    assert not (second / "mlruns").exists(), "nothing ran, so nothing was tracked"


def test_a_queued_sweep_lands_in_one_store_tagged_as_one_sweep(repo: Path, tmp_path: Path) -> None:
    # Queued experiments run two at a time in temporary copies under .dvc/tmp/exps/; their runs land here.
    sh(repo, "git", "commit", "-q", "-am", "repro", check=False)
    # The copy's .venv links to this venv: its path may hold a space (a clone in "new user ü"), which make cannot
    # take in VENV=. -o: take the venv and the page as built; remaking them would pip install this copy into it.
    grid = ("SWEEP=lr-grid", "GRID=train.lr=0.01,0.1,0.2", "JOBS=2")
    sh(repo, "make", "-o", ".venv/.installed", "-o", "web/dvc-plots.html", "sweep", *grid)
    cfg = config.load(repo / "params.yaml")
    client = MlflowClient(tracking.default_uri(repo))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'lr-grid'")
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.01", "0.1", "0.2"]
    assert all(r.info.status == "FINISHED" and "weight.learned" in r.data.metrics for r in runs)
    assert len({r.data.tags["dvc_exp_name"] for r in runs}) == 3
    shown = sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert all(r.data.tags["dvc_exp_name"] in shown for r in runs), shown
    # Each named after its experiment and what the sweep set, so that the UI's legends tell the curves apart.
    set_here = {"0.01": "train.lr=0.01", "0.1": "(params as committed)", "0.2": "train.lr=0.2"}
    for r in runs:
        assert r.info.run_name == f"{r.data.tags['dvc_exp_name']} {set_here[r.data.params['train.lr']]}"
    for r in runs:  # each says how to get it back; its files sit beside the store, not in DVC's temporary copy
        exp = r.data.tags["dvc_exp_name"]
        again = f"The same bytes again: `dvc exp apply {exp}`; `make verify RUN={r.info.run_id}` rebuilds every output"
        assert again in r.data.tags["mlflow.note.content"]
        assert r.info.artifact_uri.startswith((repo / "mlruns" / "artifacts").as_uri())
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db")), "a stray store inside DVC's temporary copy"
    # @champion in a sweep: each model is a version; lr 0.01 stops short of the closed form in 100 epochs and fails
    # the gate, the other two pass, and the alias ends on whichever of those two evaluate finished last.
    name = cfg.tracking.registered_model
    assert name is not None
    version = {r.data.params["train.lr"]: client.search_model_versions(f"run_id = '{r.info.run_id}'")[0] for r in runs}
    assert all(v.name == name for v in version.values())
    assert version["0.01"].tags["gate"].startswith("failed: learned parameters ")
    assert version["0.1"].tags["gate"] == version["0.2"].tags["gate"] == "passed"
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version in {version["0.1"].version, version["0.2"].version}
    # A sweep's run rebuilds from its baseline commit and the params its experiment set, named as `dvc exp show` does.
    swept = next(r for r in runs if r.data.params["train.lr"] == "0.2")
    exp = swept.data.tags["dvc_exp_name"]
    out = sh(repo, "make", "-o", ".venv/.installed", "-o", "web/dvc-plots.html", "verify", f"RUN={exp}").stdout
    assert f"same: 8 of 8 outputs of run {swept.info.run_id}" in out, out
    # In the UI: the three runs side by side, a weight and a loss curve each, named after their experiments.
    with mlflow_server(tmp_path / "ui", backend=tracking.default_uri(repo)) as url:
        page = browser.metric_page(url, experiment.experiment_id, [r.info.run_id for r in runs], ["weight", "loss"])
        dom = browser.dom(page)
        # A curve is a polyline (M…L…); the UI draws each one twice, the same path over itself.
        curves = {d for d in re.findall(r'<path class="js-line" d="(M[^"]+)"', dom) if "L" in d}
        assert len(curves) == 3 * 2, f"{len(curves)} curves, not one per run and metric"
        text = browser.page_text(dom)
        for r in runs:  # each curve labelled with its run's name; the latest weight as the store holds it
            assert f"{r.info.run_name} (weight)" in text and f"{r.info.run_name} (loss)" in text
            assert f"{r.info.run_name} {r.data.metrics['weight']!r} (step={cfg.train.epochs})" in text
        assert browser.inked_fraction(browser.screenshot(page, "mlflow-ui-sweep.png", size=(1800, 800))) > 0.02
