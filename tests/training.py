"""Training as the train stage trains, in the test process: for the tests of the loop, the lessons and the theory."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pipeline import config, data, loop


def train_arrays(cfg: config.Config, **generate: object) -> tuple[np.ndarray, np.ndarray]:
    """The train table the stage would read, in float64: (N, k) features and (N,) targets."""
    train, _ = data.generate(dataclasses.replace(cfg.generate, **generate))  # type: ignore[arg-type]
    return train.X.astype(np.float64), train.y.astype(np.float64)


def run(
    cfg: config.Config,
    method: str = "nn",
    dtype: torch.dtype = torch.float32,
    X64: np.ndarray | None = None,
    y64: np.ndarray | None = None,
    **train: object,
) -> loop.Trajectory:
    """Train as the train stage does, with cfg.train overridden by `train`."""
    name = str(dtype).removeprefix("torch.")  # as params.yaml spells it
    p = dataclasses.replace(cfg.train, method=method, dtype=name, **train)  # type: ignore[arg-type]
    if X64 is None or y64 is None:
        X64, y64 = train_arrays(cfg)
    return loop.learn(p, data.Table(X64, y64)).trajectory
