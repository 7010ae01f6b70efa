"""The pipeline as users run it: `make repro` in a fresh copy of the repository, checked from its outputs.

These are the CI assertions: the learned weight is within a noise-derived tolerance of w_true and at the
closed form, every execution is one MLflow run in the repository's store, and DVC re-runs only what changed.
The reproduced repository (conftest.py) is only read; a test that runs DVC takes a copy of its own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from pipeline import config, numerics, tracking
from tests.helpers import FOLDER, REPO, clone, logged_params, pipeline_env, sh, yaml_params

pytestmark = pytest.mark.system

# |w - w_true| <= Z * SE(w_ols): with Gaussian noise the OLS slope is normal around w_true with standard error
# SE, so a 3-SE band fails by chance with probability 0.27 %; the defaults keep the band itself below 0.05.
Z = 3.0
OPTIMISATION_TOL = 1e-3  # gradient descent must have reached the closed form to this absolute accuracy


def store(repo: Path) -> tuple[MlflowClient, str]:
    cfg = config.load(repo / "params.yaml")
    client = MlflowClient(tracking.default_uri(repo))
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    assert experiment is not None, f"no experiment {cfg.tracking.experiment!r} in {repo}/mlruns"
    return client, experiment.experiment_id


def test_learned_weight_within_tolerance_of_truth_and_closed_form(reproduced: Path) -> None:
    m = json.loads((reproduced / "data/metrics/metrics.json").read_text())
    w = m["weight"]["learned"]
    tolerance = Z * m["statistical_error"]["weight_se"]
    assert tolerance <= 0.05, f"the defaults should pin the weight to 0.05, the noise allows only {tolerance:.4f}"
    assert abs(w - 3.0) <= tolerance, f"learned weight {w} is more than {Z} standard errors ({tolerance:.4f}) from 3"
    assert abs(w - m["weight"]["closed_form"]) <= OPTIMISATION_TOL
    assert abs(m["bias"]["learned"] - m["bias"]["closed_form"]) <= OPTIMISATION_TOL
    # The gate's distance, from evaluate's gaps, is the one train measured itself against the closed form.
    train_report = json.loads((reproduced / "data/metrics/train.json").read_text())
    assert m["gate"]["passed"] is True
    assert m["gate"]["distance"] == pytest.approx(train_report["convergence"]["final_distance"], rel=1e-9)
    # The held-out curve levels off above the training loss, at the learned line's test MSE: the generalization gap.
    test_loss = pd.read_csv(reproduced / "data/metrics/test_loss.csv")["test_loss"]
    loss = pd.read_csv(reproduced / "data/model/trajectory.csv")["loss"]
    assert test_loss.iloc[-1] == pytest.approx(m["test"]["mse_learned"], rel=1e-6)
    assert test_loss.iloc[-1] > 1.2 * loss.iloc[-1] and test_loss.iloc[-1] == pytest.approx(test_loss.iloc[-2])


def test_one_finished_mlflow_run_with_params_series_and_artifacts(reproduced: Path, tmp_path: Path) -> None:
    cfg = config.load(reproduced / "params.yaml")
    client, exp_id = store(reproduced)
    runs = client.search_runs([exp_id])
    assert len(runs) == 1, "train and evaluate must share one run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    # The oracle is the YAML itself, read here without the pipeline's config module.
    assert logged_params(run.data.params) == yaml_params(reproduced / "params.yaml")
    weight = client.get_metric_history(run.info.run_id, "weight")
    assert sorted(p.step for p in weight) == list(range(cfg.train.epochs + 1))
    assert float(run.data.params["init.weight"]) == next(p.value for p in weight if p.step == 0)
    for series in ("loss", "grad_weight", "grad_bias", "bias"):
        assert len(client.get_metric_history(run.info.run_id, series)) >= cfg.train.epochs
    m = json.loads((reproduced / "data/metrics/metrics.json").read_text())
    assert run.data.metrics["weight.closed_form"] == m["weight"]["closed_form"]
    assert 0 <= run.data.metrics["closed_form.sklearn_gap"] <= 1e-9, "scikit-learn disagrees with the closed form"
    inputs = {(d.dataset.name, d.tags[0].value): d.dataset.digest for d in run.inputs.dataset_inputs}
    test_md5 = hashlib.md5((reproduced / "data/generated/test.parquet").read_bytes()).hexdigest()
    assert inputs == {("train", "training"): run.data.tags["data_md5"], ("test", "evaluation"): test_md5}
    # The model's own test scores are linked to it and to the test table: the Models tab compares models by them.
    (output,) = run.outputs.model_outputs
    linked = {x.key: x for x in client.get_logged_model(output.model_id).metrics or []}
    for key in ("mse_learned", "r2_learned"):
        point = linked[f"test.{key}"]
        assert point.value == run.data.metrics[f"test.{key}"] == m["test"][key]
        assert (point.dataset_name, point.dataset_digest, point.run_id) == ("test", test_md5, run.info.run_id)
    assert "test.mse_closed_form" not in linked and "test.mse_closed_form" in run.data.metrics
    # The run says which numerics made its bytes: portable here, with each setting in force.
    assert run.data.tags["numerics"] == ("portable" if numerics.portable_here() else "native")
    assert {k: run.data.tags[f"numerics.{k}"] for k in numerics.PORTABLE} == (
        numerics.PORTABLE if numerics.portable_here() else {k: "unset" for k in numerics.PORTABLE}
    )
    commit = sh(reproduced, "git", "rev-parse", "HEAD").stdout.strip()
    assert run.data.tags["mlflow.source.git.commit"] == commit
    # Its description: plain gradient descent converged as theory bounds it, and the way back to these bytes.
    c = json.loads((reproduced / "data/metrics/train.json").read_text())["convergence"]
    note = run.data.tags["mlflow.note.content"]
    assert f"after **{c['observed_epochs']}** epochs (theory: at most {c['predicted_epochs']})" in note
    assert (
        f"The same bytes again: `git checkout {commit}`, then `dvc repro`; `make verify RUN={run.info.run_id}`" in note
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"trajectory.csv", "metrics.json", "train.json", "plots", "params.yaml"} <= artifacts
    # What `make verify` rebuilds from (tests/test_verify.py): the params file, byte for byte.
    logged = Path(client.download_artifacts(run.info.run_id, "params.yaml", str(tmp_path)))
    assert logged.read_bytes() == (reproduced / "params.yaml").read_bytes()
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/landscape.png", "plots/convergence.png"} <= plots
    t = json.loads((reproduced / "data/metrics/train.json").read_text())
    assert run.data.metrics["convergence.predicted_epochs"] == t["convergence"]["predicted_epochs"]
    assert run.data.metrics["convergence.observed_epochs"] == t["convergence"]["observed_epochs"]
    # The artifacts sit beside the store, under the repository root, not in whatever folder a stage ran in.
    assert run.info.artifact_uri.startswith((reproduced / "mlruns" / "artifacts").as_uri())


def test_the_runs_mlflow_model_and_the_predict_command_give_the_learned_line(
    reproduced: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow.pyfunc

    client, exp_id = store(reproduced)
    run = client.search_runs([exp_id])[0]
    assert run.outputs is not None
    (output,) = run.outputs.model_outputs
    m = json.loads((reproduced / "data/metrics/metrics.json").read_text())
    w, b = m["weight"]["learned"], m["bias"]["learned"]
    x = [-2.0, 0.5, 1.5, 10.0]
    # The model is read through its URI, from the store MLFLOW_TRACKING_URI names (monkeypatch puts it back).
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.default_uri(reproduced))
    served = mlflow.pyfunc.load_model(f"models:/{output.model_id}").predict(pd.DataFrame({"x": x}))
    out = sh(reproduced, "python", "-m", "pipeline.predict", *map(str, x)).stdout
    predicted = pd.read_csv(io.StringIO(out))["prediction"].to_numpy()
    expected = np.array(x) * w + b
    np.testing.assert_allclose(served, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(predicted, expected, rtol=1e-6, atol=1e-6)
    tolerance = Z * m["statistical_error"]["weight_se"]
    # About 3x: the slope within the test's noise band of the truth, plus the learned intercept.
    assert np.all(np.abs(predicted - 3.0 * np.array(x)) <= tolerance * np.abs(x) + abs(b) + 1e-6)


def test_misspelt_key_stops_the_stage_and_checkout_restores_its_outputs(repo: Path) -> None:
    params = repo / "params.yaml"
    original = params.read_text()
    model_before = (repo / "data/model/model.safetensors").read_bytes()
    params.write_text(original.replace("  lr: 0.1 ", "  lrr: 0.1\n  lr: 0.1 "))
    try:
        out = sh(repo, "dvc", "repro", check=False)
        assert out.returncode != 0
        assert "error: train: params.yaml: unknown key train.lrr" in out.stderr + out.stdout
    finally:
        params.write_text(original)
    sh(repo, "dvc", "checkout")
    assert (repo / "data/model/model.safetensors").read_bytes() == model_before
    assert "Running stage" not in sh(repo, "dvc", "repro").stdout


@pytest.mark.skipif(
    not numerics.portable_here(),
    reason="dvc.lock holds x86-64 bytes: other CPUs (Apple silicon, aarch64) have other kernels and no MKL",
)
def test_outputs_match_committed_lock(reproduced: Path) -> None:
    pipeline_files = ("dvc.lock", "dvc.yaml", "params.yaml", "pipeline")
    if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", *pipeline_files], cwd=REPO).returncode != 0:
        pytest.skip("the pipeline has uncommitted changes here, so there is no committed dvc.lock to match")
    # A fresh machine reproduces the very bytes recorded in dvc.lock, whatever its x86-64 CPU (pipeline/numerics.py;
    # tests/test_cpus.py runs the stages on other CPUs).
    # If a code change is not yet reproduced here, this fails too: run `make repro` and commit dvc.lock.
    diff = sh(reproduced, "git", "diff", "--unified=0", "dvc.lock").stdout
    assert diff == "", f"a fresh dvc repro does not reproduce the committed dvc.lock:\n{diff}"


def test_an_experiment_reruns_train_and_evaluate_only_compiled_step_included(reproduced: Path, tmp_path: Path) -> None:
    # In a copy whose folder holds a space and a non-ASCII letter: one experiment at a time is what `make sweep`'s
    # error offers there instead of the queue. The compiled step, built afresh (an inductor cache of its own), links
    # against torch/lib in the venv, whose path holds the folder's space (pytorch/pytorch#191010).
    repo = clone(reproduced, tmp_path / FOLDER)
    env = pipeline_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    env["PATH"] = f"{repo / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"  # as make puts it: the stages' python
    out = sh(repo, "dvc", "exp", "run", "-S", "train.lr=0.05", "-S", "train.compile=on", env=env).stdout
    assert "Stage 'generate' didn't change" in out, out
    assert "Running stage 'train'" in out and "Running stage 'evaluate'" in out, out
    assert list((tmp_path / "inductor").rglob("*.so")), "nothing was compiled"
    client, exp_id = store(repo)
    runs = client.search_runs([exp_id], filter_string="params.`train.lr` = '0.05'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["compiled"] == "True"
    assert runs[0].data.tags.get("dvc_exp_name"), "the DVC experiment name is tagged on the run"
    assert "weight.learned" in runs[0].data.metrics, "evaluate logged into the experiment's run"
    assert "0.05" in sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert "train.lr" in sh(repo, "dvc", "params", "diff").stdout
    diff = sh(repo, "dvc", "metrics", "diff").stdout
    assert "weight.learned" in diff, diff
    # .dvc/config names the offline page by a relative path (plots.html_template): no plotting library from a CDN.
    sh(repo, "dvc", "plots", "diff")
    html = (repo / "dvc_plots" / "index.html").read_text(encoding="utf-8")
    assert "grad_weight" in html and "fit.png" in html, "plots diff renders the trajectory and the PNGs"
    assert "vega-embed" in html and 'src="http' not in html
