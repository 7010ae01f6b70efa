"""Where the MLflow store is, and the stage's side of tracking: every MLflow call goes to a worker process.

`connect()` starts the worker (pipeline/tracking_worker.py, the one module that imports MLflow) at once, so that
importing MLflow and opening the store overlap the stage's own work (docs/tracking.md). A logging call checks its
arguments, queues the worker's command and returns; the end of a run waits until the worker has logged everything.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import signal
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Concatenate, ParamSpec

import numpy as np

from pipeline import tracking_worker
from pipeline.errors import DataError, TrackingError
from pipeline.tracking_worker import Command, Session

log = logging.getLogger(__name__)
P = ParamSpec("P")

STORE_DIR = "mlruns"  # under the repository root: mlruns/mlflow.db and mlruns/artifacts/


def project_root(cwd: Path | None = None) -> Path:
    """The repository root, also from a queued or --temp DVC experiment's copy in
    <root>/.dvc/tmp/exps/[standalone/]tmpXXXX: the store stays at the real root, not in throw-away folders."""
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


def tracking_on() -> bool:
    """False under PIPELINE_TRACKING=off: nothing is logged, and nothing reads a store either."""
    return os.environ.get("PIPELINE_TRACKING", "on") != "off"


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, naming it, when a tracking server does not answer (MLflow's client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (OSError, ValueError) as e:  # URLError, HTTPError, timeouts and refused connections are OSErrors
        why = f"is not reachable ({getattr(e, 'reason', e)}); start it or unset MLFLOW_TRACKING_URI"
        raise TrackingError(f"MLflow tracking server {uri} {why} to use the project's own store") from None


def require_store(uri: str, subject: str) -> None:
    """For a command that reads what the stages logged (predict, serve): one line about `subject` when the
    project's store does not exist yet, so that none is made, and a server that does not answer fails at once."""
    db = tracking_worker.sqlite_path(uri)
    if db is not None and not db.exists():
        raise DataError(f"{subject}: there is no MLflow store at {db} yet: run `make repro` first")
    check_reachable(uri)


@contextmanager
def mlflow_settings(settings: Mapping[str, str]) -> Iterator[None]:
    """Environment variables MLflow reads, set for this block only: a caller in this process (a test, a notebook)
    keeps its own."""
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def connect(experiment: str, root: Path | None = None, enabled: bool = True) -> Tracker:
    """A Tracker whose worker is starting already. enabled=False (a torchrun rank but 0) or PIPELINE_TRACKING=off:
    the calls go nowhere, for machines without a store and for timing what tracking costs (benchmarks/bench.py)."""
    if not enabled or not tracking_on():
        return Tracker("(tracking off)", "", enabled=False)
    uri = tracking_uri(root or project_root())
    check_reachable(uri)
    tracker = Tracker(uri, experiment)
    tracker.start()
    return tracker


class Offline:
    """PIPELINE_TRACKING=off, or a torchrun rank but 0: the same calls, recorded nowhere, and no process."""

    run_id: str | None = None

    def send(self, command: Command) -> None: ...
    def end(self, status: str) -> None: ...
    def close(self) -> None: ...


