"""A clone in a folder whose path holds a space and a non-ASCII letter, as users' folders do ("My Projects",
"Übungen"): the README's commands work there, through make, and the MLflow store stays inside it.

GNU make splits words on spaces, and runs a command line without shell syntax itself, splitting it there too:
an unquoted absolute path in a recipe fails with "make: /tmp/.../my: No such file or directory".

The reproduced repository's `make repro` (conftest.py) and one `make ui` run under strace (tests/outbound.py):
nothing they start reaches beyond the machine, MLflow's usage telemetry included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import urllib.parse
import urllib.request
from contextlib import closing
from pathlib import Path

import pytest

from tests import outbound
from tests.helpers import FOLDER, PAGE, clone, copy_repo, free_port, pipeline_env, sh, telemetry_env, wait_for_port

pytestmark = pytest.mark.system

# The targets that need the set-up (make install): the venv and the offline plot page, or the venv alone.
NEED_VENV_AND_PAGE = ("install", "repro", "test", "test-fast", "sweep", "screenshots", "bench", "team-server")
NEED_VENV = ("lint", "ui")
NEED_DEV_TOOLS = ("test", "test-fast", "screenshots", "bench", "lint")  # the rest install only the pipeline's
# Stands in for python3 (and npm): logs its folder and arguments; `-m venv DIR` makes DIR/bin/python a copy of it.
STUB = """#!/bin/sh
echo "$PWD|$(basename "$0") $*" >> "$STUB_LOG"
if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python"; fi
"""


def file_path(uri: str) -> Path:
    """The local path of a file:// URI, percent-decoded as MLflow's local artifact store decodes it."""
    assert uri.startswith("file://"), uri
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(uri).path))


def query(db: Path, sql: str) -> list[tuple[str, ...]]:
    """Rows of the MLflow store, read with sqlite3 itself: the file at this path is the one MLflow wrote."""
    with closing(sqlite3.connect(db)) as store:
        return store.execute(sql).fetchall()


def make(repo: Path, *args: str, env: dict[str, str] | None = None) -> str:
    return sh(repo, "make", "--no-print-directory", *args, env=env).stdout


@pytest.fixture
def fresh(tmp_path: Path) -> Path:
    """A copy as a fresh clone is: no .venv, no plot page."""
    repo = copy_repo(tmp_path / FOLDER)
    (repo / PAGE).unlink()
    return repo


def test_every_target_that_needs_the_set_up_builds_it_first(fresh: Path) -> None:
    for target in (*NEED_VENV_AND_PAGE, *NEED_VENV):
        plan = make(fresh, "-n", target)
        assert "-m venv .venv" in plan, f"make {target} does not create the venv first:\n{plan}"
        assert ("web/build_template.py" in plan) == (target in NEED_VENV_AND_PAGE), f"make {target}:\n{plan}"
        assert ("-e '.[dev]'" in plan) == (target in NEED_DEV_TOOLS), f"make {target}:\n{plan}"
    # make test also installs what the browser, team-server, emulated-CPU and telemetry tests need, when missing.
    plan = make(fresh, "-n", "test")
    for tool in ("chromium", "postgresql", "qemu-user", "strace"):
        assert f"apt-get install {tool}" in plan, f"make test does not check for {tool}:\n{plan}"


def test_the_first_run_set_up_runs_in_a_folder_with_a_space(fresh: Path, tmp_path: Path) -> None:
    # The real recipes, with python3 stubbed: they run here, in this folder, and nothing is fetched. The venv's
    # python (a copy of the stub) builds the plot page; npm is stubbed too, so a recipe that ran it would be logged.
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("python3", "npm"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = pipeline_env(STUB_LOG=str(log))
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    make(fresh, "install", f"PYTHON={stubs / 'python3'}", env=env)
    folders, commands = zip(*(call.split("|", 1) for call in log.read_text().splitlines()), strict=True)
    assert set(folders) == {str(fresh)}
    assert commands[0].startswith("python3 -c import sys;"), commands  # the version check
    assert list(commands[1:]) == [
        "python3 -m venv .venv",
        "python -m pip install --quiet --upgrade pip",
        "python -m pip install --quiet -c requirements.lock -e .",
        "python web/build_template.py",
    ]
    assert (fresh / ".venv/.installed").is_file()


def test_make_repro_writes_the_outputs_and_the_mlflow_store_inside_the_folder(
    reproduced: Path, reproduced_output: str
) -> None:
    # The linked venv and the copied page were taken as built: make repro installed and built nothing.
    assert "pip install" not in reproduced_output and "build_template" not in reproduced_output, reproduced_output
    for out in ("data/model/model.safetensors", "data/metrics/metrics.json", "data/plots/fit.png"):
        assert (reproduced / out).is_file(), out
    # Nothing beside the folder: no percent-encoded twin ("my%20project%20%C3%BC") of it or of the store.
    assert [p.name for p in reproduced.parent.iterdir()] == [FOLDER]
    db = reproduced / "mlruns" / "mlflow.db"
    assert sh(reproduced, sys.executable, "-m", "pipeline.tracking").stdout.strip() == f"sqlite:///{db}"
    assert sorted(reproduced.rglob("mlflow.db")) == [db]
    [(location,)] = query(db, "SELECT artifact_location FROM experiments WHERE name = 'linear-regression'")
    [(run_uri,)] = query(db, "SELECT artifact_uri FROM runs WHERE status = 'FINISHED'")
    [(model_uri,)] = query(db, "SELECT artifact_location FROM logged_models")
    assert file_path(location) == reproduced / "mlruns" / "artifacts"
    run_files = file_path(run_uri)
    assert run_files.is_relative_to(reproduced / "mlruns" / "artifacts")
    for name in ("metrics.json", "trajectory.csv", "train.json", "plots/fit.png"):
        assert (run_files / name).is_file(), name
    assert (file_path(model_uri) / "MLmodel").is_file()


def test_the_summary_points_at_the_run_and_the_model_the_store_holds(reproduced: Path, tmp_path: Path) -> None:
    db = reproduced / "mlruns" / "mlflow.db"
    [(experiment, run, model)] = query(
        db,
        "SELECT runs.experiment_id, runs.run_uuid, logged_models.model_id FROM runs"
        " JOIN logged_models ON logged_models.source_run_id = runs.run_uuid WHERE runs.status = 'FINISHED'",
    )
    lines = sh(reproduced, sys.executable, "-m", "pipeline.summary").stdout.splitlines()
    assert f"MLflow run {run} (experiment 'linear-regression') in sqlite:///{db}" in lines
    ui = f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run}?workflowType=machine_learning"
    assert f"browse it: make ui, then {ui}" in lines
    assert f"check its bytes: make verify RUN={run}" in lines
    assert any(line.startswith(f"load its model: mlflow.pyfunc.load_model('models:/{model}')") for line in lines)
    # A store that does not exist: the summary says so, and makes none.
    absent = f"sqlite:///{tmp_path / 'absent.db'}"
    env = pipeline_env(MLFLOW_TRACKING_URI=absent)
    assert (
        f"MLflow: no run for this model in {absent}"
        in sh(reproduced, sys.executable, "-m", "pipeline.summary", env=env).stdout
    )
    assert list(tmp_path.iterdir()) == []


