"""DVC stage `evaluate`: learned line vs scikit-learn's closed form -> metrics JSON, PNG plots, same MLflow run."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sklearn.metrics import mean_squared_error, r2_score

from pipeline import cli, config, data, plots, theory, tracking
from pipeline.config import GenerateParams
from pipeline.io import md5_file, write_bytes_atomic, write_text_atomic
from pipeline.loop import TRAJECTORY_COLUMNS
from pipeline.theory import LineFit


def load_line(path: str | Path) -> LineFit:
    """The trained nn.Linear(1, 1) as a LineFit; weights_only=True refuses pickled code."""
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: no such model file (run `dvc repro` to create it)")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        return LineFit(weight=float(state["weight"].reshape(-1)[0]), bias=float(state["bias"].reshape(-1)[0]))
    except Exception as e:  # any unreadable, foreign or malicious file: say which and why, in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise data.DataError(f"{path}: not a model state_dict with weight and bias: {first}") from None


def read_trajectory(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise data.DataError(f"{path}: no such trajectory file (run `dvc repro` to create it)")
    df = pd.read_csv(path)
    if tuple(df.columns) != TRAJECTORY_COLUMNS or len(df) == 0:
        raise data.DataError(f"{path}: expected a trajectory with columns {list(TRAJECTORY_COLUMNS)}")
    return df


def compute_metrics(p: GenerateParams, learned: LineFit, train: pd.DataFrame, test: pd.DataFrame) -> dict[str, Any]:
    """Every number the evaluation reports, nested by topic (DVC flattens it as `topic.key`)."""
    ols = theory.closed_form(train["x"].to_numpy(), train["y"].to_numpy())
    se = theory.slope_standard_error(train["x"].to_numpy(), train["y"].to_numpy(), ols)

    def scores(df: pd.DataFrame) -> dict[str, float]:
        out = {}
        for name, line in (("learned", learned), ("closed_form", ols)):
            pred = line.predict(df["x"].to_numpy())
            out[f"mse_{name}"] = float(mean_squared_error(df["y"], pred))
            out[f"r2_{name}"] = float(r2_score(df["y"], pred))
        return out

    return {
        "weight": {"true": p.w_true, "learned": learned.weight, "closed_form": ols.weight},
        "bias": {"true": p.b_true, "learned": learned.bias, "closed_form": ols.bias},
        # How far gradient descent stopped from the exact minimiser of the training loss.
        "optimisation_gap": {"weight": abs(learned.weight - ols.weight), "bias": abs(learned.bias - ols.bias)},
        # How far the exact minimiser sits from the truth because of the noise; compare with its standard error.
        "statistical_error": {"weight": abs(ols.weight - p.w_true), "weight_se": se},
        "train": scores(train),
        "test": scores(test),
    }


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = float(value)
    return out


def evaluate(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    train = data.read_table(args.train_data)
    test = data.read_table(args.test_data)
    learned = load_line(args.model)
    trajectory = read_trajectory(args.trajectory)
    tracker = tracking.connect(cfg.tracking.experiment)

    metrics = compute_metrics(cfg.generate, learned, train, test)
    closed = LineFit(metrics["weight"]["closed_form"], metrics["bias"]["closed_form"])
    true = LineFit(cfg.generate.w_true, cfg.generate.b_true)
    x_tr, y_tr, x_te, y_te = (df[c].to_numpy() for df in (train, test) for c in ("x", "y"))
    epochs = trajectory["epoch"].to_numpy()
    figures = {
        "fit.png": plots.fit_plot(x_tr, y_tr, x_te, y_te, {"learned": learned, "closed form": closed, "true": true}),
        "loss.png": plots.loss_plot(epochs, trajectory["loss"].to_numpy(), metrics["train"]["mse_closed_form"]),
        "params.png": plots.params_plot(
            epochs, trajectory["weight"].to_numpy(), trajectory["bias"].to_numpy(), closed, true
        ),
    }

    write_text_atomic(args.metrics, json.dumps(metrics, indent=2) + "\n")
    plot_dir = Path(args.plots)
    for name, png in figures.items():
        write_bytes_atomic(plot_dir / name, png)

    # Add to the run that trained this model; a store that never saw it (another URI) gets a run of its own.
    model_md5 = md5_file(args.model)
    run_id = tracker.find_run(model_md5)
    if run_id is None:
        cli.log.warning("no MLflow run trained model %s in %s; starting a new run", model_md5, tracker.uri)
    with tracker.run(run_id=run_id) as rid:
        if run_id is None:
            tracker.set_tags(rid, tracking.provenance_tags("evaluate") | {tracking.MODEL_TAG: model_md5})
        tracker.log_metrics(rid, flatten(metrics))
        tracker.log_artifact(rid, args.metrics)
        for name in figures:
            tracker.log_artifact(rid, plot_dir / name, "plots")
    cli.log.info(
        "learned w=%.6f b=%.6f; closed form w=%.6f b=%.6f; true w=%g b=%g",
        learned.weight,
        learned.bias,
        closed.weight,
        closed.bias,
        true.weight,
        true.bias,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--train-data", required=True, help="train table (CSV)")
    p.add_argument("--test-data", required=True, help="test table (CSV)")
    p.add_argument("--model", required=True, help="trained state_dict")
    p.add_argument("--trajectory", required=True, help="per-epoch trajectory (CSV)")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--plots", required=True, help="folder for the PNG plots")
    return cli.run("evaluate", evaluate, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
