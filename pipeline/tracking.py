"""Where the MLflow store is, and the stage's side of tracking: a proxy that hands every MLflow call to a worker.

MLflow itself is imported only in `pipeline.tracking_worker`, a process of its own that `connect()` starts at
once. Importing MLflow (~1 s) and opening a SQLite store (~0.8 s) then run on the second core while the stage
imports its libraries, trains and plots, instead of on the stage's critical path. Calls on the Tracker only
queue a command and return; the end of `Tracker.run()` waits until the worker has logged everything, and turns
any failure there into a one-line TrackingError.
"""

from __future__ import annotations

import fcntl
import logging
import os
import pickle
import secrets
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TrackingError, first_line

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"  # under the repository root: mlruns/mlflow.db and mlruns/artifacts/
MODEL_TAG = "model_md5"  # the key that ties evaluate to the run train created
WORKER_MODULE = "pipeline.tracking_worker"
# MLflow's own tag names (mlflow.utils.mlflow_tags; tests/test_tracking.py checks they still match), spelt out
# here so that the stage need not import MLflow for two strings.
SOURCE_NAME_TAG = "mlflow.source.name"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
REPLY_HEADER = struct.Struct("!I")  # each reply is its pickled length, then the pickle
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the stage's to act on; the worker ignores them


def project_root(cwd: Path | None = None) -> Path:
    """The repository root, also when DVC runs a stage in an experiment's temporary copy.

    Queued and --temp experiments run in <root>/.dvc/tmp/exps/[standalone/]tmpXXXX; relative paths there
    would scatter runs over throw-away folders, so the store is anchored to the real root.
    """
    here = (cwd or Path.cwd()).resolve()
    parts = here.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    return here


def default_uri(root: Path) -> str:
    return f"sqlite:///{root / STORE_DIR / 'mlflow.db'}"


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the embedded SQLite store under the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_uri(root)


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute sqlite:/// URI, else None (a server or another backend)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) and uri[len(prefix) :].startswith("/") else None


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store: concurrent schema migrations of a new database file fail."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@dataclass
class Run:
    """The stage's handle on a run: usable at once, while the worker creates the run.

    `id` stays None until the worker reports the run it made; at the latest, that is when the run ends.
    """

    id: str | None = None


class _Worker:
    """The worker process as the stage sees it: commands go to its stdin, replies come back on a pipe of
    their own, so nothing MLflow prints (it logs to stderr; the worker sends stdout there too) can mix in."""

    def __init__(self, uri: str, experiment: str) -> None:
        # The stage may delete or rewrite a file right after logging it, so log_artifact snapshots the file
        # into this folder, which the worker removes when it exits. Made at the first artifact only: a worker
        # killed with its stage (SIGKILL to the group) cannot clean up, and most of them die before any artifact.
        self.staging = Path(tempfile.gettempdir()) / f"pipeline-artifacts-{secrets.token_hex(8)}"
        reply_read, reply_write = os.pipe()
        # -P and PYTHONPATH: the worker imports this very package, not whatever `pipeline` the current folder or
        # an editable install of another checkout would give it.
        package_root = str(Path(__file__).resolve().parents[1])
        pythonpath = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        command = [sys.executable, "-P", "-m", WORKER_MODULE, uri, experiment, str(reply_write), str(self.staging)]
        # The worker ignores Ctrl-C and SIGTERM, but only once its Python is up. Blocked here, they are inherited
        # blocked, so one sent meanwhile waits and the worker discards it; this process gets it at the unblock.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, pass_fds=(reply_write,), env=os.environ | {"PYTHONPATH": pythonpath}
            )
        except OSError as e:
            os.close(reply_read)
            raise TrackingError(f"MLflow store {uri}: cannot start the tracking worker: {first_line(e)}") from None
        finally:
            os.close(reply_write)  # else the reply pipe would never reach EOF
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.replies = reply_read
        self.buffer = bytearray()
        self.eof = False
        self.artifacts = 0
        self.sent = 0  # commands so far: until the first, the worker has not touched the store

    def send(self, command: tuple[Any, ...]) -> None:
        """Queue one command; the worker reads its stdin in a thread of its own, so this does not wait for
        MLflow. Raises BrokenPipeError once the worker has exited."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(pickle.dumps(command, protocol=pickle.HIGHEST_PROTOCOL))
        stdin.flush()
        self.sent += 1

    def close_input(self) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        with suppress(BrokenPipeError):  # it has exited already; what it said is on the reply pipe
            stdin.close()

    def receive(self, block: bool) -> list[tuple[Any, ...]]:
        """The replies that have arrived; with block, wait for at least one or for the worker's end."""
        while not self.eof:
            if not block and not select.select([self.replies], [], [], 0)[0]:
                break
            chunk = os.read(self.replies, 1 << 16)
            if not chunk:
                self.eof = True
                os.close(self.replies)
            self.buffer += chunk
            if block and self._complete():
                break
        out = []
        while self._complete():
            (size,) = REPLY_HEADER.unpack_from(self.buffer)
            start = REPLY_HEADER.size
            out.append(pickle.loads(self.buffer[start : start + size]))
            del self.buffer[: start + size]
        return out

    def _complete(self) -> bool:
        if len(self.buffer) < REPLY_HEADER.size:
            return False
        size: int = REPLY_HEADER.unpack_from(self.buffer)[0]
        return len(self.buffer) >= REPLY_HEADER.size + size

    def stage_artifact(self, path: Path) -> Path:
        if self.artifacts == 0:
            self.staging.mkdir(mode=0o700)  # not exist_ok: a folder someone else made is not ours to use
        self.artifacts += 1
        copy = self.staging / str(self.artifacts) / path.name  # the name MLflow logs it under
        copy.parent.mkdir()
        shutil.copyfile(path, copy)
        return copy


