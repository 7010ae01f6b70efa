"""DVC stage `evaluate`: learned model vs scikit-learn's closed form -> metrics JSON, the held-out loss per epoch,
PNG plots, same MLflow run."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy

from pipeline import cli, config, data, record, theory, tracking
from pipeline.config import GenerateParams
from pipeline.data import weight_names
from pipeline.errors import DataError, first_line
from pipeline.io import md5_dir, md5_file, write_bytes_atomic, write_text_atomic
from pipeline.theory import LineFit


def load_line(path: str | Path) -> LineFit:
    """The trained nn.Linear(k, 1) as a LineFit, read from safetensors: no pickle, so no code can run.

    safetensors.numpy also spares this stage the import of torch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such model file (run `dvc repro` to create it)")
    try:
        state = safetensors.numpy.load(path.read_bytes())
        weights = state["weight"].astype(np.float64).reshape(-1)
        return LineFit(weights=weights, bias=float(state["bias"].reshape(-1)[0]))
    except Exception as e:  # any unreadable, foreign or malicious file: say which and why, in one line
        raise DataError(f"{path}: not a model state_dict with weight and bias: {first_line(e)}") from None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        out: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read JSON: {e}") from None
    return out


SKLEARN_MAX_ROWS = 10_000_000  # above this, a float64 copy for scikit-learn would break the memory target


@dataclass(frozen=True)
class Scan:
    """One streaming pass over a table: its moments and an evenly spaced sample of rows to plot."""

    moments: theory.Moments
    sample: data.Table


