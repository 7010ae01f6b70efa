"""Predictions of the DVC-tracked model (the `model` path of dvc.yaml), from the command line.

    python -m pipeline.predict 1.5 2.0                 # one x per value (the default, one-feature model)
    python -m pipeline.predict 1,0.5,2 3,1,0           # k comma-separated features per value
    python -m pipeline.predict --csv new.csv           # a table with the model's feature columns (x, or x1 ...)
    python -m pipeline.predict --csv new.csv --out predicted.csv
    python -m pipeline.predict --model models:/linear-regression@champion 1.5   # a model in the MLflow store

The output is CSV: the feature columns, then `prediction`. The weights go back into the nn.Linear that train
saved them from, so a prediction is that module's forward pass. Bad input stops with one line naming it, and
--out is written whole or not at all.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline import cli, config, data, tracking
from pipeline.errors import DataError, first_line
from pipeline.io import write_atomic

if TYPE_CHECKING:
    import pandas as pd
    import torch

NEGATIVE = re.compile(r"-\.?\d")  # how a value that is a negative number starts


def load_model(path: str | Path) -> torch.nn.Linear:
    """The nn.Linear(k, 1) whose state_dict train saved as safetensors (no pickle: loading runs no code)."""
    import safetensors.torch
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file (run `dvc repro`, or `dvc pull` from a remote, to make it)")
    try:
        state = safetensors.torch.load(path.read_bytes())
        weight, bias = state["weight"], state["bias"]
        if weight.dim() != 2 or weight.shape[0] != 1 or tuple(bias.shape) != (1,):
            raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} are not nn.Linear(k, 1)'s")
        model = torch.nn.Linear(weight.shape[1], 1, dtype=weight.dtype)
        model.load_state_dict(state)  # strict: a key too many or too few is refused
    except Exception as e:  # any unreadable, foreign or malicious file: say which and why, in one line
        raise DataError(f"{path}: not a model state_dict with weight and bias: {first_line(e)}") from None
    return model.eval()


def load_logged_model(uri: str, store: str) -> torch.nn.Linear:
    """The nn.Linear inside a model the train stage logged, by its MLflow URI (`models:/<model id>`,
    `models:/<name>/<version>`, `models:/<name>@<alias>`), from `store`: its weights file is downloaded and read
    like any other, so the prediction is the same module's forward pass. A URI the store does not know is one line."""
    import tempfile

    from pipeline.tracking_worker import store_lock

    tracking.require_store(store, uri)
    import mlflow.artifacts  # only once there is a store: the refusal above stays quick

    # Through the variable, for this call only: MLflow looks a logged model's ID up in the default store whatever
    # download_artifacts is given, and without it that is a new mlflow.db in this folder.
    settings = {"MLFLOW_TRACKING_URI": store, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tracking.mlflow_settings(settings), store_lock(store):  # an older store's first use migrates it
                local = mlflow.artifacts.download_artifacts(uri, dst_path=tmp, tracking_uri=store, registry_uri=store)
        except Exception as e:  # MLflow's own words for what it could not find, in one line
            raise DataError(f"{uri}: cannot be read from the MLflow store {store}: {first_line(e)}") from None
        weights = sorted(Path(local).glob("artifacts/*.safetensors"))
        if len(weights) != 1:
            raise DataError(f"{uri}: not a model the train stage logged (no single artifacts/*.safetensors)")
        return load_model(weights[0])


def predict(model: torch.nn.Linear, X: np.ndarray) -> np.ndarray:
    """model(X) for X of shape (n, k): one prediction per row, in the model's dtype."""
    import torch

    with torch.no_grad():
        out: np.ndarray = model(torch.tensor(np.asarray(X), dtype=model.weight.dtype)).numpy().reshape(-1)
    return out


def parse_values(values: Sequence[str], columns: Sequence[str]) -> np.ndarray:
    """Command-line values -> (n, k) float64: each value one row, its k features separated by commas."""
    rows = []
    for value in values:
        parts = value.split(",")
        if len(parts) != len(columns):
            raise DataError(
                f"input {value!r}: {len(parts)} number(s), but the model takes {len(columns)} feature(s) "
                f"({','.join(columns)})"
            )
        row = []
        for part in parts:
            try:
                number = float(part)
            except ValueError:
                number = math.nan
            if not math.isfinite(number):
                where = "" if len(parts) == 1 else f"input {value!r}: "
                raise DataError(f"{where}{part.strip()!r} is not a finite number")
            row.append(number)
        rows.append(row)
    return np.array(rows, dtype=np.float64).reshape(len(rows), len(columns))


def read_features(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """A CSV's rows, with at least the model's feature columns, all numbers; other columns are kept."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{path}: not a readable CSV: {first_line(e)}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: no column {missing[0]!r}; the model takes {', '.join(columns)}")
    if frame.empty:
        raise DataError(f"{path}: no rows to predict")
    for c in columns:
        numbers = pd.to_numeric(frame[c], errors="coerce")
        bad = np.flatnonzero(~np.isfinite(numbers.to_numpy(dtype=np.float64)))
        if len(bad):
            # Line numbers as an editor shows them: the header is line 1.
            raise DataError(
                f"{path}: line {bad[0] + 2}, column {c!r}: {frame[c].iloc[bad[0]]!r} is not a finite number"
            )
        frame[c] = numbers.astype(np.float64)
    return frame


def run(args: argparse.Namespace) -> None:
    import pandas as pd

    if bool(args.values) == bool(args.csv):
        raise DataError("give numbers (python -m pipeline.predict 1.5 2.0) or --csv FILE, one of the two")
    if args.out and not args.csv:
        raise DataError("--out goes with --csv; predictions of command-line numbers are printed")
    if args.model and args.model.startswith("models:/"):
        model = load_logged_model(args.model, tracking.tracking_uri(tracking.project_root()))
    else:
        model = load_model(args.model or config.dvc_paths(args.dvc_yaml)["model"])
    columns = data.feature_columns(model.in_features)
    if args.csv:
        frame = read_features(args.csv, columns)
    else:
        frame = pd.DataFrame(parse_values(args.values, columns), columns=columns)
    frame["prediction"] = predict(model, frame[columns].to_numpy())
    if args.out:
        write_atomic(args.out, lambda tmp: frame.to_csv(tmp, index=False, lineterminator="\n"))
        cli.log.info("%d prediction(s) written to %s", len(frame), args.out)
    else:
        frame.to_csv(sys.stdout, index=False, lineterminator="\n")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("values", nargs="*", help="one row per value: x, or x1,...,xk (negative numbers are fine)")
    p.add_argument("--csv", help="CSV file with the model's feature columns")
    p.add_argument("--out", help="write the predictions here (CSV) instead of printing them; needs --csv")
    p.add_argument(
        "--model",
        help="safetensors model file (default: the `model` path in dvc.yaml), or a logged model's models:/ URI, "
        "read from MLFLOW_TRACKING_URI or the project's own store",
    )
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="pipeline file whose `paths` name the model")
    # argparse takes "-1.5" for a number but "-1.5,2" for an unknown option; a leading space (which float()
    # ignores) keeps every value that starts like a negative number positional, in its place.
    argv = [f" {a}" if NEGATIVE.match(a) else a for a in (sys.argv[1:] if argv is None else argv)]
    return cli.run("predict", run, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
