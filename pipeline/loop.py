"""Gradient descent on y = X @ w + b three ways, and the per-epoch trajectory it leaves behind. No I/O.

The same update, written at three levels of abstraction (train.method):
- nn:       nn.Linear + nn.MSELoss + optim.SGD, the five steps of every PyTorch training loop;
- autograd: plain tensors with requires_grad=True; autograd computes the gradient, we do the rest;
- numpy:    the gradient derived by hand, dL/dw = 2/N X^T (y_pred - y), dL/db = 2/N sum(y_pred - y).
With the same start, data and learning rate they produce the same trajectory (tests/test_lessons.py).
The train stage calls learn(): the train params and a table in, the trajectory and the model out; under torchrun,
pipeline/distributed.py wraps the nn learner in DistributedDataParallel. What makes the nn step fast without
changing what it computes (compiling it, the data's layout) is kept apart, in pipeline/tuning.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import pandas as pd
import torch
from torch import nn, optim
from tqdm import tqdm

from pipeline import distributed, tuning
from pipeline.config import METHODS, TrainParams  # noqa: F401  (METHODS re-exported: the methods implemented here)
from pipeline.data import Table, trajectory_columns, weight_names


def make_model(init_seed: int, n_features: int = 1, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """nn.Linear(n_features, 1) with PyTorch's own random initialisation, drawn from a seed.

    fork_rng keeps the seed local: the global generator is the same before and after this call.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        return nn.Linear(n_features, 1, dtype=dtype)


def make_optimizer(name: str, params: list[nn.Parameter], lr: float, momentum: float = 0.0) -> optim.Optimizer:
    if name == "sgd":
        return optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        # fused: one kernel of ATen's own vector code, dispatched like the rest (pipeline/numerics.py); the
        # default kernel's sqrt goes through MKL's vector maths, which picks a code path per CPU of its own.
        return optim.Adam(params, lr=lr, fused=True)
    raise ValueError(f"unknown optimizer {name!r}")


