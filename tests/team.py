"""The team server for the tests and the benchmark: started by the package's own `stack()`, as `make team-server`
starts it, and PostgreSQL restarted under it, as an operator would."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import team_server
from tests.helpers import free_port, pipeline_env


def require_postgres() -> None:
    """Fail in CI, and skip elsewhere, without PostgreSQL."""
    try:
        team_server.postgres_bin("initdb")
    except team_server.ServerError as e:
        pytest.fail(str(e)) if os.environ.get("CI") else pytest.skip(str(e))


@contextmanager
def team_stack() -> Iterator[tuple[str, team_server.Postgres]]:
    """PostgreSQL and an `mlflow server` on it, started as `make team-server` starts them, on free ports;
    yields (the server's URI, the team_server.Postgres). Fails in CI, and skips elsewhere, without PostgreSQL."""
    require_postgres()
    # Not under pytest's tmp_path: its folders are private to this user, and PostgreSQL runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="team ü-"))  # a space and a non-ASCII letter, as users' folders have
    try:
        with team_server.stack(folder, free_port(), free_port(), env=pipeline_env(), quiet=True) as team:
            yield team.uri, team.postgres
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def restart(server: team_server.Postgres) -> None:
    """Stop PostgreSQL and start it again with the same settings, as an operator's restart would."""
    log = str(server.data.parent / "postgres.log")  # as at the start: not our pipes, which it would hold open
    restarted = [team_server.postgres_bin("pg_ctl"), "-D", str(server.data), "-l", log, "-m", "fast", "-w", "restart"]
    subprocess.run(team_server.as_owner(restarted), check=True, capture_output=True)
