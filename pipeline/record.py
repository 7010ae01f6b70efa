"""What a run records, in one place: the names of its params, series, metrics, tags and inputs.

train and evaluate log what these functions return, and nothing else but their artifacts and the model. The
table mirrors "What a run holds" in docs/pipeline.md:

| what                                                          | where in the run | built by                      |
|---------------------------------------------------------------|------------------|-------------------------------|
| params.yaml flattened, init.<weight>/init.bias, how it ran    | params           | train_params                  |
| loss, grad_*, weights and bias per epoch (step 0: the start), | metrics (series) | initial_series, epoch_series, |
| batch_loss per optimiser step                                 |                  | batch_series                  |
| train.json at the last epoch; metrics.json, sklearn's gap     | metrics          | train_metrics, eval_metrics   |
| the model's test MSE and R², linked to it and the test table  | model metrics    | MODEL_METRICS                 |
| git, dvc_exp_name, data_md5, sweep, numerics, cpu,           | tags             | train_tags, evaluate_tags     |
| mlflow_telemetry; model_md5; the gate's verdict               |                  | gate_verdict                  |
| each output's md5 as dvc.lock records it (`outs/<path>`)      | tags             | output_tags                   |
| the params file itself, for pipeline.verify to rebuild from   | artifacts        | PARAMS_ARTIFACT               |
| the method, optimiser, lr and epochs, or the DVC experiment   | run name         | run_name                      |
| and the params it changed                                     |                  |                               |
| the result, the gate, its hashes and how to reproduce it      | description      | description                   |
| the training and the test table, digest = each one's md5      | inputs           | dataset                       |
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import config, data, numerics
from pipeline.errors import ConfigError

DVC_EXP_TAG = "dvc_exp_name"  # the DVC experiment a run was made under
MODEL_TAG = "model_md5"  # the tag that ties evaluate to the run train created: set last, on a complete run
# MLflow's own tag names (mlflow.utils.mlflow_tags; tests/test_tracking.py checks they still match), spelt out
# here so that the stages need not import MLflow for two strings.
SOURCE_NAME_TAG = "mlflow.source.name"
GIT_COMMIT_TAG = "mlflow.source.git.commit"
GATE_TAG = "gate"  # on the run and on its model version: "passed", or "failed: <reasons>" (evaluate.gate)
CHAMPION = "champion"  # the registered model's alias that the last model to pass the gate holds
NOTE_TAG = "mlflow.note.content"  # the run's Description in the UI, rendered as markdown
# The experiment's kind: MLflow 3's UI opens a "custom_model_development" one on its model-training pages (runs,
# metrics, models), and one without the tag in its GenAI mode (traces, prompts, judges).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
TELEMETRY_TAG = "mlflow_telemetry"  # off or on: whether MLflow could send usage data while the run was logged
# The variables by which MLflow 3.17 takes a machine for CI or a test run, and then sends nothing.
MLFLOW_CI_VARIABLES = (
    *("CI", "PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CIRCLECI", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "TF_BUILD"),
    *("BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN", "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION"),
    *("RUNBOT_HOST_URL", "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID"),
)
OUTS_TAG = "outs/"  # + an output's path from the repository root: its md5 as dvc.lock records it (pipeline.verify)
PARAMS_ARTIFACT = "params.yaml"  # the params file the run read, byte for byte: what pipeline.verify rebuilds with
THIS_RUN = "{run_id}"  # in the description, replaced by the run's ID where the run is known (the tracking worker)
EXAMPLE_ROWS = 3  # rows of the training table logged as the MLflow model's input example

Series = dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (steps, values)


def train_params(
    cfg: config.Config, init: np.ndarray, n_train: int, compiled: bool, device: object, world_size: int
) -> dict[str, Any]:
    """Every value of params.yaml, the random start every method begins from, and how the training ran."""
    names = [*data.weight_names(len(init) - 1), "bias"]
    start = {f"init.{n}": v for n, v in zip(names, init.tolist(), strict=True)}
    return (
        cfg.flat() | start | {"data.n_train": n_train, "compiled": compiled, "device": device, "world_size": world_size}
    )


def initial_series(init: np.ndarray) -> Series:
    """Step 0 of the weights and bias is the random start, so their curves begin where training did."""
    names = [*data.weight_names(len(init) - 1), "bias"]
    return {n: (np.array([0]), init[i : i + 1]) for i, n in enumerate(names)}


def epoch_series(first: int, rows: np.ndarray, n_features: int) -> Series:
    """Rows of the trajectory from epoch `first` on (its columns after "epoch"), one series per column."""
    steps = np.arange(first, first + len(rows))
    return {c: (steps, rows[:, j]) for j, c in enumerate(data.trajectory_columns(n_features)[1:])}


def batch_series(batch_loss: np.ndarray) -> Series:
    return {"batch_loss": (np.arange(1, len(batch_loss) + 1), batch_loss)}


def train_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """train.json's numbers, but the start (a param already)."""
    return {k: v for k, v in flatten(report).items() if not k.startswith("init.")}


