"""DVC stage `train`: gradient descent on the train table -> model, trajectory, train metrics, one MLflow run."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import cli, config, distributed, numerics, tracking
from pipeline.errors import ConfigError, DataError, DivergenceError
from pipeline.io import md5_file, write_bytes_atomic, write_text_atomic

EXAMPLE_ROWS = 3  # rows of the training table logged as the MLflow model's input example

# torch and the modules that import it (or pandas and pyarrow) are imported inside train(), after the tracking
# worker has started: it imports MLflow (~2 s) on the other core while this process imports torch (~1 s).
if TYPE_CHECKING:
    import torch

    from pipeline import data, loop, theory


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict in safetensors format: plain tensors, no pickle; identical bytes for identical
    weights. Load it with safetensors (`load_file`) and `model.load_state_dict(...)`."""
    import safetensors.torch

    return safetensors.torch.save(model.state_dict())


def analyse(
    table: data.Table, moments: theory.Moments, traj: loop.Trajectory, stab: theory.Stability, p: config.TrainParams
) -> dict[str, Any]:
    """Theory against what happened: convergence predicted vs observed, autograd vs analytic gradient."""
    from pipeline import data, loop, theory

    optimum = theory.least_squares(moments)
    start = theory.LineFit(traj.init_weight.astype(np.float64), traj.init_bias)
    end = theory.LineFit(traj.weights()[-1].astype(np.float64), float(traj.column("bias")[-1]))
    path = np.column_stack([traj.weights(), traj.column("bias")]).astype(np.float64)
    distances = np.linalg.norm(path - optimum.params(), axis=1)
    offset = start.params() - optimum.params()
    d0 = math.sqrt(theory.dot(offset, offset))
    # The contraction bound is exact for plain full-batch gradient descent only.
    plain_gd = p.optimizer == "sgd" and p.momentum == 0 and p.batch_size is None
    gradient_gap = max(
        float(
            np.max(
                np.abs(
                    loop.autograd_gradient(table.X, table.y, f.weights, np.array([f.bias]))
                    - theory.mse_gradient(moments, f)
                )
            )
        )
        for f in (start, end)
    )
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
        "gradient_check": {"max_abs_diff": gradient_gap},
        "init": dict(zip([*data.weight_names(len(start.weights)), "bias"], start.params().tolist(), strict=True)),
        "final_loss": float(traj.column("loss")[-1]),
    }


