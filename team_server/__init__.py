"""A tracking server for a team: `mlflow server` on a PostgreSQL store, with the run files served by it.

    python -m team_server --dir .team                   # or: make team-server
    MLFLOW_TRACKING_URI=http://127.0.0.1:5001 make repro   # from any clone that should log there

It starts PostgreSQL (Debian's `postgresql` package) on 127.0.0.1 with its data in DIR/postgres, creates the
`mlflow` database on first use, and runs `mlflow server` in the foreground with that database as its store
and DIR/artifacts as its artifact store: clients upload and download files through the server
(mlflow-artifacts:/), so they need no access to the folder. Ctrl-C stops both. Everything listens on
127.0.0.1; to serve a network, put it behind a proxy with authentication.

Operations, not the pipeline: it uses the pipeline's one-line errors and CLI, and the pipeline never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import pwd
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Importing the pipeline package also turns MLflow's telemetry off for the `mlflow server` started here
# (pipeline/__init__.py).
from pipeline import cli
from pipeline.errors import PipelineError

DATABASE = "mlflow"
SUPERUSER = "postgres"


class ServerError(PipelineError, RuntimeError):
    """PostgreSQL or the MLflow server cannot be started; the message says what to do."""


@dataclass(frozen=True)
class Postgres:
    """A running PostgreSQL cluster on 127.0.0.1, and the URI of its `mlflow` database."""

    data: Path
    port: int
    password: str

    @property
    def uri(self) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{DATABASE}"


def postgres_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, or where Debian puts it (/usr/lib/postgresql/<version>/bin)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise ServerError(f"no {name}: install PostgreSQL (Debian: apt-get install postgresql, or `make postgres`)")
    return found


def as_owner(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` account the package creates."""
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServerError(
            "running as root needs the `postgres` account (Debian's postgresql package makes it)"
        ) from None
    return ["runuser", "-u", "postgres", "--", *command]


def _chown_to_owner(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)


