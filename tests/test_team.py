"""When one machine is not enough: a DVC remote shared by clones, and sweeps of queued experiments that land
in one MLflow store, grouped for the UI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
import urllib.parse
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from ruamel.yaml import YAML

from pipeline import config, tracking
from tests import browser
from tests.conftest import (
    copy_repo,
    free_port,
    logged_params,
    mlflow_server,
    pipeline_env,
    rest,
    sh,
    team_stack,
    yaml_params,
)

pytestmark = pytest.mark.slow


def outputs(repo: Path) -> list[Path]:
    """Every file DVC tracks as a stage output, from dvc.lock (directories expanded)."""
    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())
    paths = [repo / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])]
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file()))]
    assert files, "dvc.lock names no outputs"
    return files


def test_push_from_one_clone_and_pull_into_another_restores_every_output_without_running(tmp_path: Path) -> None:
    first = copy_repo(tmp_path / "first")
    assert sh(first, "dvc", "remote", "default").stdout.strip() == "local", "the project ships a default remote"
    sh(first, "dvc", "repro")
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


def test_a_queued_sweep_lands_in_one_store_tagged_as_one_sweep(tmp_path: Path) -> None:
    repo = copy_repo(tmp_path / "repo")
    sh(repo, "dvc", "repro")
    sh(repo, "git", "commit", "-q", "-am", "repro", check=False)
    venv = Path(sys.executable).parents[1]  # this one: the copy has none, and make would build one
    # -o: take this venv as installed; the copy's newer pyproject.toml would make pip reinstall it from the copy.
    sh(
        repo,
        "make",
        "-o",
        f"{venv}/.installed",
        "sweep",
        f"VENV={venv}",
        "SWEEP=lr-grid",
        "GRID=train.lr=0.01,0.05,0.1",
        "JOBS=2",
    )
    assert not (repo / ".venv").exists()
    cfg = config.load(repo / "params.yaml")
    client = MlflowClient(tracking.default_uri(repo))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.sweep = 'lr-grid'")
    assert sorted(r.data.params["train.lr"] for r in runs) == ["0.01", "0.05", "0.1"]
    assert all(r.info.status == "FINISHED" and "weight.learned" in r.data.metrics for r in runs)
    assert len({r.data.tags["dvc_exp_name"] for r in runs}) == 3
    shown = sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert all(r.data.tags["dvc_exp_name"] in shown for r in runs), shown
    assert sorted(r.info.run_name for r in runs) == sorted(r.data.tags["dvc_exp_name"] for r in runs)
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


def test_the_pipeline_logs_into_a_team_server_on_postgresql(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow.pyfunc
    import pandas as pd
    import psycopg

    repo = copy_repo(tmp_path / "repo")
    cfg = config.load(repo / "params.yaml")
    with team_stack() as (uri, database):
        sh(repo, "dvc", "repro", env=pipeline_env(MLFLOW_TRACKING_URI=uri))
        assert not (repo / "mlruns").exists(), "nothing goes to the embedded store"
        # What the server says, through its REST API.
        api = f"{uri}/api/2.0/mlflow"
        name = urllib.parse.quote(cfg.tracking.experiment)
        experiment = rest(f"{api}/experiments/get-by-name?experiment_name={name}")["experiment"]["experiment_id"]
        (run,) = rest(f"{api}/runs/search", {"experiment_ids": [experiment]})["runs"]
        assert run["info"]["status"] == "FINISHED"
        logged = logged_params({p["key"]: p["value"] for p in run["data"]["params"]})
        assert logged == yaml_params(repo / "params.yaml")
        run_id = run["info"]["run_id"]
        history = rest(f"{api}/metrics/get-history?run_id={run_id}&metric_key=weight")["metrics"]
        assert sorted(m["step"] for m in history) == list(range(cfg.train.epochs + 1))
        files = {f["path"] for f in rest(f"{api}/artifacts/list?run_id={run_id}")["files"]}
        assert {"trajectory.csv", "metrics.json", "plots"} <= files
        # The model comes back through the server too.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        client = MlflowClient(uri)
        outputs = client.get_run(run_id).outputs
        assert outputs is not None
        model = mlflow.pyfunc.load_model(f"models:/{outputs.model_outputs[0].model_id}")
        m = json.loads((repo / "data/metrics/metrics.json").read_text())
        got = model.predict(pd.DataFrame({"x": [2.0]}))
        assert got[0] == pytest.approx(2.0 * m["weight"]["learned"] + m["bias"]["learned"], rel=1e-6)
        # And the rows are in PostgreSQL itself, not in some file beside the server.
        with psycopg.connect(database) as connection:
            assert connection.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone() == (1,)
            weights = connection.execute(
                "SELECT count(*) FROM metrics WHERE run_uuid = %s AND key = 'weight'", (run_id,)
            ).fetchone()
            assert weights == (cfg.train.epochs + 1,)
        # gunicorn serves it (uvicorn's workers stall kept-alive requests), with MLflow's protections still on:
        # a foreign Host header (DNS rebinding) and a foreign page's request (CORS) are refused.
        search = f"{api}/experiments/search"
        with requests.Session() as session:
            assert session.get(f"{uri}/health").headers["Server"].startswith("gunicorn")
            assert session.get(f"{search}?max_results=1", headers={"Host": "evil.example.com"}).status_code == 403
            foreign = session.post(search, json={"max_results": 1}, headers={"Origin": "http://evil.example.com"})
            assert foreign.status_code == 403
            assert session.post(search, json={"max_results": 1}).status_code == 200  # the control


def test_a_failed_first_start_leaves_nothing_that_breaks_the_next() -> None:
    from pipeline import team_server

    if os.geteuid() != 0:
        pytest.skip("the failure needs a folder the postgres account cannot read, which needs root")
    try:
        team_server.postgres_bin("initdb")
    except team_server.ServerError as e:
        pytest.fail(str(e)) if os.environ.get("CI") else pytest.skip(str(e))
    folder = Path(tempfile.mkdtemp(prefix="team-"))  # pytest's tmp_path is private to root already
    try:
        folder.chmod(0o700)  # the postgres account cannot enter it: initdb fails
        refused = pytest.raises(team_server.ServerError, match=r"^initdb .* failed: ")
        with refused, team_server.postgres(folder / "postgres", free_port()):
            pass
        assert not (folder / "postgres").exists()
        folder.chmod(0o755)  # the user's fix; the next start then simply works
        with team_server.postgres(folder / "postgres", free_port()) as db:
            assert (db.data / "PG_VERSION").is_file()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_a_cluster_without_its_password_file_is_one_clear_error(tmp_path: Path) -> None:
    from pipeline import team_server

    data = tmp_path / "postgres"
    data.mkdir()
    (data / "PG_VERSION").write_text("15\n")
    with pytest.raises(team_server.ServerError, match=r"postgres-password: missing, .* remove .* to start over"):
        team_server.init_cluster(data)
