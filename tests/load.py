"""A bounded load on a tracking server: writers that log at once, each its own run, and the check that the store
kept every point.

Each writer makes a run, sends one untimed request, waits for the others at a barrier, then logs requests of
METRICS_PER_REQUEST points (STEPS more steps of each of KEYS, as a train stage streams its epochs), ends the run
FINISHED, and reports how long each `log_batch` took. It sends `batches` timed requests, or more while the
caller's `beside` runs (stages logging at the same time), at most `most`.

The writers are threads, each on its own connection (MLflow's client pools 10). Building a request costs the
client ~15 ms of Python and the server ~30 times that, so they need not be processes, each of which would spend
seconds of CPU importing MLflow first. The slow test (tests/test_team_server.py) and the benchmark (`make
bench`) both use it: the test for what the store holds, the bench for the figures.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from unittest import mock

from pipeline.tracking_worker import METRICS_PER_REQUEST

KEYS = ("weight", "bias", "loss", "grad_weight", "grad_bias")  # what a train run logs
STEPS = METRICS_PER_REQUEST // len(KEYS)  # per request
EXPERIMENT = "load"


@dataclass(frozen=True)
class Writer:
    run_id: str
    started: float  # time.time() after the barrier
    ended: float  # after its last log_batch
    latencies: list[float]  # seconds, one per timed log_batch

    @property
    def steps(self) -> int:
        """Steps of each key in the run, the untimed request's included."""
        return (len(self.latencies) + 1) * STEPS


@dataclass(frozen=True)
class Load:
    writers: list[Writer]

    @property
    def points(self) -> int:
        """Those sent in timed requests."""
        return sum(len(w.latencies) for w in self.writers) * METRICS_PER_REQUEST

    @property
    def seconds(self) -> float:
        """From the first writer's start to the last one's end: the span in which they logged together."""
        return max(w.ended for w in self.writers) - min(w.started for w in self.writers)

    @property
    def latencies(self) -> list[float]:
        return [t for w in self.writers for t in w.latencies]

    def p99(self) -> float:
        return statistics.quantiles(self.latencies, n=100, method="inclusive")[98]


def request(i: int) -> list[tuple[str, float, int]]:
    """The i-th request of a writer: (key, value, step) for STEPS steps of each key."""
    return [(key, 0.5 * step, step) for key in KEYS for step in range(i * STEPS, (i + 1) * STEPS)]


def _write(
    uri: str, experiment_id: str, batches: int, most: int, barrier: threading.Barrier, stop: threading.Event
) -> Writer:
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run_id = client.create_run(experiment_id).info.run_id
    client.log_batch(run_id, metrics=[Metric(k, v, 0, s) for k, v, s in request(0)])  # untimed: lazy work
    barrier.wait(timeout=120)
    started = time.time()
    latencies: list[float] = []
    while len(latencies) < most and (len(latencies) < batches or not stop.is_set()):
        batch = [Metric(k, v, 0, s) for k, v, s in request(len(latencies) + 1)]
        start = time.perf_counter()
        client.log_batch(run_id, metrics=batch)
        latencies.append(time.perf_counter() - start)
    ended = time.time()
    client.set_terminated(run_id)
    return Writer(run_id, started, ended, latencies)


def load(uri: str, writers: int, batches: int, beside: Callable[[], object] | None = None, most: int = 200) -> Load:
    """`writers` writers logging into runs of experiment EXPERIMENT on the server at `uri`, each `batches` timed
    requests or, while `beside()` runs once they have all started, more, up to `most`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = found.experiment_id if found else client.create_experiment(EXPERIMENT)
    barrier, stop = threading.Barrier(writers + 1), threading.Event()
    # No "View run" line (nor the request behind it) as each run ends; MLflow's pool holds a connection each.
    quiet = mock.patch.dict(os.environ, {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"})
    with quiet, ThreadPoolExecutor(writers) as pool:
        pending = [pool.submit(_write, uri, experiment_id, batches, most, barrier, stop) for _ in range(writers)]
        try:
            barrier.wait(timeout=120)  # each writer has its run and has made a request
            if beside is not None:
                beside()
        except threading.BrokenBarrierError:
            barrier.abort()
            errors = [
                e for f in pending if not isinstance(e := f.exception(10), (threading.BrokenBarrierError, type(None)))
            ]
            raise errors[0] if errors else RuntimeError("the writers did not all start within 120 s") from None
        finally:
            stop.set()
        return Load([future.result(timeout=600) for future in pending])


def missing(database: str, load: Load) -> list[str]:
    """What the PostgreSQL store lacks of what the writers sent, read from its tables: [] when each run is
    FINISHED and holds each key's every step once, with its value."""
    import psycopg

    wrong = []
    with psycopg.connect(database) as connection:
        for w in load.writers:
            n = w.steps
            want = [(key, n, n, 0, n - 1, 0.5 * n * (n - 1) / 2) for key in sorted(KEYS)]
            status = connection.execute("SELECT status FROM runs WHERE run_uuid = %s", (w.run_id,)).fetchall()
            if status != [("FINISHED",)]:
                wrong.append(f"run {w.run_id}: status {status}")
            rows = connection.execute(
                "SELECT key, count(*), count(DISTINCT step), min(step), max(step), sum(value) FROM metrics"
                " WHERE run_uuid = %s GROUP BY key ORDER BY key",
                (w.run_id,),
            ).fetchall()
            if rows != want:
                wrong.append(f"run {w.run_id} holds (key, points, steps, first, last, sum) {rows}, not {want}")
    return wrong
