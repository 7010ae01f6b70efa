"""What theory says about this problem: the closed-form optimum, its sampling error, and how fast (and
whether) gradient descent gets there. Pure functions of the data; no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LineFit:
    """y = X @ weights + bias."""

    weights: np.ndarray  # (k,)
    bias: float

    @property
    def weight(self) -> float:
        """The first (for the seed's problem: the only) weight."""
        return float(self.weights[0])

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        y: np.ndarray = X.reshape(len(X), -1) @ self.weights + self.bias
        return y

    def params(self) -> np.ndarray:
        """(w_1, ..., w_k, b) as one vector: the point gradient descent moves."""
        return np.append(self.weights, self.bias)


def closed_form(X: np.ndarray, y: np.ndarray) -> LineFit:
    """scikit-learn's least-squares fit: the exact minimiser of the training MSE."""
    from sklearn.linear_model import LinearRegression  # 1 s to import: only the stages that need it pay

    X = np.asarray(X, dtype=np.float64)
    reg = LinearRegression().fit(X.reshape(len(X), -1), np.asarray(y, dtype=np.float64))
    return LineFit(weights=np.asarray(reg.coef_, dtype=np.float64), bias=float(reg.intercept_))


def design(X: np.ndarray) -> np.ndarray:
    """A = [X, 1]: the model is y ≈ A @ (w, b)."""
    X = np.asarray(X, dtype=np.float64)
    X = X.reshape(len(X), -1)
    return np.column_stack([X, np.ones(len(X))])


def least_squares(X: np.ndarray, y: np.ndarray) -> LineFit:
    """The same optimum from the normal equations' QR solver: train uses it (no scikit-learn import)."""
    coef, *_ = np.linalg.lstsq(design(X), np.asarray(y, dtype=np.float64), rcond=None)
    return LineFit(weights=coef[:-1], bias=float(coef[-1]))


def standard_errors(X: np.ndarray, y: np.ndarray, fit: LineFit) -> np.ndarray:
    """Standard error of each weight: sqrt(s^2 [(A^T A)^-1]_ii), with s^2 = RSS / (n - k - 1).

    How far the closed-form weights are expected to sit from the true ones because of the noise alone.
    """
    A = design(X)
    n, p = A.shape  # config guarantees n > p: s^2 needs n - p > 0 degrees of freedom
    rss = float(np.sum((np.asarray(y, dtype=np.float64) - fit.predict(X)) ** 2))
    cov = rss / (n - p) * np.linalg.inv(A.T @ A)
    return np.sqrt(np.diag(cov)[:-1])


def hessian(X: np.ndarray) -> np.ndarray:
    """Hessian of L(w, b) = mean((A θ - y)^2): H = (2/N) A^T A, the same at every point (L is quadratic)."""
    A = design(X)
    H: np.ndarray = 2.0 / len(A) * (A.T @ A)
    return H


@dataclass(frozen=True)
class Stability:
    """Full-batch gradient descent on a quadratic, from the Hessian's eigenvalues."""

    eigenvalues: np.ndarray  # of H, ascending
    lr_max: float  # largest stable learning rate: 2 (1 + momentum) / λ_max
    contraction: float  # factor the distance to the optimum shrinks by per epoch, at worst (asymptotically)

    def predicted_epochs(self, distance0: float, tol: float) -> int | None:
        """Epochs until the distance falls to tol if it shrinks by `contraction` each epoch (None: never)."""
        if distance0 <= tol:
            return 0
        if not 0 < self.contraction < 1:
            return None if self.contraction >= 1 else 1
        return math.ceil(math.log(tol / distance0) / math.log(self.contraction))


def stability(X: np.ndarray, lr: float, momentum: float = 0.0) -> Stability:
    """Stability limit and contraction of (heavy-ball) gradient descent for this data.

    Along each eigenvector of H the error follows e_{t+1} = (1 + β - lr λ) e_t - β e_{t-1}; it shrinks iff
    the companion matrix [[1 + β - lr λ, -β], [1, 0]] has spectral radius < 1, i.e. iff lr λ < 2 (1 + β).
    With β = 0 the radius is |1 - lr λ| and, H being symmetric, ‖θ_t - θ*‖ <= radius^t ‖θ_0 - θ*‖ exactly.
    """
    lam = np.linalg.eigvalsh(hessian(X))
    radii = [max(abs(np.linalg.eigvals(np.array([[1 + momentum - lr * li, -momentum], [1.0, 0.0]])))) for li in lam]
    return Stability(eigenvalues=lam, lr_max=2 * (1 + momentum) / float(lam[-1]), contraction=float(max(radii)))


def observed_epochs(distances: np.ndarray, tol: float) -> int | None:
    """First epoch (1-based) from which the distance to the optimum stays within tol (None: never)."""
    outside = np.flatnonzero(~(np.asarray(distances) <= tol))
    if len(outside) == 0:
        return 1
    last = int(outside[-1]) + 1  # 1-based epoch of the last excursion
    return last + 1 if last < len(distances) else None


def mse_grid(X: np.ndarray, y: np.ndarray, fit: LineFit, w1: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MSE over a (b, w1) grid, the other weights held at `fit` (a slice through the optimum).

    Expanded in sample moments, so the cost does not grow with N: L = E[(w1 x1 + b - y')^2] with
    y' = y - (other features) @ (their weights).
    """
    X = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
    y_rest = np.asarray(y, dtype=np.float64) - X[:, 1:] @ fit.weights[1:]
    x1 = X[:, 0]
    sxx, sx, sxy, sy, syy = (
        (x1 @ x1) / len(x1),
        x1.mean(),
        (x1 @ y_rest) / len(x1),
        y_rest.mean(),
        (y_rest @ y_rest) / len(x1),
    )
    W, B = np.meshgrid(w1, b)
    Z: np.ndarray = W**2 * sxx + B**2 + syy + 2 * W * B * sx - 2 * W * sxy - 2 * B * sy
    return Z


def mse_gradient(X: np.ndarray, y: np.ndarray, fit: LineFit) -> np.ndarray:
    """Analytic gradient of the MSE at `fit`: (2/N) A^T (A θ - y), as (dL/dw_1, ..., dL/dw_k, dL/db)."""
    A = design(X)
    grad: np.ndarray = 2.0 / len(A) * (A.T @ (A @ fit.params() - np.asarray(y, dtype=np.float64)))
    return grad
