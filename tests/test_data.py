"""The generator: deterministic, with the statistics it was asked for; tables that round-trip or fail clearly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config, data
from pipeline.data import DataError


def write_generated(p: config.GenerateParams, folder: Path) -> tuple[Path, Path]:
    """What the generate stage does: stream the chunks into the two tables."""
    paths = folder / "train.parquet", folder / "test.parquet"
    data.write_tables(data.split(data.generate_chunks(p), p.n_train), paths, p.n_features)
    return paths


def test_same_params_give_byte_identical_files(cfg: config.Config, tmp_path: Path) -> None:
    a, b = write_generated(cfg.generate, tmp_path / "a"), write_generated(cfg.generate, tmp_path / "b")
    for first, second in zip(a, b, strict=True):
        assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("chunk_rows", [1, 7, 64])
def test_rows_do_not_depend_on_the_chunk_size(cfg: config.Config, chunk_rows: int) -> None:
    p = dataclasses.replace(cfg.generate, n_samples=300, true_weights=[1.0, 2.0])
    whole = next(data.generate_chunks(p, chunk_rows=p.n_samples))
    parts = list(data.generate_chunks(p, chunk_rows=chunk_rows))
    assert np.array_equal(np.concatenate([t.X for t in parts]), whole.X)
    assert np.array_equal(np.concatenate([t.y for t in parts]), whole.y)


def test_other_seed_gives_other_data(cfg: config.Config) -> None:
    a, _ = data.generate(cfg.generate)
    b, _ = data.generate(dataclasses.replace(cfg.generate, seed=cfg.generate.seed + 1))
    assert not np.array_equal(a.X, b.X)


def test_tables_round_trip_exactly_and_open_in_pandas(cfg: config.Config, tmp_path: Path) -> None:
    p = dataclasses.replace(cfg.generate, n_samples=5000, true_weights=[1.0, 2.0])
    train, test = data.generate(p)
    paths = write_generated(p, tmp_path)
    for table, path in zip((train, test), paths, strict=True):
        back = data.read_table(path)
        assert back.X.dtype == np.float32 and np.array_equal(back.X, table.X) and np.array_equal(back.y, table.y)
        df = pd.read_parquet(path)  # any Parquet reader sees the same table
        assert list(df.columns) == ["x1", "x2", "y"] and np.array_equal(
            df.to_numpy(), np.column_stack([table.X, table.y])
        )


def test_a_table_is_read_in_row_groups_without_changing_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    table = data.Table(rng.normal(size=(1000, 1)).astype(np.float32), rng.normal(size=1000).astype(np.float32))
    pieces = [(0, data.Table(table.X[i : i + 300], table.y[i : i + 300])) for i in range(0, 1000, 300)]
    data.write_tables(iter(pieces), [tmp_path / "t.parquet"], 1)
    groups = list(data.iter_table(tmp_path / "t.parquet"))
    assert [len(g) for g in groups] == [300, 300, 300, 100]
    back = data.read_table(tmp_path / "t.parquet")
    assert np.array_equal(back.X, table.X) and np.array_equal(back.y, table.y)


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
    x = np.concatenate([train.X[:, 0], test.X[:, 0]]).astype(np.float64)
    y = np.concatenate([train.y, test.y]).astype(np.float64)
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
    line = cfg.generate.true_weights[0] * train.X[:, 0].astype(np.float64) + cfg.generate.b_true
    np.testing.assert_allclose(train.y, line, rtol=1e-6)  # up to float32 rounding of x and y


def test_several_features_are_independent_columns_with_their_own_weights(cfg: config.Config) -> None:
    n = 100_000
    p = dataclasses.replace(cfg.generate, n_samples=n, true_weights=[1.0, -2.0, 0.5], noise_std=0.2)
    train, test = data.generate(p)
    assert train.columns == ["x1", "x2", "x3", "y"]
    X = np.concatenate([train.X, test.X]).astype(np.float64)
    y = np.concatenate([train.y, test.y]).astype(np.float64)
    assert np.all(np.abs(np.corrcoef(X.T) - np.eye(3)) < 5 / math.sqrt(n))
    noise = y - X @ np.array([1.0, -2.0, 0.5])
    assert abs(noise.std() - 0.2) < 0.01 * 0.2


def parquet(path: Path, **columns: object) -> Path:
    """A Parquet file with these columns, written by pyarrow directly (not by the code under test)."""
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


@pytest.mark.parametrize(
    ("columns", "fragment"),
    [
        ({"x": pa.array([], pa.float32()), "y": pa.array([], pa.float32())}, "table has no rows"),
        ({"a": [1.0, 2.0], "b": [2.0, 3.0]}, "expected columns ['x', 'y']"),
        ({"x": [1.0, 2.0], "z": [2.0, 3.0]}, "expected columns ['x', 'y']"),
        ({"x1": [1.0], "x3": [2.0], "y": [3.0]}, "expected columns ['x1', 'x2', 'y']"),
        ({"x": [1.0, 2.0], "y": ["1", "abc"]}, "column 'y' is not numeric"),
        ({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, float("nan")]}, "non-finite value nan at row 3"),  # 2nd row group
        ({"x": [1.0, float("inf")], "y": [1.0, 2.0]}, "column 'x' has a non-finite value inf at row 2"),
        ({"x": [1.0, 2.0, 3.0], "y": [1.0, None, 2.0]}, "column 'y' has a missing value at row 2"),
    ],
)
def test_bad_tables_are_refused_naming_path_and_problem(tmp_path: Path, columns: dict, fragment: str) -> None:  # type: ignore[type-arg]
    path = parquet(tmp_path / "train.parquet", **columns)
    with pytest.raises(DataError) as err:
        data.read_table(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "file is empty"),
        (b"x,y\n1,2\n", "not a readable Parquet table"),  # a CSV under the Parquet name
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 50, "not a readable Parquet table"),
    ],
)
def test_files_that_are_not_parquet_are_refused_in_one_line(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "train.parquet"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        data.read_table(path)
    assert str(err.value).startswith(f"{path}: ") and fragment in str(err.value) and "\n" not in str(err.value)


def test_truncated_table_is_refused_in_one_line(cfg: config.Config, tmp_path: Path) -> None:
    path, _ = write_generated(cfg.generate, tmp_path)
    whole = path.read_bytes()
    for cut in (len(whole) // 2, len(whole) - 3):
        path.write_bytes(whole[:cut])
        with pytest.raises(DataError) as err:
            data.read_table(path)
        assert str(err.value).startswith(f"{path}: not a readable Parquet table") and "\n" not in str(err.value)


def test_missing_table_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such data file"):
        data.read_table(tmp_path / "absent.parquet")
