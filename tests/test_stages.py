"""The stages' command lines: what they write, and one-line errors that leave nothing behind."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipeline import cli, data, evaluate, generate, summary, tracking, train
from pipeline.io import md5_file
from tests.helpers import REPO

pytestmark = pytest.mark.stage  # each stage runs here, its tracking worker in a process of its own


def params_with(tmp_path: Path, old: str, new: str) -> Path:
    text = (REPO / "params.yaml").read_text()
    assert old in text
    (tmp_path / "params.yaml").write_text(text.replace(old, new))
    return tmp_path / "params.yaml"


def test_generate_writes_both_tables(tmp_path: Path) -> None:
    args = [
        "--params",
        str(REPO / "params.yaml"),
        "--train",
        str(tmp_path / "tr.parquet"),
        "--test",
        str(tmp_path / "te.parquet"),
    ]
    assert generate.main(args) == 0
    assert (tmp_path / "tr.parquet").stat().st_size > 0 and (tmp_path / "te.parquet").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ("lr: 0.1 ", "lr: -1 ", "train.lr = -1.0: must be > 0"),
        ("epochs: 100", "epochz: 100", "unknown key train.epochz"),
    ],
)
def test_bad_params_fail_every_stage_in_one_line_writing_nothing(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    old: str,
    new: str,
    fragment: str,
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a project of its own: the MLflow store would be made here
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = str(params_with(tmp_path, old, new))
    out = tmp_path / "out"
    runs = [
        (generate.main, ["--train", f"{out}/a.parquet", "--test", f"{out}/b.parquet"]),
        (
            train.main,
            [
                *("--data", f"{REPO}/params.yaml", "--model", f"{out}/m.pt", "--trajectory", f"{out}/t.csv"),
                *("--metrics", f"{out}/train.json"),
            ],
        ),
        (
            evaluate.main,
            [
                *("--train-data", "x", "--test-data", "x", "--model", "x", "--trajectory", "x"),
                *("--train-metrics", "x"),
                *("--metrics", f"{out}/m.json", "--test-loss", f"{out}/test_loss.csv", "--plots", f"{out}/plots"),
            ],
        ),
    ]
    for main, args in runs:
        assert main(["--params", params, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and fragment in err and str(params) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml", "params.yaml"]  # no output, no mlruns/


def test_train_refuses_a_missing_data_file_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "--data",
        str(tmp_path / "none.parquet"),
        "--model",
        str(tmp_path / "m.pt"),
        "--trajectory",
        str(tmp_path / "t"),
        "--metrics",
        str(tmp_path / "train.json"),
    ]
    assert train.main(["--params", str(REPO / "params.yaml"), *args]) == 2
    assert "no such data file" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project folder: the stages' default MLflow store lands in its mlruns/."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


@pytest.fixture
def tracked(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder whose MLflow store is made already (conftest.py), for the tests that read their run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(project)
    return project


def run_pipeline(params: Path) -> list[int]:
    """generate, train, evaluate with the paths dvc.yaml uses, relative to the current folder."""
    p = ["--params", str(params)]
    t = ["--model", "m/model.safetensors", "--trajectory", "m/trajectory.csv"]
    evaluate_outputs = ["--train-metrics", "metrics/train.json", "--metrics", "metrics/eval.json", "--plots", "plots"]
    evaluate_outputs += ["--test-loss", "metrics/test_loss.csv"]
    codes = [generate.main([*p, "--train", "g/train.parquet", "--test", "g/test.parquet"])]
    codes.append(train.main([*p, "--data", "g/train.parquet", *t, "--metrics", "metrics/train.json"]))
    if codes[-1] == 0:
        codes.append(
            evaluate.main(
                [*p, "--train-data", "g/train.parquet", "--test-data", "g/test.parquet", *t, *evaluate_outputs]
            )
        )
    return codes


def only_run(workdir: Path) -> Run:
    client = MlflowClient(tracking.default_uri(workdir))
    experiment = client.get_experiment_by_name("linear-regression")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_two_features_mini_batches_and_numpy_run_end_to_end(tracked: Path) -> None:
    params = params_with(tracked, "true_weights: [3.0]", "true_weights: [3.0, -1.0]")
    text = params.read_text().replace("method: nn", "method: numpy").replace("batch_size: null", "batch_size: 16")
    params.write_text(text.replace("epochs: 100", "epochs: 60"))
    assert run_pipeline(params) == [0, 0, 0]
    m = json.loads((tracked / "metrics/eval.json").read_text())
    for name, true in (("weight_1", 3.0), ("weight_2", -1.0)):
        assert m[name]["true"] == true and abs(m[name]["learned"] - true) < 0.1
    assert sorted(p.name for p in (tracked / "plots").iterdir()) == [
        "convergence.png",
        "fit.png",
        "landscape.png",
        "loss.png",
        "params.png",
    ]
    run = only_run(tracked)
    assert run.info.status == "FINISHED" and run.data.params["train.method"] == "numpy"
    client = MlflowClient(tracking.default_uri(tracked))
    assert len(client.get_metric_history(run.info.run_id, "batch_loss")) == 60 * 5  # 80 rows / 16 per batch
    assert len(client.get_metric_history(run.info.run_id, "weight_2")) == 61
    # The held-out curve: the CSV evaluate wrote is the run's series, point for point, one per epoch.
    curve = (tracked / "metrics/test_loss.csv").read_text().splitlines()
    logged = sorted((p.step, p.value) for p in client.get_metric_history(run.info.run_id, "test_loss"))
    assert curve[0] == "epoch,test_loss" and logged == [
        (int(e), float(v)) for e, v in (r.split(",") for r in curve[1:])
    ]
    assert [step for step, _ in logged] == list(range(1, 61))
    assert {"stability.lr_max", "gradient_check.max_abs_diff", "weight_2.learned"} <= set(run.data.metrics)
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/landscape.png", "plots/convergence.png"} <= plots
    # What ran, in its name; the result, in its description, from the files the stages wrote.
    assert run.info.run_name == "numpy-sgd-lr0.1-60ep"
    note = run.data.tags["mlflow.note.content"]
    report = json.loads((tracked / "metrics/train.json").read_text())
    for name in ("weight_1", "weight_2", "bias"):
        row = next(line for line in note.splitlines() if line.startswith(f"| {name} |"))
        cells = [float(c) for c in row.split("|")[2:6]]  # six significant digits, the gap three
        expected = [m[name]["true"], m[name]["learned"], m[name]["closed_form"]]
        assert cells[:3] == pytest.approx(expected, rel=5e-6), row
        assert cells[3] == pytest.approx(m["optimisation_gap"][name], rel=5e-3), row
    # Mini-batches: not within the tolerance at the end, and no theoretical bound (plain full-batch descent only).
    assert report["convergence"]["observed_epochs"] is None and report["convergence"]["predicted_epochs"] is None
    assert "**not reached** in the epochs run (theory gives no bound: it bounds plain full-batch descent" in note
    # Outside a git repository there is no commit to rebuild from, and the note does not offer `make verify`.
    assert "no git commit was recorded); `make verify` cannot check it: that needs a commit" in note
    # make repro's summary says so in the same words, not "after None epochs (theory: None)".
    closing = summary.table(m, report)
    tol = report["convergence"]["tolerance"]
    assert f"within {tol:g} of the closed form: not reached in the epochs run (theory gives no bound" in closing
    assert "None" not in closing
    assert f"Data md5 `{md5_file(tracked / 'g/train.parquet')}`" in note
    assert f"model md5 `{md5_file(tracked / 'm/model.safetensors')}`" in note
    assert "no git commit was recorded" in note  # this folder is no git repository


def test_the_gate_moves_champion_to_a_passing_model_and_leaves_it_where_it_was_for_a_failing_one(
    tracked: Path,
) -> None:
    params = params_with(tracked, "registered_model: linear-regression", "registered_model: linear-regression")
    assert run_pipeline(params) == [0, 0, 0]  # the defaults: converged, and the closed form near the truth
    client = MlflowClient(tracking.default_uri(tracked))
    champion = client.get_model_version_by_alias("linear-regression", "champion")
    assert int(champion.version) == 1 and champion.tags == {"gate": "passed"}
    assert json.loads((tracked / "metrics/eval.json").read_text())["gate"]["passed"] is True
    # Five epochs stop far from the closed form: the run and its version say why, and @champion stays.
    params.write_text(params.read_text().replace("epochs: 100", "epochs: 5"))
    assert run_pipeline(params) == [0, 0, 0]
    failed = client.get_model_version("linear-regression", "2")
    assert (
        failed.tags["gate"].startswith("failed: learned parameters ")
        and "beyond the tolerance 0.0001" in failed.tags["gate"]
    )
    assert int(client.get_model_version_by_alias("linear-regression", "champion").version) == 1
    run = client.get_run(failed.run_id or "")
    assert run.data.tags["gate"] == failed.tags["gate"] and run.data.metrics["gate.passed"] == 0.0
    assert f"Gate for @champion: **{failed.tags['gate']}**." in run.data.tags["mlflow.note.content"]
    assert json.loads((tracked / "metrics/eval.json").read_text())["gate"]["passed"] is False


def test_learning_rate_above_the_stability_limit_is_refused_before_any_work(
    workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = params_with(workdir, "lr: 0.1 ", "lr: 1.5 ")
    assert run_pipeline(params) == [0, 2]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # The limit 2 / λ_max of H = (2/N) A^T A, from numpy on the table the stage read.
    t = data.read_table(workdir / "g" / "train.parquet")
    A = np.column_stack([t.X.astype(np.float64), np.ones(len(t))])
    limit = 2 / np.linalg.eigvalsh(2 / len(A) * A.T @ A)[-1]
    assert f"train.lr = 1.5: at or above the largest stable learning rate {limit:.4g} for this data" in err
    assert not (workdir / "m").exists() and not (workdir / "mlruns").exists()


def test_divergence_demonstration_fails_the_run_and_keeps_its_trajectory(
    tracked: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = params_with(tracked, "lr: 0.1 ", "lr: 1.5 ")
    params.write_text(params.read_text().replace("allow_divergence: false", "allow_divergence: true"))
    params.write_text(params.read_text().replace("epochs: 100", "epochs: 5000"))
    assert run_pipeline(params) == [0, 2]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "loss is not finite at epoch" in err and "train.lr = 1.5" in err and "largest stable" in err
    assert not (tracked / "m" / "model.safetensors").exists() and not (tracked / "m" / "trajectory.csv").exists()
    run = only_run(tracked)
    assert run.info.status == "FAILED"
    client = MlflowClient(tracking.default_uri(tracked))
    # The params file, logged before the first step, and the trajectory up to the failure.
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["params.yaml", "trajectory.csv"]
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 10


def test_tracking_off_runs_the_pipeline_without_any_store(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_TRACKING", "off")
    assert run_pipeline(params_with(workdir, "epochs: 100", "epochs: 20")) == [0, 0, 0]
    assert (workdir / "metrics/eval.json").exists() and not (workdir / "mlruns").exists()


def test_progress_bar_shows_on_a_terminal_and_not_in_a_log(workdir: Path) -> None:
    """The train stage draws a tqdm bar only when stderr is a terminal (a pseudo-terminal here)."""
    params = str(params_with(workdir, "epochs: 100 ", "epochs: 100 "))  # params.yaml, where train looks for it
    assert generate.main(["--params", params, "--train", "g/train.parquet", "--test", "g/test.parquet"]) == 0
    cmd = [sys.executable, "-m", "pipeline.train", "--data", "g/train.parquet"]
    cmd += ["--model", "m2.safetensors", "--trajectory", "t2.csv", "--metrics", "t2.json"]
    env = {**os.environ, "PIPELINE_TRACKING": "off"}
    outputs = {}
    for name in ("terminal", "file"):
        if name == "terminal":
            leader, follower = pty.openpty()
            # A new pseudo-terminal is 0 columns wide, and tqdm cuts its bar to the width: make it 80 x 24.
            fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            proc = subprocess.run(cmd, cwd=workdir, env=env, stderr=follower, stdout=subprocess.DEVNULL, timeout=120)
            os.close(follower)
            chunks = []
            with contextlib.suppress(OSError):  # EIO once everything written has been read
                while chunk := os.read(leader, 65536):
                    chunks.append(chunk)
            os.close(leader)
            outputs[name] = b"".join(chunks).decode(errors="replace")
        else:
            proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
            outputs[name] = proc.stderr
        assert proc.returncode == 0
    assert "training:" in outputs["terminal"] and "/100 [" in outputs["terminal"]  # n/epochs, then times
    assert "training:" not in outputs["file"] and "it/s" not in outputs["file"] and "epoch/s" not in outputs["file"]


def test_a_compiled_step_without_a_compiler_fails_in_one_line_and_its_run_is_failed(tracked: Path) -> None:
    """No page of compiler output: inductor's error becomes the stage's one line, exit status 2."""
    params = params_with(tracked, "compile: auto", "compile: on")
    assert generate.main(["--params", str(params), "--train", "g/train.parquet", "--test", "g/test.parquet"]) == 0
    cmd = [sys.executable, "-m", "pipeline.train", "--data", "g/train.parquet", "--params", str(params)]
    cmd += ["--model", "m/model.safetensors", "--trajectory", "m/trajectory.csv", "--metrics", "m/train.json"]
    # A cache of its own: a step compiled before would be loaded, not built.
    env = {**os.environ, "CXX": str(tracked / "no-such-g++"), "TORCHINDUCTOR_CACHE_DIR": str(tracked / "inductor")}
    proc = subprocess.run(cmd, cwd=tracked, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if not line.startswith(("INFO ", "20"))]  # not MLflow's log
    assert ours == [
        f"error: train: the compiled step (train.compile) needs a C++ compiler, and '{tracked / 'no-such-g++'}' is "
        "not one that works here: install g++ (or set CXX to a compiler), or set train.compile: off"
    ]
    assert not (tracked / "m").exists()
    assert only_run(tracked).info.status == "FAILED"


@pytest.fixture
def log_level() -> Iterator[None]:
    """Put the pipeline logger's level back after a test that changes it."""
    before = cli.log.level
    yield
    cli.log.setLevel(before)


def generate_args(out: Path) -> list[str]:
    return ["--params", str(REPO / "params.yaml"), "--train", f"{out}/a.parquet", "--test", f"{out}/b.parquet"]


@pytest.mark.parametrize("level", ["debug", "WARNING"])
def test_pipeline_log_level_sets_how_much_the_stages_say(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_level: None, level: str
) -> None:
    monkeypatch.setenv("PIPELINE_LOG_LEVEL", level)
    args = generate_args(tmp_path)
    assert generate.main(args) == 0
    assert cli.log.getEffectiveLevel() == getattr(logging, level.upper())
    assert cli.log.isEnabledFor(logging.DEBUG) == (level == "debug")


def test_an_unknown_log_level_is_one_line_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIPELINE_LOG_LEVEL", "loud")
    args = generate_args(tmp_path)
    assert generate.main(args) == 2
    assert (
        capsys.readouterr().err
        == "error: generate: PIPELINE_LOG_LEVEL = 'LOUD': must be one of DEBUG, INFO, WARNING, ERROR\n"
    )
    assert list(tmp_path.iterdir()) == []