def init_cluster(data: Path) -> str:
    """Create the cluster in `data` (once) and return the superuser's password, kept in data/../postgres-password."""
    secret = data.parent / "postgres-password"
    if (data / "PG_VERSION").is_file():
        if not secret.is_file():
            raise ServerError(f"{secret}: missing, and the cluster in {data} needs it; remove {data} to start over")
        return secret.read_text().strip()
    if data.is_dir() and any(data.iterdir()):
        raise ServerError(f"{data}: holds files but no PostgreSQL cluster; remove it to start over")
    data.mkdir(parents=True, mode=0o700, exist_ok=True)  # empty: what an older failed start left
    _chown_to_owner(data)
    password = secrets.token_urlsafe(18)
    pwfile = data.parent / ".initdb-password"  # initdb wants an empty data folder; deleted right after
    pwfile.write_text(password + "\n")
    pwfile.chmod(0o600)
    _chown_to_owner(pwfile)
    try:
        subprocess.run(
            as_owner(
                [
                    postgres_bin("initdb"),
                    *("-D", str(data), "-U", SUPERUSER, "--pwfile", str(pwfile)),
                    *("--auth-host=scram-sha-256", "--auth-local=peer", "--encoding=UTF8", "--no-instructions"),
                ]
            ),
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as e:
        shutil.rmtree(data, ignore_errors=True)  # nothing half-made for the next start to trip on
        raise ServerError(f"initdb {data} failed: {cli_line(e.stderr)}") from None
    finally:
        pwfile.unlink(missing_ok=True)
    secret.write_text(password + "\n")
    secret.chmod(0o600)
    return password


def cli_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


@contextlib.contextmanager
def postgres(data: Path, port: int) -> Iterator[Postgres]:
    """PostgreSQL on 127.0.0.1:port with its cluster in `data` (created on first use), stopped on exit."""
    password = init_cluster(data)
    log = data.parent / "postgres.log"
    log.touch()
    _chown_to_owner(log)
    # TCP on 127.0.0.1 only; the Unix socket goes into the data folder (quoted: its path may hold spaces), not
    # /var/run/postgresql.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={shlex.quote(str(data))}"
    pg_ctl = postgres_bin("pg_ctl")
    started = subprocess.run(
        as_owner([pg_ctl, "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"]),
        capture_output=True,
        text=True,
    )
    if started.returncode != 0:
        raise ServerError(f"PostgreSQL did not start on 127.0.0.1:{port}: {cli_line(log.read_text())}")
    try:
        server = Postgres(data, port, password)
        create_database(server)
        yield server
    finally:
        subprocess.run(as_owner([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]), capture_output=True)


def create_database(server: Postgres) -> None:
    import psycopg

    # autocommit: CREATE DATABASE cannot run inside a transaction.
    with psycopg.connect(
        host="127.0.0.1", port=server.port, user=SUPERUSER, password=server.password, dbname="postgres", autocommit=True
    ) as connection:
        if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
            connection.execute(f"CREATE DATABASE {DATABASE}")


# Served by gunicorn, not uvicorn: with more than one uvicorn worker, every request on a kept-alive connection
# (MLflow's client keeps them) waits ~40 ms for a delayed ACK (Kludex/uvicorn#3149). gunicorn's threaded workers
# keep connections alive without it, and MLflow's host-header and CORS checks stay on (tests/test_team_server.py).
# gunicorn 26 stops only once every connection has closed, or after its graceful timeout (30 s): one idle client
# (a UI open in a browser) would hold a Ctrl-C for all of it. A request cut off at 5 s is retried by MLflow's client.
GUNICORN = "--worker-class gthread --threads 4 --keep-alive 5 --graceful-timeout 5"


def mlflow_server_command(store: str, artifacts: Path, port: int, workers: int = 4) -> list[str]:
    """`mlflow server` on the store, serving the run files from `artifacts`; loopback only."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        *("--host", "127.0.0.1", "--port", str(port), "--workers", str(workers), "--gunicorn-opts", GUNICORN),
        *("--backend-store-uri", store),
        *("--artifacts-destination", str(artifacts)),
        "--serve-artifacts",
    ]


def _answers(url: str, server: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether `url` answers 200 within `timeout` seconds, while the server is still running."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            time.sleep(0.5)
    return False


@dataclass(frozen=True)
class Team:
    """A running team server: its URI, the PostgreSQL under it, and the `mlflow server` process."""

    uri: str
    postgres: Postgres
    server: subprocess.Popen[bytes]


@contextlib.contextmanager
def stack(
    folder: Path, port: int, pg_port: int, workers: int = 4, env: Mapping[str, str] | None = None, quiet: bool = False
) -> Iterator[Team]:
    """PostgreSQL and `mlflow server` on it, their data in `folder`; yields once the server answers, stops both
    on exit. `make team-server` and the tests start it through here alike."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        folder.chmod(folder.stat().st_mode | 0o055)  # the postgres account must reach its data inside
    with postgres(folder / "postgres", pg_port) as db:
        cli.log.info("PostgreSQL on 127.0.0.1:%d, data in %s", db.port, db.data)
        output = subprocess.DEVNULL if quiet else None
        server = subprocess.Popen(
            mlflow_server_command(db.uri, folder / "artifacts", port, workers),
            env=env,
            stdout=output,
            stderr=output,
            start_new_session=True,  # its workers go with it, by group
        )
        try:
            uri = f"http://127.0.0.1:{port}"
            if not _answers(f"{uri}/health", server, 120):
                why = "did not answer within 120 s" if server.poll() is None else "exited before it answered"
                raise ServerError(f"the MLflow server on {uri} {why}")
            yield Team(uri, db, server)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGTERM)
            server.wait()


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds through the finally blocks, which stop the MLflow server and PostgreSQL


def serve(args: argparse.Namespace) -> None:
    signal.signal(signal.SIGTERM, _stop)
    folder = Path(args.dir).resolve()
    # Ctrl-C: leaving the stack stops both, and the interrupt ends here.
    with contextlib.suppress(KeyboardInterrupt), stack(folder, args.port, args.pg_port, args.workers) as team:
        cli.log.info("MLflow tracking server on %s: export MLFLOW_TRACKING_URI=%s", team.uri, team.uri)
        team.server.wait()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m team_server", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dir", default=".team", help="where the database and the run files live (default: .team)")
    p.add_argument("--port", type=int, default=5001, help="the MLflow server's port (default: 5001)")
    p.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port (default: 5433)")
    p.add_argument("--workers", type=int, default=4, help="the MLflow server's worker processes (default: 4)")
    return cli.run("team_server", serve, p.parse_args(argv))