def train(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    # First, so that the worker's start-up overlaps everything below. A server that does not answer fails here.
    # Leaving the block stops a worker that never got a run (the stage failed its checks). Under torchrun only
    # rank 0 tracks the run.
    rank, _ = distributed.world()
    if rank != 0:
        cli.log.setLevel(logging.WARNING)  # one account of the run, rank 0's
    with tracking.connect(cfg.tracking.experiment) if rank == 0 else tracking.OfflineTracker() as tracker:
        try:
            fit_and_write(args, cfg, tracker)
        finally:
            distributed.stop()


def fit_and_write(args: argparse.Namespace, cfg: config.Config, tracker: tracking.Tracker) -> None:
    import torch

    from pipeline import data, loop, theory

    p = cfg.train
    # Set before any tensor work: float32 reductions at large N depend on the thread count.
    torch.set_num_threads(p.threads)
    loop.set_deterministic()  # an op without a deterministic kernel raises instead of varying
    table = data.read_table(args.data)
    k = table.n_features
    cli.log.debug(
        "%s: %d rows, %d feature(s); torch %s, %d thread(s)", args.data, len(table), k, torch.__version__, p.threads
    )
    if k != cfg.generate.n_features:
        raise DataError(f"{args.data}: has {k} feature column(s), generate.true_weights has {cfg.generate.n_features}")
    moments = theory.Moments.of(table.X, table.y)
    stab = theory.stability(moments, p.lr, p.momentum)
    if p.optimizer == "sgd" and p.lr >= stab.lr_max and not p.allow_divergence:
        raise ConfigError(
            f"{cfg.source}: train.lr = {p.lr}: at or above the largest stable learning rate {stab.lr_max:.4g} for "
            f"this data (2(1 + momentum)/λ_max of the MSE Hessian); lower it, or set train.allow_divergence: true"
        )
    data_md5 = md5_file(args.data)
    names = data.weight_names(k)
    rank, size = distributed.world()
    dev = distributed.device(p.device) if p.method == "nn" else torch.device("cpu")
    if size > 1:
        if p.method != "nn" or p.batch_size is not None:
            raise ConfigError(
                f"{cfg.source}: under torchrun, train runs method nn on full batches (train.method = {p.method!r}, "
                f"train.batch_size = {p.batch_size!r})"
            )
        shard = distributed.shard(len(table), rank, size)
        distributed.start(dev)

    # The run starts once the inputs have passed their checks: the worker opens the store and creates the run
    # while this process builds the learner (torch.optim's first use imports torch._dynamo, ~1 s) and trains.
    with tracker.run(run_name=os.environ.get("DVC_EXP_NAME")) as run:
        sweep = {} if cfg.tracking.sweep is None else {"sweep": cfg.tracking.sweep}
        tracker.set_tags(run, tracking.provenance_tags("train") | {"data_md5": data_md5} | sweep | numerics.tags())
        tracker.expect_model(run)
        dtype = getattr(torch, p.dtype)
        X, y = loop.as_arrays(table.X, table.y, dtype)
        model = loop.make_model(p.init_seed, k, dtype)
        rows_per_step = min(len(X), p.batch_size or len(X)) // size
        # Compiled steps are tuned for the CPU and one process (benchmarks/bench.py, P3).
        compile_step = loop.should_compile(p.compile, p.method, rows_per_step, p.epochs) and dev.type == "cpu"
        compile_step = compile_step and size == 1
        cli.log.debug(
            "method %s on %s, %d process(es), %d row(s) per step, compiled: %s",
            p.method,
            dev,
            size,
            rows_per_step,
            compile_step,
        )
        # Every method starts from this model's parameters. Logged before the learner exists, so the worker
        # records them while make_learner imports torch._dynamo.
        w0, b0 = model.weight.detach().numpy(), model.bias.detach().numpy()
        init = dict(zip([f"init.{n}" for n in [*names, "bias"]], [*w0.reshape(-1).tolist(), float(b0[0])], strict=True))
        run_facts = {"data.n_train": len(table), "compiled": compile_step, "device": dev, "world_size": size}
        tracker.log_params(run, cfg.flat() | init | run_facts)
        tracker.log_dataset(
            run,
            source=args.data,
            name="train",
            digest=data_md5,
            context="training",
            n_rows=len(table),
            columns=list(table.columns),
        )
        if size > 1:
            learner: loop.Learner = distributed.learner(model, X[shard], y[shard], p.optimizer, p.lr, p.momentum, dev)
            X, y = X[shard], y[shard]  # what this rank trains on
        else:
            learner = loop.make_learner(p.method, model, X, y, p.optimizer, p.lr, p.momentum, compile_step, dev)

        columns = data.trajectory_columns(k)[1:]
        # Step 0 of weight and bias is the random initialisation, so their curves start where training did.
        tracker.log_series(
            run, {n: ([0], [v]) for n, v in zip([*names, "bias"], [*w0.reshape(-1), b0[0]], strict=True)}
        )

        def log_epochs(first: int, rows: np.ndarray) -> None:
            """Each series as training produces it: the worker logs while the next epochs run."""
            steps = np.arange(first, first + len(rows))
            tracker.log_series(run, {c: (steps, rows[:, j]) for j, c in enumerate(columns)})

        traj = loop.fit(
            learner,
            len(X),
            p.epochs,
            p.batch_size,
            p.shuffle_seed,
            progress=sys.stderr.isatty() and rank == 0,
            on_epochs=log_epochs,
        )
        frame = traj.frame()
        shown = sorted({*range(0, len(frame), max(1, p.epochs // 10)), len(frame) - 1})  # ~10 lines and the last
        for row in frame.iloc[shown].itertuples(index=False):
            cli.log.info(
                "epoch %5d  loss %.6g  %s",
                row.epoch,
                row.loss,
                "  ".join(f"{n} {getattr(row, n):.6f}" for n in [*names, "bias"]),
            )

        if p.batch_size is not None:
            tracker.log_series(run, {"batch_loss": (np.arange(1, len(traj.batch_loss) + 1), traj.batch_loss)})
        if traj.diverged_at is not None:
            # The run keeps the trajectory up to the failure; the stage's outputs are not written at all.
            with tempfile.TemporaryDirectory() as tmp:
                data.write_csv(frame, Path(tmp) / "trajectory.csv")
                tracker.log_artifact(run, Path(tmp) / "trajectory.csv")
            raise DivergenceError(
                f"train: loss is not finite at epoch {traj.diverged_at} with train.lr = {p.lr}; the largest stable "
                f"learning rate for this data is {stab.lr_max:.4g}"
            )

        if rank != 0:
            return  # rank 0 writes the outputs: every rank holds the same trajectory
        model = model.cpu()
        loop.load_params(model, traj.weights()[-1], traj.column("bias")[-1:])
        report = analyse(table, moments, traj, stab, p)
        write_bytes_atomic(args.model, state_dict_bytes(model))
        data.write_csv(frame, args.trajectory)
        write_text_atomic(args.metrics, json.dumps(report, indent=2) + "\n")

        flat = {k: v for k, v in tracking.flatten(report).items() if not k.startswith("init.")}
        tracker.log_metrics(run, flat, step=p.epochs)
        for path in (args.trajectory, args.metrics):
            tracker.log_artifact(run, path)
        # A few real rows are the model's input example; the metrics just logged at the last epoch go with it.
        tracker.log_model(
            run,
            args.model,
            data.feature_columns(k),
            table.X[:EXAMPLE_ROWS],
            registered_name=cfg.tracking.registered_model,
            step=p.epochs,
        )
        # Last: evaluate finds this run by the model's hash, so the tag marks a complete run.
        tracker.set_tags(run, {tracking.MODEL_TAG: md5_file(args.model)})

    c = report["convergence"]
    cli.log.info(
        "within %g of the closed form after %s epochs (theory: at most %s); lr limit %.4g; autograd vs analytic "
        "gradient: max |diff| %.3g",
        c["tolerance"],
        c["observed_epochs"],
        c["predicted_epochs"],
        report["stability"]["lr_max"],
        report["gradient_check"]["max_abs_diff"],
    )
    # As the seed document ends: the learned parameters, straight from the model.
    for name, param in model.named_parameters():
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
