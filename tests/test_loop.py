"""The five-step loop, checked against hand-derived math: analytic gradients, the SGD update, least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import config, data, loop


def train_arrays(cfg: config.Config) -> tuple[np.ndarray, np.ndarray]:
    train, _ = data.generate(cfg.generate)
    return train["x"].to_numpy(), train["y"].to_numpy()


def fit_defaults(cfg: config.Config, dtype: torch.dtype = torch.float32, **kw: object) -> loop.Trajectory:
    x, y = train_arrays(cfg)
    X, Y = loop.as_tensors(x, y, dtype)
    model = loop.make_model(cfg.train.init_seed).to(dtype)
    args = {"optimizer_name": "sgd", "lr": cfg.train.lr, "epochs": cfg.train.epochs} | kw
    return loop.fit(model, X, Y, **args)  # type: ignore[arg-type]


def params_before_each_step(t: loop.Trajectory) -> tuple[np.ndarray, np.ndarray]:
    w = np.concatenate(([t.init_weight], t.column("weight")[:-1])).astype(np.float64)
    b = np.concatenate(([t.init_bias], t.column("bias")[:-1])).astype(np.float64)
    return w, b


def test_recorded_loss_and_gradients_equal_the_analytic_ones(cfg: config.Config) -> None:
    x, y = train_arrays(cfg)
    t = fit_defaults(cfg)
    w, b = params_before_each_step(t)
    residual = w[:, None] * x[None, :] + b[:, None] - y[None, :]  # (epochs, N), in float64
    # L = mean(r^2);  dL/dw = 2/N sum(r x);  dL/db = 2/N sum(r)
    np.testing.assert_allclose(t.column("loss"), (residual**2).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(t.column("grad_weight"), 2 * (residual * x).mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(t.column("grad_bias"), 2 * residual.mean(axis=1), rtol=1e-4, atol=1e-6)


def test_each_step_is_p_minus_lr_times_grad(cfg: config.Config) -> None:
    t = fit_defaults(cfg, dtype=torch.float64)
    w, b = params_before_each_step(t)
    lr = cfg.train.lr
    np.testing.assert_allclose(t.column("weight"), w - lr * t.column("grad_weight"), rtol=1e-15, atol=1e-15)
    np.testing.assert_allclose(t.column("bias"), b - lr * t.column("grad_bias"), rtol=1e-15, atol=1e-15)


def test_gradient_descent_reaches_least_squares(cfg: config.Config) -> None:
    x, y = train_arrays(cfg)
    A = np.column_stack([x, np.ones_like(x)])
    (w_ls, b_ls), *_ = np.linalg.lstsq(A, y, rcond=None)
    t = fit_defaults(cfg, dtype=torch.float64, epochs=400)
    assert abs(t.column("weight")[-1] - w_ls) < 1e-10 and abs(t.column("bias")[-1] - b_ls) < 1e-10
    t32 = fit_defaults(cfg)  # the defaults: float32, 100 epochs
    assert abs(t32.column("weight")[-1] - w_ls) < 1e-4


def test_loss_decreases_every_epoch_at_a_stable_rate(cfg: config.Config) -> None:
    loss = fit_defaults(cfg, dtype=torch.float64).column("loss")
    assert np.all(np.diff(loss) < 0)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_each_optimizer_lowers_the_loss(cfg: config.Config, name: str) -> None:
    loss = fit_defaults(cfg, optimizer_name=name, lr=0.05, epochs=50).column("loss")
    assert loss[-1] < 0.1 * loss[0]


def test_trajectory_frame_layout(cfg: config.Config) -> None:
    frame = fit_defaults(cfg, epochs=7).frame()
    assert tuple(frame.columns) == loop.TRAJECTORY_COLUMNS
    assert frame["epoch"].tolist() == list(range(1, 8))


def test_initialisation_is_seeded_random_trainable_and_leaves_global_rng_alone() -> None:
    before = torch.random.get_rng_state()
    a, b, c = loop.make_model(0), loop.make_model(0), loop.make_model(1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert all(p.requires_grad for p in a.parameters())


def test_train_step_runs_the_five_steps_in_order() -> None:
    calls: list[str] = []
    model = loop.make_model(0)
    X, Y = loop.as_tensors(np.array([1.0, 2.0]), np.array([3.0, 6.0]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.register_forward_hook(lambda *_: calls.append("forward"))
    criterion = torch.nn.MSELoss()
    criterion.register_forward_hook(lambda *_: calls.append("loss"))
    model.weight.register_hook(lambda g: calls.append("backward"))
    optimizer.register_step_pre_hook(lambda *_: calls.append("step"))
    zero_grad = optimizer.zero_grad
    optimizer.zero_grad = lambda *a, **k: (calls.append("zero_grad"), zero_grad(*a, **k))[1]  # type: ignore[method-assign]
    loop.train_step(model, criterion, optimizer, X, Y)
    assert calls == ["forward", "loss", "zero_grad", "backward", "step"]
