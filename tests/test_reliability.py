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

from pipeline import config, data, evaluate, summary, tracking, train
from pipeline.errors import ConfigError, TrackingError
from pipeline.io import md5_file
from tests.conftest import REPO, copy_repo, free_port, pipeline_env, sh

OUTPUTS = (
    "data/generated/train.parquet",
    "data/generated/test.parquet",
    "data/model/model.safetensors",
    "data/model/trajectory.csv",
    "data/metrics/train.json",
    "data/metrics/metrics.json",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh copy of the repository after one `dvc repro`, for tests that break things on purpose."""
    path = copy_repo(tmp_path_factory.mktemp("reliability"))
    sh(path, "dvc", "repro")
    return path


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


@pytest.mark.slow
def test_python_tags_in_params_run_nothing_through_dvc_or_directly(repo: Path, tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    params = repo / "params.yaml"
    original = params.read_text()
    params.write_text(original.replace("seed: 42", f"seed: !!python/object/apply:os.system ['touch {sentinel}']"))
    try:
        through_dvc = sh(repo, "dvc", "repro", check=False)
        direct = sh(
            repo, sys.executable, "-m", "pipeline.generate", "--train", "a.parquet", "--test", "b.parquet", check=False
        )
    finally:
        params.write_text(original)
    assert through_dvc.returncode != 0 and direct.returncode == 2
    assert "not valid YAML" in direct.stderr and len(direct.stderr.strip().splitlines()) == 1
    assert not sentinel.exists() and not (repo / "a.parquet").exists()


# A stage killed mid-way leaves every output whole (or absent), and `dvc repro` recovers.


@pytest.mark.slow
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
        *("--metrics", f"{out}/m.json", "--plots", f"{out}/p"),
    ]


# A stage that dies leaves its run FAILED: the tracking worker sees its stdin end without the run's end.


@pytest.mark.slow
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


@pytest.mark.slow
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


# Same params, same bytes.


@pytest.mark.slow
def test_forced_reruns_are_byte_identical(repo: Path) -> None:
    before = {p: (repo / p).read_bytes() for p in OUTPUTS}
    plots = {p.name: p.read_bytes() for p in (repo / "data/plots").iterdir()}
    sh(repo, "dvc", "repro", "--force")
    assert {p: (repo / p).read_bytes() for p in OUTPUTS} == before
    assert {p.name: p.read_bytes() for p in (repo / "data/plots").iterdir()} == plots


# No duplicate runs; a run-cache restore stays findable.


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_unreachable_tracking_server_fails_fast(repo: Path, tmp_path: Path, stage: str) -> None:
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
            "--plots",
            f"{out}/p",
        ],
    }[stage]
    start = time.monotonic()
    result = sh(
        repo, sys.executable, "-m", f"pipeline.{stage}", *args, env=pipeline_env(MLFLOW_TRACKING_URI=uri), check=False
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_four_queued_experiments_on_two_workers_all_land_in_the_store(repo: Path) -> None:
    count = len(runs_in(repo))
    rates = ("0.02", "0.03", "0.04", "0.06")
    for lr in rates:
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        status = sh(repo, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            break
        time.sleep(2)
    sh(repo, "dvc", "queue", "stop")  # the workers would otherwise idle on after the test
    assert "Failed" not in status, status
    runs = runs_in(repo)
    assert len(runs) == count + 4
    finished = [r for r in runs if r.data.params.get("train.lr") in rates and r.info.status == "FINISHED"]
    assert sorted(r.data.params["train.lr"] for r in finished) == sorted(rates)
    assert all("weight.learned" in r.data.metrics for r in finished)  # evaluate found each one's own run
    shown = sh(repo, "dvc", "exp", "show", "--csv").stdout
    assert all(lr in shown for lr in rates)


# Artifact paths stay inside the run.


@pytest.mark.slow
def test_every_logged_artifact_path_is_relative_and_inside_the_run(repo: Path) -> None:
    client = MlflowClient(tracking.default_uri(repo))
    for run in runs_in(repo):
        pending = [None]
        while pending:
            for a in client.list_artifacts(run.info.run_id, pending.pop()):
                assert not a.path.startswith("/") and ".." not in a.path.split("/")
                if a.is_dir:
                    pending.append(a.path)


@pytest.mark.slow
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


# Params errors leave nothing behind, run directly as through DVC (the DVC side: test_pipeline_e2e.py).


def test_invalid_params_leave_no_output_and_no_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("epochs: 100 ", "epochs: -5 "))
    with pytest.raises(ConfigError):
        config.load(params)
    t = ["--model", "m.pt", "--trajectory", "t.csv"]
    assert train.main(["--params", str(params), "--data", "x.parquet", *t, "--metrics", "t.json"]) == 2
    e = ["--train-data", "x", "--test-data", "x", "--model", "x", "--trajectory", "x", "--train-metrics", "x"]
    assert evaluate.main(["--params", str(params), *e, "--metrics", "m.json", "--plots", "p"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dvc.yaml", "params.yaml"]  # no outputs, no mlruns/


@pytest.mark.slow
def test_metrics_files_are_plain_json(repo: Path) -> None:
    for name in ("train.json", "metrics.json"):
        json.loads((repo / "data/metrics" / name).read_text(), parse_constant=lambda c: pytest.fail(c))
