"""Data-parallel training under torchrun: two processes, each on half the training table, against one process
on all of it (the oracle: with equal shards and full batches the two take the same steps, pipeline/distributed.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline import config, distributed
from tests.helpers import REPO, pipeline_env, sh

pytestmark = pytest.mark.stage

TORCHRUN = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2"]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
]


def params_file(folder: Path, dtype: str, device: str) -> Path:
    text = (REPO / "params.yaml").read_text()
    for old, new in ((" dtype: float32", f" dtype: {dtype}"), (" device: cpu ", f" device: {device} ")):
        assert old in text
        text = text.replace(old, new)
    (folder / "params.yaml").write_text(text)
    return folder / "params.yaml"


def train(folder: Path, name: str, params: Path, table: Path, *launcher: str, **env: str) -> Path:
    out = folder / name
    command = [*launcher] if launcher else [sys.executable]
    sh(
        folder,
        *command,
        "-m",
        "pipeline.train",
        *("--params", str(params), "--data", str(table)),
        *("--model", f"{out}/model.safetensors", "--trajectory", f"{out}/trajectory.csv"),
        *("--metrics", f"{out}/train.json"),
        env=pipeline_env(PYTHONPATH=str(REPO), **env),
    )
    return out


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    sh(
        REPO,
        sys.executable,
        "-m",
        "pipeline.generate",
        *("--train", f"{folder}/train.parquet", "--test", f"{folder}/test.parquet"),
    )
    return folder / "train.parquet"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("dtype", "rtol", "atol"), [("float64", 1e-12, 1e-14), ("float32", 1e-5, 1e-6)])
def test_two_processes_on_half_the_rows_each_follow_the_one_process_trajectory(
    tmp_path: Path, table: Path, dtype: str, rtol: float, atol: float, device: str
) -> None:
    params = params_file(tmp_path, dtype, device)
    single = train(tmp_path, "single", params, table, PIPELINE_TRACKING="off")
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    ddp = train(tmp_path, "ddp", params, table, *TORCHRUN, MLFLOW_TRACKING_URI=store)

    one, two = pd.read_csv(single / "trajectory.csv"), pd.read_csv(ddp / "trajectory.csv")
    assert list(one.columns) == list(two.columns) and len(one) == len(two) == config.load(params).train.epochs
    # Equal in exact arithmetic; they differ only in the order of the sums (the mean of two half-means).
    np.testing.assert_allclose(two.to_numpy(), one.to_numpy(), rtol=rtol, atol=atol)
    # Only rank 0 tracked: one run, which knows it ran on two processes.
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name(config.load(params).tracking.experiment)
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert len(client.get_metric_history(run.info.run_id, "weight")) == len(one) + 1


def test_shards_must_be_equal(tmp_path: Path, table: Path) -> None:
    text = (REPO / "params.yaml").read_text().replace("n_samples: 100 ", "n_samples: 101 ")
    (tmp_path / "params.yaml").write_text(text)
    odd = tmp_path / "odd.parquet"
    sh(
        REPO,
        sys.executable,
        "-m",
        "pipeline.generate",
        *("--params", str(tmp_path / "params.yaml"), "--train", str(odd), "--test", f"{tmp_path}/t.parquet"),
    )
    command = [
        *TORCHRUN,
        "-m",
        "pipeline.train",
        *("--params", str(tmp_path / "params.yaml"), "--data", str(odd)),
        *(
            "--model",
            f"{tmp_path}/m.safetensors",
            "--trajectory",
            f"{tmp_path}/t.csv",
            "--metrics",
            f"{tmp_path}/j.json",
        ),
    ]
    out = sh(tmp_path, *command, env=pipeline_env(PYTHONPATH=str(REPO), PIPELINE_TRACKING="off"), check=False)
    assert out.returncode != 0
    assert "do not split into equal shards" in out.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_auto_picks_cuda_only_where_there_is_one() -> None:
    assert distributed.device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert distributed.device("cpu").type == "cpu"
