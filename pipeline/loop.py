"""The five-step training loop on nn.Linear, and the per-epoch trajectory it leaves behind. No I/O."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn, optim

TRAJECTORY_COLUMNS = ("epoch", "loss", "grad_weight", "grad_bias", "weight", "bias")


def make_model(init_seed: int) -> nn.Linear:
    """nn.Linear(1, 1) with PyTorch's own random initialisation, drawn from a seed.

    fork_rng keeps the seed local: the global generator is the same before and after this call.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return nn.Linear(1, 1)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> optim.Optimizer:
    if name == "sgd":
        return optim.SGD(params, lr=lr)
    if name == "adam":
        return optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


def train_step(
    model: nn.Module, criterion: nn.Module, optimizer: optim.Optimizer, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One epoch of full-batch gradient descent: the five steps, in this order."""
    y_pred = model(X)  # 1. forward pass: records the graph y_pred = X @ W.T + b
    loss = criterion(y_pred, y)  # 2. loss: one scalar, mean((y_pred - y)^2)
    optimizer.zero_grad()  # 3. clear the gradients left by the previous epoch (they accumulate)
    loss.backward()  # 4. backward pass: chain rule fills W.grad and b.grad; parameters unchanged
    optimizer.step()  # 5. update: p <- p - lr * p.grad (SGD); computes no gradient itself
    return loss  # type: ignore[no-any-return]  # nn.Module.__call__ is typed Any


@dataclass(frozen=True)
class Trajectory:
    """What training did: the starting point and one row per epoch (see TRAJECTORY_COLUMNS)."""

    init_weight: float
    init_bias: float
    values: np.ndarray  # shape (epochs, 5): TRAJECTORY_COLUMNS after "epoch", in the training dtype

    @property
    def epochs(self) -> np.ndarray:
        return np.arange(1, len(self.values) + 1)

    def column(self, name: str) -> np.ndarray:
        if name == "epoch":
            return self.epochs
        return self.values[:, TRAJECTORY_COLUMNS.index(name) - 1]

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: self.column(name) for name in TRAJECTORY_COLUMNS})


def fit(model: nn.Linear, X: torch.Tensor, y: torch.Tensor, optimizer_name: str, lr: float, epochs: int) -> Trajectory:
    """Train `model` in place for `epochs` full-batch steps and return its trajectory.

    Each row holds the loss and gradients computed in that epoch (at the parameters before its step) and
    the weight and bias after the step.
    """
    criterion = nn.MSELoss()
    optimizer = make_optimizer(optimizer_name, list(model.parameters()), lr)
    w, b = model.weight, model.bias
    init_weight, init_bias = w.item(), b.item()
    # One preallocated buffer instead of per-epoch Python floats: recording costs ~nothing per epoch.
    # It keeps the training dtype, so the CSV shows float32 values as float32 (3.0, not 2.9999999523).
    record = torch.empty(epochs, 5, dtype=w.dtype)
    for epoch in range(epochs):
        loss = train_step(model, criterion, optimizer, X, y)
        assert w.grad is not None and b.grad is not None  # set by loss.backward() in train_step
        # .grad still holds this epoch's gradient: step() reads it but does not clear it.
        record[epoch] = torch.stack((loss.detach()[()], w.grad[0, 0], b.grad[0], w.detach()[0, 0], b.detach()[0]))
    return Trajectory(init_weight=init_weight, init_bias=init_bias, values=record.numpy())


def as_tensors(x: np.ndarray, y: np.ndarray, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns (N,) -> the (N, 1) tensors nn.Linear(1, 1) and nn.MSELoss expect."""
    # torch.tensor copies: pandas hands out read-only arrays, which torch must not alias.
    X = torch.tensor(x, dtype=dtype).reshape(-1, 1)
    Y = torch.tensor(y, dtype=dtype).reshape(-1, 1)
    return X, Y
