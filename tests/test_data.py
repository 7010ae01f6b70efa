"""The generator: deterministic, with the statistics it was asked for; tables that round-trip or fail clearly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import config, data
from pipeline.data import DataError


def test_same_params_give_byte_identical_files(cfg: config.Config, tmp_path: Path) -> None:
    for run in ("a", "b"):
        train, test = data.generate(cfg.generate)
        data.write_table(train, tmp_path / run / "train.csv")
        data.write_table(test, tmp_path / run / "test.csv")
    for name in ("train.csv", "test.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_other_seed_gives_other_data(cfg: config.Config) -> None:
    a, _ = data.generate(cfg.generate)
    b, _ = data.generate(dataclasses.replace(cfg.generate, seed=cfg.generate.seed + 1))
    assert not np.array_equal(a["x"], b["x"])


def test_tables_round_trip_exactly(cfg: config.Config, tmp_path: Path) -> None:
    train, _ = data.generate(cfg.generate)
    data.write_table(train, tmp_path / "t.csv")
    back = data.read_table(tmp_path / "t.csv")
    assert np.array_equal(back.to_numpy(), train.to_numpy())  # bit for bit, not approximately


def test_split_sizes(cfg: config.Config) -> None:
    train, test = data.generate(cfg.generate)
    assert len(train) == cfg.generate.n_train and len(test) == cfg.generate.n_test


@pytest.mark.parametrize("dist", ["normal", "uniform"])
def test_generated_statistics_match_the_params(cfg: config.Config, dist: str) -> None:
    n = 200_000
    p = dataclasses.replace(
        cfg.generate, n_samples=n, x_dist=dist, x_loc=1.5, x_scale=2.0, true_weights=[-2.0], b_true=0.5, noise_std=0.3
    )
    train, test = data.generate(p)
    df = pd.concat([train, test])
    x, y = df["x"].to_numpy(), df["y"].to_numpy()
    # Expected mean and standard deviation of x for each distribution, from their definitions.
    mean, std = (1.5, 2.0) if dist == "normal" else (1.5 + 2.0 / 2, 2.0 / math.sqrt(12))
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(n)
    assert abs(x.std() - std) < 0.01 * std
    if dist == "uniform":
        assert x.min() >= 1.5 and x.max() < 3.5
    noise = y - (-2.0 * x + 0.5)  # what remains once the true line is removed is the noise
    assert abs(noise.mean()) < 5 * 0.3 / math.sqrt(n)
    assert abs(noise.std() - 0.3) < 0.01 * 0.3
    assert abs(np.corrcoef(x, noise)[0, 1]) < 5 / math.sqrt(n)


def test_zero_noise_puts_every_point_on_the_line(cfg: config.Config) -> None:
    train, _ = data.generate(dataclasses.replace(cfg.generate, noise_std=0.0))
    assert np.allclose(train["y"], cfg.generate.true_weights[0] * train["x"] + cfg.generate.b_true, rtol=0, atol=1e-12)


def test_several_features_are_independent_columns_with_their_own_weights(cfg: config.Config) -> None:
    n = 100_000
    p = dataclasses.replace(cfg.generate, n_samples=n, true_weights=[1.0, -2.0, 0.5], noise_std=0.2)
    train, test = data.generate(p)
    assert list(train.columns) == ["x1", "x2", "x3", "y"]
    X, y = data.split_xy(pd.concat([train, test]))
    assert np.all(np.abs(np.corrcoef(X.T) - np.eye(3)) < 5 / math.sqrt(n))
    noise = y - X @ np.array([1.0, -2.0, 0.5])
    assert abs(noise.std() - 0.2) < 0.01 * 0.2


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("", "file is empty"),
        ("x,y\n", "header but no rows"),
        ("a,b\n1,2\n", "expected columns ['x', 'y']"),
        ("x,y\n1,abc\n", "column 'y' is not numeric"),
        ("x,y\n1,2\n3,nan\n", "non-finite value nan at row 2"),
        ("x,y\n1,inf\n", "non-finite value inf at row 1"),
        ("x,y\n1,2\n3\n4,5,6\n", "not a readable CSV"),
        ("x,y\n1.5,2.25\n3.0", "non-finite value nan at row 2"),  # truncated mid-row
        ("x,y\n1,2\n3,4\n5,", "non-finite value nan at row 3"),  # truncated after a comma
        ("x,z\n1,2\n", "expected columns ['x', 'y']"),
        ("x1,x3,y\n1,2,3\n", "expected columns ['x1', 'x2', 'y']"),
    ],
)
def test_bad_tables_are_refused_naming_path_and_problem(tmp_path: Path, content: str, fragment: str) -> None:
    path = tmp_path / "train.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        data.read_table(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value)


def test_binary_garbage_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 50)
    with pytest.raises(DataError) as err:
        data.read_table(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_missing_table_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        data.read_table(tmp_path / "absent.csv")
