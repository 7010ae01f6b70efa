"""The closed-form reference: ordinary least squares and the sampling error of its slope. No I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LinearRegression


@dataclass(frozen=True)
class LineFit:
    weight: float
    bias: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.weight * np.asarray(x, dtype=np.float64) + self.bias


def closed_form(x: np.ndarray, y: np.ndarray) -> LineFit:
    """scikit-learn's least-squares line, the minimiser gradient descent should approach."""
    reg = LinearRegression().fit(np.asarray(x, dtype=np.float64).reshape(-1, 1), np.asarray(y, dtype=np.float64))
    return LineFit(weight=float(reg.coef_[0]), bias=float(reg.intercept_))


def slope_standard_error(x: np.ndarray, y: np.ndarray, fit: LineFit) -> float:
    """Standard error of the OLS slope: sqrt(s^2 / sum((x - mean x)^2)), with s^2 = RSS / (n - 2).

    How far the closed-form weight is expected to sit from w_true because of the noise alone.
    """
    x = np.asarray(x, dtype=np.float64)
    n = len(x)  # config guarantees n >= 3: s^2 needs n - 2 > 0 degrees of freedom
    rss = float(np.sum((np.asarray(y, dtype=np.float64) - fit.predict(x)) ** 2))
    sxx = float(np.sum((x - x.mean()) ** 2))
    return math.sqrt(rss / (n - 2) / sxx)
