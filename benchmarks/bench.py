"""The performance targets of the project, each a ratio measured side by side in one run (`make bench`).

P1 edit->result: `dvc repro` after changing train.lr / (no-op `dvc repro` + the stages' import floors).
P2 logging:      train stage at 1000 epochs with MLflow tracking / with PIPELINE_TRACKING=off,
                 on the embedded SQLite store and against a local `mlflow server` (and, where PostgreSQL is
                 installed, the team server on it, for comparison).
P3 throughput:   time per epoch of the nn five-step loop / one torch pass computing sum x, sum y, sum xy, sum x^2.
P4 memory:       peak RSS of each stage (its whole process tree) at N = 1e8 / the float32 data (x and y, 0.8 GB).
P5 scaling:      each stage's wall time per sample at N = 1e8 / the same at N = 1e6.
R cost:          P1, and P3 at 1e6 and 1e7, with the portable numerics / with PIPELINE_NUMERICS=native.
V verify:        `python -m pipeline.verify` of the default run (make verify) / its rebuild alone, `dvc repro --force`
                 with tracking off: what finding the run, checking out its commit and comparing add. A figure to read.
Load:            8 writers logging at once into the team server (tests/load.py), where PostgreSQL is installed:
                 their points per second / one writer's alone, and the p99 of one 1000-point log_batch / the
                 median alone. Figures to read, not targets.

Medians of repeated runs; the machine is shared, so compare the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO))

from tests import load, stages_once  # noqa: E402  (needs the path)
from tests.helpers import copy_repo, mlflow_server, pipeline_env  # noqa: E402
from tests.team import team_stack  # noqa: E402


def run(cwd: Path, *cmd: str, **extra: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=pipeline_env(**extra), check=True, capture_output=True)
    return time.perf_counter() - start


def median(f: Callable[[], float], n: int) -> float:
    return statistics.median(f() for _ in range(n))


def set_param(repo: Path, key: str, value: str) -> None:
    path = repo / "params.yaml"
    lines = path.read_text().splitlines()
    section, name = key.split(".")
    inside = False
    for i, line in enumerate(lines):
        if not line.startswith(" "):
            inside = line.startswith(f"{section}:")
        elif inside and line.strip().startswith(f"{name}:"):
            comment = line[line.index("#") :] if "#" in line else ""
            lines[i] = f"  {name}: {value}  {comment}".rstrip()
    path.write_text("\n".join(lines) + "\n")


def p1(repo: Path, n: int) -> tuple[float, float]:
    noop = median(lambda: run(repo, "dvc", "repro"), n)
    imports_train = median(lambda: run(repo, sys.executable, "-c", "import torch, mlflow, pandas"), n)
    imports_eval = median(lambda: run(repo, sys.executable, "-c", "import sklearn.linear_model, mlflow, pandas"), n)
    floor = noop + imports_train + imports_eval
    times = []
    for i in range(n):
        set_param(repo, "train.lr", f"0.{101 + i}")  # a new value each time: nothing comes from the run cache
        times.append(run(repo, "dvc", "repro"))
    set_param(repo, "train.lr", "0.1")
    return statistics.median(times), floor


def verify_row(repo: Path, n: int) -> tuple[float, float]:
    """make verify of the run the first `dvc repro` made, and the same stages rebuilt in place with tracking off."""
    with contextlib.closing(sqlite3.connect(repo / "mlruns" / "mlflow.db")) as db:
        (run_id,) = db.execute("SELECT run_uuid FROM runs ORDER BY start_time LIMIT 1").fetchone()
    verify = median(lambda: run(repo, sys.executable, "-m", "pipeline.verify", run_id), n)
    rebuild = median(lambda: run(repo, "dvc", "repro", "--force", "--no-commit", PIPELINE_TRACKING="off"), n)
    return verify, rebuild


def train_cmd(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline.train",
        "--data",
        "data/generated/train.parquet",
        "--model",
        f"{out}/m.safetensors",
        "--trajectory",
        f"{out}/t.csv",
        "--metrics",
        f"{out}/t.json",
    ]


def round_trips(uri: str, n: int = 20) -> tuple[float, float]:
    """Median seconds of one small request to the server: on a kept-alive connection, as MLflow's client sends
    them, and on a new connection each time. A default `mlflow server` runs four uvicorn workers, whose
    sockets lose TCP_NODELAY (Kludex/uvicorn#3149): a kept-alive response then waits for a delayed ACK."""
    import requests

    url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    with requests.Session() as session:
        session.get(url)
        kept = statistics.median(timed(partial(session.get, url)) for _ in range(n))
    fresh = statistics.median(timed(partial(requests.get, url)) for _ in range(n))
    return kept, fresh


def p2(repo: Path, n: int, tmp: Path) -> tuple[dict[str, tuple[float, float]], dict[str, tuple[float, float]]]:
    """Medians of n rounds, each timing off, SQLite and server back to back: a change in the shared machine's
    load then moves all three, not one of them. Also the server's round trips (round_trips)."""
    import team_server

    set_param(repo, "train.epochs", "1000")
    out = tmp / "p2"
    with contextlib.ExitStack() as stack:
        uri = stack.enter_context(mlflow_server(tmp))
        settings = {"off": {"PIPELINE_TRACKING": "off"}, "sqlite": {}, "server": {"MLFLOW_TRACKING_URI": uri}}
        try:  # the team server (PostgreSQL store), where PostgreSQL is installed: compared, not a target
            team_server.postgres_bin("initdb")
            settings["team server"] = {"MLFLOW_TRACKING_URI": stack.enter_context(team_stack())[0]}
        except team_server.ServerError:
            pass
        for extra in settings.values():
            if "MLFLOW_TRACKING_URI" in extra:
                run(repo, *train_cmd(out), **extra)  # creates the experiment
        times: dict[str, list[float]] = {name: [] for name in settings}
        for _ in range(n):
            for name, extra in settings.items():
                times[name].append(run(repo, *train_cmd(out), **extra))
        trips = {
            name: round_trips(e["MLFLOW_TRACKING_URI"]) for name, e in settings.items() if "MLFLOW_TRACKING_URI" in e
        }
    set_param(repo, "train.epochs", "100")
    off = statistics.median(times["off"])
    return {store: (statistics.median(times[store]), off) for store in settings if store != "off"}, trips


def mlflow_floor(repo: Path, tmp: Path, n: int) -> tuple[float, int]:
    """What MLflow itself needs, warm, for the metric points of the newest run in the repository's SQLite store:
    the same number of points per key, logged as one log_batch series per key (1000 points per request) into a
    fresh SQLite store by a client that has already made a request. Median seconds, and the points."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline import config, tracking

    source = MlflowClient(tracking.default_uri(repo))
    experiment = source.get_experiment_by_name(config.load(repo / "params.yaml").tracking.experiment)
    assert experiment is not None
    (newest,) = source.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    counts = {key: len(source.get_metric_history(newest.info.run_id, key)) for key in newest.data.metrics}
    client = MlflowClient(f"sqlite:///{tmp / 'floor.db'}")
    floor_experiment = client.create_experiment("floor")

    def once() -> float:
        run_id = client.create_run(floor_experiment).info.run_id
        series = {key: [Metric(key, 0.5, 0, step) for step in range(count)] for key, count in counts.items()}
        start = time.perf_counter()
        for points in series.values():
            for i in range(0, len(points), 1000):
                client.log_batch(run_id, metrics=points[i : i + 1000])
        return time.perf_counter() - start

    once()  # warm: the store open, its tables made, the client's code loaded
    return median(once, n), sum(counts.values())


def team_load(writers: int, batches: int) -> tuple[load.Load, load.Load] | None:
    """One writer alone, then `writers` at once, against a fresh team server; None without PostgreSQL. Every
    point is checked in the store before a figure counts."""
    import team_server

    try:
        team_server.postgres_bin("initdb")
    except team_server.ServerError:
        return None
    with team_stack() as (uri, db):
        alone, together = load.load(uri, 1, batches), load.load(uri, writers, batches)
        if wrong := load.missing(db.uri, alone) + load.missing(db.uri, together):
            raise RuntimeError(f"the team server lost points under load: {wrong[0]}")
    return alone, together


def p3(sizes: list[int], epochs: int) -> dict[int, tuple[float, float, bool]]:
    import numpy as np
    import torch

    from pipeline import loop, tuning

    torch.set_num_threads(1)  # the pipeline's default (train.threads)
    out = {}
    for n in sizes:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(n).astype(np.float32)
        y = (3 * x + 0.1 * rng.standard_normal(n)).astype(np.float32)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        floor = sufficient_statistics_time(xt, yt)
        X, Y = loop.as_arrays(x, y)
        compiled = tuning.should_compile("auto", "nn", n, 1000)
        learner = loop.make_learner("nn", loop.make_model(0), X, Y, "sgd", 0.1, 0.0, compiled)
        loop.fit(learner, n, 2)  # warm-up (and compilation)
        # The median of three runs, like the floor's median: one run can land on another process's burst.
        per_epoch = statistics.median(timed(partial(loop.fit, learner, n, epochs)) for _ in range(3)) / epochs
        out[n] = (per_epoch, floor, compiled)
    return out


def numerics_cost(repo: Path, n: int) -> dict[str, tuple[float, float]]:
    """What the portable numerics cost (pipeline/numerics.py): {what: (portable, native)} seconds.

    P1's edit->result, and P3's epoch at N = 1e6 (eager) and 1e7 (compiled), each measured with
    PIPELINE_NUMERICS=portable and =native in turn, round after round, so that the machine's load moves both.
    P3 runs in a process of its own for each: the libraries read the settings once, when they load."""
    times: dict[str, list[float]] = {}
    for i in range(n):
        for mode in ("portable", "native"):
            set_param(repo, "train.lr", f"0.{201 + 2 * i + (mode == 'native')}")  # new each time: no run cache
            times.setdefault(f"P1 {mode}", []).append(run(repo, "dvc", "repro", PIPELINE_NUMERICS=mode))
            env = pipeline_env(PIPELINE_NUMERICS=mode)
            out = subprocess.run([sys.executable, __file__, "--p3-json"], env=env, capture_output=True, check=True)
            for size, per_epoch in json.loads(out.stdout.decode().splitlines()[-1]).items():
                times.setdefault(f"P3 N={float(size):.0e} {mode}", []).append(per_epoch)
    set_param(repo, "train.lr", "0.1")
    names = sorted({k.rsplit(" ", 1)[0] for k in times})
    return {k: (statistics.median(times[f"{k} portable"]), statistics.median(times[f"{k} native"])) for k in names}


def measured(cwd: Path, cmd: list[str], **extra: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in bytes) of a command and every process it starts, summed.

    RSS is sampled every 20 ms over the whole process tree (a stage's MLflow worker included). Each process's
    own high-water mark (VmHWM) is read too, so a spike between samples still counts. (Not ru_maxrss: Linux
    carries the RSS a child had when forked from this process over its exec, and this process is large.)
    """
    import psutil

    def high_water(pid: int) -> int:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:")), 0)  # 0: a zombie

    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a pipe nobody reads can fill and block
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=pipeline_env(**extra), stdout=subprocess.DEVNULL, stderr=err)
        parent = psutil.Process(proc.pid)
        peak, hwm = 0, 0
        while True:
            with contextlib.suppress(psutil.Error, OSError):  # a process ended while being read
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree))
                hwm = max(hwm, *(high_water(p.pid) for p in tree))
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed: {err.read().decode()[-2000:]}")
    return wall, max(peak, hwm)


