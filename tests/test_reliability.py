"""What happens when things go wrong: hostile or odd params, killed stages, unreachable servers, concurrent
writers, repeated runs. Each test here fails without the behaviour it names (docs/reliability.md: "What happens
when …")."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dvc.utils.serialize import parse_yaml
from mlflow.tracking import MlflowClient

from pipeline import config, data, summary, tracking
from pipeline.errors import TrackingError
from pipeline.io import md5_file
from tests.helpers import REPO, free_port, pipeline_env, sh

OUTPUTS = (
    "data/generated/train.parquet",
    "data/generated/test.parquet",
    "data/model/model.safetensors",
    "data/model/trajectory.csv",
    "data/metrics/train.json",
    "data/metrics/metrics.json",
)


def runs_in(repo: Path) -> list:  # type: ignore[type-arg]
    client = MlflowClient(tracking.default_uri(repo))
    experiment = client.get_experiment_by_name(config.load(repo / "params.yaml").tracking.experiment)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], max_results=1000)


# Params are read as DVC reads them (YAML 1.2), whatever spelling `dvc exp run -S` or a hand edit uses.


def test_params_spellings_mean_to_the_stage_what_they_mean_to_dvc(tmp_path: Path) -> None:
    # Spellings YAML 1.1 (PyYAML) and 1.2 (DVC's ruamel) read differently: 1e-3, no, on, 0o17, 017, 1:20.
    text = "a: 1e-3\nb: no\nc: on\nd: 0o17\ne: 1_000\nf: .5\ng: ~\nh: 017\ni: 0x1F\nj: .inf\nk: 1:20\n"
    (tmp_path / "params.yaml").write_text(text)
    assert config.read_yaml(tmp_path / "params.yaml") == parse_yaml(text, "params.yaml")
    raw = config.read_yaml(REPO / "params.yaml")
    raw["train"]["lr"] = parse_yaml("lr: 1e-3", "x")["lr"]  # PyYAML (YAML 1.1) would give the string '1e-3'
    assert config.parse(raw, "params.yaml").train.lr == 0.001


# Hostile YAML runs nothing, through DVC or directly.


@pytest.mark.system
def test_python_tags_in_params_run_nothing_through_dvc(repo: Path, tmp_path: Path) -> None:
    # The stages' own parser refuses them too (tests/test_config.py).
    sentinel = tmp_path / "pwned"
    params = repo / "params.yaml"
    params.write_text(
        params.read_text().replace("seed: 42", f"seed: !!python/object/apply:os.system ['touch {sentinel}']")
    )
    assert sh(repo, "dvc", "repro", check=False).returncode != 0
    assert not sentinel.exists()


# A stage killed mid-way leaves every output whole (or absent), and `dvc repro` recovers.


@pytest.mark.system
def test_sigkill_during_training_leaves_no_truncated_output_and_repro_recovers(repo: Path) -> None:
    before = {p: (repo / p).read_bytes() for p in OUTPUTS}
    params = repo / "params.yaml"
    original = params.read_text()
    # 2 million rows and far more epochs than can finish: the kill lands in the middle of training.
    params.write_text(
        original.replace("n_samples: 100 ", "n_samples: 2000000 ").replace("epochs: 100 ", "epochs: 99999 ")
    )
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        # DVC deletes a stage's outputs just before running it: once model.safetensors is gone, train has started.
        while (repo / "data/model/model.safetensors").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "the pipeline ended before it could be killed"
        time.sleep(4)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        params.write_text(original)
    for p in OUTPUTS:
        path = repo / p
        if path.exists() and path.read_bytes() != before[p]:
            # Only generate had finished: its tables are complete, new ones (2 million rows in all).
            assert p.startswith("data/generated/"), f"{p} was left changed by a killed stage"
            assert len(data.read_table(path)) == (1_600_000 if "train" in p else 400_000)  # reads, every row
    assert not [q.name for q in (repo / "data").rglob("*") if q.is_file() and q.stat().st_size == 0]
    sh(repo, "dvc", "repro")
    assert {p: (repo / p).read_bytes() for p in OUTPUTS} == before  # recovered, to the byte


def train_args(out: Path) -> list[str]:
    return [
        *("--data", "data/generated/train.parquet", "--model", f"{out}/m.safetensors"),
        *("--trajectory", f"{out}/t.csv", "--metrics", f"{out}/t.json"),
    ]


def evaluate_args(out: Path) -> list[str]:
    """evaluate on what train_args(out) wrote."""
    return [
        *("--train-data", "data/generated/train.parquet", "--test-data", "data/generated/test.parquet"),
        *("--model", f"{out}/m.safetensors", "--trajectory", f"{out}/t.csv", "--train-metrics", f"{out}/t.json"),
        *("--metrics", f"{out}/m.json", "--test-loss", f"{out}/test_loss.csv", "--plots", f"{out}/p"),
    ]


# A stage that dies leaves its run FAILED: the tracking worker sees its stdin end without the run's end.


@pytest.mark.system
@pytest.mark.parametrize("kill", ["SIGKILL to the stage", "SIGTERM to its process group"])
def test_a_killed_stage_leaves_its_run_failed_not_running(repo: Path, tmp_path: Path, kill: str) -> None:
    params = tmp_path / "params.yaml"
    params.write_text((repo / "params.yaml").read_text().replace("epochs: 100 ", "epochs: 10000000 "))
    before = {r.info.run_id for r in runs_in(repo)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.train", "--params", str(params), *train_args(tmp_path / "out")],
        cwd=repo,
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, as under a shell or DVC
    )
    try:
        deadline = time.monotonic() + 120
        while not (new := [r for r in runs_in(repo) if r.info.run_id not in before]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert new and new[0].info.status == "RUNNING", "the run never appeared"
        assert proc.poll() is None, "the stage ended before it could be killed"  # 10 million epochs: training
        if kill == "SIGKILL to the stage":  # as the kernel's OOM killer does: the stage alone
            os.kill(proc.pid, signal.SIGKILL)
        else:  # as `timeout`, CI cancellation or `kill -- -PGID` do
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        client = MlflowClient(tracking.default_uri(repo))
        deadline = time.monotonic() + 60
        while (status := client.get_run(new[0].info.run_id).info.status) == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the worker, should it have outlived the test
            os.killpg(proc.pid, signal.SIGKILL)
    assert status == "FAILED"
    assert client.get_run(new[0].info.run_id).data.params["train.epochs"] == "10000000"  # what it sent first


# The stages hand all MLflow work to the worker: they never import it, and their run is still complete.


# Loaded by every Python process of the test through PYTHONPATH: each one lists the modules it imports in a file
# named by its pid and its parent's, so the stage's own list is told apart from its tracking worker's.
IMPORT_LOG = """
import os, sys
_log = open(os.path.join(os.environ["IMPORT_LOG"], f"{os.getpid()}-{os.getppid()}.txt"), "a", buffering=1)
sys.addaudithook(lambda event, args: event == "import" and _log.write(args[0] + "\\n"))
"""


@pytest.mark.system
def test_the_stages_never_import_mlflow_yet_their_run_is_complete(repo: Path, tmp_path: Path) -> None:
    before = {r.info.run_id for r in runs_in(repo)}
    out, site = tmp_path / "out", tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(IMPORT_LOG)
    imported = {}
    for stage, args in (("train", train_args(out)), ("evaluate", evaluate_args(out))):
        logs = tmp_path / stage
        logs.mkdir()
        env = pipeline_env(PYTHONPATH=str(site), IMPORT_LOG=str(logs))
        sh(repo, sys.executable, "-m", f"pipeline.{stage}", *args, env=env)
        (mine,) = logs.glob(f"*-{os.getpid()}.txt")  # the stage: the process this test started
        imported[stage] = set(mine.read_text().split())
        workers = [set(f.read_text().split()) for f in logs.glob("*.txt") if f != mine]
        assert any("mlflow" in w for w in workers)  # the listing does show the worker's MLflow
    assert "torch" in imported["train"] and "sklearn" in imported["evaluate"]  # and the stages' own imports
    for stage, modules in imported.items():
        heavy = sorted(m for m in modules if m.split(".")[0] in ("mlflow", "sqlalchemy", "alembic"))
        assert heavy == [], f"{stage} imported {heavy[:5]}"
    new = [r for r in runs_in(repo) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    assert {"loss", "weight.learned"} <= set(new[0].data.metrics)  # train's series and evaluate's metrics


# No duplicate runs; a run-cache restore stays findable.


@pytest.mark.system
def test_noop_repro_makes_no_run_and_a_run_cache_restore_stays_findable(repo: Path) -> None:
    count = len(runs_in(repo))
    sh(repo, "dvc", "repro")
    assert len(runs_in(repo)) == count
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("lr: 0.1 ", "lr: 0.05 "))
    sh(repo, "dvc", "repro")
    params.write_text(original)
    out = sh(repo, "dvc", "repro").stdout  # back to 0.1: DVC restores train and evaluate from its run cache
    assert "Stage 'train' is cached - skipping run" in out, out
    assert len(runs_in(repo)) == count + 1  # only the lr=0.05 execution made a run
    uri = tracking.default_uri(repo)  # what make repro's summary finds for the restored model:
    found = summary.locate(
        uri, config.load(params).tracking.experiment, md5_file(repo / "data/model/model.safetensors")
    )
    assert found is not None and "weight.learned" in MlflowClient(uri).get_run(found[1]).data.metrics


# An unreachable tracking server fails the stage in seconds, naming the URI, before any output.


@pytest.mark.system
@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_unreachable_tracking_server_fails_fast(reproduced: Path, tmp_path: Path, stage: str) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = tmp_path / "out"
    args = {
        "train": [
            "--data",
            "data/generated/train.parquet",
            "--model",
            f"{out}/m.pt",
            "--trajectory",
            f"{out}/t.csv",
            "--metrics",
            f"{out}/t.json",
        ],
        "evaluate": [
            "--train-data",
            "data/generated/train.parquet",
            "--test-data",
            "data/generated/test.parquet",
            "--model",
            "data/model/model.safetensors",
            "--trajectory",
            "data/model/trajectory.csv",
            "--train-metrics",
            "data/metrics/train.json",
            "--metrics",
            f"{out}/m.json",
            "--test-loss",
            f"{out}/test_loss.csv",
            "--plots",
            f"{out}/p",
        ],
    }[stage]
    start = time.monotonic()
    result = sh(
        reproduced,
        sys.executable,
        "-m",
        f"pipeline.{stage}",
        *args,
        env=pipeline_env(MLFLOW_TRACKING_URI=uri),
        check=False,
    )
    assert time.monotonic() - start < 10
    assert result.returncode == 2 and uri in result.stderr and "not reachable" in result.stderr
    assert not out.exists()


# Concurrent writers lose nothing.

WRITER = """
import sys
from pathlib import Path
from pipeline import tracking
t = tracking.connect("concurrent", Path(sys.argv[1]))
with t.run() as run_id:
    t.log_params({"writer": sys.argv[2]})
    t.log_series({"m": (range(1500), [float(i) for i in range(1500)])})