class Tracker:
    """One store and one experiment, as the stage sees them: every logging call returns at once.

    A worker handles one run and exits when the run ends; a later run() (tests do that) starts another. The
    logging calls take the run's handle as the stages always passed a run id, though a tracker has at most one
    run open and the worker knows which.
    """

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri = uri
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._worker: _Worker | None = None
        self._run: Run | None = None
        self._found: list[str | None] = []
        self._error: str | None = None  # the first failure the worker reported
        self._failed: TrackingError | None = None  # raised once already; later calls raise it again

    # The worker's lifetime.

    def start(self) -> None:
        """Start a worker now, if none is running, so that MLflow's start-up overlaps the caller's work."""
        if self._worker is None:
            self._worker = _Worker(self.uri, self.experiment)
            self._error = self._failed = None
            log.debug("tracking worker %d started for %s", self._worker.proc.pid, self.uri)

    @property
    def worker_pid(self) -> int | None:
        return None if self._worker is None else self._worker.proc.pid

    def _live_worker(self) -> _Worker:
        if self._worker is not None:
            return self._worker
        if self._failed is not None:
            raise self._failed
        raise RuntimeError("no MLflow run is open on this tracker")

    def _send(self, *command: Any) -> None:
        worker = self._live_worker()
        self._handle(worker.receive(block=False))
        if self._error is None:
            try:
                worker.send(command)
                return
            except BrokenPipeError:  # the worker has exited; its reply says why
                pass
        # Nothing more can be logged, so the stage should stop here rather than at the end of the run.
        self._stop(worker)
        raise self._fail(worker)

    def _handle(self, replies: list[tuple[Any, ...]]) -> None:
        for kind, *args in replies:
            if kind == "ready":
                self._experiment_id = args[0]
            elif kind == "run" and self._run is not None:
                self._run.id = args[0]
                log.info("MLflow run %s in %s", args[0], self.uri)
            elif kind == "found":
                self._found.append(args[0])
            elif kind == "warning":
                log.warning("%s", args[0])
            elif kind == "error" and self._error is None:
                self._error = args[0]

    def _wait_for(self, condition: Callable[[], bool]) -> None:
        """Read replies until condition() holds; a worker that fails or ends first is a TrackingError."""
        worker = self._live_worker()
        while not condition():
            if self._error is not None or worker.eof:
                self._stop(worker)
                raise self._fail(worker)
            self._handle(worker.receive(block=True))

    def _stop(self, worker: _Worker) -> None:
        """Wait for the worker to exit, reading what it still says on the way."""
        worker.close_input()
        while not worker.eof:
            self._handle(worker.receive(block=True))
        worker.proc.wait()
        shutil.rmtree(worker.staging, ignore_errors=True)  # the worker's job, unless it was killed
        if self._worker is worker:
            self._worker = None

    def _fail(self, worker: _Worker) -> TrackingError:
        code = worker.proc.returncode
        if self._error is not None:
            cause = self._error
        elif code is not None and code < 0:
            cause = f"the tracking worker was killed by signal {-code}"
        else:
            cause = f"the tracking worker stopped with exit status {code}"
        self._failed = TrackingError(f"MLflow store {self.uri}: {cause}")
        return self._failed

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Let an idle worker go (one with no run open: run() ends its own) and wait for it to exit.

        A worker that was never asked for anything has not opened the store; it is only importing MLflow, so it
        is stopped at once rather than waited for (a stage that fails its own checks should fail fast).
        """
        worker = self._worker
        if worker is None or self._run is not None:
            return
        if worker.sent == 0:
            worker.proc.kill()
        self._stop(worker)

    def open(self) -> None:
        """Let the worker open the store now, without waiting for it (it does at its first command anyway)."""
        self.start()
        if self._live_worker().sent == 0:
            self._send("open")

    # Queries: they wait for the worker, so the stages do not use them.

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self.start()
            self._send("open")  # the worker opens the store at its first command
            self._wait_for(lambda: self._experiment_id is not None)
        assert self._experiment_id is not None
        return self._experiment_id

    def find_run(self, model_md5: str) -> str | None:
        """Id of the newest finished run that trained the model with this hash, if any."""
        return self._query("find", model_md5)

    def find_model(self, run_id: str) -> str | None:
        """Id of the MLflow model the run logged, if any: load it as models:/<id>."""
        return self._query("model_of", run_id)

    def _query(self, *command: Any) -> str | None:
        self.start()
        self._found.clear()
        self._send(*command)
        self._wait_for(lambda: bool(self._found))
        return self._found[0]

    # Runs.

    @contextmanager
    def run(
        self,
        run_name: str | None = None,
        attach_to_model: str | None = None,
        tags_if_new: Mapping[str, str] | None = None,
    ) -> Iterator[Run]:
        """A run, which the worker creates (or finds) while the body goes on; it ends FINISHED, or
        FAILED/KILLED if the body raises.

        attach_to_model: add to the newest FINISHED run tagged with this model hash; if there is none, a new
        run gets `tags_if_new` and the hash, and a warning says so.
        At the end this waits until the worker has logged everything and exited.
        """
        if self._run is not None:
            raise RuntimeError("a run is already open on this tracker")
        self.start()
        handle = self._run = Run()
        try:
            self._send("start", run_name, attach_to_model, dict(tags_if_new or {}))
            yield handle
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                self._end(status)
            except TrackingError as inner:  # the original error matters more than this one
                if inner is not e:
                    log.warning("could not mark MLflow run %s %s: %s", handle.id, status, inner)
            raise
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        try:
            worker = self._live_worker()
            with suppress(BrokenPipeError):  # it has exited: _stop() reads why
                worker.send(("end", status))
            self._stop(worker)
            if self._error is not None or worker.proc.returncode != 0:
                raise self._fail(worker)
        finally:
            self._run = None

    # Logging: each call queues a command and returns.

    def log_params(self, run: Run, params: Mapping[str, Any]) -> None:
        self._send("log_params", {k: str(v) for k, v in params.items()})

    def set_tags(self, run: Run, tags: Mapping[str, str]) -> None:
        self._send("set_tags", {k: str(v) for k, v in tags.items()})

    def log_metrics(self, run: Run, values: Mapping[str, float], step: int = 0) -> None:
        self.log_series(run, {k: ([step], [v]) for k, v in values.items()})

    def log_series(self, run: Run, series: Mapping[str, tuple[Any, Any]]) -> None:
        """Log {name: (steps, values)}; the worker sends 1000 points per request, not one request per point."""
        now = int(time.time() * 1000)  # when the values were computed, not when the worker gets to them
        arrays = {}
        for name, (steps, values) in series.items():
            s, v = np.asarray(steps, dtype=np.int64).reshape(-1), np.asarray(values, dtype=np.float64).reshape(-1)
            if len(s) != len(v):
                raise ValueError(f"series {name!r}: {len(s)} steps but {len(v)} values")
            arrays[name] = (s, v)
        self._send("log_series", arrays, now)

    def log_dataset(
        self,
        run: Run,
        *,
        source: str,
        name: str,
        digest: str,
        context: str,
        n_rows: int,
        columns: Sequence[str],
        targets: str = "y",
    ) -> None:
        """Record a table as a run input whose digest is the file's hash (the md5 in dvc.lock).

        Only its description travels: the table may be far too large to send, or not in memory at all. The
        entry is the one MLflow makes for a DataFrame of float32 columns (mlflow.data.from_pandas). `targets`
        is only checked against the columns: MLflow's entry for a DataFrame does not record it either.
        """
        if targets not in columns:
            raise ValueError(f"dataset {name!r}: target column {targets!r} is not among {list(columns)}")
        self._send("log_dataset", source, name, digest, context, int(n_rows), list(columns))

    def log_artifact(self, run: Run, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file under the run's artifacts, at `artifact_path` or at the top.

        The file is copied before this returns, so the caller may delete or replace it at once.
        MLflow itself refuses an absolute path or one with `..` (tests/test_reliability.py holds it to that).
        """
        self._send("log_artifact", self._snapshot(path), artifact_path)

    def _snapshot(self, path: str | Path) -> str:
        """A copy of the file for the worker to log, so the caller may change or delete the file at once."""
        try:
            return str(self._live_worker().stage_artifact(Path(path)))
        except OSError as e:
            raise TrackingError(f"MLflow store {self.uri}: cannot log {path}: {e.strerror or e}") from None

    def expect_model(self, run: Run) -> None:
        """Say that log_model will come, so that the worker prepares for it while it has nothing else to do."""
        self._send("expect_model")

    def log_model(
        self,
        run: Run,
        weights: str | Path,
        columns: Sequence[str],
        example: np.ndarray,
        registered_name: str | None = None,
        step: int = 0,
    ) -> None:
        """Log the model in MLflow's format (pipeline/mlflow_model.py) with these safetensors weights.

        columns: the feature columns it takes; example: a few rows of them (the model's input example);
        registered_name: also register it as a new version of this model; step: link the metrics logged at
        this step to the model. The weights are copied before this returns, as log_artifact does.
        """
        rows = np.asarray(example, dtype=np.float64).reshape(-1, len(columns))
        self._send("log_model", self._snapshot(weights), list(columns), rows.tolist(), registered_name, int(step))


