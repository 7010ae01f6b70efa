"""DVC stage `train`: the five-step loop on the train table -> model, trajectory, one MLflow run."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence

import torch

from pipeline import cli, config, data, loop, tracking
from pipeline.io import md5_file, write_bytes_atomic


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict as torch.save bytes, identical for identical weights.

    Saved through a buffer: given a path, torch.save names the archive's inner folder after the file, and
    the atomic write's temporary name is random.
    """
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def train(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    p = cfg.train
    # Set before any tensor work: float32 reductions at large N depend on the thread count.
    torch.set_num_threads(p.threads)
    table = data.read_table(args.data)
    data_md5 = md5_file(args.data)
    # Connect before training, so a store that cannot be reached fails the stage before any work.
    tracker = tracking.connect(cfg.tracking.experiment)
    X, y = loop.as_tensors(table["x"].to_numpy(), table["y"].to_numpy())
    model = loop.make_model(p.init_seed)

    with tracker.run(run_name=os.environ.get("DVC_EXP_NAME")) as run_id:
        cli.log.info("MLflow run %s in %s", run_id, tracker.uri)
        tracker.set_tags(run_id, tracking.provenance_tags("train") | {"data_md5": data_md5})
        init = {"init.weight": model.weight.item(), "init.bias": model.bias.item()}
        tracker.log_params(run_id, cfg.flat() | init | {"data.n_train": len(table)})
        tracker.log_dataset(run_id, table, source=args.data, name="train", digest=data_md5, context="training")

        traj = loop.fit(model, X, y, p.optimizer, p.lr, p.epochs)
        frame = traj.frame()
        shown = sorted({*range(0, p.epochs, max(1, p.epochs // 10)), p.epochs - 1})  # ~10 lines and the last
        for row in frame.iloc[shown].itertuples():
            cli.log.info("epoch %5d  loss %.6g  weight %.6f  bias %.6f", row.epoch, row.loss, row.weight, row.bias)

        write_bytes_atomic(args.model, state_dict_bytes(model))
        data.write_table(frame, args.trajectory)

        steps = traj.epochs
        tracker.log_series(
            run_id,
            {
                "loss": (steps, traj.column("loss")),
                "grad_weight": (steps, traj.column("grad_weight")),
                "grad_bias": (steps, traj.column("grad_bias")),
                # Step 0 is the random initialisation, so the curves start where training started.
                "weight": ([0, *steps], [traj.init_weight, *traj.column("weight")]),
                "bias": ([0, *steps], [traj.init_bias, *traj.column("bias")]),
            },
        )
        tracker.log_metrics(run_id, {"final_loss": float(traj.column("loss")[-1])}, step=p.epochs)
        tracker.log_artifact(run_id, args.trajectory)
        tracker.log_artifact(run_id, args.model, "model")
        # Last: evaluate finds this run by the model's hash, so the tag marks a complete run.
        tracker.set_tags(run_id, {tracking.MODEL_TAG: md5_file(args.model)})

    # As the seed document ends: the learned parameters, straight from the model.
    for name, param in model.named_parameters():
        print(name, param.data)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--data", required=True, help="train table to read (CSV)")
    p.add_argument("--model", required=True, help="state_dict to write (torch.save)")
    p.add_argument("--trajectory", required=True, help="per-epoch trajectory to write (CSV)")
    return cli.run("train", train, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
