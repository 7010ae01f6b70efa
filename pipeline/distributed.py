"""Data-parallel training: `torchrun --nproc_per_node=N -m pipeline.train ...` runs the same five steps under
DistributedDataParallel, each process (rank) on its own shard of the training table.

Why the result equals one process's: each rank's nn.MSELoss is the mean over its shard, and DDP's backward
averages the ranks' gradients. With shards of equal size the average of the shard means is the mean over the
whole table, so every rank takes the full-batch step that one process would take. The shards must therefore
be equal (the table's rows divisible by N) and the batch full; anything else is refused. Every rank trains;
rank 0 alone speaks for the run (lead). Backends: gloo on the CPU, NCCL with a GPU per rank (gloo when ranks
share GPUs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from pipeline import config, loop


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes): (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def lead() -> bool:
    """Whether this process speaks for the run: rank 0, the only process outside torchrun. It alone tracks the
    run, draws the progress bar, writes the outputs and prints the result; every rank holds the same trajectory.
    The others train their shards and log warnings only: one account of the run, rank 0's."""
    if world()[0] == 0:
        return True
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    return False


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


@dataclass(frozen=True)
class Place:
    """Where this process trains (train.device, for the nn method), on which rows, among how many processes."""

    device: torch.device
    rows: slice  # all of them, or this rank's shard
    size: int = 1


@contextmanager
def place(p: config.TrainParams, n: int, source: str) -> Iterator[Place]:
    """All n rows on train.device; under torchrun this rank's shard, in a process group started for the block."""
    import torch
    import torch.distributed as dist

    dev = device(p.device) if p.method == "nn" else torch.device("cpu")
    rank, size = world()
    if size == 1:
        yield Place(dev, slice(None))
        return
    if p.method != "nn" or p.batch_size is not None:
        raise ConfigError(
            f"{source}: under torchrun, train runs method nn on full batches (train.method = {p.method!r}, "
            f"train.batch_size = {p.batch_size!r})"
        )
    rows = shard(n, rank, size)
    if dev.type == "cuda" and torch.cuda.device_count() >= size:
        dist.init_process_group(backend="nccl", device_id=dev)
    else:
        dist.init_process_group(backend="gloo")
    try:
        yield Place(dev, rows, size)
    finally:
        dist.destroy_process_group()


class DDPLearner:
    """An nn learner on this rank's shard: its five steps call the model through DistributedDataParallel, and the
    loss it reports is the mean over the ranks. The gradients it reads back are DDP's average already."""

    def __init__(self, learner: loop.NNLearner, dev: torch.device) -> None:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's parameters here; every rank drew the same seeded start anyway.
        learner.model = DistributedDataParallel(learner.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.learner, self.device = learner, dev

    def step(self, rows: slice | np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        import torch
        import torch.distributed as dist

        loss, grad_w, grad_b = self.learner.step(rows)
        # Each rank's loss is its shard's mean: the whole table's is their average (equal shards).
        total = torch.tensor(loss, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / dist.get_world_size(), grad_w, grad_b

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        return self.learner.params()
