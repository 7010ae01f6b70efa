"""params.yaml -> one frozen, validated Config. The only module that reads YAML."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

X_DISTRIBUTIONS = ("normal", "uniform")
OPTIMIZERS = ("sgd", "adam")


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file, the key and the value."""


@dataclass(frozen=True)
class GenerateParams:
    n_samples: int
    w_true: float
    b_true: float
    noise_std: float
    x_dist: str
    x_loc: float
    x_scale: float
    test_fraction: float
    seed: int

    @property
    def n_test(self) -> int:
        return round(self.n_samples * self.test_fraction)

    @property
    def n_train(self) -> int:
        return self.n_samples - self.n_test


@dataclass(frozen=True)
class TrainParams:
    optimizer: str
    lr: float
    epochs: int
    init_seed: int
    threads: int


@dataclass(frozen=True)
class TrackingParams:
    experiment: str


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


def _typed(source: str, key: str, value: Any, kind: type) -> Any:
    # bool is a subclass of int in Python; `epochs: yes` must not become 1.
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {key} = {value!r}: must be a finite number")
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise ConfigError(f"{source}: {key} = {value!r}: expected {kind.__name__}, got {type(value).__name__}")


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
    kinds = {"int": int, "float": float, "str": str}
    values = {k: _typed(source, f"{name}.{k}", raw[k], kinds[str(t)]) for k, t in expected.items()}
    return cls(**values)


def _check(source: str, ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: {key} = {value!r}: {rule}")


def validate(cfg: Config) -> Config:
    """Range checks that types alone cannot express; returns cfg unchanged."""
    s, g, t = cfg.source, cfg.generate, cfg.train
    _check(s, g.n_samples >= 4, "generate.n_samples", g.n_samples, "must be at least 4")
    _check(s, g.noise_std >= 0, "generate.noise_std", g.noise_std, "must be >= 0")
    _check(s, g.x_dist in X_DISTRIBUTIONS, "generate.x_dist", g.x_dist, f"must be one of {X_DISTRIBUTIONS}")
    _check(s, g.x_scale > 0, "generate.x_scale", g.x_scale, "must be > 0")
    _check(s, 0 < g.test_fraction < 1, "generate.test_fraction", g.test_fraction, "must be in (0, 1)")
    # The slope's standard error needs n_train - 2 > 0 degrees of freedom; an empty test table measures nothing.
    _check(
        s,
        g.n_test >= 1 and g.n_train >= 3,
        "generate.test_fraction",
        g.test_fraction,
        f"leaves {g.n_train} train and {g.n_test} test samples of {g.n_samples}; need >= 3 and >= 1",
    )
    _check(s, g.seed >= 0, "generate.seed", g.seed, "must be >= 0")
    _check(s, t.optimizer in OPTIMIZERS, "train.optimizer", t.optimizer, f"must be one of {OPTIMIZERS}")
    _check(s, t.lr > 0, "train.lr", t.lr, "must be > 0")
    _check(s, t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(s, t.init_seed >= 0, "train.init_seed", t.init_seed, "must be >= 0")
    _check(s, t.threads >= 1, "train.threads", t.threads, "must be >= 1")
    _check(
        s, bool(cfg.tracking.experiment.strip()), "tracking.experiment", cfg.tracking.experiment, "must not be empty"
    )
    return cfg


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
    try:
        # typ="safe" builds only plain data: a `!!python/object` tag raises instead of running code.
        return YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML: {first}") from None


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