def train_step(
    model: nn.Module, criterion: nn.Module, optimizer: optim.Optimizer, X: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """One step of gradient descent with nn/optim: the five steps, in this order."""
    y_pred = model(X)  # 1. forward pass: records the graph y_pred = X @ W.T + b
    loss = criterion(y_pred, y)  # 2. loss: one scalar, mean((y_pred - y)^2)
    optimizer.zero_grad()  # 3. clear the gradients left by the previous step (they accumulate)
    loss.backward()  # 4. backward pass: chain rule fills W.grad and b.grad; parameters unchanged
    optimizer.step()  # 5. update: p <- p - lr * p.grad (SGD); computes no gradient itself
    return loss  # type: ignore[no-any-return]  # nn.Module.__call__ is typed Any


def autograd_step(
    w: torch.Tensor, b: torch.Tensor, X: torch.Tensor, y: torch.Tensor, lr: float, momentum: float, bufs: list[Any]
) -> torch.Tensor:
    """The same step with raw tensors: autograd gives the gradient, the rest is written out."""
    y_pred = X @ w.T + b  # forward: w, b have requires_grad=True, so this records the graph
    loss = ((y_pred - y) ** 2).mean()  # the MSE, by hand
    for p in (w, b):  # zero_grad, by hand
        if p.grad is not None:
            p.grad.zero_()
    loss.backward()  # type: ignore[no-untyped-call]  # autograd fills w.grad and b.grad
    with torch.no_grad():  # the update itself must not become part of the graph
        for i, p in enumerate((w, b)):
            assert p.grad is not None
            d = p.grad if momentum == 0 else sgd_momentum(bufs, i, p.grad, momentum)
            p -= lr * d
    return loss


def numpy_step(
    w: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, lr: float, momentum: float, bufs: list[Any]
) -> tuple[float, np.ndarray, np.ndarray]:
    """The same step in NumPy: the gradient is derived by hand. Updates w and b in place."""
    # Sums written out rather than X @ w.T: numpy's BLAS picks its kernels, and so its rounding, per CPU.
    y_pred = (X * w).sum(axis=1, keepdims=True) + b  # forward: y_pred = X @ w.T + b
    residual = y_pred - y
    loss = float(np.mean(residual**2))  # MSE
    grad_w = 2.0 / len(X) * np.array([[np.sum(residual[:, 0] * x) for x in X.T]])  # dL/dw = 2/N sum((y_pred - y) x)
    grad_b = 2.0 / len(X) * residual.sum(axis=0)  # dL/db = 2/N sum(y_pred - y)
    for i, (p, g) in enumerate(((w, grad_w), (b, grad_b))):
        p -= lr * (g if momentum == 0 else sgd_momentum(bufs, i, g, momentum))
    return loss, grad_w.astype(w.dtype), grad_b.astype(b.dtype)


def sgd_momentum(bufs: list[Any], i: int, grad: Any, momentum: float) -> Any:
    """torch.optim.SGD's momentum: buf <- grad on the first step, then buf <- momentum * buf + grad."""
    if len(bufs) <= i:
        bufs.append(grad.copy() if isinstance(grad, np.ndarray) else grad.clone())
    else:
        bufs[i] = momentum * bufs[i] + grad
    return bufs[i]


class Learner(Protocol):
    def step(self, rows: slice | np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """One update on the given rows; returns (loss, grad_w, grad_b) computed before the update."""

    def params(self) -> tuple[np.ndarray, np.ndarray]: ...


class NNLearner:
    """The five steps on `model` (on `device`, the CPU by default), nn.MSELoss and an optimiser."""

    def __init__(
        self,
        model: nn.Linear,
        X: np.ndarray,
        y: np.ndarray,
        optimizer: str,
        lr: float,
        momentum: float,
        compile: bool = False,
        device: torch.device | None = None,
    ):
        self.model: nn.Module = model.to(device or torch.device("cpu"))  # under torchrun: DDP around it
        self.weight, self.bias = model.weight, model.bias
        self.criterion = nn.MSELoss()
        self.optimizer = make_optimizer(optimizer, list(model.parameters()), lr, momentum)
        self.X, self.y = tuning.column_major(torch.from_numpy(X).to(device)), torch.from_numpy(y).to(device)
        self.train_step: tuning.TrainStep = tuning.compiled_train_step(train_step) if compile else train_step

    def step(self, rows: slice | np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        loss = self.train_step(self.model, self.criterion, self.optimizer, self.X[rows], self.y[rows]).item()
        w, b = self.weight, self.bias
        assert w.grad is not None and b.grad is not None  # set by loss.backward()
        # .grad still holds this step's gradient: step() reads it but does not clear it.
        return loss, w.grad.cpu().numpy().copy(), b.grad.cpu().numpy().copy()

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        return self.weight.detach().cpu().numpy().copy(), self.bias.detach().cpu().numpy().copy()


class AutogradLearner:
    def __init__(self, w0: np.ndarray, b0: np.ndarray, X: np.ndarray, y: np.ndarray, lr: float, momentum: float):
        self.w = torch.tensor(w0, requires_grad=True)
        self.b = torch.tensor(b0, requires_grad=True)
        self.X, self.y, self.lr, self.momentum = torch.from_numpy(X), torch.from_numpy(y), lr, momentum
        self.bufs: list[Any] = []

    def step(self, rows: slice | np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        loss = autograd_step(self.w, self.b, self.X[rows], self.y[rows], self.lr, self.momentum, self.bufs)
        assert self.w.grad is not None and self.b.grad is not None
        return loss.item(), self.w.grad.numpy().copy(), self.b.grad.numpy().copy()

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        return self.w.detach().numpy().copy(), self.b.detach().numpy().copy()


class NumpyLearner:
    def __init__(self, w0: np.ndarray, b0: np.ndarray, X: np.ndarray, y: np.ndarray, lr: float, momentum: float):
        self.w, self.b = w0.copy(), b0.copy()
        self.X, self.y, self.lr, self.momentum = X, y, lr, momentum
        self.bufs: list[Any] = []
        self.lr_t = X.dtype.type(lr)  # keep float32 data in float32 arithmetic, like torch

    def step(self, rows: slice | np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        return numpy_step(self.w, self.b, self.X[rows], self.y[rows], self.lr_t, self.momentum, self.bufs)

    def params(self) -> tuple[np.ndarray, np.ndarray]:
        return self.w.copy(), self.b.copy()


@dataclass(frozen=True)
class Trajectory:
    """What training did: the starting point and one row per epoch.

    Each row holds the loss and gradients of that epoch, computed at the parameters before its update(s)
    (with mini-batches: their sample-weighted mean over the epoch's batches), and the parameters after it.
    """

    init_weight: np.ndarray  # (n_features,)
    init_bias: float
    values: np.ndarray  # (epochs run, columns after "epoch"), in the training dtype
    batch_loss: np.ndarray  # loss of every optimiser step (one per batch), in order
    diverged_at: int | None = None  # first epoch whose loss was not finite, if any

    @property
    def n_features(self) -> int:
        return len(self.init_weight)

    @property
    def epochs(self) -> np.ndarray:
        return np.arange(1, len(self.values) + 1)

    def column(self, name: str) -> np.ndarray:
        if name == "epoch":
            return self.epochs
        return self.values[:, trajectory_columns(self.n_features).index(name) - 1]

    def weights(self) -> np.ndarray:
        """(epochs, n_features): the weights after each epoch."""
        return np.column_stack([self.column(name) for name in weight_names(self.n_features)])

    def path(self) -> np.ndarray:
        """(epochs + 1, n_features + 1): the weights and bias at the start and after each epoch."""
        start = np.append(self.init_weight, self.init_bias).astype(self.values.dtype)
        return np.vstack([start, np.column_stack([self.weights(), self.column("bias")])])

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: self.column(name) for name in trajectory_columns(self.n_features)})


def batches(n: int, batch_size: int | None, rng: np.random.Generator) -> Iterator[slice | np.ndarray]:
    """The rows of one epoch: everything at once, or a fresh shuffle cut into batches of batch_size."""
    if batch_size is None or batch_size >= n:
        yield slice(None)
        return
    # rng.permutation(n), shuffled in place in int32 when that fits: the same order, in half the memory (in
    # int64 the order alone would take as much memory as a one-feature float32 table).
    order = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    rng.shuffle(order)
    for start in range(0, n, batch_size):
        yield np.sort(order[start : start + batch_size])  # sorted: same rows, cache-friendly gather


def make_learner(
    method: str,
    model: nn.Linear,
    X: np.ndarray,
    y: np.ndarray,
    optimizer: str,
    lr: float,
    momentum: float,
    compile: bool = False,
    device: torch.device | None = None,
) -> Learner:
    """A learner for `method`, starting from `model`'s parameters (all three start from the same point); the
    nn method trains on `device` (the CPU by default), the others on the CPU."""
    if method == "nn":
        return NNLearner(model, X, y, optimizer, lr, momentum, compile, device)
    w0, b0 = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    if method == "autograd":
        return AutogradLearner(w0, b0, X, y, lr, momentum)
    if method == "numpy":
        return NumpyLearner(w0, b0, X, y, lr, momentum)
    raise ValueError(f"unknown method {method!r}")


def fit(
    learner: Learner,
    n: int,
    epochs: int,
    batch_size: int | None = None,
    shuffle_seed: int = 0,
    progress: bool = False,
    on_epochs: Callable[[int, np.ndarray], object] | None = None,
    stream_epochs: int = tuning.STREAM_EPOCHS,
    stream_seconds: float = tuning.STREAM_SECONDS,
) -> Trajectory:
    """Run `epochs` epochs and record the trajectory; stop early at the first non-finite loss.

    progress: show a progress bar on stderr (the caller decides: only on a terminal).
    on_epochs(first_epoch, rows): the trajectory as it grows, the rows of Trajectory.values from first_epoch on,
    handed over every stream_epochs epochs or stream_seconds, and at the end: so that a long run can be logged
    while it trains.
    """
    w0, b0 = learner.params()
    k = w0.size
    dtype = w0.dtype
    rng = np.random.default_rng(shuffle_seed)
    rows: list[list[float]] = []
    batch_losses = []
    diverged_at = None
    sent, last_sent = 0, time.monotonic()

    def hand_over() -> None:
        nonlocal sent, last_sent
        if on_epochs is not None and len(rows) > sent:
            on_epochs(sent + 1, np.asarray(rows[sent:], dtype=np.float64).astype(dtype))  # as in values below
            sent, last_sent = len(rows), time.monotonic()

    for epoch in tqdm(range(1, epochs + 1), desc="training", unit="epoch", disable=not progress, leave=False):
        loss_sum, gw_sum, gb_sum = 0.0, np.zeros(k), 0.0
        for part in batches(n, batch_size, rng):
            size = n if isinstance(part, slice) else len(part)
            loss, gw, gb = learner.step(part)
            batch_losses.append(loss)
            loss_sum += size * loss
            gw_sum += size * gw.reshape(-1)
            gb_sum += size * float(gb.reshape(-1)[0])
        w, b = learner.params()
        # One row in the order of data.trajectory_columns, which names them.
        rows.append([loss_sum / n, *(gw_sum / n), gb_sum / n, *w.reshape(-1), float(b.reshape(-1)[0])])
        if not math.isfinite(loss_sum):
            diverged_at = epoch
            break
        if len(rows) - sent >= stream_epochs or time.monotonic() - last_sent >= stream_seconds:
            hand_over()
    hand_over()
    width = len(trajectory_columns(k)) - 1
    values = np.asarray(rows, dtype=np.float64).astype(dtype) if rows else np.empty((0, width), dtype)
    return Trajectory(w0.reshape(-1), float(b0.reshape(-1)[0]), values, np.asarray(batch_losses), diverged_at)


@dataclass(frozen=True)
class Fit:
    """What learn() did: the trajectory, and the model after the last epoch (on the CPU, whatever the method)."""

    trajectory: Trajectory
    model: nn.Linear


def learn(
    p: TrainParams,
    table: Table,
    place: distributed.Place | None = None,
    progress: bool = False,
    on_start: Callable[[np.ndarray, bool], object] | None = None,
    on_epochs: Callable[[int, np.ndarray], object] | None = None,
) -> Fit:
    """Gradient descent by train.method from the seeded start every method shares, on place's rows (by default all
    of them, on the CPU); no I/O. on_start(init, compiled): the start (weights, then bias) and whether the step is
    compiled, before the first step; progress and on_epochs: as in fit()."""
    place = place or distributed.Place(torch.device("cpu"), slice(None))
    model = make_model(p.init_seed, table.n_features, getattr(torch, p.dtype))
    X, y = (a[place.rows] for a in as_arrays(table.X, table.y, model.weight.dtype))  # this rank's rows
    rows_per_step = min(len(X), p.batch_size or len(X))
    compiled = tuning.should_compile(p.compile, p.method, rows_per_step, p.epochs) and place.device.type == "cpu"
    compiled = compiled and place.size == 1  # compiled steps are tuned for the CPU and one process
    if on_start is not None:
        on_start(np.append(model.weight.detach().numpy(), model.bias.detach().numpy()), compiled)
    learner = make_learner(p.method, model, X, y, p.optimizer, p.lr, p.momentum, compile=compiled, device=place.device)
    if place.size > 1:  # under torchrun: the nn learner (distributed.place refuses the others) through DDP
        learner = distributed.DDPLearner(cast(NNLearner, learner), place.device)
    traj = fit(learner, len(X), p.epochs, p.batch_size, p.shuffle_seed, progress, on_epochs)
    return Fit(traj, load_params(model.cpu(), traj.weights()[-1], traj.column("bias")[-1:]))


def as_arrays(x: np.ndarray, y: np.ndarray, dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, np.ndarray]:
    """Features (N,) or (N, k) and targets (N,) -> the (N, k) and (N, 1) arrays every method trains on.

    No copy when the data already has the dtype and is a writable, contiguous array (a table read from
    disk): a copy would hold a large table in memory twice.
    """
    np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
    X = np.require(x, np_dtype, ["C", "W"]).reshape(len(x), -1)
    Y = np.require(y, np_dtype, ["C", "W"]).reshape(-1, 1)
    return X, Y


def autograd_gradient(
    X: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, chunk_rows: int = 1 << 20
) -> np.ndarray:
    """Autograd's gradient of the MSE at (w, b) in float64, as (dL/dw_1, ..., dL/dw_k, dL/db).

    Chunk by chunk, so no float64 copy of a large table is made: each chunk's share of the mean loss is
    back-propagated on its own and backward() adds the gradients up in .grad (the accumulation that
    zero_grad exists to clear).
    """
    weight = torch.tensor(np.reshape(w, (1, -1)), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(np.reshape(b, (1,)), dtype=torch.float64, requires_grad=True)
    n = len(X)
    for start in range(0, n, chunk_rows):
        Xc = torch.tensor(np.reshape(X[start : start + chunk_rows], (-1, weight.shape[1])), dtype=torch.float64)
        yc = torch.tensor(np.reshape(y[start : start + chunk_rows], (-1, 1)), dtype=torch.float64)
        # The functions nn.Linear and nn.MSELoss call, without building a module (whose init would draw randoms).
        loss = nn.functional.mse_loss(nn.functional.linear(Xc, weight, bias), yc, reduction="sum") / n
        loss.backward()  # type: ignore[no-untyped-call]
    assert weight.grad is not None and bias.grad is not None
    return np.append(weight.grad.numpy().reshape(-1), bias.grad.numpy())


def load_params(model: nn.Linear, w: np.ndarray, b: np.ndarray) -> nn.Linear:
    """Put (w, b) into an nn.Linear, so every method saves the same kind of state_dict."""
    with torch.no_grad():
        model.weight.copy_(torch.as_tensor(np.reshape(w, model.weight.shape)))
        model.bias.copy_(torch.as_tensor(np.reshape(b, model.bias.shape)))
    return model
