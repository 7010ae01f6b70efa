"""The trained model outside the pipeline: `python -m pipeline.predict` on the DVC-tracked file, and the model
in MLflow's format that train logs with its run, loaded back through its model URI.

Both are held to the same oracle: y = X w + b computed in float64 from the weights that went in.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import safetensors.torch
import torch
from mlflow.tracking import MlflowClient

from pipeline import data, predict, tracking, tracking_worker

# float32 weights and inputs: a prediction may differ from the float64 oracle by a few units in the last place.
RTOL, ATOL = 1e-6, 1e-6


def save_linear(path: Path, w: list[float], b: float) -> torch.nn.Linear:
    """An nn.Linear(k, 1) with these parameters, saved as train saves its model."""
    model = torch.nn.Linear(len(w), 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([w]))
        model.bias.copy_(torch.tensor([b]))
    path.write_bytes(safetensors.torch.save(model.state_dict()))
    return model


def oracle(X: np.ndarray, w: list[float], b: float) -> np.ndarray:
    """X w + b in float64 with the float32 parameters the model holds."""
    w32 = np.asarray(w, dtype=np.float32).astype(np.float64)
    return np.asarray(X, dtype=np.float64) @ w32 + float(np.float32(b))


def cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = predict.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# The predict command.


@pytest.mark.parametrize("w", [[3.0], [1.5, -2.0, 0.25]])
def test_predictions_of_command_line_values_are_x_w_plus_b(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], w: list[float]
) -> None:
    model = tmp_path / "m.safetensors"
    save_linear(model, w, 0.5)
    rows = np.array([[1.5, -2.0, 0.0][: len(w)], [-0.75, 4.0, 1e3][: len(w)]])
    argv = [",".join(str(v) for v in r.tolist()) for r in rows]
    code, out, err = cli([*argv, "--model", str(model)], capsys)
    assert code == 0, err
    frame = pd.read_csv(io.StringIO(out))
    assert list(frame.columns) == [*data.feature_columns(len(w)), "prediction"]
    np.testing.assert_allclose(frame[data.feature_columns(len(w))].to_numpy(), rows)
    np.testing.assert_allclose(frame["prediction"], oracle(rows, w, 0.5), rtol=RTOL, atol=ATOL)


def test_csv_in_csv_out_keeps_the_other_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, src, out = tmp_path / "m.safetensors", tmp_path / "in.csv", tmp_path / "out.csv"
    save_linear(model, [3.0], -1.0)
    src.write_text("id,x\na,0.5\nb,2\n")
    code, _, err = cli(["--csv", str(src), "--out", str(out), "--model", str(model)], capsys)
    assert code == 0, err
    frame = pd.read_csv(out)
    assert list(frame["id"]) == ["a", "b"]
    np.testing.assert_allclose(frame["prediction"], oracle(np.array([[0.5], [2.0]]), [3.0], -1.0), rtol=RTOL)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["1.5a"], r"'1.5a' is not a finite number"),
        (["nan"], r"'nan' is not a finite number"),
        (["1,2"], r"input '1,2': 2 number\(s\), but the model takes 1 feature\(s\) \(x\)"),
        ([], r"give numbers .* or --csv FILE"),
        (["--csv", "{tmp}/missing.csv"], r"missing\.csv: no such file"),
        (["--csv", "{tmp}/bad.csv"], r"bad\.csv: line 3, column 'x': 'oops' is not a finite number"),
        (["--csv", "{tmp}/nox.csv"], r"nox\.csv: no column 'x'; the model takes x"),
        (["--csv", "{tmp}/empty.csv"], r"empty\.csv: no rows to predict"),
        (["1", "--out", "{tmp}/o.csv"], r"--out goes with --csv"),
        (["1", "--model", "{tmp}/none.safetensors"], r"none\.safetensors: no such model file"),
        (["1", "--model", "{tmp}/bad.csv"], r"bad\.csv: not a model state_dict with weight and bias"),
    ],
)
def test_bad_input_is_one_line_naming_it_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    save_linear(tmp_path / "m.safetensors", [3.0], 0.0)
    (tmp_path / "bad.csv").write_text("x\n1\noops\n")
    (tmp_path / "nox.csv").write_text("z\n1\n")
    (tmp_path / "empty.csv").write_text("x\n")
    out = tmp_path / "o.csv"
    out.write_text("kept\n")
    args = [a.format(tmp=tmp_path) for a in argv]
    if "--model" not in args:
        args += ["--model", str(tmp_path / "m.safetensors")]
    code, stdout, err = cli([*args, "--out", str(out)] if "--csv" in args else args, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: predict: ")
    assert re.search(message, err), err
    assert out.read_text() == "kept\n" and stdout == ""


# The model in MLflow's format.


def logged_model_id(client: MlflowClient, run_id: str) -> str:
    outputs = client.get_run(run_id).outputs
    assert outputs is not None and len(outputs.model_outputs) == 1, "the run should have one model as its output"
    return outputs.model_outputs[0].model_id


@pytest.fixture
def root(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder whose store MLflow's module-level API (load_model of a models:/ URI) reads too.

    Through the variable, which monkeypatch puts back: mlflow.set_tracking_uri would set it for the rest of
    the session, and later tests would find their stores moved.
    """
    monkeypatch.delenv("PIPELINE_TRACKING", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.default_uri(project))
    return project


