"""The tracking worker: the one process that imports MLflow, started by `pipeline.tracking.connect()` as

    python -P -m pipeline.tracking_worker URI EXPERIMENT REPLY_FD STAGING_DIR

It imports MLflow and its store's modules at once, opens the store at the stage's first command (a stage that
stops before sending any leaves no store behind), then executes the commands (pickled frames on stdin) in order
against one run, and answers (length-prefixed pickles) on REPLY_FD alone. It exits after the run ends; if stdin
ends first, the stage has died without ending its run, and the run is marked FAILED rather than left RUNNING.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import pickle
import queue
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np

from pipeline import tracking
from pipeline.errors import first_line

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

METRICS_PER_REQUEST = 1000  # MLflow's REST limit for one log_batch
PARAMS_PER_REQUEST = 100
REQUESTS_IN_FLIGHT = 4  # to a tracking server, at once
# The commands without a reply.
LOGGED = ("log_params", "set_tags", "log_series", "log_dataset", "log_artifact", "log_model", "expect_model")
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # what MLflow runs to load a logged model
MODEL_REQUIREMENTS = ("numpy", "pandas", "safetensors")  # what that code imports; MLflow adds itself


class Session:
    """One store, one experiment and at most one run: what the commands act on."""

    def __init__(self, client: MlflowClient, experiment_id: str, uri: str) -> None:
        self.client = client
        self.experiment_id = experiment_id
        self.uri = uri
        self.run_id: str | None = None
        self.ended = False
        # A tracking server takes requests side by side (`mlflow server` runs 4 workers); an embedded store
        # gains nothing from threads (its cost is Python in this very process) and gets its calls in turn.
        remote = uri.startswith(("http://", "https://"))
        self.pool = ThreadPoolExecutor(REQUESTS_IN_FLIGHT) if remote else None
        self.pending: list[Future[object]] = []
        self.idle: list[Callable[[], object]] = []  # work to do whenever no command is waiting
        self.params: dict[str, str] = {}  # the run's, as logged

    def _request(self, call: Callable[..., object], *args: Any) -> None:
        """One logging call: now for an embedded store; for a server, in the background, REQUESTS_IN_FLIGHT at a
        time. Logging calls touch different rows (params, tags, inputs, files, one series each), so their order
        does not matter; drain() waits for them all before whatever does (starting, finding or ending a run)."""
        if self.pool is None:
            call(*args)
        else:
            self.pending.append(self.pool.submit(call, *args))

    def drain(self) -> None:
        """Wait for the logging calls in flight; the first that failed raises here."""
        pending, self.pending = self.pending, []
        for future in pending:
            future.result()

    @classmethod
    def open(cls, uri: str, experiment: str) -> Session:
        """Open the store (creating it and the experiment on first use)."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        with tracking._store_lock(uri):
            # Inside the lock: the client opens the store, which is when MLflow migrates a new database.
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return cls(client, found.experiment_id, uri)
            # With a SQLite store MLflow would put artifacts in ./mlruns of the current folder, which for a
            # queued DVC experiment is a temporary copy; anchor them beside the database instead.
            db = tracking.sqlite_path(uri)
            location = (db.parent / "artifacts").as_uri() if db else None
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by another process sharing a server
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        return cls(client, experiment_id, uri)

    def find(self, model_md5: str) -> str | None:
        """Id of the newest finished run that trained the model with this hash, if any."""
        self.drain()
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{tracking.MODEL_TAG} = '{model_md5}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def model_of(self, run_id: str) -> str | None:
        """Id of the last model the run logged, if any."""
        self.drain()
        outputs = self.client.get_run(run_id).outputs
        models = outputs.model_outputs if outputs is not None else []
        return models[-1].model_id if models else None

    def start(self, run_name: str | None, attach_to_model: str | None, tags_if_new: dict[str, str]) -> str | None:
        """Create the run, or reopen the one that trained `attach_to_model`; returns a warning, if any."""
        self.drain()
        if attach_to_model is not None:
            found = self.find(attach_to_model)
            if found is not None:
                self.client.update_run(found, status="RUNNING")
                self.run_id = found
                return None
        self.run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        if attach_to_model is None:
            return None
        # A store that never saw this model (another URI, a deleted run) gets a run of its own.
        self.set_tags(tags_if_new | {tracking.MODEL_TAG: attach_to_model})
        return f"no MLflow run trained model {attach_to_model} in {self.uri}; starting a new run"

    def end(self, status: str) -> None:
        self.drain()
        self.client.set_terminated(self._run(), status)
        self.ended = True

    def abandon(self) -> None:
        """Mark an open run FAILED: its stage failed or died."""
        if self.run_id is None or self.ended:
            return
        try:
            self.end("FAILED")
        except Exception as e:  # the failure that brought us here is the one to report
            print(f"tracking worker: could not mark MLflow run {self.run_id} FAILED: {e}", file=sys.stderr)

    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("no run has been started")
        return self.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        self.params |= params  # the logged model records them too
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self._request(partial(self.client.log_batch, self._run(), params=items[i : i + PARAMS_PER_REQUEST]))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self._request(partial(self.client.log_batch, self._run(), tags=items[i : i + PARAMS_PER_REQUEST]))

    def log_series(self, series: dict[str, tuple[Any, Any]], timestamp: int) -> None:
        """{name: (steps, values)} in batches: one request per 1000 points, not one per point.

        Each series is one call of _request: its batches go in order, so no two requests in flight update the same
        latest value.
        """
        from mlflow.entities import Metric

        run_id = self._run()
        for name, (steps, values) in series.items():
            points = [
                Metric(name, float(v), timestamp, int(s))
                for s, v in zip(np.asarray(steps).tolist(), np.asarray(values).tolist(), strict=True)
            ]
            batches = [points[i : i + METRICS_PER_REQUEST] for i in range(0, len(points), METRICS_PER_REQUEST)]
            self._request(self._log_batches, run_id, batches)

    def _log_batches(self, run_id: str, batches: list[list[Any]]) -> None:
        for batch in batches:
            self.client.log_batch(run_id, metrics=batch)

    def log_dataset(
        self, source: str, name: str, digest: str, context: str, n_rows: int, columns: Sequence[str]
    ) -> None:
        """The entry mlflow.data.from_pandas(...).to_dict() makes for a table of float32 columns (the tables'
        type, pipeline/data.py), built from its description alone (tests/test_tracking.py compares the two)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.types import ColSpec, DataType, Schema
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        dataset = Dataset(
            name=name,
            digest=digest,
            source_type="local",
            source=json.dumps({"uri": source}),
            schema=json.dumps({"mlflow_colspec": Schema([ColSpec(DataType.float, c) for c in columns]).to_dict()}),
            profile=json.dumps({"num_rows": n_rows, "num_elements": n_rows * len(columns)}),
        )
        inputs = [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, context)])]
        self._request(self.client.log_inputs, self._run(), inputs)

    def log_artifact(self, path: str, artifact_path: str | None) -> None:
        """Log the stage's snapshot of a file, then drop the snapshot."""
        self._request(self._log_artifact, self._run(), path, artifact_path)

    def _log_artifact(self, run_id: str, path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)
        os.unlink(path)

    def expect_model(self) -> None:
        """A model will come: prepare for it while the stage trains."""
        self.idle.append(prepare_model_logging)

    def log_model(
        self, weights: str, columns: list[str], example: list[list[float]], registered_name: str | None, step: int
    ) -> None:
        self._request(self._log_model, self._run(), weights, columns, example, registered_name, step)

    def _log_model(
        self,
        run_id: str,
        weights: str,
        columns: list[str],
        example: list[list[float]],
        registered_name: str | None,
        step: int,
    ) -> None:
        """The pyfunc model of pipeline/mlflow_model.py with these weights, as the run's output at `step`.

        The signature names the feature columns and takes doubles (float32 would refuse a DataFrame of plain
        Python floats); one float32 comes out per row. The example is real rows of the training table. The
        requirements are given, pinned to this environment: inferring them costs MLflow 4-6 s.

        The model is created here, with the run as its source, and logged without a run: given a run, Model.log
        also reads back the whole history of every metric of the run, to link the values at `step` to the model.
        For a 1000-epoch run that is 5000 points read back on SQLite (~0.3 s), and 35 requests of ~45 ms each
        to a default `mlflow server`.
        """
        import mlflow.pyfunc
        import pandas as pd
        from mlflow.entities import LoggedModelOutput
        from mlflow.models import Model, ModelSignature
        from mlflow.types import ColSpec, DataType, Schema

        model = self.client.create_logged_model(
            self.experiment_id, name="model", source_run_id=run_id, params=self.params
        )
        Model.log(
            artifact_path=None,  # deprecated in favour of name, but still a required argument
            name="model",
            flavor=mlflow.pyfunc,
            model_id=model.model_id,
            python_model=str(MODEL_CODE),
            artifacts={"weights": weights},
            signature=ModelSignature(
                inputs=Schema([ColSpec(DataType.double, c) for c in columns]), outputs=Schema([ColSpec(DataType.float)])
            ),
            input_example=pd.DataFrame(np.asarray(example, dtype=np.float64), columns=columns),
            pip_requirements=model_requirements(),
            registered_model_name=registered_name,
        )
        self.client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=step)])
        os.unlink(weights)


