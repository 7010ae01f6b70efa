"""Synthetic data y = X @ true_weights + b_true + noise (pure), and reading/writing tables with clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import GenerateParams
from pipeline.errors import DataError
from pipeline.io import write_atomic


def feature_columns(n_features: int) -> list[str]:
    """`x` for the seed's one-feature problem, else x1 ... xk."""
    return ["x"] if n_features == 1 else [f"x{i}" for i in range(1, n_features + 1)]


def weight_names(n_features: int) -> list[str]:
    """`weight` for the seed's one-feature model, else weight_1 ... weight_k."""
    return ["weight"] if n_features == 1 else [f"weight_{i}" for i in range(1, n_features + 1)]


def trajectory_columns(n_features: int) -> list[str]:
    weights = weight_names(n_features)
    return ["epoch", "loss", *(f"grad_{w}" for w in weights), "grad_bias", *weights, "bias"]


def sample_x(rng: np.random.Generator, dist: str, loc: float, scale: float, n: int | tuple[int, ...]) -> np.ndarray:
    """Independent draws of x: normal(mean=loc, std=scale) or uniform on [loc, loc + scale)."""
    if dist == "normal":
        return rng.normal(loc, scale, n)
    if dist == "uniform":
        return rng.uniform(loc, loc + scale, n)
    raise ValueError(f"unknown x distribution {dist!r}")


def generate(p: GenerateParams) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Draw the data set and split it into (train, test) tables: feature columns, then y (float64)."""
    rng = np.random.default_rng(p.seed)
    X = sample_x(rng, p.x_dist, p.x_loc, p.x_scale, (p.n_samples, p.n_features))
    noise = rng.normal(0.0, p.noise_std, p.n_samples)
    y = X @ np.asarray(p.true_weights) + p.b_true + noise
    table = pd.DataFrame(X, columns=feature_columns(p.n_features))
    table["y"] = y
    # The rows are independent draws, so a split by position is as random as a shuffled one.
    train = table.iloc[: p.n_train].reset_index(drop=True)
    test = table.iloc[p.n_train :].reset_index(drop=True)
    return train, test


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    """Write a table as CSV, atomically."""
    # pandas writes floats in their shortest round-trip form: reading back gives the same float64 bits.
    write_atomic(path, lambda tmp: df.to_csv(tmp, index=False, lineterminator="\n"))


def read_table(path: str | Path) -> pd.DataFrame:
    """Read a table written by write_table, refusing anything but finite numeric x..., y columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (run `dvc repro` to create it)")
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0]
        raise DataError(f"{path}: not a readable CSV table: {first}") from None
    expected = [*feature_columns(max(1, len(df.columns) - 1)), "y"]
    if list(df.columns) != expected:
        raise DataError(f"{path}: expected columns {expected}, found {list(df.columns)}")
    if len(df) == 0:
        raise DataError(f"{path}: table has a header but no rows")
    for col in expected:
        if not pd.api.types.is_float_dtype(df[col]) and not pd.api.types.is_integer_dtype(df[col]):
            raise DataError(f"{path}: column {col!r} is not numeric (dtype {df[col].dtype})")
        values = df[col].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"{path}: column {col!r} has a non-finite value {values[row]} at row {row + 1}")
    return df.astype(np.float64)


def split_xy(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(N, k) features and (N,) targets of a table."""
    return df.drop(columns="y").to_numpy(dtype=np.float64), df["y"].to_numpy(dtype=np.float64)
