"""Theory of gradient descent on the MSE, checked against autograd, brute force and training itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline import config, loop, theory
from tests.training import run, train_arrays


def lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The oracle: numpy's least-squares solution (w_1, ..., w_k, b) of [X, 1] θ ≈ y."""
    A = np.column_stack([X.reshape(len(X), -1), np.ones(len(X))])
    return np.linalg.lstsq(A, y, rcond=None)[0]


def test_hessian_equals_autograds_second_derivative(cfg: config.Config) -> None:
    X, y = train_arrays(cfg, true_weights=[1.0, 2.0], n_samples=60)
    Xt, yt = torch.tensor(X), torch.tensor(y)

    def mse(theta: torch.Tensor) -> torch.Tensor:
        return ((Xt @ theta[:-1] + theta[-1] - yt) ** 2).mean()

    H = torch.autograd.functional.hessian(mse, torch.zeros(3, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(theory.hessian(theory.Moments.of(X, y)), H, rtol=1e-12, atol=1e-12)


def test_closed_form_and_least_squares_agree(cfg: config.Config) -> None:
    X, y = train_arrays(cfg, true_weights=[1.0, -2.0, 0.5], n_samples=50)
    np.testing.assert_allclose(theory.closed_form(X, y).params(), lstsq(X, y), rtol=1e-10)
    np.testing.assert_allclose(theory.least_squares(theory.Moments.of(X, y)).params(), lstsq(X, y), rtol=1e-10)


def distance_growth(cfg: config.Config, lr: float, momentum: float = 0.0) -> float:
    """Final over initial distance to the optimum after 300 epochs of float64 training."""
    X, y = train_arrays(cfg)
    t = run(cfg, dtype=torch.float64, lr=lr, momentum=momentum, epochs=300)
    opt = lstsq(X, y)
    start = np.append(t.init_weight, t.init_bias)
    end = np.append(t.weights()[-1], t.column("bias")[-1])
    return float(np.linalg.norm(end - opt) / np.linalg.norm(start - opt))


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_largest_stable_learning_rate_separates_convergence_from_divergence(
    cfg: config.Config, momentum: float
) -> None:
    X, y = train_arrays(cfg)
    limit = theory.stability(theory.Moments.of(X, y), 0.1, momentum).lr_max
    assert distance_growth(cfg, 0.98 * limit, momentum) < 1  # just below: still converges
    assert distance_growth(cfg, 1.02 * limit, momentum) > 1  # just above: moves away


def test_observed_contraction_per_epoch_matches_theory(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    stab = theory.stability(theory.Moments.of(X, y), cfg.train.lr)
    assert stab.contraction == pytest.approx(max(abs(1 - cfg.train.lr * stab.eigenvalues)), rel=1e-12)
    t = run(cfg, dtype=torch.float64, epochs=110)
    d = np.linalg.norm(np.column_stack([t.weights(), t.column("bias")]) - lstsq(X, y), axis=1)
    # Late in the run the slowest direction dominates and each epoch shrinks the error by the factor. (The
    # other factor is 0.79 against 0.81 here, so its share fades slowly: after 110 epochs it is ~1e-4.)
    assert d[-1] > 1e-10  # still far above rounding
    assert d[-1] / d[-2] == pytest.approx(stab.contraction, rel=1e-4)
    assert np.all(d[1:] <= stab.contraction * d[:-1] * (1 + 1e-12))  # and never by less: it is a bound


def test_predicted_epochs_bound_the_observed_ones(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    stab = theory.stability(theory.Moments.of(X, y), cfg.train.lr)
    t = run(cfg, dtype=torch.float64, epochs=200)
    opt = lstsq(X, y)
    d = np.linalg.norm(np.column_stack([t.weights(), t.column("bias")]) - opt, axis=1)
    d0 = float(np.linalg.norm(np.append(t.init_weight, t.init_bias) - opt))
    for tol in (1e-2, 1e-4, 1e-8):
        predicted, observed = stab.predicted_epochs(d0, tol), theory.observed_epochs(d, tol)
        assert predicted is not None and observed is not None
        assert observed <= predicted <= observed + 3


def test_observed_epochs_is_the_first_epoch_that_stays_within_tolerance() -> None:
    assert theory.observed_epochs(np.array([5, 0.5, 2, 0.5, 0.1]), 1.0) == 4
    assert theory.observed_epochs(np.array([0.5, 0.1]), 1.0) == 1
    assert theory.observed_epochs(np.array([5, 0.5, 2]), 1.0) is None


def test_standard_error_of_one_slope_is_the_textbook_formula(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    m = theory.Moments.of(X, y)
    fit = theory.least_squares(m)
    x = X[:, 0]
    s2 = np.sum((y - fit.predict(X)) ** 2) / (len(x) - 2)
    assert theory.standard_errors(m, fit)[0] == pytest.approx(math.sqrt(s2 / np.sum((x - x.mean()) ** 2)))


def test_standard_errors_match_the_spread_of_refits_on_fresh_noise() -> None:
    # Monte Carlo: refit on 4000 fresh noise draws; the weights' and the bias's spread is what the standard errors
    # predict.
    rng = np.random.default_rng(7)
    X = rng.normal(size=(40, 3))
    w_true, sigma = np.array([1.0, -2.0, 0.5]), 0.3
    noise = rng.normal(0, sigma, size=(4000, 40))
    A = np.column_stack([X, np.ones(40)])
    fits = np.linalg.lstsq(A, (X @ w_true)[:, None] + noise.T, rcond=None)[0]  # (3 weights + bias, 4000)
    y0 = X @ w_true + noise[0]
    m = theory.Moments.of(X, y0)
    se = theory.standard_errors(m, theory.least_squares(m))
    # One sample's s^2 estimates sigma^2 with ~ sqrt(2/36) = 24 % relative spread; compare loosely.
    np.testing.assert_allclose(se, fits.std(axis=1), rtol=0.35)
    np.testing.assert_allclose(sigma * np.sqrt(np.diag(np.linalg.inv(A.T @ A))), fits.std(axis=1), rtol=0.05)


def test_loss_grid_equals_the_loss_computed_point_by_point(cfg: config.Config) -> None:
    X, y = train_arrays(cfg, true_weights=[1.0, -2.0], n_samples=50)
    m = theory.Moments.of(X, y)
    fit = theory.least_squares(m)
    ws, bs = np.linspace(-1, 3, 7), np.linspace(-2, 2, 5)
    Z = theory.mse_grid(m, fit, ws, bs)
    for i, b in enumerate(bs):
        for j, w in enumerate(ws):
            pred = X @ np.array([w, fit.weights[1]]) + b
            assert Z[i, j] == pytest.approx(np.mean((pred - y) ** 2), rel=1e-10)


def test_analytic_gradient_vanishes_at_the_closed_form(cfg: config.Config) -> None:
    X, y = train_arrays(cfg)
    m = theory.Moments.of(X, y)
    assert np.abs(theory.mse_gradient(m, theory.least_squares(m))).max() < 1e-12
    assert np.abs(loop.autograd_gradient(X, y, np.array([3.0]), np.array([0.0]))).max() > 1e-3


# The moments: one streaming pass gives what the whole table would.


def offset_data(n: int, k: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Features far from 0 (mean 1000): where uncentred sums of squares lose ~12 digits."""
    rng = np.random.default_rng(seed)
    X = 1000.0 + rng.normal(size=(n, k))
    return X, X @ np.arange(1.0, k + 1) - 5.0 + 0.1 * rng.normal(size=n)


@pytest.mark.parametrize("chunk_rows", [1, 7, 1000, 10**6])
def test_moments_do_not_depend_on_the_chunking(chunk_rows: int) -> None:
    X, y = offset_data(3000, 2)
    whole = theory.Moments.of(X, y, chunk_rows=len(X))
    part = theory.Moments.of(X, y, chunk_rows=chunk_rows)
    assert part.n == whole.n
    np.testing.assert_allclose(part.mean, whole.mean, rtol=1e-14)
    np.testing.assert_allclose(part.comoment, whole.comoment, rtol=1e-10)
    D = np.column_stack([X, y]) - np.column_stack([X, y]).mean(axis=0)
    np.testing.assert_allclose(whole.comoment, D.T @ D, rtol=1e-10)  # the definition, computed directly


@pytest.mark.parametrize("k", [1, 3])
def test_least_squares_from_streamed_moments_equals_lstsq_and_scikit_learn(k: int) -> None:
    X, y = offset_data(1_000_000, k)
    m = theory.Moments.of(X, y, chunk_rows=65_536)
    expected = lstsq(X - 1000.0, y)  # lstsq on centred features: the well-conditioned form of the same fit
    expected[-1] -= 1000.0 * expected[:-1].sum()
    np.testing.assert_allclose(theory.least_squares(m).params(), expected, rtol=1e-9)
    np.testing.assert_allclose(theory.closed_form(X, y).params(), expected, rtol=1e-9)


def test_losses_scores_and_gradient_from_moments_equal_the_direct_formulas() -> None:
    X, y = offset_data(5000, 2)
    m = theory.Moments.of(X, y, chunk_rows=999)
    fit = theory.LineFit(np.array([0.9, 2.1]), -3.0)
    r = fit.predict(X) - y
    assert m.sse(fit) == pytest.approx(np.sum(r**2), rel=1e-9)
    assert m.mse(fit) == pytest.approx(np.mean(r**2), rel=1e-9)
    assert m.r2(fit) == pytest.approx(1 - np.sum(r**2) / np.sum((y - y.mean()) ** 2), rel=1e-9)
    A = np.column_stack([X, np.ones(len(X))])
    np.testing.assert_allclose(theory.mse_gradient(m, fit), 2 / len(X) * A.T @ r, rtol=1e-7)
    np.testing.assert_allclose(m.gram(), A.T @ A, rtol=1e-12)