def prepare_model_logging() -> None:
    """What log_model would otherwise spend its first 0.3-0.5 s on: MLflow's pyfunc modules, and its map of
    installed packages, which it builds (once) to check the model's pinned requirements against."""
    import mlflow.pyfunc  # noqa: F401
    from mlflow.utils import requirements_utils

    build_map = getattr(requirements_utils, "_init_packages_to_modules_map", None)  # private: may go away
    if build_map is not None:
        build_map()
    gc.freeze()  # what this imported, too


def model_requirements() -> list[str]:
    """name==version of what the model's code imports, as installed here (without a local label: +cpu)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_REQUIREMENTS]


class Replies:
    """The reply pipe: nothing but these frames is ever written to it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def send(self, *reply: Any) -> None:
        data = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(tracking.REPLY_HEADER.pack(len(data)) + data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except BrokenPipeError:  # the stage has gone: there is nobody left to tell
            pass


def read_commands(stream: BinaryIO, commands: queue.SimpleQueue[tuple[Any, ...] | None]) -> None:
    """Move commands from stdin into memory as they come, then None for the end of stdin.

    A thread of its own, so that the stage never waits on a full pipe while MLflow imports or the store is
    busy. A frame cut short (the stage was killed while writing it) counts as the end.
    """
    try:
        while True:
            commands.put(pickle.load(stream))
    except Exception:  # EOFError, or a truncated frame
        pass
    finally:
        commands.put(None)


def quiet_model_logging() -> None:
    """log_model's chatter, which would land in the middle of the stage's own output: a progress bar for a
    file copied from local disk and a line per check. Warnings and errors still show."""
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow.pyfunc").setLevel(logging.WARNING)


def preload(uri: str) -> None:
    """Import MLflow's client and, for a database URI, its SQLAlchemy store (~0.8 s of the ~2 s start-up):
    the slow part, done while the stage imports its own libraries. The store itself is not touched yet."""
    from mlflow.tracking import MlflowClient  # noqa: F401

    if uri.split(":", 1)[0].split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401


def serve(
    session: Session,
    first: tuple[Any, ...],
    commands: queue.SimpleQueue[tuple[Any, ...] | None],
    replies: Replies,
) -> bool:
    """Execute `first`, then the commands in order, until "end" (True) or the end of stdin (False)."""
    command: tuple[Any, ...] | None = first
    while command is not None:
        name, *args = command
        if name == "open":
            pass  # the store is open: that was all it asked for
        elif name == "end":
            session.end(*args)
            return True
        elif name == "start":
            warning = session.start(*args)
            if warning:
                replies.send("warning", warning)
            replies.send("run", session.run_id)
        elif name == "find":
            replies.send("found", session.find(*args))
        elif name == "model_of":
            replies.send("found", session.model_of(*args))
        elif name in LOGGED:
            getattr(session, name)(*args)
        else:
            raise ValueError(f"unknown tracking command {name!r}")
        while session.idle and commands.empty():
            session.idle.pop(0)()
        command = commands.get()
    return False


def main(argv: Sequence[str] | None = None) -> int:
    # Ctrl-C reaches the whole process group; the stage decides how its run ends (KILLED) and tells us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A SIGTERM to the group ends the stage; staying alive until stdin ends lets us log what it sent and mark
    # the run FAILED.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, tracking.STOP_SIGNALS)  # blocked by the stage until now
    uri, experiment, reply_fd, staging = argv or sys.argv[1:]
    # Where MLflow's module-level API (Model.log) looks for the store. Not mlflow.set_tracking_uri(): that
    # also restarts MLflow's tracing, which imports OpenTelemetry's SDK (~0.15 s).
    os.environ["MLFLOW_TRACKING_URI"] = uri
    fd = int(reply_fd)
    os.set_inheritable(fd, False)
    os.dup2(2, 1)  # whatever MLflow prints goes to the stage's stderr, never near the replies
    replies = Replies(fd)
    commands: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
    threading.Thread(target=read_commands, args=(sys.stdin.buffer, commands), daemon=True).start()
    session = None
    try:
        preload(uri)
        quiet_model_logging()  # after MLflow's import, which sets up its own loggers
        # MLflow's modules hold ~300k objects that live as long as this process. Frozen, they are left out
        # of the full collections that logging's ORM objects set off: one had taken 0.12 s in log_model.
        gc.freeze()
        first = commands.get()
        if first is None:  # the stage stopped before asking for anything: leave the store as it was
            return 0
        # Opened at the first command, not at start: a stage that fails its own checks first (bad data, an lr
        # above the limit) then creates no store and no experiment.
        session = Session.open(uri, experiment)
        replies.send("ready", session.experiment_id)
        if not serve(session, first, commands, replies) and session.run_id is not None:
            print(f"tracking worker: the stage ended without ending MLflow run {session.run_id}", file=sys.stderr)
            session.abandon()
        return 0
    except Exception as e:
        replies.send("error", first_line(e))
        if session is not None:
            session.abandon()
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    status = main()
    # Every write is committed by now. A normal exit would spend about a second finalising MLflow's thousands
    # of modules while the stage waits for this process to end.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
