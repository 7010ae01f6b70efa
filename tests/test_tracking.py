"""Where the MLflow store is, how runs end, and batched logging, against a throw-away SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline import tracking


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    return tmp_path


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


def test_series_are_logged_in_batches_and_read_back_exactly(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = tracking.connect("t", root)
    assert (
        tracker.client.get_experiment(tracker.experiment_id).artifact_location
        == (root / "mlruns" / "artifacts").as_uri()
    )
    calls: list[int] = []
    log_batch = tracker.client.log_batch

    def counting(run_id: str, metrics: list[object] = (), **kw: object) -> None:  # type: ignore[assignment]
        calls.append(len(metrics))
        log_batch(run_id, metrics=metrics, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(tracker.client, "log_batch", counting)
    steps = list(range(1250))
    with tracker.run() as run_id:
        tracker.log_series(run_id, {"a": (steps, [0.5 * s for s in steps]), "b": (steps, [-1.0] * 1250)})
    assert calls == [1000, 1000, 500]
    history = MlflowClient(tracker.uri).get_metric_history(run_id, "a")
    assert sorted((p.step, p.value) for p in history) == [(s, 0.5 * s) for s in steps]


def test_run_ends_failed_when_the_body_raises_and_is_not_found(root: Path) -> None:
    tracker = tracking.connect("t", root)
    with pytest.raises(RuntimeError), tracker.run() as run_id:
        tracker.set_tags(run_id, {tracking.MODEL_TAG: "abc"})
        raise RuntimeError("boom")
    assert tracker.client.get_run(run_id).info.status == "FAILED"
    assert tracker.find_run("abc") is None  # evaluate must not attach to a failed run


def test_find_run_returns_the_newest_finished_run_with_the_model_hash(root: Path) -> None:
    tracker = tracking.connect("t", root)
    ids = []
    for _ in range(2):
        with tracker.run() as run_id:
            tracker.set_tags(run_id, {tracking.MODEL_TAG: "same"})
        ids.append(run_id)
    assert tracker.find_run("same") == ids[-1]
    assert tracker.find_run("other") is None
    with tracker.run(run_id=ids[0]) as again:  # reopening keeps the run and ends it FINISHED again
        assert again == ids[0]
    assert tracker.client.get_run(ids[0]).info.status == "FINISHED"