def test_make_sweep_in_a_non_ascii_folder_says_why_it_cannot_in_one_line(reproduced: Path) -> None:
    # DVC's queue itself fails there (an ASCII-only config file it writes); make says so before queueing anything.
    out = sh(reproduced, "make", "--no-print-directory", "-o", ".venv/.installed", "-o", PAGE, "sweep", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-2].startswith("error: DVC's experiment queue fails in a folder whose")
    assert "dvc exp run" not in out.stdout, "nothing may be queued"


def test_make_repro_reaches_nothing_beyond_the_machine(
    reproduced: Path, reproduced_trace: Path, tmp_path: Path
) -> None:
    outbound.require()
    # The control: in the same environment and under the same trace, MLflow with its telemetry on is caught. It
    # fetches the UI's telemetry settings, as `make ui` would for its page, in a network namespace of its own
    # where unshare can make one: the DNS query is tried, and traced, but goes nowhere.
    control = tmp_path / "control.strace"
    fetch = "from mlflow.telemetry.utils import fetch_ui_telemetry_config; fetch_ui_telemetry_config()"
    command = outbound.traced(control, *outbound.offline(), sys.executable, "-c", fetch)
    sh(tmp_path, *command, env=telemetry_env(MLFLOW_DISABLE_TELEMETRY="false"))
    assert outbound.outgoing(control), f"the trace does not show MLflow's telemetry:\n{control.read_text()}"

    # make repro, traced in the fixture: every stage and the tracking worker, with only the package's default.
    assert outbound.processes(reproduced_trace) >= 10  # make, dvc, the stages, their workers
    assert outbound.outgoing(reproduced_trace) == []
    tagged = query(reproduced / "mlruns" / "mlflow.db", "SELECT value FROM tags WHERE key = 'mlflow_telemetry'")
    assert tagged and set(tagged) == {("off",)}  # and each run says so


def test_make_ui_listens_on_loopback_only_refuses_a_foreign_host_and_reaches_nothing_beyond(
    reproduced: Path, tmp_path: Path
) -> None:
    outbound.require()
    repo = clone(reproduced, tmp_path / FOLDER)
    # One start of the UI, traced (tests/outbound.py; the detector's control is the test above).
    log, port = tmp_path / "ui.strace", free_port()
    ui = subprocess.Popen(
        outbound.traced(log, "make", "-s", "-o", ".venv/.installed", "-o", PAGE, "ui", f"UI_PORT={port}"),
        cwd=repo,
        env=telemetry_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert wait_for_port(port, 90), "the MLflow UI did not start"

        def status(host: str) -> int:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                # An API call: /health and /version are exempt from MLflow's host check by design.
                request = f"GET /api/2.0/mlflow/experiments/search?max_results=1 HTTP/1.1\r\nHost: {host}\r\n"
                s.sendall(f"{request}Connection: close\r\n\r\n".encode())
                return int(s.recv(64).split()[1])

        assert status(f"127.0.0.1:{port}") == 200
        assert status("evil.example.com") == 403
        # The kernel's table of listening sockets (state 0A): every one on this port is bound to 127.0.0.1.
        rows = [line.split() for name in ("tcp", "tcp6") for line in Path(f"/proc/net/{name}").read_text().splitlines()]
        bound = [r[1].split(":")[0] for r in rows[1:] if r[3] == "0A" and int(r[1].split(":")[1], 16) == port]
        assert bound and all(addr == "0100007F" for addr in bound), bound  # 127.0.0.1, little-endian hex
        # The page, and the telemetry settings the page would act on.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as page:
            assert b"<html" in page.read().lower()
        settings = f"http://127.0.0.1:{port}/ajax-api/3.0/mlflow/ui-telemetry"
        with urllib.request.urlopen(settings, timeout=30) as answer:
            assert json.load(answer)["disable_ui_telemetry"] is True  # the page is told to send nothing either
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=60)
    assert "HTTP/1.1 200 OK" in log.read_text(errors="replace"), "the trace did not follow the server that answered"
    assert outbound.outgoing(log) == []
