"""params.yaml -> one frozen, validated Config. The only module that reads YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.errors import ConfigError

X_DISTRIBUTIONS = ("normal", "uniform")
OPTIMIZERS = ("sgd", "adam")
METHODS = ("nn", "autograd", "numpy")
DTYPES = ("float32", "float64")
COMPILE = ("auto", "on", "off")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class GenerateParams:
    n_samples: int
    true_weights: list[float]
    b_true: float
    noise_std: float
    x_dist: str
    x_loc: float
    x_scale: float
    test_fraction: float
    seed: int

    @property
    def n_features(self) -> int:
        return len(self.true_weights)

    @property
    def n_test(self) -> int:
        return round(self.n_samples * self.test_fraction)

    @property
    def n_train(self) -> int:
        return self.n_samples - self.n_test


@dataclass(frozen=True)
class TrainParams:
    method: str
    optimizer: str
    lr: float
    momentum: float
    epochs: int
    batch_size: int | None
    init_seed: int
    shuffle_seed: int
    dtype: str
    threads: int
    compile: str
    device: str
    convergence_tol: float
    allow_divergence: bool


@dataclass(frozen=True)
class TrackingParams:
    experiment: str
    registered_model: str | None  # also register the logged model under this name in MLflow's model registry
    sweep: str | None  # tag the run sweep=<name>: the runs of one sweep, filtered and compared in the MLflow UI


@dataclass(frozen=True)
class Config:
    generate: GenerateParams
    train: TrainParams
    tracking: TrackingParams
    source: str  # the file it came from, for error messages

    def flat(self) -> dict[str, Any]:
        """Every value as `section.key` -> value, the form MLflow params take."""
        out: dict[str, Any] = {}
        for section in fields(self):
            if section.name == "source":
                continue
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                out[f"{section.name}.{key}"] = value
        return out


SECTIONS: dict[str, type] = {
    "generate": GenerateParams,
    "train": TrainParams,
    "tracking": TrackingParams,
}


def _typed(source: str, key: str, value: Any, kind: str) -> Any:
    """Check one value against its field's annotation (as a string: `int | None`, `list[float]`, ...)."""
    if kind.endswith(" | None"):
        return None if value is None else _typed(source, key, value, kind.removesuffix(" | None"))
    if kind == "list[float]":
        if not isinstance(value, list) or not value:
            raise ConfigError(f"{source}: {key} = {value!r}: expected a non-empty list of numbers")
        return [_typed(source, f"{key}[{i}]", v, "float") for i, v in enumerate(value)]
    # bool is a subclass of int in Python; `epochs: yes` must not become 1.
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key} = {value!r}: must be a finite number")
        return float(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key} = {value!r}: expected {kind}, got {type(value).__name__}")


def _section(source: str, name: str, raw: Any, cls: type) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name} must be a mapping of keys to values, got {raw!r}")
    expected = {f.name: f.type for f in fields(cls)}
    unknown = sorted(set(raw) - set(expected))
    if unknown:
        raise ConfigError(f"{source}: unknown key {name}.{unknown[0]} (known: {', '.join(expected)})")
    missing = [k for k in expected if k not in raw]
    if missing:
        raise ConfigError(f"{source}: missing key {name}.{missing[0]}")
    values = {k: _typed(source, f"{name}.{k}", raw[k], str(t)) for k, t in expected.items()}
    return cls(**values)