class Worker:
    """The worker process as the stage sees it: commands go down one pipe, its replies come up another."""

    def __init__(self, uri: str, experiment: str) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: a fork would copy threads, stores
        their_commands, self.commands = context.Pipe(duplex=False)
        self.replies, their_replies = context.Pipe(duplex=False)
        args = (uri, experiment, their_commands, their_replies)
        self.process = context.Process(target=tracking_worker.main, args=args, name="tracking")
        # The worker ignores Ctrl-C and SIGTERM once its Python is up. Blocked here, they are inherited blocked:
        # one sent meanwhile waits and the worker discards it, while this process gets it at the unblock.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, tracking_worker.STOP_SIGNALS)
        try:
            self.process.start()
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot start the tracking worker: {e}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            their_commands.close()  # the worker's ends: with ours closed, each side sees the other's end
            their_replies.close()
        atexit.register(self.commands.close)  # multiprocessing joins its children at exit: let this one end
        self.uri, self.pid = uri, self.process.pid
        log.debug("tracking worker %d started for %s", self.pid, uri)
        self.run_id: str | None = None  # the run the worker made or reopened, once it has said so
        self.sent, self.eof = 0, False  # until its first command, the worker has not touched the store
        self.error: str | None = None  # the first failure the worker reported
        self.failed: TrackingError | None = None  # raised once, and again by every later call

    def send(self, command: Command) -> None:  # returns at once
        if self.failed is not None:
            raise self.failed
        while not self.eof and self.replies.poll():
            self._receive()
        if self.error is None:
            with suppress(BrokenPipeError):  # the worker has exited: its replies say why
                self.commands.send(command)
                self.sent += 1
                return
        raise self._fail()  # nothing more can be logged: stop the stage now, not at the end of the run

    def end(self, status: str) -> None:  # end the run, and wait until everything is logged
        if self.failed is not None:
            raise self.failed
        with suppress(BrokenPipeError):
            self.commands.send((Session.end, (status,), {}))
        self._stop()
        if self.error is not None or self.process.exitcode != 0:
            raise self._fail()

    def close(self) -> None:  # let a worker with no run go
        if self.sent == 0:  # it is only importing MLflow: a stage that failed its own checks should fail fast
            self.process.kill()
        self._stop()

    def _receive(self) -> None:  # one reply, or the worker's end
        try:
            kind, value = self.replies.recv()
        except EOFError:
            self.eof = True
            return
        if kind == "run":
            self.run_id = value
            log.info("MLflow run %s in %s", value, self.uri)
        elif kind == "warning":
            log.warning("%s", value)
        else:  # "error"
            self.error = self.error or value

    def _stop(self) -> None:  # wait for the worker to exit, reading what it still says on the way
        self.commands.close()
        while not self.eof:
            self._receive()
        self.process.join()

    def _fail(self) -> TrackingError:
        self._stop()
        code = self.process.exitcode or 0
        killed = f"the tracking worker was killed by signal {-code}"
        cause = self.error or (killed if code < 0 else f"the tracking worker stopped with exit status {code}")
        self.failed = TrackingError(f"MLflow store {self.uri}: {cause}")
        return self.failed


