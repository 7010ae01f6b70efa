"""What the tests share: the environment a pipeline runs in, running commands, servers on free ports, and copies
of the repository (a fresh one, or one of the reproduced repository that conftest.py builds once)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from pipeline import config, record

REPO = Path(__file__).resolve().parents[1]
PAGE = "web/dvc-plots.html"  # the offline plot page
SETUP_BUILT = (PAGE,)  # git ignores them; `make install` builds them (Makefile)
FOLDER = "my project ü"  # a space and a non-ASCII letter, as users' folders have ("My Projects", "Übungen")


def pipeline_env(**extra: str) -> dict[str, str]:
    """Environment for running DVC in a copy: this venv first on PATH, no outside MLflow or DVC settings."""
    # _MLFLOW_TELEMETRY_SESSION_ID too, which importing MLflow sets: a server started with it takes 30 s to stop.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "_MLFLOW_", "DVC_", "PIPELINE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env |= {
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.invalid",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.invalid",
    }
    return env | extra


def telemetry_env(**extra: str) -> dict[str, str]:
    """pipeline_env() without what keeps MLflow's telemetry quiet whatever the project does: a CI or test-run
    variable (pytest's own PYTEST_CURRENT_TEST among them), DO_NOT_TRACK. In it, only the project's own default
    stands between MLflow and its servers (tests/test_paths.py traces what it reaches)."""
    env = pipeline_env()
    for name in ("DO_NOT_TRACK", *record.MLFLOW_CI_VARIABLES):
        env.pop(name, None)
    return env | extra


def sh(cwd: Path, *cmd: str, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its output in files, not pipes.

    `dvc queue start` and `dvc exp run --run-all` leave worker daemons behind that inherit the command's
    stdout and stderr: with pipes, waiting for their end means waiting for the daemons to exit.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        code = subprocess.run(cmd, cwd=cwd, env=env or pipeline_env(), stdout=stdout, stderr=stderr, timeout=600)
        stdout.seek(0)
        stderr.seek(0)
        out = subprocess.CompletedProcess(cmd, code.returncode, stdout.read(), stderr.read())
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def yaml_params(path: Path) -> dict[str, str]:
    """params.yaml as MLflow params (`section.key` -> str), read with a YAML parser, not the pipeline's config:
    the oracle for what a run logged."""
    from ruamel.yaml import YAML

    raw = YAML(typ="safe").load(path.read_text())
    return {f"{s}.{k}": str(v) for s, section in raw.items() for k, v in section.items()}


def logged_params(params: dict[str, str]) -> dict[str, str]:
    """A run's params that come from params.yaml (not init.*, compiled, device ...)."""
    return {k: v for k, v in params.items() if k.split(".")[0] in config.SECTIONS}


def rest(url: str, body: dict[str, Any] | None = None) -> Any:
    """A tracking server's REST API: GET, or POST of a JSON body; the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> bool:
    """Whether something accepts connections on 127.0.0.1:port within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            time.sleep(0.5)
    return False


@contextmanager
def mlflow_server(folder: Path, backend: str | None = None, port: int | None = None) -> Iterator[str]:
    """A real `mlflow server` on a free 127.0.0.1 port (or this one), its store (unless `backend` names one) and
    artifacts in `folder`; yields its URI."""
    port = port or free_port()
    server = subprocess.Popen(
        [
            *(str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)),
            *("--workers", "1"),  # a server for the client's tests: one process to start, not four
            *("--backend-store-uri", backend or f"sqlite:///{folder}/server.db"),
            *("--default-artifact-root", str(folder / "server-artifacts")),
        ],
        env=pipeline_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        if not wait_for_port(port, 120):
            raise RuntimeError("the mlflow server did not start")
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait()


def copy_repo(dest: Path) -> Path:
    """The working tree's tracked and untracked-but-not-ignored files, committed in a fresh git repository,
    and what set-up builds (the offline plot page, SETUP_BUILT).

    Outputs, the DVC cache, .venv and the MLflow store are ignored, so the copy starts as a fresh clone does
    once `make install` has run there.
    """
    dest.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for rel in SETUP_BUILT:
        if not (REPO / rel).is_file():
            raise RuntimeError(f"{rel} is missing: `make install` builds it")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dest / rel)
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-q", "-m", "copy for test")
    return dest


# Where MLflow's SQLite store writes absolute paths: the artifacts' folders, as paths and as file:// URIs.
STORE_PATHS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "storage_location"),
)


def clone(src: Path, dest: Path) -> Path:
    """A copy of a reproduced repository (conftest.py's `reproduced`) that a test may change: its git history, DVC
    cache, outputs and MLflow store, with the store's artifact locations moved to the copy's own folder."""
    shutil.copytree(src, dest, symlinks=True)  # a linked .venv stays a link
    with closing(sqlite3.connect(dest / "mlruns" / "mlflow.db")) as db, db:
        for table, column in STORE_PATHS:
            for old, new in ((src.as_uri(), dest.as_uri()), (str(src), str(dest))):
                db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?",
                    (new, len(old) + 1, len(old), old),
                )
    return dest


def lock_outputs(repo: Path) -> dict[str, str]:
    """Output path -> md5 in a repository's dvc.lock, as DVC wrote it; a folder's is the md5 of its listing (`.dir`)."""
    from ruamel.yaml import YAML

    lock = YAML(typ="safe").load((repo / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for stage in lock["stages"].values() for o in stage.get("outs", [])}
