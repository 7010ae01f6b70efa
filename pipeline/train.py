"""DVC stage `train`: gradient descent on the train table -> model, trajectory, train metrics, one MLflow run.

train() tells the stage's story: read, check, fit (loop.learn: a function of the train params and the table), write,
log. What the run records is named in pipeline/record.py.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import cli, config, data, distributed, record, theory, tracking
from pipeline.errors import ConfigError, DataError, DivergenceError
from pipeline.io import md5_file, write_bytes_atomic, write_text_atomic


def train(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    p, lead = cfg.train, distributed.lead()  # lead: rank 0, the one process that tracks, shows, writes and prints
    # First: the worker imports MLflow while all that follows runs. A server that does not answer fails here.
    with tracking.connect(cfg.tracking.experiment, enabled=lead) as tracker:
        import safetensors.torch  # the one deferred import: torch and what is built on it

        from pipeline import loop, tuning

        tuning.set_deterministic(p.threads)
        table = data.read_table(args.data)
        moments, stab = check(cfg, args.data, table)
        with distributed.place(p, len(table), cfg.source) as place, tracker.run(run_name=record.run_name(cfg)):
            started = partial(log_start, tracker, cfg, args.data, table, place)  # before the first step
            stream = partial(log_epochs, tracker, table.n_features)  # logged while the next epochs run
            fit = loop.learn(p, table, place, lead and sys.stderr.isatty(), started, stream)
            traj, frame = fit.trajectory, fit.trajectory.frame()
            show(frame, p.epochs, table.n_features)
            if p.batch_size is not None:
                tracker.log_series(record.batch_series(traj.batch_loss))
            if traj.diverged_at is not None:
                raise diverged(tracker, frame, traj.diverged_at, p.lr, stab)
            autograd = partial(loop.autograd_gradient, table.X, table.y)  # the gradient to check the formula by
            report = analyse(moments, stab, p, traj.path(), float(traj.column("loss")[-1]), autograd)
            if not lead:
                return  # every rank holds the same result: rank 0 alone writes and logs it
            write_outputs(args, safetensors.torch.save(fit.model.state_dict()), frame, report)
            log_result(tracker, args, cfg, report, table)
    summarise(report, fit.model.named_parameters())


def check(cfg: config.Config, source: str, table: data.Table) -> tuple[theory.Moments, theory.Stability]:
    """The table fits the params, and the learning rate is below the stability limit (unless allowed)."""
    p, k = cfg.train, table.n_features
    cli.log.debug("%s: %d rows, %d feature(s), %d thread(s)", source, len(table), k, p.threads)
    if k != cfg.generate.n_features:
        raise DataError(f"{source}: has {k} feature column(s), generate.true_weights has {cfg.generate.n_features}")
    moments = theory.Moments.of(table.X, table.y)
    stab = theory.stability(moments, p.lr, p.momentum)
    if p.optimizer == "sgd" and p.lr >= stab.lr_max and not p.allow_divergence:
        raise ConfigError(
            f"{cfg.source}: train.lr = {p.lr}: at or above the largest stable learning rate {stab.lr_max:.4g} for "
            f"this data (2(1 + momentum)/λ_max of the MSE Hessian); lower it, or set train.allow_divergence: true"
        )
    return moments, stab


def log_start(
    tracker: tracking.Tracker,
    cfg: config.Config,
    source: str,
    table: data.Table,
    place: distributed.Place,
    init: np.ndarray,
    compiled: bool,
) -> None:
    """What the run records before training (a run cut short keeps it): its tags, params, input, step 0."""
    cli.log.debug("method %s on %s, %d process(es), compiled: %s", cfg.train.method, place.device, place.size, compiled)
    data_md5 = md5_file(source)
    tracker.set_tags(
        record.train_tags(data_md5, cfg.tracking.sweep, cfg.source) | record.output_tags({source: data_md5})
    )
    tracker.log_artifact(cfg.source, name=record.PARAMS_ARTIFACT)
    tracker.expect_model()  # the worker prepares for log_model while this process trains
    tracker.log_params(record.train_params(cfg, init, len(table), compiled, place.device, place.size))
    tracker.log_dataset(**record.dataset(source, data_md5, len(table), table.n_features))
    tracker.log_series(record.initial_series(init))


def log_epochs(tracker: tracking.Tracker, n_features: int, first: int, values: np.ndarray) -> None:
    tracker.log_series(record.epoch_series(first, values, n_features))


def show(frame: Any, epochs: int, n_features: int) -> None:
    """About ten lines of the trajectory, and the last one."""
    names = [*data.weight_names(n_features), "bias"]
    for i in sorted({*range(0, len(frame), max(1, epochs // 10)), len(frame) - 1}):
        row = frame.iloc[i]
        values = "  ".join(f"{n} {row[n]:.6f}" for n in names)
        cli.log.info("epoch %5d  loss %.6g  %s", row["epoch"], row["loss"], values)


def diverged(tracker: tracking.Tracker, frame: Any, epoch: int, lr: float, stab: theory.Stability) -> DivergenceError:
    """The run keeps the trajectory up to the failure; the stage's outputs are not written at all."""
    with tempfile.TemporaryDirectory() as tmp:
        data.write_csv(frame, Path(tmp) / "trajectory.csv")
        tracker.log_artifact(Path(tmp) / "trajectory.csv")
    return DivergenceError(
        f"train: loss is not finite at epoch {epoch} with train.lr = {lr}; the largest stable "
        f"learning rate for this data is {stab.lr_max:.4g}"
    )