def stage_commands(folder: Path) -> dict[str, list[str]]:
    """The three stages as dvc.yaml runs them, with their paths and params.yaml under `folder`."""
    commands = stages_once.stage_commands(folder, folder / "params.yaml")
    return {stage: [sys.executable, "-m", *args] for stage, args in commands.items()}


def p4_p5(repo: Path, tmp: Path, sizes: list[int]) -> dict[int, dict[str, tuple[float, float]]]:
    """Each stage at each N (defaults otherwise, tracking on): {N: {stage: (seconds, peak RSS bytes)}}."""
    out: dict[int, dict[str, tuple[float, float]]] = {}
    for n in sizes:
        folder = tmp / f"n{n}"
        folder.mkdir()
        text = (repo / "params.yaml").read_text()
        (folder / "params.yaml").write_text(text.replace("n_samples: 100 ", f"n_samples: {n} "))
        commands = stage_commands(folder)
        out[n] = {stage: measured(repo, cmd) for stage, cmd in commands.items()}
        if n == max(sizes):  # memory only: mini-batches gathered from the table, 2 epochs of 80 steps
            batched = folder / "batched.yaml"
            text = (folder / "params.yaml").read_text()
            batched.write_text(
                text.replace("batch_size: null ", "batch_size: 1000000 ").replace("epochs: 100 ", "epochs: 2 ")
            )
            out[n]["train (batches)"] = measured(repo, [*commands["train"], "--params", str(batched)])
        shutil.rmtree(folder)  # 0.8 GB at N = 1e8
    return out


