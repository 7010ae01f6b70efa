"""The suite's fixtures and tiers. What tests share besides fixtures is in tests/helpers.py.

Tiers (markers, described in pyproject.toml; `make test-fast` runs the unit tests): unit, stage and system. A
test without a tier marker is a unit test.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import pytest

from pipeline import config
from tests import outbound
from tests.helpers import FOLDER, PAGE, REPO, clone, copy_repo, sh, telemetry_env

TIERS = ("unit", "stage", "system")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one test process more than cores. tests/test_cpus.py's process only waits while its emulated
    CPUs run (at low priority, in the time the others leave): without a spare, the rest would share one core."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in exactly one tier: unit unless marked otherwise."""
    for item in items:
        tiers = [m.name for m in item.iter_markers() if m.name in TIERS]
        if len(set(tiers)) > 1:
            raise pytest.UsageError(f"{item.nodeid}: in tiers {sorted(set(tiers))}; a test belongs to one")
        if not tiers:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def cfg() -> config.Config:
    """The project's own params.yaml, validated: unit tests start from the defaults a user gets."""
    return config.load(REPO / "params.yaml")


def session_folder(factory: pytest.TempPathFactory) -> Path:
    """A folder of this test session that all its processes see: pytest-xdist's workers share their folders'
    parent."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository after `make repro`, in a folder named like a user's, its .venv a link to this venv: built
    once per test session, by the first test process that asks, then only read. A test that runs anything in a
    repository takes `repo` (or helpers.clone), a copy of this one.

    Every stage and the tracking worker run here under strace (tests/outbound.py), with only the package's own
    default keeping MLflow's telemetry off: the reproduced_trace fixture is what they reached."""
    root = session_folder(tmp_path_factory) / "reproduced"
    root.mkdir(exist_ok=True)
    repo = root / "home" / FOLDER  # alone in its parent folder: tests/test_paths.py looks for strays beside it
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            shutil.rmtree(repo, ignore_errors=True)  # a build that failed in another process
            copy_repo(repo)
            (repo / ".venv").symlink_to(Path(sys.executable).parents[1], target_is_directory=True)
            # -o: make must take the linked venv and the copied page as built; remaking .venv/.installed would
            # pip install this copy into the project's own venv.
            command = ("make", "--no-print-directory", "-o", ".venv/.installed", "-o", PAGE, "repro")
            out = sh(repo, *outbound.traced(root / "repro.strace", *command), env=telemetry_env()).stdout
            (root / "repro.out").write_text(out)
            (root / "built").touch()
    return repo


@pytest.fixture(scope="session")
def reproduced_trace(reproduced: Path) -> Path:
    """The strace log of the reproduced repository's `make repro` (written only where strace can trace)."""
    return reproduced.parents[1] / "repro.strace"


@pytest.fixture(scope="session")
def reproduced_output(reproduced: Path) -> str:
    """What the reproduced repository's `make repro` printed."""
    return (reproduced.parents[1] / "repro.out").read_text()


@pytest.fixture
def repo(reproduced: Path, tmp_path: Path) -> Path:
    """A copy of the reproduced repository for this test alone, in an ASCII folder (DVC's queue needs one)."""
    return clone(reproduced, tmp_path / "repo")


@pytest.fixture(scope="session")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store whose tables are made, built once per test session: MLflow migrates a new database
    for seconds at its first use, and a copy of this one starts where a new store is after it."""
    root = session_folder(tmp_path_factory) / "store"
    root.mkdir(exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "built").exists():
            from mlflow.tracking import MlflowClient

            MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
            (root / "built").touch()
    return root / "mlflow.db"


@pytest.fixture
def project(tmp_path: Path, store_template: Path) -> Path:
    """A project folder (its dvc.yaml marks the root) whose MLflow store, mlruns/mlflow.db, is made already."""
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "mlruns").mkdir()
    shutil.copy(store_template, tmp_path / "mlruns" / "mlflow.db")
    return tmp_path
