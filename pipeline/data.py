"""Synthetic data y = X @ true_weights + b_true + noise, and the tables that hold it, with clear errors.

Tables are Parquet files of float32 columns x (or x1 ... xk) and y. Columnar and typed: a table of 1e8 rows
is 0.8 GB, read column by column into one array per column, never through a 1e8-row CSV parser. Every reader
(pandas, polars, DuckDB, Spark) opens it as it is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import GenerateParams
from pipeline.errors import DataError, first_line
from pipeline.io import write_atomic

if TYPE_CHECKING:
    import pandas as pd  # only write_csv's argument: evaluate imports this module without pandas

DTYPE = np.float32  # what the tables store: the training precision by default, half the bytes of float64
CHUNK_ROWS = 1 << 20  # rows drawn, written and checked at a time: memory stays flat whatever N is


def feature_columns(n_features: int) -> list[str]:
    """`x` for the seed's one-feature problem, else x1 ... xk."""
    return ["x"] if n_features == 1 else [f"x{i}" for i in range(1, n_features + 1)]


def weight_names(n_features: int) -> list[str]:
    """`weight` for the seed's one-feature model, else weight_1 ... weight_k."""
    return ["weight"] if n_features == 1 else [f"weight_{i}" for i in range(1, n_features + 1)]


def trajectory_columns(n_features: int) -> list[str]:
    """The trajectory's columns, named here only: the epoch; its loss and gradients, at the parameters before its
    update(s); the parameters after it. loop.fit fills each row in this order."""
    weights = weight_names(n_features)
    return ["epoch", "loss", *(f"grad_{w}" for w in weights), "grad_bias", *weights, "bias"]


@dataclass(frozen=True)
class Table:
    """Features X (N, k) and targets y (N,), both float32."""

    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def columns(self) -> list[str]:
        return [*feature_columns(self.n_features), "y"]


def sample_x(rng: np.random.Generator, dist: str, loc: float, scale: float, n: int | tuple[int, ...]) -> np.ndarray:
    """Independent draws of x: normal(mean=loc, std=scale) or uniform on [loc, loc + scale)."""
    if dist == "normal":
        return rng.normal(loc, scale, n)
    if dist == "uniform":
        return rng.uniform(loc, loc + scale, n)
    raise ValueError(f"unknown x distribution {dist!r}")


def generate_chunks(p: GenerateParams, chunk_rows: int = CHUNK_ROWS) -> Iterator[Table]:
    """All n_samples rows in order, chunk_rows at a time.

    x and the noise come from two streams spawned from the seed, each drawn in order, so the rows do not
    depend on chunk_rows: any chunking gives the same table (tests/test_data.py).
    """
    x_rng, noise_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(p.seed).spawn(2))
    w = np.asarray(p.true_weights, dtype=np.float64)
    for start in range(0, p.n_samples, chunk_rows):
        rows = min(chunk_rows, p.n_samples - start)
        X = sample_x(x_rng, p.x_dist, p.x_loc, p.x_scale, (rows, p.n_features))
        # Summed by numpy in a fixed order, not by BLAS, whose rounding depends on the CPU (pipeline/numerics.py).
        y = (X * w).sum(axis=1) + p.b_true + noise_rng.normal(0.0, p.noise_std, rows)
        yield Table(X.astype(DTYPE), y.astype(DTYPE))


def split(chunks: Iterator[Table], n_first: int) -> Iterator[tuple[int, Table]]:
    """(0, rows) for the first n_first rows, then (1, rows): the rows are independent draws, so a split by
    position is as random as a shuffled one."""
    seen = 0
    for c in chunks:
        cut = min(max(n_first - seen, 0), len(c))
        if cut:
            yield 0, Table(c.X[:cut], c.y[:cut])
        if cut < len(c):
            yield 1, Table(c.X[cut:], c.y[cut:])
        seen += len(c)


def generate(p: GenerateParams) -> tuple[Table, Table]:
    """The (train, test) tables in memory: for tests and small N (the stage streams them to disk)."""
    parts: tuple[list[Table], list[Table]] = ([], [])
    for i, t in split(generate_chunks(p), p.n_train):
        parts[i].append(t)
    return _concat(parts[0], p.n_features), _concat(parts[1], p.n_features)


def _concat(tables: list[Table], k: int) -> Table:
    if not tables:
        return Table(np.empty((0, k), DTYPE), np.empty(0, DTYPE))
    return Table(np.concatenate([t.X for t in tables]), np.concatenate([t.y for t in tables]))


def _schema(k: int) -> pa.Schema:
    return pa.schema([(name, pa.float32()) for name in [*feature_columns(k), "y"]])