def eval_metrics(metrics: Mapping[str, Any], sklearn_gap: float | None) -> dict[str, float]:
    """metrics.json's numbers, and how far scikit-learn is from the closed form written: its last digits are the
    CPU's, so it goes to the run only, not to metrics.json."""
    return flatten(metrics) | ({} if sklearn_gap is None else {"closed_form.sklearn_gap": sklearn_gap})


def train_tags(data_md5: str, sweep: str | None, params_file: str) -> dict[str, str]:
    return (
        provenance_tags("train", params_file)
        | {"data_md5": data_md5}
        | ({} if sweep is None else {"sweep": sweep})
        | numerics.tags()
        | telemetry_tags()
    )


def evaluate_tags(params_file: str) -> dict[str, str]:
    """The tags of a run evaluate starts itself, when no run in the store trained its model."""
    return provenance_tags("evaluate", params_file) | numerics.tags() | telemetry_tags()


def output_tags(md5s: Mapping[str, str]) -> dict[str, str]:
    """{path: md5} of outputs as tags `outs/<path>`, each path from the stage's folder (the repository root, where DVC
    runs it) as dvc.lock writes it; one outside that folder is not DVC's, and is left out."""
    here = Path.cwd().resolve()
    full = {Path(path).resolve(): md5 for path, md5 in md5s.items()}
    return {OUTS_TAG + p.relative_to(here).as_posix(): md5 for p, md5 in full.items() if p.is_relative_to(here)}