def scan(path: str | Path, max_rows: int) -> Scan:
    """Read a table one row group at a time: memory stays flat whatever its size. The sample has at most
    max_rows rows (as many as a scatter plot draws)."""
    step = max(1, -(-data.count_rows(path) // max_rows))
    total: theory.Moments | None = None
    picked: list[data.Table] = []
    start = 0
    for t in data.iter_table(path):
        m = theory.Moments.of(t.X, t.y)
        total = m if total is None else total.merge(m)
        first = (-start) % step  # rows 0, step, 2 step, ... of the whole table
        picked.append(data.Table(t.X[first::step], t.y[first::step]))
        start += len(t)
    assert total is not None  # data.iter_table refuses a table without rows
    return Scan(total, data.Table(np.concatenate([t.X for t in picked]), np.concatenate([t.y for t in picked])))


SKLEARN_AGREEMENT = 1e-9  # largest gap allowed between scikit-learn's answer and the moments', per unit of size


def reference_fit(path: str | Path, moments: theory.Moments) -> tuple[LineFit, float | None]:
    """The closed form and how far scikit-learn's LinearRegression is from it (None above SKLEARN_MAX_ROWS).

    The closed form written is the least-squares solution from the float64 moments (theory.least_squares),
    the same bytes on any CPU; scikit-learn's own last digits depend on the CPU (its LAPACK is OpenBLAS,
    pipeline/numerics.py), so it is the check, to SKLEARN_AGREEMENT. Above SKLEARN_MAX_ROWS a float64 copy
    for scikit-learn would break the memory target, and the moments stand alone (tests/test_theory.py holds
    them to numpy.linalg.lstsq as well)."""
    fit = theory.least_squares(moments)
    if moments.n > SKLEARN_MAX_ROWS:
        cli.log.info(
            "closed form from float64 moments only: %d rows is more than scikit-learn gets a copy of", moments.n
        )
        return fit, None
    t = data.read_table(path)
    gap = float(np.max(np.abs(theory.closed_form(t.X, t.y).params() - fit.params())))
    cli.log.debug("closed form from moments; scikit-learn LinearRegression on %d rows differs by %.3g", moments.n, gap)
    if gap > SKLEARN_AGREEMENT * (1.0 + float(np.max(np.abs(fit.params())))):
        raise DataError(
            f"{path}: scikit-learn's least-squares fit and the moments' differ by {gap:.3g}: the features are too "
            "close to collinear for a float64 closed form"
        )
    return fit, gap


def compute_metrics(
    p: GenerateParams, learned: LineFit, ols: LineFit, train: theory.Moments, test: theory.Moments
) -> dict[str, Any]:
    """Every number the evaluation reports, nested by topic (DVC flattens it as `topic.key`)."""
    se = theory.standard_errors(train, ols)
    names = weight_names(len(ols.weights))
    true_w = np.asarray(p.true_weights)

    def scores(m: theory.Moments) -> dict[str, float]:
        out = {}
        for name, line in (("learned", learned), ("closed_form", ols)):
            out[f"mse_{name}"] = m.mse(line)
            out[f"r2_{name}"] = m.r2(line)
        return out

    coefficients = {
        n: {"true": float(true_w[i]), "learned": float(learned.weights[i]), "closed_form": float(ols.weights[i])}
        for i, n in enumerate(names)
    }
    return {
        **coefficients,
        "bias": {"true": p.b_true, "learned": learned.bias, "closed_form": ols.bias},
        # How far gradient descent stopped from the exact minimiser of the training loss.
        "optimisation_gap": {
            **{n: abs(float(learned.weights[i] - ols.weights[i])) for i, n in enumerate(names)},
            "bias": abs(learned.bias - ols.bias),
        },
        # How far the exact minimiser sits from the truth because of the noise; compare with its standard error.
        "statistical_error": {
            **{n: abs(float(ols.weights[i] - true_w[i])) for i, n in enumerate(names)},
            "bias": abs(ols.bias - p.b_true),
            **{f"{n}_se": float(se[i]) for i, n in enumerate([*names, "bias"])},
        },
        "train": scores(train),
        "test": scores(test),
    }


SE_LIMIT = 3.0  # the closed form may sit this many standard errors from the truth: what CI asserts of the weight
MSE_MARGIN = 0.01  # the learned line's test MSE may exceed the closed form's by this fraction


@dataclass(frozen=True)
class Verdict:
    """The gate's outcome: its numbers (metrics.json's `gate`) and why it failed (none when it passed)."""

    numbers: dict[str, float | bool]
    reasons: list[str]


def gate(metrics: dict[str, Any], tolerance: float) -> Verdict:
    """Whether this model may become the registered model's @champion: the checks CI makes of a run, on
    metrics.json's numbers. `tolerance` is the train stage's convergence tolerance (train.json).

    1. optimisation: the learned parameters within `tolerance` of the closed form (their Euclidean distance);
    2. statistics: the closed form within SE_LIMIT standard errors of the true value, parameter by parameter;
    3. generalization: the learned line's test MSE at most (1 + MSE_MARGIN) times the closed form's.
    Plain Python arithmetic on numbers that are the same bytes on any CPU, so the verdict is too."""
    gap, err = metrics["optimisation_gap"], metrics["statistical_error"]
    distance = math.sqrt(math.fsum(v * v for v in gap.values()))
    z = {n: err[n] / err[f"{n}_se"] if err[f"{n}_se"] > 0 else (0.0 if err[n] == 0 else math.inf) for n in gap}
    worst = max(z, key=lambda n: z[n])
    learned_mse, closed_mse = metrics["test"]["mse_learned"], metrics["test"]["mse_closed_form"]
    # An exact fit (noise-free data) has a closed-form test MSE of 0, or a rounding error either side of it.
    ratio = learned_mse / closed_mse if closed_mse > 0 else (1.0 if learned_mse <= 0 else math.inf)
    reasons = []
    if distance > tolerance:
        reasons.append(f"learned parameters {distance:.3g} from the closed form, beyond the tolerance {tolerance:g}")
    if z[worst] > SE_LIMIT:
        reasons.append(f"closed-form {worst} {z[worst]:.3g} standard errors from the truth, beyond {SE_LIMIT:g}")
    if ratio > 1 + MSE_MARGIN:
        reasons.append(f"test MSE {ratio:.4g} times the closed form's, beyond {1 + MSE_MARGIN:g}")
    numbers = {"passed": not reasons, "distance": distance, "max_z": z[worst], "test_mse_ratio": ratio}
    return Verdict(numbers, reasons)


def held_out_loss(trajectory: dict[str, np.ndarray], init: dict[str, float], test: theory.Moments) -> np.ndarray:
    """The test MSE of each epoch, at the parameters its training loss was measured at: the start for epoch 1, then
    those the trajectory records after the epoch before (with mini-batches the training loss is the mean over
    the epoch's moving parameters, so the two differ by the epoch's progress). From the moments: no pass over the
    table, and the same bytes on any CPU. Shown beside the training loss; nothing is decided from it."""
    names = [*weight_names(test.k), "bias"]
    start = np.array([init[n] for n in names], dtype=np.float64)
    after = np.column_stack([trajectory[n] for n in names]).astype(np.float64)
    before = np.vstack([start, after[:-1]])
    return np.array([test.mse(LineFit(weights=p[:-1], bias=float(p[-1]))) for p in before])


def curve_csv(epochs: np.ndarray, values: np.ndarray, name: str) -> str:
    """`epoch,<name>` rows, each value in Python's shortest round-trip form (its exact float64)."""
    return f"epoch,{name}\n" + "".join(f"{int(e)},{float(v)!r}\n" for e, v in zip(epochs, values, strict=True))


def evaluate(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    g = cfg.generate
    # First, so that the worker's start-up (it imports MLflow) overlaps all that follows; a server that does not
    # answer fails here. Leaving the block stops a worker that never got a run (the inputs failed their checks).
    with tracking.connect(cfg.tracking.experiment) as tracker:
        from pipeline import plots  # the one deferred import: matplotlib, while the worker imports MLflow

        train, test = scan(args.train_data, plots.MAX_POINTS), scan(args.test_data, plots.MAX_POINTS)
        learned = load_line(args.model)
        k = len(learned.weights)
        if train.moments.k != k or test.moments.k != k:
            raise DataError(f"{args.model}: has {k} weight(s), the tables have {train.moments.k} feature column(s)")
        trajectory, report = data.read_trajectory(args.trajectory, k), read_json(args.train_metrics)

        closed, sklearn_gap = reference_fit(args.train_data, train.moments)  # reads the table for scikit-learn
        metrics = compute_metrics(g, learned, closed, train.moments, test.moments)
        verdict = gate(metrics, report["convergence"]["tolerance"])
        metrics["gate"] = verdict.numbers
        test_loss = held_out_loss(trajectory, report["init"], test.moments)
        lines = {"learned": learned, "closed form": closed, "true": LineFit(np.asarray(g.true_weights), g.b_true)}
        pngs = plots.figures(train.moments, train.sample, test.sample, trajectory, test_loss, report, lines)
        write_outputs(args, metrics, curve_csv(trajectory["epoch"], test_loss, "test_loss"), pngs)

        # Add to the run that trained this model; a store that never saw it (another URI) gets a run of its own.
        model_md5, data_md5, test_md5 = md5_file(args.model), md5_file(args.train_data), md5_file(args.test_data)
        tested = record.dataset(args.test_data, test_md5, test.moments.n, k, name="test")
        # Each output's md5 as dvc.lock records it, for `make verify` to compare with a rebuild.
        written = {args.metrics: md5_file(args.metrics), args.test_loss: md5_file(args.test_loss)}
        outputs = {args.test_data: test_md5, **written, args.plots: md5_dir(args.plots)}
        with tracker.run(record.run_name(cfg), attach_to_model=model_md5, tags_if_new=record.evaluate_tags(cfg.source)):
            scores = record.eval_metrics(metrics, sklearn_gap)
            tracker.log_metrics({key: v for key, v in scores.items() if key not in record.MODEL_METRICS})
            tracker.log_dataset(**tested)
            tracker.log_model_metrics({key: scores[key] for key in record.MODEL_METRICS}, tested)
            tracker.log_series({"test_loss": (trajectory["epoch"], test_loss)})  # beside train's `loss`, step = epoch
            note = record.description(metrics, report, data_md5, model_md5, verdict.reasons, cfg.source)
            tracker.describe(note)
            tracker.set_tags({record.GATE_TAG: record.gate_verdict(verdict.reasons)})
            tracker.set_tags(record.output_tags(outputs))
            if cfg.tracking.registered_model is not None:
                tracker.crown(cfg.tracking.registered_model, verdict.reasons)
            tracker.log_artifact(args.metrics)
            for name in pngs:
                tracker.log_artifact(Path(args.plots) / name, "plots")
    show(lines, k)


def write_outputs(args: argparse.Namespace, metrics: dict[str, Any], test_loss: str, pngs: dict[str, bytes]) -> None:
    """metrics.json, the test-loss CSV and the PNGs, each written atomically."""
    write_text_atomic(args.metrics, json.dumps(metrics, indent=2) + "\n")
    write_text_atomic(args.test_loss, test_loss)
    for name, png in pngs.items():
        write_bytes_atomic(Path(args.plots) / name, png)


def show(lines: dict[str, LineFit], k: int) -> None:
    for label, line in lines.items():
        values = "  ".join(f"{n}={v:.6g}" for n, v in zip([*weight_names(k), "bias"], line.params(), strict=True))
        cli.log.info("%-11s %s", label, values)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--train-data", required=True, help="train table (Parquet)")
    p.add_argument("--test-data", required=True, help="test table (Parquet)")
    p.add_argument("--model", required=True, help="trained state_dict")
    p.add_argument("--trajectory", required=True, help="per-epoch trajectory (CSV)")
    p.add_argument("--train-metrics", required=True, help="the train stage's metrics (JSON)")
    p.add_argument("--metrics", required=True, help="metrics JSON to write")
    p.add_argument("--test-loss", required=True, help="the test loss per epoch, CSV to write")
    p.add_argument("--plots", required=True, help="folder for the PNG plots")
    return cli.run("evaluate", evaluate, p.parse_args(argv))


if __name__ == "__main__":
    cli.exit_now(main())
