"""The tracking worker: the one process that imports MLflow, started by `pipeline.tracking.Worker`, and what it
shares with the stage's side (which imports this module, never the reverse).

It imports MLflow at once, opens the store at the stage's first command (a stage that stops before sending any
leaves no store behind), then runs the commands in order, each a method of Session called by name. It exits when
the run ends; if the commands end first, the stage has died without ending its run, which is marked FAILED.
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import queue
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import record
from pipeline.errors import first_line

METRICS_PER_REQUEST = 1000  # MLflow's REST limit for one log_batch
PARAMS_PER_REQUEST = 100
REQUESTS_IN_FLIGHT = 4  # to a tracking server, at once
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # what MLflow runs to load a logged model
MODEL_REQUIREMENTS = ("numpy", "pandas", "safetensors")  # what that code imports; MLflow adds itself
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the stage's to act on; the worker ignores them

Say = Callable[[str, Any], None]  # a reply to the stage: ("run", id), ("warning", text) or ("error", text)
Command = tuple[str, tuple[Any, ...]]  # a Session method's name and its arguments
Inbox = queue.SimpleQueue[Command | None]  # None: the commands have ended


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute sqlite:/// URI, else None (a server or another backend)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) and uri[len(prefix) :].startswith("/") else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store: concurrent schema migrations of a new database file fail."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Session:
    """One store, one experiment and at most one run; the stage's commands are its public methods."""

    def __init__(self, uri: str, experiment: str, say: Say) -> None:
        """Open the store, creating it and the experiment on first use."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri, self.say = uri, say
        with store_lock(uri):  # the client opens the store: when MLflow migrates a new database
            self.client = MlflowClient(tracking_uri=uri)
            # In a SQLite store's folder, not in ./mlruns (for a queued DVC experiment, a temporary copy).
            db = sqlite_path(uri)
            location = (db.parent / "artifacts").as_uri() if db else None
            kind = {record.EXPERIMENT_KIND_TAG: record.EXPERIMENT_KIND}
            try:
                found = self.client.get_experiment_by_name(experiment)
                self.experiment_id = (
                    found.experiment_id if found else self.client.create_experiment(experiment, location, kind)
                )
            except MlflowException:  # created meanwhile by another process sharing a server
                if (found := self.client.get_experiment_by_name(experiment)) is None:
                    raise
                self.experiment_id = found.experiment_id
            if found is not None and record.EXPERIMENT_KIND_TAG not in found.tags:  # made before the project set it
                self.client.set_experiment_tag(self.experiment_id, *kind.popitem())
        self.run_id = ""  # until start
        self.ended = False
        # A server takes requests side by side (`mlflow server` runs 4 workers); an embedded store gains nothing
        # from threads (its cost is Python in this very process), so it gets its calls in turn.
        self.pool = ThreadPoolExecutor(REQUESTS_IN_FLIGHT) if uri.startswith(("http://", "https://")) else None
        self.pending: list[Future[object]] = []
        self.idle: list[Callable[[], object]] = []  # work to do whenever no command is waiting
        self.params: dict[str, str] = {}  # the run's, as logged: the logged model records them too

    def _request(self, call: Callable[..., object], *args: Any) -> None:
        """One logging call: now, or for a server in the pool. Logging calls touch different rows, so their order
        does not matter; _drain() waits for them all before what does (finding or ending a run)."""
        if self.pool is None:
            call(*args)
        else:
            self.pending.append(self.pool.submit(call, *args))

    def _drain(self) -> None:
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()  # the first that failed raises here

    # The run.

    def open_store(self) -> None:  # nothing more: the store is open by the time any command runs
        pass

    def start(self, run_name: str | None, attach_to_model: str | None, tags_if_new: dict[str, str]) -> None:
        """Create the run, or reopen the newest finished one that trained `attach_to_model`."""
        found = None if attach_to_model is None else find_run(self.client, self.experiment_id, attach_to_model)
        if found is not None:
            self.client.update_run(found, status="RUNNING")
        self.run_id = found or self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        if attach_to_model is not None and found is None:  # a store that never saw it: another URI, a deleted run
            self.set_tags(tags_if_new | {record.MODEL_TAG: attach_to_model})
            self.say("warning", f"no MLflow run trained model {attach_to_model} in {self.uri}; starting a new run")
        self.say("run", self.run_id)

    def end(self, status: str) -> None:
        self._drain()
        self.client.set_terminated(self.run_id, status)
        self.ended = True

    def _abandon(self) -> None:
        """Mark an open run FAILED: its stage failed or died."""
        if self.run_id and not self.ended:
            try:
                self.end("FAILED")
            except Exception as e:  # the failure that brought us here is the one to report
                print(f"tracking worker: could not mark MLflow run {self.run_id} FAILED: {e}", file=sys.stderr)

    # Logging: no answers.

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.params |= params
        for batch in chunks([Param(k, v) for k, v in params.items()], PARAMS_PER_REQUEST):
            self._request(partial(self.client.log_batch, self.run_id, params=batch))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        for batch in chunks([RunTag(k, v) for k, v in tags.items()], PARAMS_PER_REQUEST):
            self._request(partial(self.client.log_batch, self.run_id, tags=batch))

    def log_series(self, series: dict[str, tuple[np.ndarray, np.ndarray]], timestamp: int) -> None:
        """1000 points per request, not one per point. Each series is one _request, its batches in order, so no
        two requests in flight update the same latest value."""
        from mlflow.entities import Metric

        for name, (steps, values) in series.items():
            points = [Metric(name, v, timestamp, s) for s, v in zip(steps.tolist(), values.tolist(), strict=True)]
            self._request(self._log_batches, self.run_id, chunks(points, METRICS_PER_REQUEST))

    def _log_batches(self, run_id: str, batches: list[list[Any]]) -> None:
        for batch in batches:
            self.client.log_batch(run_id, metrics=batch)

    def log_dataset(self, source: str, name: str, digest: str, context: str, n_rows: int, columns: list[str]) -> None:
        """The entry mlflow.data.from_pandas(...) makes for a table of float32 columns (pipeline/data.py), from
        its description alone (tests/test_tracking.py compares the two)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import ColSpec, DataType, Schema
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        schema = json.dumps({"mlflow_colspec": Schema([ColSpec(DataType.float, c) for c in columns]).to_dict()})
        profile = json.dumps({"num_rows": n_rows, "num_elements": n_rows * len(columns)})
        entry = Dataset(name, digest, "local", json.dumps({"uri": source}), schema=schema, profile=profile)
        inputs = [DatasetInput(entry, [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        self._request(self._log_inputs, self.run_id, inputs)

    def _log_inputs(self, run_id: str, inputs: list[Any]) -> None:
        """MLflow's store looks for the experiment's dataset, then inserts it when missing: two runs logging one
        table at once (a sweep's stages) can both miss it, and the second insert then breaks the key. Its
        transaction is rolled back, and the one retry finds the row (tests/test_team_server.py)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(run_id, inputs)
        except MlflowException as e:
            said = str(e).lower()
            if "dataset" not in said or not any(w in said for w in ("unique", "duplicate")):
                raise
            self.client.log_inputs(run_id, inputs)

    def log_artifact(self, name: str, content: bytes, artifact_path: str | None) -> None:
        self._request(self._log_file, self.run_id, name, content, artifact_path)

    def _log_file(self, run_id: str, name: str, content: bytes, artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory(prefix="pipeline-artifact-") as folder:  # MLflow logs files by name
            (path := Path(folder, name)).write_bytes(content)
            self.client.log_artifact(run_id, str(path), artifact_path)

    def expect_model(self) -> None:
        self.idle.append(prepare_model_logging)  # done while the stage trains

    def log_model(
        self, weights: bytes, columns: list[str], rows: list[list[float]], name: str | None, step: int
    ) -> None:
        self._request(self._log_model, self.run_id, weights, columns, rows, name, step)

    def _log_model(
        self, run_id: str, weights: bytes, columns: list[str], rows: list[list[float]], name: str | None, step: int
    ) -> None:
        """The pyfunc model of pipeline/mlflow_model.py, as the run's output at `step`.

        It takes doubles (float32 would refuse a DataFrame of plain Python floats) and gives one float32 per row;
        its requirements are pinned here, as inferring them takes MLflow seconds. It is created with the run as
        its source and logged without a run: given one, Model.log reads back every metric's whole history.
        """
        import mlflow.pyfunc
        import pandas as pd
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import ColSpec, DataType, Schema

        model = self.client.create_logged_model(self.experiment_id, "model", source_run_id=run_id, params=self.params)
        inputs, outputs = Schema([ColSpec(DataType.double, c) for c in columns]), Schema([ColSpec(DataType.float)])
        with tempfile.TemporaryDirectory(prefix="pipeline-model-") as folder:
            (path := Path(folder, "model.safetensors")).write_bytes(weights)
            Model.log(
                artifact_path=None,  # deprecated in favour of name, but still a required argument
                name="model",
                flavor=mlflow.pyfunc,
                model_id=model.model_id,
                python_model=str(MODEL_CODE),
                artifacts={"weights": str(path)},
                signature=ModelSignature(inputs=inputs, outputs=outputs),
                input_example=pd.DataFrame(np.asarray(rows, dtype=np.float64), columns=columns),
                pip_requirements=model_requirements(),
                registered_model_name=name,
            )
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])


def find_run(client: Any, experiment_id: str, model_md5: str) -> str | None:
    """Id of the newest FINISHED run that trained the model with this hash, if any (`make repro`'s summary too)."""
    query = f"tags.{record.MODEL_TAG} = '{model_md5}' and attributes.status = 'FINISHED'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def prepare_model_logging() -> None:
    """What log_model would spend its first fraction of a second on: MLflow's pyfunc modules, and checking the
    pinned requirements against what is installed (MLflow maps every installed package at its first check)."""
    import mlflow.pyfunc  # noqa: F401
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    warn_dependency_requirement_mismatches(model_requirements())
    gc.freeze()  # what this imported, too


def model_requirements() -> list[str]:
    """name==version of what the model's code imports, as installed here (without a local label: +cpu)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def read_commands(commands: Connection, inbox: Inbox) -> None:
    """Commands into memory as they come, so that the stage never waits on a full pipe; then None for their end
    (the stage closed its end, or died, maybe while sending one)."""
    with suppress(Exception):
        while True:
            inbox.put(commands.recv())
    inbox.put(None)


def preload(uri: str) -> None:
    """The slow part of the start-up, while the stage imports its own libraries: MLflow's client and, for a
    database, its SQLAlchemy store (not opened yet)."""
    from mlflow.tracking import MlflowClient  # noqa: F401

    if uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    # log_model's chatter (a progress bar for a local copy, a line per check) would land in the stage's output.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    gc.freeze()  # MLflow's objects live as long as this process: keep them out of every full collection


def serve(session: Session, first: Command, inbox: Inbox) -> bool:
    """Run `first`, then the commands in order, until "end" (True) or the end of the commands (False)."""
    command: Command | None = first
    while command is not None:
        name, args = command
        getattr(session, name)(*args)
        if name == "end":
            return True
        while session.idle and inbox.empty():
            session.idle.pop(0)()
        command = inbox.get()
    return False


def main(uri: str, experiment: str, commands: Connection, replies: Connection) -> None:
    # Ctrl-C reaches the whole process group: the stage decides how its run ends (KILLED) and says so. A SIGTERM
    # to the group ends the stage; staying alive until its commands end, we log what it sent and mark it FAILED.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the stage until now
    # Where Model.log looks for the store. Not mlflow.set_tracking_uri(): that restarts MLflow's tracing too.
    os.environ["MLFLOW_TRACKING_URI"] = uri
    # A server that goes away: MLflow's client retries 7 times with backoff doubling from 2 s, minutes in all.
    # Retried for about 30 s instead (1 + 2 + 4 + 8 + 16), a restart is ridden out and a server that stays
    # down fails the stage within a minute. Either can be set otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.dup2(2, 1)  # what MLflow prints goes to the stage's stderr, not into the stage's own output

    def say(kind: str, value: Any) -> None:
        with suppress(OSError):  # BrokenPipeError: the stage has gone, and there is nobody left to tell
            replies.send((kind, value))

    inbox: Inbox = queue.SimpleQueue()
    threading.Thread(target=read_commands, args=(commands, inbox), daemon=True).start()
    session, status = None, 0
    try:
        preload(uri)
        # The store opens at the first command: a stage that fails its own checks first creates no store.
        if (first := inbox.get()) is not None:
            session = Session(uri, experiment, say)
            if not serve(session, first, inbox) and session.run_id:
                print(f"tracking worker: the stage ended without ending MLflow run {session.run_id}", file=sys.stderr)
                session._abandon()
    except Exception as e:
        say("error", first_line(e))
        if session is not None:
            session._abandon()
        status = 1
    # Everything is committed. A normal exit would spend a second finalising MLflow's modules; the stage waits.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