class Tracker:
    """One store and one experiment, as the stage sees them. A worker serves one run; a later run() starts another.
    Each call the stage can make is a method here that checks its arguments, then sends the tracking_worker.Session
    method that makes the MLflow calls (mypy checks the arguments against it)."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True) -> None:
        self.uri, self.experiment, self.enabled = uri, experiment, enabled
        self._channel: Worker | Offline | None = None
        self._in_run = False
        self._params: dict[str, str] = {}  # the run's, as logged: its model records them too

    def start(self) -> Worker | Offline:  # a worker, started now if none is running
        if self._channel is None:
            self._channel = Worker(self.uri, self.experiment) if self.enabled else Offline()
        return self._channel

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:  # let an idle worker go: run() ends its own
        if self._channel is not None and not self._in_run:
            channel, self._channel = self._channel, None
            channel.close()

    @contextmanager
    def run(
        self, run_name: str | None = None, attach_to_model: str | None = None, tags_if_new: dict[str, str] | None = None
    ) -> Iterator[Worker | Offline]:
        """A run, which the worker makes while the body goes on; it ends FINISHED, or FAILED (KILLED on Ctrl-C)
        if the body raises, once the worker has logged everything. attach_to_model: add to the newest FINISHED run
        tagged with this model hash; if there is none, a new run gets `tags_if_new` and the hash, with a warning."""
        if self._in_run:
            raise RuntimeError("a run is already open on this tracker")
        channel, self._in_run, self._params = self.start(), True, {}
        try:
            self._send(Session.start, run_name, attach_to_model, tags_if_new or {})
            yield channel
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                self._end(status)
            except TrackingError as inner:  # the original error matters more than this one
                if inner is not e:
                    log.warning("could not mark MLflow run %s %s: %s", channel.run_id, status, inner)
            raise
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        channel, self._channel, self._in_run = self.start(), None, False
        channel.end(status)

    def _send(self, method: Callable[Concatenate[Session, P], None], *args: P.args, **kwargs: P.kwargs) -> None:
        if not self._in_run:
            raise RuntimeError("no MLflow run is open on this tracker")
        self.start().send((method, args, kwargs))

    def _read(self, path: str | Path) -> tuple[str, bytes]:  # now: the caller may rewrite or delete it at once
        try:
            return Path(path).name, Path(path).read_bytes()
        except OSError as e:
            raise TrackingError(f"MLflow store {self.uri}: cannot log {path}: {e.strerror or e}") from None

    # Logging: each call queues a command and returns.

    def log_params(self, params: Mapping[str, Any]) -> None:
        as_logged = {k: str(v) for k, v in params.items()}
        self._send(Session.log_params, as_logged)
        self._params |= as_logged

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._send(Session.set_tags, {k: str(v) for k, v in tags.items()})

    def log_metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        self.log_series({k: ([step], [v]) for k, v in values.items()})

    def log_series(self, series: Mapping[str, tuple[Any, Any]]) -> None:
        """Log {name: (steps, values)}; the worker sends 1000 points per request, not one request per point."""
        now = int(time.time() * 1000)  # when the values were computed, not when the worker gets to them
        arrays = {}
        for name, (steps, values) in series.items():
            s, v = np.asarray(steps, dtype=np.int64).reshape(-1), np.asarray(values, dtype=np.float64).reshape(-1)
            if len(s) != len(v):
                raise ValueError(f"series {name!r}: {len(s)} steps but {len(v)} values")
            arrays[name] = (s, v)
        for name, (s, v) in arrays.items():  # one command each: to a server, side by side
            self._send(Session.log_series, name, s, v, now)

    def log_dataset(
        self, *, source: str, name: str, digest: str, context: str, n_rows: int, columns: list[str]
    ) -> None:
        """A table as a run input whose digest is the file's md5 (as in dvc.lock), described by its rows and
        columns: the table itself may be far too large to send, or not in memory at all."""
        self._send(Session.log_dataset, source, name, digest, context, int(n_rows), list(columns))

    def log_model_metrics(self, values: Mapping[str, float], dataset: Mapping[str, Any]) -> None:
        """Metrics of this run's logged model on `dataset` (a log_dataset entry, logged first): linked to both."""
        scores, now = {k: float(v) for k, v in values.items()}, int(time.time() * 1000)
        self._send(Session.log_model_metrics, scores, dataset["name"], dataset["digest"], now)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, name: str | None = None) -> None:
        """Log a file, as it is now, at `artifact_path` of the run's artifacts or at the top, under its own name or
        `name`. MLflow itself refuses an absolute path or one with `..` (tests/test_reliability.py holds it to that)."""
        own, content = self._read(path)
        self._send(Session.log_artifact, name or own, content, artifact_path)

    def describe(self, note: str) -> None:
        """The run's Description (markdown), record.THIS_RUN in it replaced by the run's ID."""
        self._send(Session.describe, note)

    def crown(self, registered_model: str, reasons: list[str]) -> None:
        """The gate's verdict on this run's version of `registered_model`: passed (no reasons) moves @champion."""
        self._send(Session.crown, registered_model, list(reasons))

    def expect_model(self) -> None:  # log_model will come: the worker prepares while it has nothing else to do
        self._send(Session.expect_model)

    def log_model(
        self,
        weights: str | Path,
        columns: list[str],
        example: np.ndarray,
        registered_name: str | None = None,
        step: int = 0,
    ) -> None:
        """The model in MLflow's format (pipeline/mlflow_model.py) with these safetensors weights, taking these
        feature columns, with rows of them as its input example; registered_name: a model to add a version to;
        step: the metrics logged at this step go with the model."""
        rows = np.asarray(example, dtype=np.float64).reshape(-1, len(columns)).tolist()
        content = self._read(weights)[1]
        self._send(Session.log_model, content, list(columns), rows, self._params, registered_name, int(step))


if __name__ == "__main__":
    # `python -m pipeline.tracking` prints the store URI the stages use (for `make ui`).
    print(tracking_uri(project_root()))
