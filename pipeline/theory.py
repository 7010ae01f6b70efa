"""What theory says about this problem: the closed-form optimum, its sampling error, and how fast (and
whether) gradient descent gets there. Pure functions of the data; no I/O.

No value here goes through BLAS or LAPACK: numpy's OpenBLAS picks its kernels per CPU, and their sums round
differently in the last bits (pipeline/numerics.py). Sums over rows are numpy's pairwise sums of elementwise
products, in an order fixed by the code; the small (k + 1) x (k + 1) systems are solved in mpmath, whose
software arithmetic rounds the same everywhere. The same bytes then come out on any CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import mpmath
import numpy as np

PRECISION = 30  # decimal digits of mpmath's working precision: well past float64's 16, still fast


def dot(a: Iterable[float] | np.ndarray, b: Iterable[float] | np.ndarray) -> float:
    """a . b for short vectors, exactly rounded (math.fsum): the same on any CPU."""
    return math.fsum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def row_dot(X: np.ndarray, w: np.ndarray) -> np.ndarray:
    """X @ w for an (N, k) table, summed by numpy along each row: no BLAS kernel chooses the order."""
    out: np.ndarray = (np.asarray(X).reshape(len(X), -1) * w).sum(axis=1)
    return out


def _mp(A: np.ndarray) -> mpmath.matrix:
    return mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in np.atleast_2d(A)])


def _floats(v: mpmath.matrix) -> np.ndarray:
    return np.array([float(x) for x in v], dtype=np.float64)


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
        y: np.ndarray = row_dot(X, self.weights) + self.bias
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
            part = cls(len(Z), mean, cross_products(D))
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
        m = dot(self.mean[:-1], fit.weights) + fit.bias - float(self.mean[-1])
        quadratic = dot(np.outer(v, v).ravel(), self.comoment.ravel())  # v^T C v
        return quadratic + self.n * m * m

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


def cross_products(D: np.ndarray) -> np.ndarray:
    """D^T D, each entry a pairwise sum over the rows of one column's product with another's."""
    D = np.asfortranarray(D)  # columns contiguous: numpy sums them pairwise
    k = D.shape[1]
    C = np.empty((k, k))
    for i in range(k):
        for j in range(i + 1):
            C[i, j] = C[j, i] = np.add.reduce(D[:, i] * D[:, j])
    return C


def closed_form(X: np.ndarray, y: np.ndarray) -> LineFit:
    """scikit-learn's least-squares fit: the exact minimiser of the training MSE."""
    from sklearn.linear_model import LinearRegression  # slow to import: only the stages that need it pay

    X = np.asarray(X, dtype=np.float64)
    reg = LinearRegression().fit(X.reshape(len(X), -1), np.asarray(y, dtype=np.float64))
    return LineFit(weights=np.asarray(reg.coef_, dtype=np.float64), bias=float(reg.intercept_))


def least_squares(m: Moments) -> LineFit:
    """The same optimum from the moments: w = C_xx^-1 C_xy, b = mean(y) - mean(x) . w."""
    k = m.k
    with mpmath.workdps(PRECISION):
        w = _floats(mpmath.lu_solve(_mp(m.comoment[:k, :k]), _mp(m.comoment[:k, k : k + 1])))
    return LineFit(weights=w, bias=float(m.mean[k] - dot(m.mean[:k], w)))


def standard_errors(m: Moments, fit: LineFit) -> np.ndarray:
    """Standard error of each weight, then of the bias: sqrt(s^2 [(A^T A)^-1]_ii), with s^2 = SSE / (n - k - 1).

    The weights' block of (A^T A)^-1 is C_xx^-1 (the intercept column centres X), and the bias's entry is
    1/n + x̄ᵀ C_xx^-1 x̄. How far the closed-form parameters are expected to sit from the true ones because of the
    noise alone.
    """
    k = m.k  # config guarantees n > k + 1: s^2 needs n - k - 1 > 0 degrees of freedom
    s2 = m.sse(fit) / (m.n - k - 1)
    with mpmath.workdps(PRECISION):
        inverse = mpmath.inverse(_mp(m.comoment[:k, :k]))
        xbar = [mpmath.mpf(float(v)) for v in m.mean[:k]]
        bias = mpmath.mpf(1) / m.n + mpmath.fsum(xbar[i] * inverse[i, j] * xbar[j] for i in range(k) for j in range(k))
        diagonal = np.array([*(float(inverse[i, i]) for i in range(k)), float(bias)])
    return np.sqrt(s2 * diagonal)


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
    with mpmath.workdps(PRECISION):
        lam = np.sort(_floats(mpmath.eigsy(_mp(hessian(m)), eigvals_only=True)))
        radii = [companion_radius(1 + momentum - lr * li, momentum) for li in lam]
    return Stability(eigenvalues=lam, lr_max=2 * (1 + momentum) / float(lam[-1]), contraction=float(max(radii)))


def companion_radius(a: float, beta: float) -> float:
    """Spectral radius of [[a, -beta], [1, 0]]: the larger |root| of z^2 - a z + beta (complex roots: sqrt(beta))."""
    disc = mpmath.mpf(a) ** 2 - 4 * mpmath.mpf(beta)
    return float((abs(mpmath.mpf(a)) + mpmath.sqrt(disc)) / 2 if disc >= 0 else mpmath.sqrt(beta))


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
    mean_residual = row_dot(V[..., :-1].reshape(-1, m.k), m.mean[:-1]).reshape(W.shape) + B - m.mean[-1]
    quadratic = np.zeros(W.shape)
    for i in range(m.k + 1):  # v^T C v, term by term in a fixed order
        for j in range(m.k + 1):
            quadratic = quadratic + V[..., i] * m.comoment[i, j] * V[..., j]
    Z: np.ndarray = (quadratic + m.n * mean_residual**2) / m.n
    return Z


def mse_gradient(m: Moments, fit: LineFit) -> np.ndarray:
    """Analytic gradient of the MSE at `fit`: (2/N) A^T (A θ - y), as (dL/dw_1, ..., dL/dw_k, dL/db).

    From the moments: dL/dw = (2/N)(C_xx w - C_xy) + 2 r x̄ and dL/db = 2 r, r the mean residual.
    """
    k = m.k
    r = dot(m.mean[:k], fit.weights) + fit.bias - m.mean[k]
    Cw = np.array([dot(m.comoment[i, :k], fit.weights) for i in range(k)])
    grad_w = 2.0 / m.n * (Cw - m.comoment[:k, k]) + 2.0 * r * m.mean[:k]
    return np.append(grad_w, 2.0 * r)
