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


@dataclass(frozen=True)
class Moments:
    """Everything the least-squares quantities need from a table, in float64, gathered in one pass.

    n rows, the mean of each column of Z = [X, y], and their co-moment matrix C = sum (z - mean)(z - mean)^T.
    Chunks combine exactly (Chan, Golub & LeVeque's pairwise update), so a table of any size streams through
    in fixed memory, and centring keeps the sums accurate even when x sits far from 0.
    """

    n: int
    mean: np.ndarray  # (k + 1,): x_1 ... x_k, y
    comoment: np.ndarray  # (k + 1, k + 1)

    @classmethod
    def of(cls, X: np.ndarray, y: np.ndarray, chunk_rows: int = 1 << 20) -> Moments:
        """The moments of (X, y), converting chunk_rows rows at a time to float64 (never the whole table)."""
        X = np.asarray(X).reshape(len(X), -1)
        total: Moments | None = None
        for start in range(0, len(X), chunk_rows):
            Z = np.column_stack([X[start : start + chunk_rows], y[start : start + chunk_rows]]).astype(np.float64)
            mean = Z.mean(axis=0)
            D = Z - mean
            part = cls(len(Z), mean, D.T @ D)
            total = part if total is None else total.merge(part)
        if total is None:
            raise ValueError("no rows")
        return total

    def merge(self, other: Moments) -> Moments:
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        comoment = self.comoment + other.comoment + np.outer(delta, delta) * (self.n * other.n / n)
        return Moments(n, mean, comoment)

    @property
    def k(self) -> int:
        return len(self.mean) - 1

    def sse(self, fit: LineFit) -> float:
        """Sum of squared residuals of `fit`: v^T C v + n m^2, with v = (w, -1) and m the mean residual."""
        v = np.append(fit.weights, -1.0)
        m = float(self.mean[:-1] @ fit.weights + fit.bias - self.mean[-1])
        return float(v @ self.comoment @ v) + self.n * m * m

    def mse(self, fit: LineFit) -> float:
        return self.sse(fit) / self.n

    def r2(self, fit: LineFit) -> float:
        """1 - SSE / SST, SST being the spread of y around its mean (scikit-learn's r2_score)."""
        return 1.0 - self.sse(fit) / float(self.comoment[-1, -1])

    def gram(self) -> np.ndarray:
        """A^T A for the design A = [X, 1], rebuilt from the centred sums."""
        k, xbar = self.k, self.mean[:-1]
        G = np.empty((k + 1, k + 1))
        G[:k, :k] = self.comoment[:k, :k] + self.n * np.outer(xbar, xbar)
        G[:k, k] = G[k, :k] = self.n * xbar
        G[k, k] = self.n
        return G


def closed_form(X: np.ndarray, y: np.ndarray) -> LineFit:
    """scikit-learn's least-squares fit: the exact minimiser of the training MSE."""
    from sklearn.linear_model import LinearRegression  # 1 s to import: only the stages that need it pay

    X = np.asarray(X, dtype=np.float64)
    reg = LinearRegression().fit(X.reshape(len(X), -1), np.asarray(y, dtype=np.float64))
    return LineFit(weights=np.asarray(reg.coef_, dtype=np.float64), bias=float(reg.intercept_))


def least_squares(m: Moments) -> LineFit:
    """The same optimum from the moments: w = C_xx^-1 C_xy, b = mean(y) - mean(x) . w."""
    k = m.k
    w = np.linalg.solve(m.comoment[:k, :k], m.comoment[:k, k])
    return LineFit(weights=w, bias=float(m.mean[k] - m.mean[:k] @ w))


def standard_errors(m: Moments, fit: LineFit) -> np.ndarray:
    """Standard error of each weight: sqrt(s^2 [(A^T A)^-1]_ii), with s^2 = SSE / (n - k - 1).

    The weights' block of (A^T A)^-1 is C_xx^-1 (the intercept column centres X). How far the closed-form
    weights are expected to sit from the true ones because of the noise alone.
    """
    k = m.k  # config guarantees n > k + 1: s^2 needs n - k - 1 > 0 degrees of freedom
    s2 = m.sse(fit) / (m.n - k - 1)
    return np.sqrt(s2 * np.diag(np.linalg.inv(m.comoment[:k, :k])))


def hessian(m: Moments) -> np.ndarray:
    """Hessian of L(w, b) = mean((A θ - y)^2): H = (2/N) A^T A, the same at every point (L is quadratic)."""
    H: np.ndarray = 2.0 / m.n * m.gram()
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


def stability(m: Moments, lr: float, momentum: float = 0.0) -> Stability:
    """Stability limit and contraction of (heavy-ball) gradient descent for this data.

    Along each eigenvector of H the error follows e_{t+1} = (1 + β - lr λ) e_t - β e_{t-1}; it shrinks iff
    the companion matrix [[1 + β - lr λ, -β], [1, 0]] has spectral radius < 1, i.e. iff lr λ < 2 (1 + β).
    With β = 0 the radius is |1 - lr λ| and, H being symmetric, ‖θ_t - θ*‖ <= radius^t ‖θ_0 - θ*‖ exactly.
    """
    lam = np.linalg.eigvalsh(hessian(m))
    radii = [max(abs(np.linalg.eigvals(np.array([[1 + momentum - lr * li, -momentum], [1.0, 0.0]])))) for li in lam]
    return Stability(eigenvalues=lam, lr_max=2 * (1 + momentum) / float(lam[-1]), contraction=float(max(radii)))


def observed_epochs(distances: np.ndarray, tol: float) -> int | None:
    """First epoch (1-based) from which the distance to the optimum stays within tol (None: never)."""
    outside = np.flatnonzero(~(np.asarray(distances) <= tol))
    if len(outside) == 0:
        return 1
    last = int(outside[-1]) + 1  # 1-based epoch of the last excursion
    return last + 1 if last < len(distances) else None


def mse_grid(m: Moments, fit: LineFit, w1: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MSE over a (b, w1) grid, the other weights held at `fit` (a slice through the optimum).

    From the moments, so the cost does not grow with N.
    """
    W, B = np.meshgrid(w1, b)
    V = np.empty((*W.shape, m.k + 1))
    V[..., 0], V[..., 1:-1], V[..., -1] = W, fit.weights[1:], -1.0
    mean_residual = V[..., :-1] @ m.mean[:-1] + B - m.mean[-1]
    Z: np.ndarray = (np.einsum("...i,ij,...j->...", V, m.comoment, V) + m.n * mean_residual**2) / m.n
    return Z


def mse_gradient(m: Moments, fit: LineFit) -> np.ndarray:
    """Analytic gradient of the MSE at `fit`: (2/N) A^T (A θ - y), as (dL/dw_1, ..., dL/dw_k, dL/db).

    From the moments: dL/dw = (2/N)(C_xx w - C_xy) + 2 r x̄ and dL/db = 2 r, r the mean residual.
    """
    k = m.k
    r = float(m.mean[:k] @ fit.weights + fit.bias - m.mean[k])
    grad_w = 2.0 / m.n * (m.comoment[:k, :k] @ fit.weights - m.comoment[:k, k]) + 2.0 * r * m.mean[:k]
    return np.append(grad_w, 2.0 * r)