def _record_batch(t: Table) -> pa.RecordBatch:
    columns = [pa.array(t.X[:, j]) for j in range(t.n_features)] + [pa.array(t.y)]
    return pa.record_batch(columns, schema=_schema(t.n_features))


def _writer(path: Path, k: int) -> pq.ParquetWriter:
    # Random floats do not compress and gain nothing from dictionaries; both would cost CPU per row.
    return pq.ParquetWriter(path, _schema(k), compression="none", use_dictionary=False)


def write_tables(pieces: Iterator[tuple[int, Table]], paths: Sequence[str | Path], k: int) -> list[int]:
    """Stream (index, rows) pieces into len(paths) Parquet files, each written atomically; returns row counts.

    Each file appears complete or not at all: rows go to hidden temporary files renamed at the end.
    """
    counts = [0] * len(paths)

    def fill(tmps: list[Path]) -> None:
        if len(tmps) < len(paths):  # open the next file inside the previous one's atomic write
            write_atomic(paths[len(tmps)], lambda tmp: fill([*tmps, tmp]))
            return
        writers = [_writer(t, k) for t in tmps]
        try:
            for i, piece in pieces:
                writers[i].write_batch(_record_batch(piece))
                counts[i] += len(piece)
        finally:
            for w in writers:
                w.close()

    fill([])
    return counts


def write_table(table: Table, path: str | Path) -> None:
    """Write one table atomically."""
    write_tables(iter([(0, table)]), (path,), table.n_features)


def _open(path: str | Path) -> tuple[Path, pq.ParquetFile, list[str]]:
    """Open a table written by write_tables and check its columns, naming the file in every error."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (run `dvc repro` to create it)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    try:
        f = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet table: {first_line(e)}") from None
    names = f.schema_arrow.names
    expected = [*feature_columns(max(1, len(names) - 1)), "y"]
    if names != expected:
        raise DataError(f"{path}: expected columns {expected}, found {names}")
    for field in f.schema_arrow:
        if not (pa.types.is_floating(field.type) or pa.types.is_integer(field.type)):
            raise DataError(f"{path}: column {field.name!r} is not numeric (type {field.type})")
    if f.metadata.num_rows == 0:
        raise DataError(f"{path}: table has no rows")
    return path, f, names


def iter_table(path: str | Path) -> Iterator[Table]:
    """The table's rows in order, one row group at a time, checked: no missing or non-finite values."""
    return _row_groups(*_open(path))


def _row_groups(path: Path, f: pq.ParquetFile, names: list[str]) -> Iterator[Table]:
    start = 0
    for g in range(f.num_row_groups):
        try:
            group = f.read_row_group(g)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet table: {first_line(e)}") from None
        columns = []
        for name, col in zip(names, group.columns, strict=True):
            if col.null_count:
                row = start + int(np.argmax(col.is_null().to_numpy(zero_copy_only=False)))
                raise DataError(f"{path}: column {name!r} has a missing value at row {row + 1}")
            values = col.to_numpy().astype(DTYPE, copy=False)
            bad = ~np.isfinite(values)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"{path}: column {name!r} has a non-finite value {values[i]} at row {start + i + 1}")
            columns.append(values)
        yield Table(np.column_stack(columns[:-1]), columns[-1])
        start += group.num_rows


def read_table(path: str | Path) -> Table:
    """The whole table in memory: one float32 array per role, filled row group by row group, so the peak is
    the table itself plus one row group (no second copy of a large table)."""
    path, f, names = _open(path)
    n, k = f.metadata.num_rows, len(names) - 1
    X, y = np.empty((n, k), DTYPE), np.empty(n, DTYPE)
    start = 0
    for t in _row_groups(path, f, names):
        X[start : start + len(t)], y[start : start + len(t)] = t.X, t.y
        start += len(t)
    return Table(X, y)


def count_rows(path: str | Path) -> int:
    return int(_open(path)[1].metadata.num_rows)


def write_csv(frame: pd.DataFrame, path: str | Path) -> None:
    """A small table (the per-epoch trajectory) as CSV, atomically: the format `dvc plots` reads.

    pandas writes floats in their shortest round-trip form: reading back gives the same bits.
    """
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))


def read_trajectory(path: str | Path, n_features: int) -> dict[str, np.ndarray]:
    """The trajectory CSV train wrote, column by column."""
    import pandas as pd  # only here and in write_csv's caller: evaluate reads tables without it

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such trajectory file (run `dvc repro` to create it)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable trajectory CSV: {first_line(e)}") from None
    if list(df.columns) != trajectory_columns(n_features) or len(df) == 0:
        raise DataError(f"{path}: expected a trajectory with columns {trajectory_columns(n_features)}")
    return {c: df[c].to_numpy() for c in df.columns}
