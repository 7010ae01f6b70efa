"""params.yaml -> Config: what is accepted, and the one-line errors for what is not."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pipeline import config
from pipeline.config import ConfigError
from tests.helpers import REPO


def raw_defaults() -> dict[str, Any]:
    return config.read_yaml(REPO / "params.yaml")  # type: ignore[no-any-return]


def parse_with(section: str, key: str, value: Any) -> config.Config:
    raw = copy.deepcopy(raw_defaults())
    raw[section][key] = value
    return config.parse(raw, "params.yaml")


def test_project_params_load_and_flatten_to_every_key() -> None:
    cfg = config.load(REPO / "params.yaml")
    raw = raw_defaults()
    expected = {f"{s}.{k}": v for s, section in raw.items() for k, v in section.items()}
    assert cfg.flat() == expected


def test_n_train_and_n_test_partition_the_samples(cfg: config.Config) -> None:
    g = cfg.generate
    assert g.n_train + g.n_test == g.n_samples and g.n_test == round(g.n_samples * g.test_fraction)


def test_int_accepted_where_float_expected() -> None:
    assert parse_with("train", "lr", 1).train.lr == 1.0


@pytest.mark.parametrize(
    "name", ["linreg", "team/linreg", "a:b", "", " ", ".", "..", "..x", "...", "x..", "x.y", "é 1"]
)
def test_a_registered_model_name_is_refused_exactly_when_mlflow_would_refuse_it(cfg: config.Config, name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name  # MLflow's own rule: the oracle

    try:
        _validate_model_name(name)
        mlflow_accepts = True
    except MlflowException:
        mlflow_accepts = False
    tracking = dataclasses.replace(cfg.tracking, registered_model=name)
    try:
        config.validate(dataclasses.replace(cfg, tracking=tracking))
        we_accept = True
    except ConfigError:
        we_accept = False
    assert we_accept == mlflow_accepts


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("train", "lrr", 0.1, "unknown key train.lrr"),
        ("train", "lr", 0, "train.lr = 0"),
        ("train", "lr", -0.1, "must be > 0"),
        ("train", "lr", "fast", "expected float, got str"),
        ("train", "lr", float("nan"), "finite"),
        ("train", "epochs", 0, "train.epochs = 0"),
        ("train", "epochs", 10.5, "expected int"),
        ("train", "epochs", True, "expected int, got bool"),
        ("train", "optimizer", "rmsprop", "must be one of"),
        ("train", "threads", 0, "train.threads"),
        ("generate", "n_samples", 3, "generate.n_samples = 3"),
        ("generate", "noise_std", -1.0, "must be >= 0"),
        ("generate", "test_fraction", 1.0, "must be in (0, 1)"),
        ("generate", "test_fraction", 0.001, "leaves 100 train and 0 test"),
        ("generate", "x_dist", "cauchy", "generate.x_dist"),
        ("generate", "x_scale", 0.0, "generate.x_scale"),
        ("tracking", "experiment", " ", "tracking.experiment"),
        ("tracking", "registered_model", "team/linreg", "tracking.registered_model = 'team/linreg'"),
        ("tracking", "registered_model", "", "must be null or a name without"),
        ("tracking", "registered_model", 3, "expected str, got int"),
        ("train", "method", "jax", "train.method = 'jax'"),
        ("train", "momentum", 1.0, "must be in [0, 1)"),
        ("train", "batch_size", 0, "train.batch_size = 0"),
        ("train", "batch_size", 81, "between 1 and the 80 training samples"),
        ("train", "batch_size", "all", "expected int, got str"),
        ("train", "dtype", "float16", "train.dtype"),
        ("train", "device", "tpu", "train.device = 'tpu': must be one of"),
        ("train", "convergence_tol", 0, "train.convergence_tol"),
        ("train", "allow_divergence", "yes", "expected bool, got str"),
        ("generate", "true_weights", [], "non-empty list"),
        ("generate", "true_weights", 3.0, "non-empty list"),
        ("generate", "true_weights", [3.0, "a"], "generate.true_weights[1] = 'a'"),
    ],
)
def test_bad_values_name_file_key_and_value(section: str, key: str, value: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_with(section, key, value)
    message = str(err.value)
    assert message.startswith("params.yaml: ") and fragment in message and "\n" not in message


def test_hand_written_methods_accept_sgd_only_and_momentum_belongs_to_sgd() -> None:
    raw = raw_defaults()
    raw["train"] |= {"method": "numpy", "optimizer": "adam"}
    with pytest.raises(ConfigError, match="implements sgd only"):
        config.parse(raw, "params.yaml")
    raw["train"] |= {"method": "nn", "momentum": 0.9}
    with pytest.raises(ConfigError, match="applies to sgd only"):
        config.parse(raw, "params.yaml")
    raw["train"] |= {"optimizer": "sgd", "batch_size": 8, "dtype": "float64"}
    cfg = config.parse(raw, "params.yaml")
    assert cfg.train.batch_size == 8 and cfg.train.momentum == 0.9


def test_missing_key_and_unknown_section_are_refused() -> None:
    raw = raw_defaults()
    del raw["train"]["epochs"]
    with pytest.raises(ConfigError, match=r"missing key train\.epochs"):
        config.parse(raw, "params.yaml")
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        config.parse(raw_defaults() | {"trian": {}}, "params.yaml")


def test_python_object_tags_are_refused_without_running_them(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    text = (
        (REPO / "params.yaml")
        .read_text()
        .replace("seed: 42", f"seed: !!python/object/apply:os.system ['touch {sentinel}']")
    )
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "params.yaml")
    assert not sentinel.exists()


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "nope.yaml")


def test_dvc_paths_reads_the_vars_block() -> None:
    paths = config.dvc_paths(REPO / "dvc.yaml")
    assert paths["metrics"].endswith(".json") and paths["model"].startswith("data/")