def telemetry_tags(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Whether MLflow's usage telemetry was on in the environment the tracking worker inherits, decided as MLflow
    3.17 decides it (mlflow.telemetry.utils; tests/test_tracking.py holds the two together): off for
    MLFLOW_DISABLE_TELEMETRY true or 1, or any value MLflow cannot parse, for DO_NOT_TRACK=true, and on a
    machine that looks like CI. The package sets the variable to true unless it is set (pipeline/__init__.py)."""
    disable = environ.get("MLFLOW_DISABLE_TELEMETRY")
    off = (
        (disable is not None and disable.lower() not in ("false", "0"))
        or environ.get("DO_NOT_TRACK", "false").lower() == "true"
        or any(name in environ for name in MLFLOW_CI_VARIABLES)
    )
    return {TELEMETRY_TAG: "off" if off else "on"}


def run_name(cfg: config.Config) -> str:
    """What ran, as the MLflow UI lists it: under `dvc exp`, the experiment's name and the params it changed from
    the commit (`gawsy-taro train.lr=0.01`, or `gawsy-taro (params as committed)`), so that a sweep's curves say
    which is which; else the settings that tell one repro from the next."""
    t = cfg.train
    experiment = os.environ.get("DVC_EXP_NAME")
    if experiment:
        return " ".join([experiment, *(varied(cfg) or ["(params as committed)"])])
    return f"{t.method}-{t.optimizer}-lr{t.lr:g}-{t.epochs}ep"


def varied(cfg: config.Config) -> list[str]:
    """`section.key=value` for each param that differs from the committed params file (what `dvc exp run -S` set),
    but the sweep's own name (a tag already); none without git or a committed file."""
    text = _git("show", f"HEAD:./{cfg.source}")
    try:
        committed = config.parse(config.parse_yaml(text, cfg.source), cfg.source).flat() if text else {}
    except ConfigError:  # a commit before a key was added or renamed: no baseline to compare with
        return []
    now = cfg.flat()
    return [f"{k}={_short(v)}" for k, v in now.items() if k != "tracking.sweep" and committed.get(k) != v]


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def gate_verdict(reasons: list[str]) -> str:
    """The gate's outcome as GATE_TAG holds it."""
    return "failed: " + "; ".join(reasons) if reasons else "passed"


def description(
    metrics: Mapping[str, Any],
    report: Mapping[str, Any],
    data_md5: str,
    model_md5: str,
    reasons: list[str],
    params_file: str,
) -> str:
    """The run's Description in the MLflow UI (markdown): the result against the closed form and the truth, the
    convergence against theory, the gate's verdict, the inputs' hashes, how to get the same bytes again, and how to
    check that they are (THIS_RUN stands for the run's ID)."""
    se, gap = metrics["statistical_error"], metrics["optimisation_gap"]
    rows = ["| | true | learned | closed form | optimisation gap | statistical error (its SE) |", "|" + "---|" * 6]
    for n in gap:
        v, error = metrics[n], f"{se[n]:.3g} ({se[n + '_se']:.3g})" if n in se else "–"
        rows.append(f"| {n} | {v['true']:.6g} | {v['learned']:.6g} | {v['closed_form']:.6g} | {gap[n]:.3g} | {error} |")
    c, test = report["convergence"], metrics["test"]
    tags = provenance_tags("evaluate", params_file)
    commit, experiment, dirty = tags.get(GIT_COMMIT_TAG), tags.get(DVC_EXP_TAG), tags.get("git_dirty")
    if experiment:
        again = f"`dvc exp apply {experiment}`"
    elif commit:
        again = f"`git checkout {commit}`, then `dvc repro`" + (
            " (the code differed from it)" if dirty == "true" else ""
        )
    else:
        again = "`dvc repro` with the same params.yaml (no git commit was recorded)"
    if commit and dirty == "false":
        check = f"`make verify RUN={THIS_RUN}` rebuilds every output from that commit and compares their md5s"
    else:
        check = "`make verify` cannot check it: that needs a commit that holds all of its code"
    return "\n".join(
        [
            *rows,
            "",
            f"Within {c['tolerance']:g} of the closed form: {convergence(c, '**')}; largest stable lr "
            f"{report['stability']['lr_max']:.4g}. Test MSE {test['mse_learned']:.6g} (closed form "
            f"{test['mse_closed_form']:.6g}).",
            "",
            f"Gate for @{CHAMPION}: **{gate_verdict(reasons)}**.",
            "",
            f"Data md5 `{data_md5}`, model md5 `{model_md5}`. The same bytes again: {again}; {check}.",
        ]
    )


def convergence(c: Mapping[str, Any], em: str = "") -> str:
    """When training came within the tolerance of the closed form, and what theory predicted, in words where either
    is missing (None in train.json); `em` marks the outcome up ("**" in markdown)."""
    observed, predicted = c["observed_epochs"], c["predicted_epochs"]
    reached = f"after {em}{observed}{em} epochs" if observed is not None else f"{em}not reached{em} in the epochs run"
    if predicted is not None:
        return f"{reached} (theory: at most {predicted})"
    return f"{reached} (theory gives no bound: it bounds plain full-batch descent below the stability limit only)"


def dataset(source: str, digest: str, n_rows: int, n_features: int, name: str = "train") -> dict[str, Any]:
    """A table as a run input: its file, md5 and shape; the rows themselves stay on disk. "train" is the training
    table, "test" the one evaluate measures the model on."""
    columns = [*data.feature_columns(n_features), "y"]
    context = {"train": "training", "test": "evaluation"}[name]
    return {"source": source, "name": name, "digest": digest, "context": context, "n_rows": n_rows, "columns": columns}


# The model's own scores on the test table: evaluate links them to the logged model and to that table, so MLflow's
# Models tab compares models by them. The closed form's scores are the run's, not the model's.
MODEL_METRICS = ("test.mse_learned", "test.r2_learned")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numbers -> {"a.b": value}, the names `dvc metrics` shows; None (not applicable) is left out."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out |= flatten(value, f"{prefix}{key}.")
        elif value is not None:
            out[f"{prefix}{key}"] = float(value)
    return out


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def provenance_tags(stage: str, params_file: str) -> dict[str, str]:
    """Git commit, whether the tracked files that make the outputs differ from it, and the DVC experiment this runs
    under, if any. Neither the params file (the run logs it whole, and `dvc exp run -S` edits it) nor dvc.lock
    (`dvc repro` rewrites it as stages finish) counts: a run is dirty when its code is not the commit's."""
    tags = {SOURCE_NAME_TAG: f"pipeline.{stage}"}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[GIT_COMMIT_TAG] = commit
        params = Path(params_file).resolve()
        here = Path.cwd().resolve()
        excluded = ["dvc.lock", *([params.relative_to(here).as_posix()] if params.is_relative_to(here) else [])]
        status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in excluded))
        tags["git_dirty"] = "unknown" if status is None else str(bool(status)).lower()
    for env, tag in (("DVC_EXP_NAME", DVC_EXP_TAG), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags
