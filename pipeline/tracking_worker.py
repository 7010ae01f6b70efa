"""The tracking worker: the one process that imports MLflow, started by `pipeline.tracking.Worker`.

The stage sends it commands, each a Session method with its arguments. The store opens at the first one (a stage
that stops before sending any leaves no store behind). The worker exits when the run ends; if the commands end
first, the stage has died without ending its run, which is marked FAILED.
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
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import record
from pipeline.errors import first_line

METRICS_PER_REQUEST = 1000  # MLflow's REST limit for one log_batch
PARAMS_PER_REQUEST = 100
REQUESTS_IN_FLIGHT = 4  # bench P2 (team server): to a server side by side; one at a time, runs end later
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # what MLflow runs to load a logged model
MODEL_REQUIREMENTS = ("numpy", "pandas", "safetensors")  # what that code imports; MLflow adds itself
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # the stage's to act on; the worker ignores them

Command = tuple[Callable[..., None], tuple[Any, ...], dict[str, Any]]  # a Session method and its arguments


def sqlite_path(uri: str) -> Path | None:
    """The database file of an absolute sqlite:/// URI, else None (a server or another backend)."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix) :]) if uri.startswith(prefix) and uri[len(prefix) :].startswith("/") else None


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store: concurrent schema migrations of a new database file fail."""
    if (db := sqlite_path(uri)) is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class Session:
    """One store, one experiment and at most one run. Its public methods are the commands the stage sends."""

    def __init__(self, uri: str, experiment: str, say: Callable[[str, Any], None]) -> None:
        """Open the store, creating it and the experiment on first use. say(kind, value) replies to the stage."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.uri, self.say = uri, say
        with store_lock(uri):  # the client opens the store: when MLflow migrates a new database
            self.client = MlflowClient(tracking_uri=uri)
            # In a SQLite store's folder, not in ./mlruns (for a queued DVC experiment, a temporary copy).
            location = (db.parent / "artifacts").as_uri() if (db := sqlite_path(uri)) else None
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
        self.run_id, self.ended = "", False
        self.prepare = False  # for log_model, once no command is waiting
        # An embedded store gains nothing from threads: its cost is Python in this very process.
        self.pool = ThreadPoolExecutor(REQUESTS_IN_FLIGHT) if uri.startswith(("http://", "https://")) else None
        self.pending: list[Future[None]] = []

    def call(self, command: Command) -> None:
        """Run a command now or, against a server once the run exists, in the pool: logging calls touch different
        rows, so their order does not matter, and end() waits for them all."""
        method, args, kwargs = command
        if self.pool is None or not self.run_id:
            method(self, *args, **kwargs)
        else:
            self.pending.append(self.pool.submit(method, self, *args, **kwargs))

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
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()  # the first that failed raises here
        self.client.set_terminated(self.run_id, status)
        self.ended = True

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        for batch in chunks([Param(k, v) for k, v in params.items()], PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, params=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        for batch in chunks([RunTag(k, v) for k, v in tags.items()], PARAMS_PER_REQUEST):
            self.client.log_batch(self.run_id, tags=batch)

    def describe(self, note: str) -> None:
        self.set_tags({record.NOTE_TAG: note.replace(record.THIS_RUN, self.run_id)})

    def log_series(self, name: str, steps: np.ndarray, values: np.ndarray, timestamp: int) -> None:
        """One series, its requests in turn: no two in flight update its latest value."""
        from mlflow.entities import Metric

        points = [Metric(name, v, timestamp, s) for s, v in zip(steps.tolist(), values.tolist(), strict=True)]
        for batch in chunks(points, METRICS_PER_REQUEST):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_model_metrics(
        self, values: dict[str, float], dataset_name: str, dataset_digest: str, timestamp: int
    ) -> None:
        """Metrics of the model this run logged, measured on a dataset of the run's: linked to both (MLflow 3's
        logged-model metrics), so that the Models tab compares models. A run without a model logs them as plain
        run metrics, with a warning."""
        from mlflow.entities import Metric

        outputs = self.client.get_run(self.run_id).outputs
        models = outputs.model_outputs if outputs is not None else []
        if not models:
            self.say("warning", "this run logged no model: its test metrics stay the run's alone")
        model_id = models[-1].model_id if models else None
        link = {"model_id": model_id, "dataset_name": dataset_name, "dataset_digest": dataset_digest}
        metrics = [Metric(k, v, timestamp, 0, **link) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_dataset(self, source: str, name: str, digest: str, context: str, n_rows: int, columns: list[str]) -> None:
        """The entry mlflow.data.from_pandas(...) makes for a table of float32 columns (pipeline/data.py), from
        its description alone (tests/test_tracking.py compares the two)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException
        from mlflow.types import ColSpec, DataType, Schema
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        schema = json.dumps({"mlflow_colspec": Schema([ColSpec(DataType.float, c) for c in columns]).to_dict()})
        profile = json.dumps({"num_rows": n_rows, "num_elements": n_rows * len(columns)})
        entry = Dataset(name, digest, "local", json.dumps({"uri": source}), schema=schema, profile=profile)
        inputs = [DatasetInput(entry, [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        # Two runs can insert one new dataset at once (tests/test_team_server.py): the second breaks the key and is
        # rolled back, and one retry finds the row.
        try:
            self.client.log_inputs(self.run_id, inputs)
        except MlflowException as e:
            said = str(e).lower()
            if "dataset" not in said or not any(w in said for w in ("unique", "duplicate")):
                raise
            self.client.log_inputs(self.run_id, inputs)

    def log_artifact(self, name: str, content: bytes, artifact_path: str | None) -> None:
        with tempfile.TemporaryDirectory(prefix="pipeline-artifact-") as folder:  # MLflow logs files by name
            (path := Path(folder, name)).write_bytes(content)
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def crown(self, name: str, reasons: list[str]) -> None:
        """Tag this run's version of registered model `name` with the gate's verdict (record.GATE_TAG), and when
        it passed (no reasons) move the alias record.CHAMPION to it; a failed one leaves the alias where it was."""
        versions = self.client.search_model_versions(f"name = '{name}' and run_id = '{self.run_id}'")
        if not versions:
            self.say("warning", f"no version of registered model {name!r} came from this run; @champion not moved")
            return
        version = str(max(int(v.version) for v in versions))
        self.client.set_model_version_tag(name, version, record.GATE_TAG, record.gate_verdict(reasons))
        if not reasons:
            self.client.set_registered_model_alias(name, record.CHAMPION, version)

    def expect_model(self) -> None:  # bench P1, P2: log_model's first steps, done while the stage trains
        self.prepare = True

    def log_model(
        self,
        weights: bytes,
        columns: list[str],
        rows: list[list[float]],
        params: dict[str, str],
        name: str | None,
        step: int,
    ) -> None:
        """The pyfunc model of pipeline/mlflow_model.py, with the run's params, as the run's output at `step`.

        It takes doubles (float32 would refuse a DataFrame of plain Python floats) and gives one float32 per row.
        Its requirements are pinned: MLflow would infer them by loading the model in a new process. It is logged
        without a run, as a run's output: given a run, Model.log reads back every metric's whole history."""
        import mlflow.pyfunc
        import pandas as pd
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import ColSpec, DataType, Schema

        model = self.client.create_logged_model(self.experiment_id, "model", source_run_id=self.run_id, params=params)
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
        self.client.log_outputs(self.run_id, [LoggedModelOutput(model.model_id, step=step)])


def find_run(client: Any, experiment_id: str, model_md5: str) -> str | None:
    """Id of the newest FINISHED run that trained the model with this hash, if any (`make repro`'s summary too)."""
    query = f"tags.{record.MODEL_TAG} = '{model_md5}' and attributes.status = 'FINISHED'"
    runs = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def model_requirements() -> list[str]:
    """name==version of what the model's code imports, as installed here (without a local label: +cpu)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


def prepare_model_logging() -> None:
    """MLflow's pyfunc modules, and the check of the pinned requirements against what is installed (MLflow maps
    every installed package at its first check)."""
    import mlflow.pyfunc  # noqa: F401
    from mlflow.utils.requirements_utils import warn_dependency_requirement_mismatches

    warn_dependency_requirement_mismatches(model_requirements())


def preload(uri: str) -> None:
    """bench P1: the slow part of the start-up, while the stage imports its own libraries: MLflow's client and,
    for a database, its SQLAlchemy store (not opened yet)."""
    from mlflow.tracking import MlflowClient  # noqa: F401

    if uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    gc.freeze()  # bench P2 (sqlite): MLflow's objects live as long as this process: keep them out of collections


def serve(session: Session, first: Command, inbox: queue.SimpleQueue[Command | None]) -> None:
    """Run `first`, then the commands in order, until the run's end or the end of the commands (None)."""
    command: Command | None = first
    while command is not None:
        if command[0] is Session.end:  # once all the others are done
            return session.end(*command[1])
        session.call(command)
        if session.prepare and inbox.empty():  # nothing to do meanwhile: the stage is training
            session.prepare = False
            prepare_model_logging()
        command = inbox.get()
    if session.run_id:
        print(f"tracking worker: the stage ended without ending MLflow run {session.run_id}", file=sys.stderr)


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
    # log_model's chatter (a progress bar for a local copy, a line per check) would land in the stage's output.
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)
    os.dup2(2, 1)  # what MLflow prints goes to the stage's stderr, not into the stage's own output

    def say(kind: str, value: Any) -> None:  # ("run", id), ("warning", text) or ("error", text)
        with suppress(OSError):  # BrokenPipeError: the stage has gone, and there is nobody left to tell
            replies.send((kind, value))

    # The commands, read into memory as they come, then None for their end (the stage closed its end, or died).
    # No bench row needs this thread, but the stage's calls return at once even while this process cannot open
    # the store, as tests/test_tracking.py's test_calls_return_while_the_worker_cannot_even_open_the_store holds.
    inbox: queue.SimpleQueue[Command | None] = queue.SimpleQueue()

    def read_commands() -> None:
        with suppress(Exception):
            while True:
                inbox.put(commands.recv())
        inbox.put(None)

    threading.Thread(target=read_commands, daemon=True).start()
    session, status = None, 0
    try:
        preload(uri)
        # The store opens at the first command: a stage that fails its own checks first creates no store.
        if (first := inbox.get()) is not None:
            session = Session(uri, experiment, say)
            serve(session, first, inbox)
    except Exception as e:
        say("error", first_line(e))
        status = 1
    if session is not None and session.run_id and not session.ended:  # the stage failed or died, or this process
        try:
            session.end("FAILED")
        except Exception as e:  # the failure that brought us here is the one to report
            print(f"tracking worker: could not mark MLflow run {session.run_id} FAILED: {e}", file=sys.stderr)
    # Everything is committed: exit now, without the teardown of MLflow's modules nor its exit handlers.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