@pytest.mark.stage
@pytest.mark.parametrize("w", [[3.0], [1.5, -2.0, 0.25]])
def test_the_logged_model_loads_by_uri_and_predicts_what_the_nn_linear_does(root: Path, w: list[float]) -> None:
    import mlflow.artifacts
    import mlflow.pyfunc

    weights = root / "model.safetensors"
    module = save_linear(weights, w, 0.5)
    columns = data.feature_columns(len(w))
    example = np.random.default_rng(0).standard_normal((3, len(w))).astype(np.float32)
    tracker = tracking.connect("t", root)
    with tracker.run() as run:
        tracker.log_params({"train.lr": 0.1})
        tracker.log_model(weights, columns, example, step=7)
    assert run.run_id is not None
    client = MlflowClient(tracker.uri)
    model_id = logged_model_id(client, run.run_id)
    outputs = client.get_run(run.run_id).outputs
    assert outputs is not None and outputs.model_outputs[0].step == 7
    logged = client.get_logged_model(model_id)
    assert (
        logged.experiment_id == client.get_experiment_by_name(tracker.experiment).experiment_id
        and logged.source_run_id == run.run_id
    )
    assert logged.params == {"train.lr": "0.1"} and str(logged.status) == "READY"

    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    assert model.metadata.get_input_schema().input_names() == columns
    X = np.random.default_rng(1).uniform(-10, 10, (50, len(w)))
    got = model.predict(pd.DataFrame(X, columns=columns))  # plain float64 columns, as a user would pass them
    np.testing.assert_allclose(got, oracle(X, w, 0.5), rtol=RTOL, atol=ATOL)
    # The second implementation: the torch module itself, loaded back the way the predict command does.
    np.testing.assert_allclose(got, predict.predict(module, X), rtol=RTOL, atol=ATOL)

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}"))
    saved_example = pd.read_json(local / "input_example.json", orient="split")
    # MLflow writes the example's JSON with 15 significant digits.
    np.testing.assert_allclose(saved_example[columns].to_numpy(), example.astype(np.float64), rtol=1e-14)
    requirements = (local / "requirements.txt").read_text().split()
    assert set(tracking_worker.model_requirements()) <= set(requirements)
    assert any(r.startswith("mlflow==") for r in requirements)
    assert not any(r.startswith("torch") for r in requirements), "serving the model should not need torch"


@pytest.mark.stage
def test_a_registered_name_gets_a_new_version_per_model_and_the_predict_command_reads_any_by_uri(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import mlflow.pyfunc

    weights = root / "model.safetensors"
    tracker = tracking.connect("t", root)
    for b in (0.0, 1.0):
        save_linear(weights, [3.0], b)
        with tracker.run():
            tracker.log_model(weights, ["x"], np.zeros((1, 1)), registered_name="linreg")
    client = MlflowClient(tracker.uri)
    versions = sorted(client.search_model_versions("name = 'linreg'"), key=lambda v: int(v.version))
    assert [int(v.version) for v in versions] == [1, 2]
    latest = mlflow.pyfunc.load_model("models:/linreg/2")
    np.testing.assert_allclose(latest.predict(pd.DataFrame({"x": [2.0]})), [7.0], rtol=RTOL)
    # The predict command, by version, by alias and by the logged model's own ID: each version's line.
    client.set_registered_model_alias("linreg", "first", "1")
    monkeypatch.chdir(root)
    for uri, b in (
        ("models:/linreg/2", 1.0),
        ("models:/linreg@first", 0.0),
        (f"models:/{logged_model_id(client, versions[0].run_id or '')}", 0.0),
    ):
        code, out, err = cli(["--model", uri, "2.0", "-1"], capsys)
        assert code == 0 and err == "", err
        frame = pd.read_csv(io.StringIO(out))
        np.testing.assert_allclose(frame["prediction"], oracle(np.array([[2.0], [-1.0]]), [3.0], b), rtol=RTOL)
    # A URI the store does not know: one line, exit 2, and no second store made in the folder it ran in.
    for uri, known in (("models:/linreg/9", "linreg"), ("models:/nobody@first", "nobody"), ("models:/m-0", "m-0")):
        code, out, err = cli(["--model", uri, "2.0"], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith(f"error: predict: {uri}: cannot be read from the MLflow store {tracker.uri}: ")
        assert known in err.split(tracker.uri)[1], err
    assert sorted(p.name for p in root.iterdir() if "mlflow" in p.name) == [], "a store was made beside the project's"


def test_a_models_uri_without_a_store_is_one_line_and_makes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, out, err = cli(["--model", "models:/linreg@champion", "2.0"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "models:/linreg@champion: there is no MLflow store at " in err and "run `make repro`" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml"]