def analyse(
    moments: theory.Moments,
    stab: theory.Stability,
    p: config.TrainParams,
    path: np.ndarray,
    final_loss: float,
    autograd: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> dict[str, Any]:
    """Theory against what happened: convergence predicted vs observed, autograd vs analytic gradient.

    path: (epochs + 1, k + 1), the weights and bias at the start and after each epoch.
    """
    optimum = theory.least_squares(moments)
    start = theory.LineFit(path[0, :-1].astype(np.float64), float(path[0, -1]))
    end = theory.LineFit(path[-1, :-1].astype(np.float64), float(path[-1, -1]))
    distances = np.linalg.norm(path[1:].astype(np.float64) - optimum.params(), axis=1)
    offset = start.params() - optimum.params()
    d0 = math.sqrt(theory.dot(offset, offset))
    plain_gd = p.optimizer == "sgd" and p.momentum == 0 and p.batch_size is None  # the bound is exact only there
    gap = max(
        float(np.max(np.abs(autograd(f.weights, np.array([f.bias])) - theory.mse_gradient(moments, f))))
        for f in (start, end)
    )
    names = [*data.weight_names(len(start.weights)), "bias"]
    return {
        "stability": {
            "lr_max": stab.lr_max,
            "contraction": stab.contraction,
            "hessian_eigen_min": float(stab.eigenvalues[0]),
            "hessian_eigen_max": float(stab.eigenvalues[-1]),
        },
        "convergence": {
            "tolerance": p.convergence_tol,
            "initial_distance": d0,
            "final_distance": float(distances[-1]),
            "predicted_epochs": stab.predicted_epochs(d0, p.convergence_tol) if plain_gd else None,
            "observed_epochs": theory.observed_epochs(distances, p.convergence_tol),
        },
        "gradient_check": {"max_abs_diff": gap},
        "init": dict(zip(names, start.params().tolist(), strict=True)),
        "final_loss": final_loss,
    }


def write_outputs(args: argparse.Namespace, model: bytes, frame: Any, report: dict[str, Any]) -> None:
    """The model's state_dict in safetensors format (plain tensors, no pickle: identical bytes for identical
    weights), the trajectory and the metrics, each written atomically."""
    write_bytes_atomic(args.model, model)
    data.write_csv(frame, args.trajectory)
    write_text_atomic(args.metrics, json.dumps(report, indent=2) + "\n")


def log_result(
    tracker: tracking.Tracker, args: argparse.Namespace, cfg: config.Config, report: dict[str, Any], table: data.Table
) -> None:
    """The run's results: metrics at the last epoch, the outputs, the model; last, the tag that marks it whole."""
    tracker.log_metrics(record.train_metrics(report), step=cfg.train.epochs)
    for path in (args.trajectory, args.metrics):
        tracker.log_artifact(path)
    # A few real rows are the model's input example; the metrics just logged at the last epoch go with it.
    columns = data.feature_columns(table.n_features)
    example = table.X[: record.EXAMPLE_ROWS]
    tracker.log_model(args.model, columns, example, cfg.tracking.registered_model, step=cfg.train.epochs)
    model_md5 = md5_file(args.model)
    written = {args.model: model_md5, args.trajectory: md5_file(args.trajectory), args.metrics: md5_file(args.metrics)}
    tracker.set_tags(record.output_tags(written))
    # evaluate finds this run by the model's hash: set last, the tag marks a complete run.
    tracker.set_tags({record.MODEL_TAG: model_md5})


def summarise(report: dict[str, Any], parameters: Any) -> None:
    c = report["convergence"]
    cli.log.info(
        "within %g of the closed form: %s; lr limit %.4g; autograd vs analytic gradient: max |diff| %.3g",
        c["tolerance"],
        record.convergence(c),
        report["stability"]["lr_max"],
        report["gradient_check"]["max_abs_diff"],
    )
    # As the seed document ends: the learned parameters, straight from the model.
    for name, param in parameters:
        print(name, param.data)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--data", required=True, help="train table to read (Parquet)")
    p.add_argument("--model", required=True, help="state_dict to write (safetensors)")
    p.add_argument("--trajectory", required=True, help="per-epoch trajectory to write (CSV)")
    p.add_argument("--metrics", required=True, help="training metrics to write (JSON): theory vs observed")
    return cli.run("train", train, p.parse_args(argv))


if __name__ == "__main__":
    cli.exit_now(main())
