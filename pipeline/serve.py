"""The champion over HTTP (`make serve`): MLflow's own scoring server on models:/<registered model>@champion.

    python -m pipeline.serve                  # http://127.0.0.1:5001/invocations, until Ctrl-C
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_split": {"columns": ["x"], "data": [[1.5], [2.0]]}}'
    # -> {"predictions": [4.5377349853515625, 6.049508571624756]}

On 127.0.0.1 only, in this environment (`--env-manager local`: nothing is built or downloaded), from the store the
stages log to (MLFLOW_TRACKING_URI, or the project's own). With no registered model in params.yaml, no store
yet, or no version that has passed evaluate's gate, it stops with one line and exit status 2 before starting.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline import cli, config, record, tracking
from pipeline.errors import DataError, first_line


def champion(store: str, name: str) -> str:
    """The version of `name` that @champion points at in `store`, or one line saying why there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking_worker import store_lock

    tracking.require_store(store, f"models:/{name}@{record.CHAMPION}")
    try:
        with store_lock(store):  # an older store's first use migrates it
            return str(MlflowClient(store).get_model_version_by_alias(name, record.CHAMPION).version)
    except MlflowException as e:
        raise DataError(
            f"models:/{name}@{record.CHAMPION}: no version holds it in {store} (none has passed evaluate's gate, "
            f"docs/pipeline.md#the-champion): {first_line(e)}"
        ) from None


def command(name: str, port: int) -> list[str]:
    """`mlflow models serve` of the champion, loopback only, in this environment."""
    mlflow = str(Path(sys.executable).parent / "mlflow")
    uri = f"models:/{name}@{record.CHAMPION}"
    return [mlflow, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]


def serve(args: argparse.Namespace) -> None:
    cfg = config.load(args.params)
    name = cfg.tracking.registered_model
    if name is None:
        raise DataError(f"{cfg.source}: tracking.registered_model is null, so no model is registered to serve")
    store = tracking.tracking_uri(tracking.project_root())
    version = champion(store, name)
    cli.log.info(
        "models:/%s@%s is version %s: http://127.0.0.1:%d/invocations", name, record.CHAMPION, version, args.port
    )
    # The server replaces this process: Ctrl-C and SIGTERM reach it directly. MLflow's scoring server reads the
    # store from the variable; the package's own settings (telemetry off unless told otherwise) go along.
    os.environ["MLFLOW_TRACKING_URI"] = store
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per start says nothing here
    argv = command(name, args.port)
    os.execv(argv[0], argv)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--port", type=int, default=5001, help="port on 127.0.0.1 (default: 5001)")
    return cli.run("serve", serve, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