def sufficient_statistics_time(x: object, y: object) -> float:
    """The floor: sum x, sum y, sum xy, sum x^2 (all a closed form needs), as four torch reductions.

    Each reduction reads its operands once, so the floor streams 5 float32 values per row (x.sum, y.sum, both
    of x @ y, and x @ x reading x once): at large N, 2.5 reads of the data, not one.
    """
    import torch

    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    torch.stack([x.sum(), y.sum(), x @ y, x @ x])
    return statistics.median(timed(lambda: torch.stack([x.sum(), y.sum(), x @ y, x @ x])) for _ in range(20))


def timed(f: Callable[[], object]) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["p1", "p2", "p3", "p45", "numerics", "verify", "load"], action="append")
    parser.add_argument("--p3-json", action="store_true", help=argparse.SUPPRESS)  # numerics_cost's subprocess
    parser.add_argument(
        "--large", type=float, default=1e8, help="the large N of P4/P5 (1e8; smaller to try it quickly)"
    )
    args = parser.parse_args()
    if args.p3_json:
        print(json.dumps({n: r[0] for n, r in p3([1_000_000, 10_000_000], 20).items()}))
        return 0
    only = set(args.only or ["p1", "p2", "p3", "p45", "numerics", "verify", "load"])
    rows: list[tuple[str, str, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        repo = copy_repo(tmp / "repo")
        run(repo, "dvc", "repro")  # the data, the store and DVC's caches, before anything is timed
        if "verify" in only:  # first: the run to verify is the defaults', and P1 edits params.yaml
            verify, rebuild = verify_row(repo, args.repeats)
            verified = ("V verify", f"make verify {verify:.2f} s / its rebuild alone {rebuild:.2f} s", verify / rebuild)
        if "p1" in only:
            t, floor = p1(repo, args.repeats)
            rows.append(
                ("P1 edit->result", f"dvc repro after lr change {t:.2f} s / floor {floor:.2f} s", t / floor, 1.3, "<=")
            )
        if "p2" in only:
            stores, trips = p2(repo, args.repeats, tmp)
            floor, points = mlflow_floor(repo, tmp, args.repeats)
            added = stores["sqlite"][0] - stores["sqlite"][1]
            rows.append(
                (
                    "P2 tracking / MLflow (sqlite)",
                    f"tracking adds {added:.2f} s / MLflow's own log_batch of the same {points} points {floor:.2f} s",
                    added / floor,
                    1.2,
                    "<=",
                )
            )
            for store, (on, off) in stores.items():
                goal = {"sqlite": 1.10, "server": 1.25, "team server": 1.25}[store]
                rows.append(
                    (
                        f"P2 logging ({store})",
                        f"train, 1000 epochs: {on:.2f} s tracked / {off:.2f} s off",
                        on / off,
                        goal,
                        "<=",
                    )
                )
            for store, (kept, fresh) in trips.items():
                rows.append(
                    (
                        f"P2 round trip ({store})",
                        f"kept-alive connection {kept * 1e3:.1f} ms / new connection {fresh * 1e3:.1f} ms",
                        kept / fresh,
                        2.0,
                        "<=",
                    )
                )
        if "p3" in only:
            for n, (per_epoch, floor, compiled) in p3([100, 1_000_000, 10_000_000], 20).items():
                how = "compiled" if compiled else "eager"
                rows.append(
                    (
                        f"P3 throughput N={n:.0e}",
                        f"{per_epoch * 1e3:.3f} ms/epoch ({how}) / floor {floor * 1e3:.3f} ms",
                        per_epoch / floor,
                        3.0 if n == 10_000_000 else float("nan"),
                        "<=",
                    )
                )
        if "p45" in only:
            small, large = 1_000_000, int(args.large)
            results = p4_p5(repo, tmp, [small, large])
            data_bytes = large * 2 * 4  # x and y in float32
            for stage, (_, rss) in results[large].items():
                rows.append(
                    (
                        f"P4 memory {stage}",
                        f"peak RSS {rss / 1e9:.2f} GB at N={large:.0e} / float32 data {data_bytes / 1e9:.2f} GB",
                        rss / data_bytes,
                        3.0,
                        "<=",
                    )
                )
            for stage, (t, _) in results[large].items():
                if stage not in results[small]:
                    continue
                t_small = results[small][stage][0]
                rows.append(
                    (
                        f"P5 scaling {stage}",
                        f"{t / large * 1e6:.3f} us/sample at N={large:.0e} ({t:.1f} s) / "
                        f"{t_small / small * 1e6:.3f} at N={small:.0e} ({t_small:.1f} s)",
                        (t / large) / (t_small / small),
                        1.5,
                        "<=",
                    )
                )
        if "numerics" in only:
            for what, (portable, native) in numerics_cost(repo, args.repeats).items():
                unit, scale = ("s", 1) if what.startswith("P1") else ("ms/epoch", 1e3)
                rows.append(
                    (
                        f"R cost {what}",
                        f"portable numerics {portable * scale:.3f} {unit} / native {native * scale:.3f} {unit}",
                        portable / native,
                        1.10,
                        "<=",
                    )
                )
    if "load" in only and (loads := team_load(writers=8, batches=25)) is not None:
        alone, together = loads
        n = len(together.writers)
        rows += [
            (
                "Load points/s (team)",
                f"{n} writers {together.points / together.seconds:.0f} points/s / "
                f"1 writer {alone.points / alone.seconds:.0f} points/s",
                (together.points / together.seconds) / (alone.points / alone.seconds),
                float("nan"),
                "<=",
            ),
            (
                "Load p99 log_batch (team)",
                f"p99 {together.p99() * 1e3:.0f} ms with {n} writers / median "
                f"{statistics.median(alone.latencies) * 1e3:.0f} ms alone (1000 points a request)",
                together.p99() / statistics.median(alone.latencies),
                float("nan"),
                "<=",
            ),
        ]
    if "verify" in only:
        rows.append((*verified, float("nan"), "<="))
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"{'target':<26} {'ratio':>7} {'goal':>6}  {'met':<4} measured")
    for name, what, ratio, goal, _ in rows:
        met = "-" if goal != goal else ("yes" if ratio <= goal else "NO")
        goal_s = "-" if goal != goal else f"{goal:.2f}"
        print(f"{name:<26} {ratio:>7.2f} {goal_s:>6}  {met:<4} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
