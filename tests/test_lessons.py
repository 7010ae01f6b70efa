"""The lessons of linear regression in PyTorch, one executable claim per test. Read it top to bottom.

Each test states a fact about tensors, autograd, the loss, the optimizer or the training loop, and checks it
against something independent of PyTorch's own bookkeeping: a hand-derived formula, NumPy, or a second
implementation of the same math.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn, optim

from pipeline import config, data, loop, theory
from tests.training import run, train_arrays

X_DATA = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
Y_DATA = 3 * X_DATA + 1  # an exact line: y = 3x + 1


def fresh(seed: int = 0) -> tuple[nn.Linear, nn.MSELoss, optim.SGD]:
    model = loop.make_model(seed)
    return model, nn.MSELoss(), optim.SGD(model.parameters(), lr=0.1)


def analytic_gradient(model: nn.Linear) -> tuple[float, float]:
    """dL/dw = 2/N sum((w x + b - y) x), dL/db = 2/N sum(w x + b - y), computed in NumPy."""
    w, b = model.weight.item(), model.bias.item()
    x, y = X_DATA.numpy().ravel().astype(np.float64), Y_DATA.numpy().ravel().astype(np.float64)
    r = w * x + b - y
    return 2 * np.mean(r * x), 2 * np.mean(r)


# 1. The model: nn.Linear(1, 1) is y = x W^T + b with a random start and gradients switched on.


def test_nn_linear_initialises_weight_and_bias_randomly() -> None:
    a, b = loop.make_model(0), loop.make_model(1)
    assert a.weight.shape == (1, 1) and a.bias.shape == (1,)
    assert a.weight.item() != b.weight.item() and a.bias.item() != b.bias.item()
    # PyTorch draws both from U(-1/sqrt(fan_in), 1/sqrt(fan_in)); with one input that is U(-1, 1).
    draws = torch.stack([loop.make_model(s).weight.detach().squeeze() for s in range(200)])
    assert draws.abs().max() <= 1 and draws.min() < -0.5 and draws.max() > 0.5


def test_nn_linear_parameters_require_grad() -> None:
    assert all(p.requires_grad for p in loop.make_model(0).parameters())


def test_nn_linear_computes_x_times_w_plus_b() -> None:
    model = loop.make_model(0)
    expected = X_DATA.numpy() * model.weight.item() + model.bias.item()
    np.testing.assert_allclose(model(X_DATA).detach().numpy(), expected, rtol=1e-6)


# 2. The forward pass records a graph; the loss is one number.


def test_forward_pass_builds_a_graph_and_loss_is_a_scalar() -> None:
    model, criterion, _ = fresh()
    y_pred = model(X_DATA)
    assert y_pred.grad_fn is not None  # the recipe autograd will replay backwards
    loss = criterion(y_pred, Y_DATA)
    assert loss.dim() == 0 and loss.grad_fn is not None
    with torch.no_grad():  # without recording, no graph
        assert model(X_DATA).grad_fn is None


def test_mse_loss_is_the_mean_of_squared_errors() -> None:
    model, criterion, _ = fresh()
    y_pred = model(X_DATA)
    by_hand = float(np.mean((y_pred.detach().numpy() - Y_DATA.numpy()) ** 2))
    assert criterion(y_pred, Y_DATA).item() == pytest.approx(by_hand, rel=1e-6)


# 3. backward() computes gradients and nothing else.


def test_backward_fills_grad_with_the_analytic_gradient() -> None:
    model, criterion, _ = fresh()
    assert model.weight.grad is None  # nothing computed yet
    criterion(model(X_DATA), Y_DATA).backward()
    assert model.weight.grad is not None and model.bias.grad is not None
    gw, gb = analytic_gradient(model)
    assert model.weight.grad.item() == pytest.approx(gw, rel=1e-5)
    assert model.bias.grad.item() == pytest.approx(gb, rel=1e-5)


def test_backward_does_not_change_the_parameters() -> None:
    model, criterion, _ = fresh()
    before = [p.detach().clone() for p in model.parameters()]
    criterion(model(X_DATA), Y_DATA).backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_gradients_accumulate_without_zero_grad() -> None:
    model, criterion, _ = fresh()
    criterion(model(X_DATA), Y_DATA).backward()
    assert model.weight.grad is not None
    once = model.weight.grad.clone()
    criterion(model(X_DATA), Y_DATA).backward()  # a second backward adds to .grad
    assert torch.equal(model.weight.grad, 2 * once)


def test_zero_grad_clears_the_gradients() -> None:
    model, criterion, optimizer = fresh()
    criterion(model(X_DATA), Y_DATA).backward()
    optimizer.zero_grad()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


# 4. step() updates the parameters from .grad and computes nothing itself.


def test_step_without_gradients_changes_nothing() -> None:
    model, _, optimizer = fresh()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()  # no backward yet: .grad is None, so there is nothing to apply
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


def test_step_is_exactly_p_minus_lr_times_grad() -> None:
    model, criterion, optimizer = fresh()
    model.double()
    criterion(model(X_DATA.double()), Y_DATA.double()).backward()
    expected = [(p - 0.1 * p.grad).detach().clone() for p in model.parameters() if p.grad is not None]
    optimizer.step()
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected, strict=True))


# 5. The five steps, in order, make the loss go down; out of order they do what theory predicts.


def test_five_steps_in_order_lower_the_loss() -> None:
    model, criterion, optimizer = fresh()
    losses = [loop.train_step(model, criterion, optimizer, X_DATA, Y_DATA).item() for _ in range(30)]
    assert all(b < a for a, b in itertools.pairwise(losses))


def test_zero_grad_then_step_before_backward_never_moves() -> None:
    # forward, loss, zero_grad, step, backward: step reads .grad right after zero_grad emptied it.
    model, criterion, optimizer = fresh()
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(5):
        loss = criterion(model(X_DATA), Y_DATA)
        optimizer.zero_grad()
        optimizer.step()
        loss.backward()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), start, strict=True))


def test_step_before_backward_applies_the_previous_epochs_gradient() -> None:
    # forward, loss, step, zero_grad, backward: each step uses the gradient computed one epoch earlier,
    # theta_{t+1} = theta_t - lr * g(theta_{t-1}), and the first step has none. Oracle: that recursion in NumPy.
    model, criterion, optimizer = fresh()
    x, y = X_DATA.numpy().ravel().astype(np.float64), Y_DATA.numpy().ravel().astype(np.float64)
    theta = np.array([model.weight.item(), model.bias.item()])
    pending = np.zeros(2)  # the gradient waiting in .grad
    for _ in range(10):
        loss = criterion(model(X_DATA), Y_DATA)
        optimizer.step()
        optimizer.zero_grad()
        loss.backward()
        r = theta[0] * x + theta[1] - y
        grad_here = np.array([2 * np.mean(r * x), 2 * np.mean(r)])  # at the parameters the forward pass used
        theta, pending = theta - 0.1 * pending, grad_here
        assert model.weight.item() == pytest.approx(theta[0], rel=1e-5, abs=1e-6)
        assert model.bias.item() == pytest.approx(theta[1], rel=1e-5, abs=1e-6)


def test_without_zero_grad_the_update_uses_the_running_sum_of_gradients() -> None:
    # Forgetting zero_grad turns plain gradient descent into p <- p - lr * (g_1 + ... + g_t): a heavy-ball
    # method with momentum 1, which overshoots; it matches optim.SGD(momentum=1, dampening=0) step for step.
    model, criterion, optimizer = fresh()
    twin = loop.make_model(0)
    twin_opt = optim.SGD(twin.parameters(), lr=0.1, momentum=1.0)
    for _ in range(20):
        loss = criterion(model(X_DATA), Y_DATA)
        loss.backward()  # no zero_grad: .grad keeps growing
        optimizer.step()
        loop.train_step(twin, nn.MSELoss(), twin_opt, X_DATA, Y_DATA)
        assert model.weight.item() == pytest.approx(twin.weight.item(), rel=1e-5, abs=1e-6)
    ref, ref_criterion, ref_optimizer = fresh()
    for _ in range(20):
        loop.train_step(ref, ref_criterion, ref_optimizer, X_DATA, Y_DATA)
    assert abs(ref.weight.item() - 3) < abs(model.weight.item() - 3)  # the correct loop is closer


# 6. After training, the parameters are the ones the data was made from.


def test_after_training_with_the_defaults_weight_is_near_3_and_bias_near_0(cfg: config.Config) -> None:
    t = run(cfg)  # params.yaml as shipped: 100 epochs of SGD(lr=0.1) on y = 3x + noise
    X, y = train_arrays(cfg)
    m = theory.Moments.of(X, y)
    se = theory.standard_errors(m, theory.least_squares(m))[0]
    assert abs(t.column("weight")[-1] - 3.0) < 3 * se  # as close as the noise allows (3 standard errors)
    assert abs(t.column("bias")[-1]) < 3 * cfg.generate.noise_std / np.sqrt(len(X))


def test_named_parameters_lists_weight_then_bias() -> None:
    assert [name for name, _ in loop.make_model(0).named_parameters()] == ["weight", "bias"]


# 7. NumPy by hand, raw autograd and nn/optim are the same math.

# Float64 agreement of the three methods, relative, over every epoch of the run.
RTOL_FLOAT64 = 1e-12
# Float32: each method rounds its sums in its own order (about 6e-8 per operation); over 100 contracting
# epochs the differences stay at that level, so 1e-5 relative (with 1e-6 absolute near zero) is ample.
RTOL_FLOAT32, ATOL_FLOAT32 = 1e-5, 1e-6


@pytest.mark.parametrize("method", ["numpy", "autograd"])
def test_numpy_autograd_and_nn_trajectories_agree_in_float64(cfg: config.Config, method: str) -> None:
    nn_run = run(cfg, "nn", torch.float64)
    other = run(cfg, method, torch.float64)
    for column in ("loss", "weight", "bias"):
        np.testing.assert_allclose(other.column(column), nn_run.column(column), rtol=RTOL_FLOAT64, atol=0)
    for column in ("grad_weight", "grad_bias"):  # they shrink towards 0: relative to their initial size
        scale = np.abs(nn_run.column(column)).max()
        np.testing.assert_allclose(other.column(column), nn_run.column(column), rtol=0, atol=RTOL_FLOAT64 * scale)


@pytest.mark.parametrize("method", ["numpy", "autograd"])
def test_numpy_autograd_and_nn_trajectories_agree_in_float32(cfg: config.Config, method: str) -> None:
    nn_run, other = run(cfg, "nn"), run(cfg, method)
    assert other.values.dtype == np.float32
    np.testing.assert_allclose(other.values, nn_run.values, rtol=RTOL_FLOAT32, atol=ATOL_FLOAT32)


# 8. Autograd's gradient is the analytic gradient.


def test_autograd_gradient_equals_the_analytic_gradient_at_start_and_end(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    t = run(cfg, dtype=torch.float64)
    start = theory.LineFit(t.init_weight, t.init_bias)
    end = theory.LineFit(t.weights()[-1], float(t.column("bias")[-1]))
    for point in (start, end):
        auto = loop.autograd_gradient(X, y, point.weights, np.array([point.bias]))
        A = np.column_stack([X, np.ones(len(X))])  # the hand-derived gradient (2/N) A^T (A θ - y)
        analytic = 2 / len(X) * A.T @ (A @ point.params() - y)
        np.testing.assert_allclose(auto, analytic, rtol=1e-12, atol=1e-14)


def test_torch_gradcheck_passes_for_the_mse_of_a_linear_model(cfg: config.Config) -> None:
    X, y = (torch.tensor(a, dtype=torch.float64) for a in train_arrays(cfg))
    w = torch.tensor([[0.5]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-0.2], dtype=torch.float64, requires_grad=True)

    def mse(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(nn.functional.linear(X, w, b), y.reshape(-1, 1))

    # Finite differences against autograd's backward, in double precision.
    assert torch.autograd.gradcheck(mse, (w, b), eps=1e-6, atol=1e-6)


def test_hand_derived_numpy_step_matches_one_nn_step() -> None:
    x, y = loop.as_arrays(np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 4.0, 7.0, 10.0]), torch.float64)
    model = loop.make_model(0, dtype=torch.float64)
    w, b = model.weight.detach().numpy().copy(), model.bias.detach().numpy().copy()
    loss, gw, gb = loop.numpy_step(w, b, x, y, 0.1, 0.0, [])
    nn_loss = loop.train_step(
        model, nn.MSELoss(), optim.SGD(model.parameters(), lr=0.1), *map(torch.from_numpy, (x, y))
    )
    assert loss == pytest.approx(nn_loss.item(), rel=1e-15)
    np.testing.assert_allclose(w, model.weight.detach().numpy(), rtol=1e-15)
    np.testing.assert_allclose(b, model.bias.detach().numpy(), rtol=1e-15)
    assert model.weight.grad is not None
    assert model.bias.grad is not None
    np.testing.assert_allclose(gw, model.weight.grad.numpy(), rtol=1e-14)
    np.testing.assert_allclose(gb, model.bias.grad.numpy(), rtol=1e-14)


def test_data_module_generates_what_the_lessons_train_on(cfg: config.Config) -> None:
    train, _ = data.generate(cfg.generate)
    assert list(train.columns) == ["x", "y"] and cfg.generate.true_weights == [3.0]
