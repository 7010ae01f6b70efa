"""Where the MLflow store is, how runs end, and how the stage's calls reach the store through the tracking
worker, against throw-away SQLite stores read back with MLflow's own client.

Each run starts a worker process that imports MLflow (about 2 s with a new store), so most tests here are
in the stage tier.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pandas as pd
import pytest
from mlflow.data.pandas_dataset import from_pandas
from mlflow.tracking import MlflowClient
from mlflow.utils import mlflow_tags

from pipeline import generate, record, tracking, tracking_worker, train
from pipeline.errors import TrackingError
from tests.helpers import REPO, free_port, mlflow_server, telemetry_env


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with no store yet: for the tests of a store's first use, or of none."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PIPELINE_TRACKING", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


@pytest.fixture
def stored(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder whose store is made already (conftest.py): the tests of what a run logs."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("PIPELINE_TRACKING", raising=False)
    return project


def client_for(tracker: tracking.Tracker) -> MlflowClient:
    """A client of our own in this process: the oracle for what the worker wrote."""
    return MlflowClient(tracker.uri)


def find_run(tracker: tracking.Tracker, model_md5: str) -> str | None:
    client = client_for(tracker)
    experiment = client.get_experiment_by_name(tracker.experiment)
    return None if experiment is None else tracking_worker.find_run(client, experiment.experiment_id, model_md5)


def artifact_file(tracker: tracking.Tracker, run_id: str, path: str) -> Path:
    uri = client_for(tracker).get_run(run_id).info.artifact_uri
    return Path(unquote(urlparse(uri).path)) / path


@pytest.mark.parametrize("inner", [".dvc/tmp/exps/tmpab12", ".dvc/tmp/exps/standalone/tmpcd34/data"])
def test_experiment_copies_resolve_to_the_real_root(root: Path, inner: str) -> None:
    (root / inner).mkdir(parents=True)
    (root / inner / "dvc.yaml").write_text("stages: {}\n")  # the copy has its own dvc.yaml: not the root
    assert tracking.project_root(root / inner) == root
    assert tracking.tracking_uri(tracking.project_root(root / inner)) == f"sqlite:///{root}/mlruns/mlflow.db"


def test_root_is_found_from_a_subfolder(root: Path) -> None:
    (root / "data" / "model").mkdir(parents=True)
    assert tracking.project_root(root / "data" / "model") == root


def test_environment_overrides_the_store(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(root) == "http://127.0.0.1:5999"


def test_the_tag_names_spelt_out_are_mlflows_own() -> None:
    assert record.SOURCE_NAME_TAG == mlflow_tags.MLFLOW_SOURCE_NAME
    assert record.GIT_COMMIT_TAG == mlflow_tags.MLFLOW_GIT_COMMIT


@pytest.mark.parametrize(
    ("environ", "tag"),
    [
        ({}, "on"),  # MLflow's default; the package's own is the next test's
        ({"MLFLOW_DISABLE_TELEMETRY": "false"}, "on"),
        ({"MLFLOW_DISABLE_TELEMETRY": "0"}, "on"),
        ({"MLFLOW_DISABLE_TELEMETRY": "true"}, "off"),
        ({"MLFLOW_DISABLE_TELEMETRY": "1"}, "off"),
        ({"MLFLOW_DISABLE_TELEMETRY": "no"}, "off"),  # MLflow's parse fails on it, and a failed check means off
        ({"MLFLOW_DISABLE_TELEMETRY": "false", "DO_NOT_TRACK": "true"}, "off"),
        *(({"MLFLOW_DISABLE_TELEMETRY": "false", name: "1"}, "off") for name in record.MLFLOW_CI_VARIABLES),
    ],
)
def test_the_telemetry_tag_says_what_mlflow_decides(
    environ: dict[str, str], tag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.telemetry import utils  # the decision itself, private to MLflow: the oracle

    for name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK", *record.MLFLOW_CI_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    # MLflow looks for the CI variables once, at import (when pytest's PYTEST_CURRENT_TEST was set): again, here.
    monkeypatch.setattr(utils, "_IS_IN_CI_ENV_OR_TESTING", utils._is_ci_env_or_testing())
    assert utils.is_telemetry_disabled() == (tag == "off")
    assert record.telemetry_tags() == {"mlflow_telemetry": tag}
    assert (
        record.train_tags("md5", None, "params.yaml")["mlflow_telemetry"]
        == record.evaluate_tags("params.yaml")["mlflow_telemetry"]
        == tag
    )


def test_under_dvc_exp_the_run_is_named_after_the_experiment_and_the_params_it_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from pipeline import config

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)
    text = (REPO / "params.yaml").read_text()
    edits = [("  lr: 0.1 ", "  lr: 0.01 "), ("  epochs: 100 ", "  epochs: 50 "), ("sweep: null", "sweep: grid")]
    for old, new in edits:  # as `dvc exp run -S` would: sweep is a tag of its own, so not in the name
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "params.yaml").write_text(text)
    cfg = config.load("params.yaml")
    monkeypatch.setenv("DVC_EXP_NAME", "gawsy-taro")
    assert record.run_name(cfg) == "gawsy-taro train.lr=0.01 train.epochs=50"  # in params.yaml's order
    monkeypatch.delenv("DVC_EXP_NAME")
    assert record.run_name(cfg) == "nn-sgd-lr0.01-50ep"  # a plain repro: what ran
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.setenv("DVC_EXP_NAME", "gawsy-taro")
    assert record.run_name(config.load("params.yaml")) == "gawsy-taro (params as committed)"


def test_a_run_is_dirty_when_its_code_differs_from_the_commit_not_its_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for name, text in (("params.yaml", "a: 1\n"), ("dvc.lock", "x\n"), ("code.py", "x = 1\n")):
        (tmp_path / name).write_text(text)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "base"], check=True)

    def dirty() -> str:
        return record.provenance_tags("train", "params.yaml")["git_dirty"]

    assert dirty() == "false"
    # The run logs the params file whole (pipeline.verify rebuilds from it), and `dvc repro` rewrites dvc.lock.
    (tmp_path / "params.yaml").write_text("a: 2\n")
    (tmp_path / "dvc.lock").write_text("y\n")
    assert dirty() == "false"
    (tmp_path / "code.py").write_text("x = 2\n")
    assert dirty() == "true"


def test_importing_the_package_turns_mlflow_telemetry_off_unless_the_user_turned_it_on() -> None:
    # A fresh interpreter each time: this one imported the package long ago.
    code = "import os, pipeline.record as r; print(os.getenv('MLFLOW_DISABLE_TELEMETRY'), *r.telemetry_tags().values())"
    for given, expected in ((None, "true off"), ("false", "false on"), ("true", "true off")):
        env = telemetry_env(**({} if given is None else {"MLFLOW_DISABLE_TELEMETRY": given}))
        assert env.get("MLFLOW_DISABLE_TELEMETRY") == given  # unset: not even this process's value
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.split() == expected.split(), given


@pytest.mark.stage
def test_series_are_read_back_exactly_with_artifacts_beside_the_store(stored: Path) -> None:
    tracker = tracking.connect("t", stored)
    steps = list(range(1250))
    with tracker.run() as run:
        tracker.log_series({"a": (steps, [0.5 * s for s in steps]), "b": (np.arange(1250), np.full(1250, -1.0))})
    assert run.run_id is not None
    client = client_for(tracker)
    assert sorted((p.step, p.value) for p in client.get_metric_history(run.run_id, "a")) == [
        (s, 0.5 * s) for s in steps
    ]
    assert len(client.get_metric_history(run.run_id, "b")) == 1250
    assert client.get_experiment_by_name("t").artifact_location == (stored / "mlruns" / "artifacts").as_uri()


def test_series_go_to_the_store_in_batches_of_1000_points(stored: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's session, run here in-process so that its client's requests can be counted.
    session = tracking_worker.Session(tracking.default_uri(stored), "t", say=lambda kind, value: None)
    session.start(None, None, {})
    calls: list[int] = []
    log_batch = session.client.log_batch

    def counting(run_id: str, metrics: list[object] = (), **kw: object) -> None:  # type: ignore[assignment]
        calls.append(len(metrics))
        log_batch(run_id, metrics=metrics, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(session.client, "log_batch", counting)
    session.log_series("a", np.arange(1250), np.zeros(1250), 0)
    session.log_series("b", np.arange(1250), np.ones(1250), 0)
    session.end("FINISHED")
    assert calls == [1000, 250, 1000, 250]  # each request holds one series
    assert len(MlflowClient(session.uri).get_metric_history(session.run_id, "b")) == 1250


@pytest.mark.stage
def test_the_experiment_is_marked_for_model_training_when_made_and_when_found_without_it(stored: Path) -> None:
    kind = ("mlflow.experimentKind", "custom_model_development")  # the value MLflow's UI bundle tests for
    tracker = tracking.connect("t", stored)
    with tracker.run():
        pass
    client = client_for(tracker)
    assert kind in client.get_experiment_by_name("t").tags.items()
    older = client.create_experiment("older")  # as MLflow makes one: without the tag
    assert kind[0] not in client.get_experiment(older).tags
    with tracking.connect("older", stored).run():
        pass
    assert kind in client.get_experiment(older).tags.items()


@pytest.mark.stage
def test_run_ends_failed_when_the_body_raises_and_is_not_found(stored: Path) -> None:
    tracker = tracking.connect("t", stored)
    with pytest.raises(RuntimeError), tracker.run() as run:
        tracker.set_tags({record.MODEL_TAG: "abc"})
        raise RuntimeError("boom")
    assert run.run_id is not None and client_for(tracker).get_run(run.run_id).info.status == "FAILED"
    assert find_run(tracker, "abc") is None  # evaluate must not attach to a failed run


@pytest.mark.stage
def test_ctrl_c_ends_the_run_killed(stored: Path) -> None:
    tracker = tracking.connect("t", stored)
    with pytest.raises(KeyboardInterrupt), tracker.run() as run:
        tracker.log_params({"a": 1})
        pid = tracker.start().pid
        assert pid is not None
        os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group, the worker included
        raise KeyboardInterrupt
    assert run.run_id is not None
    finished = client_for(tracker).get_run(run.run_id)
    assert finished.info.status == "KILLED" and finished.data.params == {"a": "1"}  # the worker carried on


@pytest.mark.stage
def test_find_run_and_attach_to_model_pick_the_newest_finished_run(
    stored: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = tracking.connect("t", stored)
    ids = []
    for _ in range(2):
        with tracker.run() as run:
            tracker.set_tags({record.MODEL_TAG: "same"})
        ids.append(run.run_id)
    with pytest.raises(RuntimeError), tracker.run():  # newer, but FAILED: never attached to
        tracker.set_tags({record.MODEL_TAG: "same"})
        raise RuntimeError
    assert find_run(tracker, "same") == ids[-1]
    assert find_run(tracker, "other") is None
    caplog.clear()
    with caplog.at_level(logging.INFO, "pipeline"), tracker.run(attach_to_model="same") as again:
        tracker.log_metrics({"m": 2.0})
    assert again.run_id == ids[-1]
    found = client_for(tracker).get_run(ids[-1])
    assert found.info.status == "FINISHED" and found.data.metrics["m"] == 2.0
    assert [r.message for r in caplog.records] == [f"MLflow run {ids[-1]} in {tracker.uri}"]


@pytest.mark.stage
def test_attach_to_an_unknown_model_starts_a_tagged_run_with_a_warning(
    stored: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = tracking.connect("t", stored)
    with (
        caplog.at_level(logging.WARNING, "pipeline"),
        tracker.run(attach_to_model="nope", tags_if_new={"origin": "evaluate"}) as run,
    ):
        pass
    assert run.run_id is not None
    tags = client_for(tracker).get_run(run.run_id).data.tags
    assert tags[record.MODEL_TAG] == "nope" and tags["origin"] == "evaluate"
    assert [r.message for r in caplog.records] == [
        f"no MLflow run trained model nope in {tracker.uri}; starting a new run"
    ]


@pytest.mark.stage
def test_calls_return_while_the_worker_cannot_even_open_the_store(root: Path) -> None:
    lock_file = root / "mlruns" / "mlflow.db.lock"
    lock_file.parent.mkdir()
    (root / "a.txt").write_text("a")
    with open(lock_file, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the worker waits for this lock before it opens the store
        # Should the calls wait for the worker after all, this lets them go on, and the timing below fails.
        safety = threading.Timer(10, fcntl.flock, (lock, fcntl.LOCK_UN))
        safety.start()
        tracker = tracking.connect("t", root)
        start = time.monotonic()
        with tracker.run() as run:
            tracker.log_params({f"p{i}": i for i in range(300)})
            tracker.log_series({"big": (np.arange(20_000), np.arange(20_000) * 0.5)})  # 5 times a pipe's buffer
            tracker.log_artifact(root / "a.txt")
            elapsed = time.monotonic() - start
            assert run.run_id is None  # no run exists yet: nothing has reached the store
            fcntl.flock(lock, fcntl.LOCK_UN)
        safety.cancel()
    assert elapsed < 5, f"the calls took {elapsed:.1f} s: they waited for the worker"
    assert run.run_id is not None
    client = client_for(tracker)
    assert len(client.get_run(run.run_id).data.params) == 300
    assert len(client.get_metric_history(run.run_id, "big")) == 20_000
    assert [a.path for a in client.list_artifacts(run.run_id)] == ["a.txt"]


@pytest.mark.stage
def test_an_artifact_keeps_what_the_file_held_when_it_was_logged(stored: Path) -> None:
    replaced, deleted = stored / "replaced.txt", stored / "gone" / "deleted.txt"
    deleted.parent.mkdir()
    replaced.write_text("as logged")
    deleted.write_text("as logged too")
    tracker = tracking.connect("t", stored)
    with tracker.run() as run:
        tracker.log_artifact(replaced)
        tracker.log_artifact(deleted, "sub")
        replaced.write_text("rewritten right after")  # what an atomic write or a temporary folder does next
        deleted.unlink()
        deleted.parent.rmdir()
    assert run.run_id is not None
    assert artifact_file(tracker, run.run_id, "replaced.txt").read_text() == "as logged"
    assert artifact_file(tracker, run.run_id, "sub/deleted.txt").read_text() == "as logged too"


@pytest.mark.stage
def test_a_missing_artifact_file_is_a_tracking_error_at_the_call(stored: Path) -> None:
    tracker = tracking.connect("t", stored)
    with pytest.raises(TrackingError, match=r"cannot log .*none\.txt: No such file"), tracker.run() as run:
        tracker.log_artifact(stored / "none.txt")
    assert run.run_id is not None and client_for(tracker).get_run(run.run_id).info.status == "FAILED"


@pytest.mark.stage
def test_the_dataset_entry_is_the_one_mlflow_makes_from_the_dataframe(stored: Path) -> None:
    table = pd.DataFrame({"x1": np.arange(7.0), "x2": np.ones(7), "y": np.linspace(0, 1, 7)}).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's warning that a local path could be two kinds of source
        oracle = from_pandas(table, source="data/generated/train.parquet", name="train", digest="d41d8", targets="y")
    tracker = tracking.connect("t", stored)
    with tracker.run() as run:
        tracker.log_dataset(
            source="data/generated/train.parquet",
            name="train",
            digest="d41d8",
            context="training",
            n_rows=len(table),
            columns=list(table.columns),
        )
    assert run.run_id is not None
    (logged,) = client_for(tracker).get_run(run.run_id).inputs.dataset_inputs
    expected = oracle.to_dict()
    assert {k: getattr(logged.dataset, k) for k in expected} == expected
    assert [(t.key, t.value) for t in logged.tags] == [(mlflow_tags.MLFLOW_DATASET_CONTEXT, "training")]


@pytest.mark.stage
def test_a_refused_call_is_a_one_line_error_naming_the_store_and_fails_the_run(stored: Path) -> None:
    tracker = tracking.connect("t", stored)
    with pytest.raises(TrackingError) as raised, tracker.run() as run:
        tracker.log_params({"a": 1})
        tracker.log_params({"a": 2})  # MLflow refuses to change a logged param
    message = str(raised.value)
    assert message.startswith(f"MLflow store {tracker.uri}: Changing param values is not allowed")
    assert "\n" not in message
    assert run.run_id is not None and client_for(tracker).get_run(run.run_id).info.status == "FAILED"


@pytest.mark.stage
def test_a_worker_that_dies_is_a_one_line_error_naming_the_store(stored: Path) -> None:
    tracker = tracking.connect("t", stored)
    with pytest.raises(TrackingError) as raised, tracker.run():
        tracker.log_params({"a": 1})
        pid = tracker.start().pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    assert str(raised.value) == f"MLflow store {tracker.uri}: the tracking worker was killed by signal 9"


def test_a_store_that_cannot_be_read_fails_the_stage_with_status_2_and_one_line(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(root)
    (root / "mlruns").mkdir()
    (root / "mlruns" / "mlflow.db").write_bytes(b"not an SQLite database\n" * 100)
    params = ["--params", str(REPO / "params.yaml")]
    assert generate.main([*params, "--train", "train.parquet", "--test", "test.parquet"]) == 0
    outputs = ["--model", "m.safetensors", "--trajectory", "t.csv", "--metrics", "t.json"]
    assert train.main([*params, "--data", "train.parquet", *outputs]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: train: MLflow store {tracking.default_uri(root)}: (sqlite3.DatabaseError) file is not a database"
    ]


def test_tracking_off_starts_no_worker_and_logs_nothing(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_TRACKING", "off")

    def no_process(*args: object, **kwargs: object) -> None:
        raise AssertionError("a process was started")

    monkeypatch.setattr(tracking.Worker, "__init__", no_process)
    tracker = tracking.connect("t", root)
    with tracker.run(attach_to_model="m"):
        tracker.log_params({"a": 1})
        tracker.log_series({"s": ([1], [1.0])})
        tracker.log_artifact(root / "dvc.yaml")
    assert not (root / "mlruns").exists()


@pytest.mark.stage
def test_a_server_restarted_while_the_stage_logs_loses_nothing_and_one_that_stays_down_fails_in_one_line(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port, backend = free_port(), f"sqlite:///{tmp_path}/server.db"
    store = MlflowClient(backend)  # the server's own store, read directly: the oracle, with or without it
    steps = np.arange(3000)
    with mlflow_server(tmp_path, backend, port) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracker = tracking.connect("t", root)
        restarted = tracker.run()
        run = restarted.__enter__()
        tracker.log_series({"a": (steps[:1000], steps[:1000] * 0.5)})
    tracker.log_series({"a": (steps[1000:], steps[1000:] * 0.5)})  # the server is down: the worker retries
    with mlflow_server(tmp_path, backend, port):  # back on the same port and store, seconds later
        restarted.__exit__(None, None, None)
        assert store.get_run(run.run_id or "").info.status == "FINISHED"
        assert sorted(p.step for p in store.get_metric_history(run.run_id or "", "a")) == steps.tolist()
        # Now one that goes down for good, once its run exists.
        tracker = tracking.connect("t", root)
        abandoned = tracker.run()
        abandoned.__enter__()
        tracker.log_params({"p": 1})
        experiment = store.get_experiment_by_name("t")
        assert experiment is not None
        deadline = time.monotonic() + 60
        while not (found := store.search_runs([experiment.experiment_id], "params.p = '1'")):
            assert time.monotonic() < deadline, "the worker never made its run"
            time.sleep(0.2)
    tracker.log_series({"a": (steps, steps * 0.5)})
    start = time.monotonic()
    with pytest.raises(TrackingError) as raised:
        abandoned.__exit__(None, None, None)
    # One line within a minute or two (the failed request, then marking the run FAILED, each retried for ~30 s),
    # not MLflow's default of minutes each; and no run FINISHED with points missing.
    assert time.monotonic() - start < 120 and "\n" not in str(raised.value), raised.value
    assert str(raised.value).startswith(f"MLflow store {uri}: ")
    assert store.get_run(found[0].info.run_id).info.status != "FINISHED"


@pytest.mark.stage
def test_series_sent_to_a_tracking_server_side_by_side_arrive_whole(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with mlflow_server(tmp_path) as uri:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracker = tracking.connect("t", root)
        steps = np.arange(2345)
        series = {name: (steps, np.sin(steps * (i + 1))) for i, name in enumerate(("a", "b", "c"))}
        with tracker.run() as run:
            tracker.log_series(series)  # the three series side by side, each in 3 requests
        client = MlflowClient(tracker.uri)
        for name, (s, v) in series.items():
            got = sorted((p.step, p.value) for p in client.get_metric_history(run.run_id or "", name))
            assert got == list(zip(s.tolist(), v.tolist(), strict=True))
            assert client.get_run(run.run_id or "").data.metrics[name] == v[-1]  # the latest value is the last step's
        # A request that fails in the background still fails the run's end, in one line.
        with pytest.raises(TrackingError) as raised, tracker.run() as run:
            tracker.log_params({"p": 1})
            tracker.log_series(series)
            tracker.log_params({"p": 2})  # MLflow refuses to change a logged param
        assert str(raised.value).startswith(f"MLflow store {tracker.uri}: ") and "\n" not in str(raised.value)
        assert client.get_run(run.run_id or "").info.status == "FAILED"