class OfflineTracker(Tracker):
    """What connect() returns with PIPELINE_TRACKING=off: the same calls, recorded nowhere, and no worker."""

    def __init__(self) -> None:
        super().__init__(uri="(tracking off)", experiment="")
        self._experiment_id = ""

    def start(self) -> None:
        pass

    def open(self) -> None:
        pass

    def _query(self, *command: Any) -> str | None:
        return None  # nothing was recorded, so nothing is found (find_run, find_model)

    @contextmanager
    def run(
        self,
        run_name: str | None = None,
        attach_to_model: str | None = None,
        tags_if_new: Mapping[str, str] | None = None,
    ) -> Iterator[Run]:
        yield Run()

    def _send(self, *command: Any) -> None:
        pass

    def _snapshot(self, path: str | Path) -> str:
        return str(path)  # no worker, so no copy: _send drops the command


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail in seconds, naming the URI, when a tracking server does not answer (MLflow's own client would
    retry with back-off for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and refused connections are OSErrors
        reason = getattr(e, "reason", e)
        raise TrackingError(
            f"MLflow tracking server {uri} is not reachable ({reason}); start it or unset "
            f"MLFLOW_TRACKING_URI to use the project's own store"
        ) from None


def connect(experiment: str, root: Path | None = None) -> Tracker:
    """Start the worker, which opens the store (creating it and the experiment on first use), and return a
    Tracker at once.

    A tracking server that does not answer fails here, before the stage does any work. PIPELINE_TRACKING=off
    returns an OfflineTracker instead: for machines without a store, and for timing what tracking costs
    (benchmarks/bench.py).
    """
    if os.environ.get("PIPELINE_TRACKING", "on") == "off":
        return OfflineTracker()
    uri = tracking_uri(root or project_root())
    check_reachable(uri)
    tracker = Tracker(uri, experiment)
    tracker.start()
    return tracker


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"a.b": value}, the names `dvc metrics` shows; None (not applicable) is left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        elif value is not None:
            out[f"{prefix}{key}"] = float(value)
    return out


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance_tags(stage: str) -> dict[str, str]:
    """Git commit, whether tracked files differ from it, and the DVC experiment this runs under, if any."""
    tags = {SOURCE_NAME_TAG: f"pipeline.{stage}"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        # dvc.lock is rewritten by `dvc repro` itself as stages finish; it says nothing about the inputs.
        status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock")
        tags["git_dirty"] = "unknown" if status is None else str(bool(status)).lower()
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


if __name__ == "__main__":
    # `python -m pipeline.tracking` prints the store URI the stages use (for `make ui`).
    print(tracking_uri(project_root()))