def _check(source: str, ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r}: {rule}")


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express; returns cfg unchanged."""
    _validate_generate(cfg.source, cfg.generate)
    _validate_train(cfg.source, cfg.train, cfg.generate.n_train)
    _validate_tracking(cfg.source, cfg.tracking)
    return cfg


def _validate_generate(s: str, g: GenerateParams) -> None:
    k = g.n_features
    _check(s, g.n_samples >= k + 3, "generate.n_samples", g.n_samples, f"must be at least {k + 3} for {k} feature(s)")
    _check(s, g.noise_std >= 0, "generate.noise_std", g.noise_std, "must be >= 0")
    _check(s, g.x_dist in X_DISTRIBUTIONS, "generate.x_dist", g.x_dist, f"must be one of {X_DISTRIBUTIONS}")
    _check(s, g.x_scale > 0, "generate.x_scale", g.x_scale, "must be > 0")
    _check(s, 0 < g.test_fraction < 1, "generate.test_fraction", g.test_fraction, "must be in (0, 1)")
    # Standard errors need n_train - (k + 1) > 0 degrees of freedom; an empty test table measures nothing.
    _check(
        s,
        g.n_test >= 1 and g.n_train >= k + 2,
        "generate.test_fraction",
        g.test_fraction,
        f"leaves {g.n_train} train and {g.n_test} test samples of {g.n_samples}; need >= {k + 2} and >= 1",
    )
    _check(s, g.seed >= 0, "generate.seed", g.seed, "must be >= 0")


def _validate_train(s: str, t: TrainParams, n_train: int) -> None:
    _check(s, t.method in METHODS, "train.method", t.method, f"must be one of {METHODS}")
    _check(s, t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"must be one of {OPTIMIZERS}")
    # The hand-written methods implement SGD (with momentum); Adam is there to compare, through torch.optim.
    _check(
        s,
        t.method == "nn" or t.optimizer == "sgd",
        "train.optimizer",
        t.optimizer,
        f"method {t.method!r} implements sgd only; use method nn for {t.optimizer}",
    )
    _check(s, t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(s, 0 <= t.momentum < 1, "train.momentum", t.momentum, "must be in [0, 1)")
    _check(s, t.optimizer == "sgd" or t.momentum == 0, "train.momentum", t.momentum, "applies to sgd only; set 0")
    _check(s, t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    if t.batch_size is not None:
        _check(
            s,
            1 <= t.batch_size <= n_train,
            "train.batch_size",
            t.batch_size,
            f"must be between 1 and the {n_train} training samples, or null for full batch",
        )
    _check(s, t.init_seed >= 0, "train.init_seed", t.init_seed, "must be >= 0")
    _check(s, t.shuffle_seed >= 0, "train.shuffle_seed", t.shuffle_seed, "must be >= 0")
    _check(s, t.dtype in DTYPES, "train.dtype", t.dtype, f"must be one of {DTYPES}")
    _check(s, t.threads >= 1, "train.threads", t.threads, "must be >= 1")
    _check(s, t.compile in COMPILE, "train.compile", t.compile, f"must be one of {COMPILE}")
    _check(s, t.compile != "on" or t.method == "nn", "train.compile", t.compile, "compiles the nn method only")
    _check(s, t.device in DEVICES, "train.device", t.device, f"must be one of {DEVICES}")
    _check(s, t.device != "cuda" or t.method == "nn", "train.device", t.device, "runs the nn method only")
    _check(s, t.convergence_tol > 0, "train.convergence_tol", t.convergence_tol, "must be > 0")


def _validate_tracking(s: str, tr: TrackingParams) -> None:
    _check(s, bool(tr.experiment.strip()), "tracking.experiment", tr.experiment, "must not be empty")
    sweep = tr.sweep
    _check(s, sweep is None or bool(sweep.strip()), "tracking.sweep", sweep, "must be null or a non-empty name")
    name = tr.registered_model
    # MLflow refuses these names only when it registers, after training: say so first. Its rule (mlflow.utils.
    # validation._validate_model_name, which tests/test_config.py holds this to): not blank, no '/' or ':', and
    # not a path that goes up or nowhere ('.', '..', '..x').
    _check(
        s,
        name is None
        or (bool(name.strip()) and not set(name) & set("/:") and name != "." and not name.startswith("..")),
        "tracking.registered_model",
        name,
        "must be null or a name without '/' or ':' that does not start with '..' (MLflow's rule)",
    )


def parse(raw: Any, source: str) -> Config:
    """Build a validated Config from already-parsed YAML."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r} (known: {', '.join(SECTIONS)})")
    missing = [k for k in SECTIONS if k not in raw]
    if missing:
        raise ConfigError(f"{source}: missing section {missing[0]!r}")
    sections = {name: _section(source, name, raw[name], cls) for name, cls in SECTIONS.items()}
    return validate(Config(source=source, **sections))


def read_yaml(path: Path) -> Any:
    """Parse YAML the way DVC does (ruamel, YAML 1.2), refusing Python object tags."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str) -> Any:
    try:
        # Exactly DVC's parser (dvc.utils.serialize.parse_yaml), so `dvc exp run -S`, `dvc params diff` and the
        # stage agree on what a value means. typ="safe" builds plain data only: a `!!python/...` tag raises.
        return YAML(typ="safe").load(text)
    except YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{source}: not valid YAML: {first}") from None


def load(path: str | Path = "params.yaml") -> Config:
    """Read and validate a params file."""
    path = Path(path)
    return parse(read_yaml(path), str(path))


def dvc_paths(dvc_yaml: str | Path = "dvc.yaml") -> dict[str, str]:
    """The `paths` block of dvc.yaml, for tools outside the stages (which get paths as arguments)."""
    raw = read_yaml(Path(dvc_yaml))
    try:
        paths = next(v["paths"] for v in raw["vars"] if isinstance(v, dict) and "paths" in v)
    except (TypeError, KeyError, StopIteration):
        raise ConfigError(f"{dvc_yaml}: no `paths` entry under `vars`") from None
    return {str(k): str(v) for k, v in paths.items()}
