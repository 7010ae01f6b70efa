"""Everything MLflow: where the store is, one run per pipeline execution, batched logging.

The only module that imports mlflow, so the math and the stages do not depend on it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT, MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME

from pipeline.errors import TrackingError

log = logging.getLogger(__name__)

STORE_DIR = "mlruns"  # under the repository root: mlruns/mlflow.db and mlruns/artifacts/
MODEL_TAG = "model_md5"  # the key that ties evaluate to the run train created
METRICS_PER_REQUEST = 1000  # MLflow's REST limit for one log_batch
PARAMS_PER_REQUEST = 100


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


@dataclass(frozen=True)
class Tracker:
    """A client bound to one store and one experiment."""

    client: MlflowClient
    experiment_id: str
    uri: str

    def find_run(self, model_md5: str) -> str | None:
        """Id of the newest finished run that trained the model with this hash, if any."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MODEL_TAG} = '{model_md5}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    @contextmanager
    def run(self, run_id: str | None = None, run_name: str | None = None) -> Iterator[str]:
        """Create a run (or reopen run_id) and end it FINISHED, or FAILED/KILLED if the body raises."""
        if run_id is None:
            run_id = self.client.create_run(self.experiment_id, run_name=run_name).info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        try:
            yield run_id
        except BaseException as e:
            status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            try:
                self.client.set_terminated(run_id, status)
            except Exception as inner:  # the original error matters more than this one
                log.warning("could not mark MLflow run %s %s: %s", run_id, status, inner)
            raise
        self.client.set_terminated(run_id, "FINISHED")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(run_id, params=items[i : i + PARAMS_PER_REQUEST])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        items = [RunTag(k, v) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self.client.log_batch(run_id, tags=items[i : i + PARAMS_PER_REQUEST])

    def log_metrics(self, run_id: str, values: Mapping[str, float], step: int = 0) -> None:
        self.log_series(run_id, {k: ([step], [v]) for k, v in values.items()})

    def log_series(self, run_id: str, series: Mapping[str, tuple[Any, Any]]) -> None:
        """Log {name: (steps, values)} in batches: one request per 1000 points, not one per point."""
        now = int(time.time() * 1000)
        points = [
            Metric(name, float(v), now, int(s))
            for name, (steps, values) in series.items()
            for s, v in zip(np.asarray(steps).tolist(), np.asarray(values).tolist(), strict=True)
        ]
        for i in range(0, len(points), METRICS_PER_REQUEST):
            self.client.log_batch(run_id, metrics=points[i : i + METRICS_PER_REQUEST])

    def log_dataset(
        self,
        run_id: str,
        *,
        source: str,
        name: str,
        digest: str,
        context: str,
        n_rows: int,
        columns: list[str],
    ) -> None:
        """Record a table as a run input whose digest is the file's hash (the md5 in dvc.lock).

        Described, not loaded: the entity MLflow's from_pandas would build, without holding 1e8 rows.
        """
        schema = {"mlflow_colspec": [{"type": "float", "name": c, "required": True} for c in columns]}
        entity = Dataset(
            name=name,
            digest=digest,
            source_type="local",
            source=json.dumps({"uri": source}),
            schema=json.dumps(schema),
            profile=json.dumps({"num_rows": n_rows, "num_elements": n_rows * len(columns)}),
        )
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        self.client.log_inputs(run_id, [DatasetInput(entity, tags)])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file under the run's artifacts, at `artifact_path` or at the top.

        MLflow itself refuses an absolute path or one with `..` (tests/test_reliability.py holds it to that).
        """
        self.client.log_artifact(run_id, str(path), artifact_path)


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


class OfflineTracker(Tracker):
    """What connect() returns with PIPELINE_TRACKING=off: the same calls, recorded nowhere."""

    def __init__(self) -> None:
        super().__init__(client=None, experiment_id="", uri="(tracking off)")  # type: ignore[arg-type]

    def find_run(self, model_md5: str) -> str | None:
        return None

    @contextmanager
    def run(self, run_id: str | None = None, run_name: str | None = None) -> Iterator[str]:
        yield "offline"

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        pass

    def log_series(self, run_id: str, series: Mapping[str, tuple[Any, Any]]) -> None:
        pass

    def log_dataset(self, run_id: str, **description: Any) -> None:
        pass

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        pass


def connect(experiment: str, root: Path | None = None) -> Tracker:
    """Open the store (creating it and the experiment on first use) and return a Tracker.

    PIPELINE_TRACKING=off returns an OfflineTracker instead: for machines without a store, and for timing
    what tracking costs (benchmarks/bench.py).
    """
    if os.environ.get("PIPELINE_TRACKING", "on") == "off":
        return OfflineTracker()
    root = root or project_root()
    uri = tracking_uri(root)
    check_reachable(uri)
    with _store_lock(uri):
        # Inside the lock: the client opens the store, which is when MLflow migrates a new database.
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            return Tracker(client, found.experiment_id, uri)
        # With a SQLite store MLflow would put artifacts in ./mlruns of the current folder, which for a
        # queued DVC experiment is a temporary copy; anchor them beside the database instead.
        db = sqlite_path(uri)
        location = (db.parent / "artifacts").as_uri() if db else None
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        except MlflowException:  # created meanwhile by another process sharing a server
            found = client.get_experiment_by_name(experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    return Tracker(client, experiment_id, uri)


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
    tags = {MLFLOW_SOURCE_NAME: f"pipeline.{stage}"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[MLFLOW_GIT_COMMIT] = commit
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
