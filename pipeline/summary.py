"""The closing lines of `make repro`: true vs learned vs closed-form parameters, and where the MLflow run is."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import cli, config, record, tracking
from pipeline.io import md5_file

UI_URL = "http://127.0.0.1:5000"  # where `make ui` serves the MLflow UI
# MLflow 3.17's UI opens every experiment in its GenAI mode unless the page asks for model training: it reads
# the mode from this parameter or from what the browser chose last, not from the experiment's mlflow.experimentKind.
UI_MODE = "workflowType=machine_learning"


def table(m: dict[str, Any], t: dict[str, Any]) -> str:
    """m: evaluate's metrics; t: train's (theory vs observed)."""
    names = list(m["optimisation_gap"])  # the weights, then bias
    rows = [f"{'':10}{'true':>12}{'learned':>14}{'closed form':>14}{'|learned - closed|':>20}"]
    for name in names:
        v = m[name]
        gap = m["optimisation_gap"][name]
        rows.append(f"{name:10}{v['true']:>12.6f}{v['learned']:>14.6f}{v['closed_form']:>14.6f}{gap:>20.3g}")
    s = m["statistical_error"]
    for name in names:
        rows.append(f"|closed-form {name} - true| = {s[name]:.4g}  (its standard error: {s[name + '_se']:.4g})")
    rows.append(f"test MSE: learned {m['test']['mse_learned']:.6g}, closed form {m['test']['mse_closed_form']:.6g}")
    c, st = t["convergence"], t["stability"]
    rows.append(
        f"within {c['tolerance']:g} of the closed form: {record.convergence(c)}; largest stable lr {st['lr_max']:.4g}"
    )
    verdict = "passed" if m["gate"]["passed"] else "failed (the MLflow run's description says why)"
    rows.append(f"gate for @{record.CHAMPION}: {verdict}")
    return "\n".join(rows)


def locate(
    uri: str, experiment: str, model_md5: str, registered: str | None = None
) -> tuple[str, str, str | None, str | None] | None:
    """(experiment id, run id, model id, the version `registered`@champion is) of the newest finished run that
    trained this model, if any. Read with MLflow's own client: the stages' worker is for logging while they work,
    and nothing works meanwhile here."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking_worker import find_run, sqlite_path, store_lock

    db = sqlite_path(uri)
    if not tracking.tracking_on() or (db is not None and not db.exists()):
        return None  # nothing was tracked: make no store either
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    with store_lock(uri):  # an older store's first use migrates it
        found = client.get_experiment_by_name(experiment)
    run_id = None if found is None else find_run(client, found.experiment_id, model_md5)
    if found is None or run_id is None:
        return None
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs is not None else []
    champion = None
    if registered is not None:
        with contextlib.suppress(MlflowException):  # no version has passed the gate yet
            champion = str(client.get_model_version_by_alias(registered, record.CHAMPION).version)
    return found.experiment_id, run_id, models[-1].model_id if models else None, champion


def summarise(args: argparse.Namespace) -> None:
    paths = config.dvc_paths(args.dvc_yaml)
    cfg = config.load(args.params)
    metrics = json.loads(Path(paths["metrics"]).read_text())
    print(table(metrics, json.loads(Path(paths["train_metrics"]).read_text())))
    print(f"predict with it: python -m pipeline.predict 1.5 2.0   (the model is {paths['model']})")
    uri = tracking.tracking_uri(tracking.project_root())
    registered = cfg.tracking.registered_model
    if (found := locate(uri, cfg.tracking.experiment, md5_file(paths["model"]), registered)) is None:
        print(f"MLflow: no run for this model in {uri}")
        return
    experiment_id, run_id, model_id, champion = found
    print(f"MLflow run {run_id} (experiment {cfg.tracking.experiment!r}) in {uri}")
    print(f"browse it: make ui, then {UI_URL}/#/experiments/{experiment_id}/runs/{run_id}?{UI_MODE}")
    print(f"check its bytes: make verify RUN={run_id}")
    if model_id is not None:
        print(f"load its model: mlflow.pyfunc.load_model('models:/{model_id}'), with MLFLOW_TRACKING_URI={uri}")
    if registered is not None and champion is None:
        print(f"models:/{registered}@{record.CHAMPION}: no version has passed the gate yet")
    elif registered is not None:
        champion_uri = f"models:/{registered}@{record.CHAMPION}"
        print(f"{champion_uri} is version {champion}: python -m pipeline.predict --model {champion_uri} 1.5")


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser(__doc__ or "")
    p.add_argument("--dvc-yaml", default="dvc.yaml", help="pipeline file whose `paths` name the outputs")
    return cli.run("summary", summarise, p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
