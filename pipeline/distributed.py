"""Data-parallel training: `torchrun --nproc_per_node=N -m pipeline.train ...` runs the same five steps under
DistributedDataParallel, each process (rank) on its own shard of the training table.

Why the result equals one process's: each rank's nn.MSELoss is the mean over its shard, and DDP's backward
averages the ranks' gradients. With shards of equal size the average of the shard means is the mean over the
whole table, so every rank takes the full-batch step that one process would take. The shards must therefore
be equal (the table's rows divisible by N) and the batch full; anything else is refused. Only rank 0 tracks
the run in MLflow and writes the stage's outputs. Backends: gloo on the CPU, NCCL with a GPU per rank (gloo
when ranks share GPUs).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline import loop


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def device(setting: str) -> torch.device:
    """train.device: cpu, cuda, or auto (CUDA when present). Under torchrun on GPUs, rank r's own GPU."""
    import torch

    cuda = setting == "cuda" or (setting == "auto" and torch.cuda.is_available())
    if not cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is available here (use auto or cpu)")
    # cuBLAS needs this for its deterministic algorithms (tuning.set_deterministic), before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # More ranks than GPUs share them (and then talk through gloo: NCCL wants one GPU per rank).
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def shard(n: int, rank: int, size: int) -> slice:
    """Rank's contiguous share of n rows; the shares must be equal (see the module's docstring)."""
    if n % size:
        raise ConfigError(
            f"torchrun with {size} processes: the {n} training rows do not split into equal shards; "
            f"change generate.n_samples or test_fraction so that train has a multiple of {size} rows"
        )
    per = n // size
    return slice(rank * per, (rank + 1) * per)


def place(method: str, setting: str, batch_size: int | None, n: int, source: str) -> tuple[torch.device, slice]:
    """Where this process trains (train.device, for the nn method) and on which rows: all of them, or under
    torchrun this rank's shard, with the process group started."""
    import torch

    dev = device(setting) if method == "nn" else torch.device("cpu")
    rank, size = world()
    if size == 1:
        return dev, slice(None)
    if method != "nn" or batch_size is not None:
        raise ConfigError(
            f"{source}: under torchrun, train runs method nn on full batches (train.method = {method!r}, "
            f"train.batch_size = {batch_size!r})"
        )
    rows = shard(n, rank, size)
    start(dev)
    return dev, rows


def start(dev: torch.device) -> None:
    import torch
    import torch.distributed as dist

    if dev.type == "cuda" and torch.cuda.device_count() >= world()[1]:
        dist.init_process_group(backend="nccl", device_id=dev)
    else:
        dist.init_process_group(backend="gloo")


def stop() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def learner(
    model: nn.Linear, X: np.ndarray, y: np.ndarray, optimizer: str, lr: float, momentum: float, dev: torch.device
) -> loop.NNLearner:
    """The nn learner on this rank's shard: the five steps call the model through DistributedDataParallel, and
    the loss it reports is the mean over the ranks. The gradients it reads back are DDP's average already."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pipeline import loop

    def wrap(module: nn.Module) -> nn.Module:
        # DDP broadcasts rank 0's parameters here; every rank drew the same seeded start anyway.
        return DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)

    def average(loss: float) -> float:
        # Each rank's loss is its shard's mean: the whole table's is their average (equal shards).
        total = torch.tensor(loss, dtype=torch.float64, device=dev)
        dist.all_reduce(total)
        return total.item() / dist.get_world_size()

    return loop.NNLearner(model, X, y, optimizer, lr, momentum, device=dev, wrap=wrap, average=average)