"""


@pytest.mark.stage
def test_four_processes_creating_and_writing_a_fresh_store_all_succeed(tmp_path: Path) -> None:
    env = pipeline_env(PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(i)], env=env, stderr=subprocess.PIPE, text=True
        )
        for i in range(4)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    client = MlflowClient(tracking.default_uri(tmp_path))
    experiment = client.get_experiment_by_name("concurrent")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.params["writer"] for r in runs) == ["0", "1", "2", "3"]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert all(len(client.get_metric_history(r.info.run_id, "m")) == 1500 for r in runs)


# Artifact paths stay inside the run.


@pytest.mark.system
def test_every_logged_artifact_path_is_relative_and_inside_the_run(reproduced: Path) -> None:
    client = MlflowClient(tracking.default_uri(reproduced))
    for run in runs_in(reproduced):
        pending = [None]
        while pending:
            for a in client.list_artifacts(run.info.run_id, pending.pop()):
                assert not a.path.startswith("/") and ".." not in a.path.split("/")
                if a.is_dir:
                    pending.append(a.path)


@pytest.mark.stage
@pytest.mark.parametrize("bad", ["../escape", "/etc", "plots/../../x"])
def test_artifact_paths_that_leave_the_run_are_refused(tmp_path: Path, bad: str) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    tracker = tracking.connect("t", tmp_path)
    with pytest.raises(TrackingError, match="Invalid artifact path") as refused, tracker.run() as run:
        tracker.log_artifact(tmp_path / "dvc.yaml", bad)
    assert str(refused.value).startswith(f"MLflow store {tracker.uri}: ") and "\n" not in str(refused.value)
    assert run.run_id is not None
    client = MlflowClient(tracker.uri)
    assert client.get_run(run.run_id).info.status == "FAILED" and client.list_artifacts(run.run_id) == []


@pytest.mark.system
def test_metrics_files_are_plain_json(reproduced: Path) -> None:
    for name in ("train.json", "metrics.json"):
        json.loads((reproduced / "data/metrics" / name).read_text(), parse_constant=lambda c: pytest.fail(c))
