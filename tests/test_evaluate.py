"""The evaluation numbers against independent computations (numpy least squares, textbook formulas)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from pipeline import config, data, evaluate, loop, plots, theory, tracking
from pipeline.data import DataError
from pipeline.theory import LineFit
from pipeline.train import state_dict_bytes


def test_metrics_match_numpy_least_squares_and_textbook_formulas(cfg: config.Config) -> None:
    train, test = data.generate(cfg.generate)
    learned = LineFit(weights=np.array([2.9]), bias=0.1)
    m = evaluate.compute_metrics(cfg.generate, learned, train, test)

    x, y = train["x"].to_numpy(), train["y"].to_numpy()
    A = np.column_stack([x, np.ones_like(x)])
    coef, rss, *_ = np.linalg.lstsq(A, y, rcond=None)
    assert m["weight"]["closed_form"] == pytest.approx(coef[0], abs=1e-12)
    assert m["bias"]["closed_form"] == pytest.approx(coef[1], abs=1e-12)
    # Var(coef) = s^2 (A^T A)^-1 with s^2 = RSS / (n - 2): the slope's standard error is the [0, 0] entry.
    cov = rss[0] / (len(x) - 2) * np.linalg.inv(A.T @ A)
    assert m["statistical_error"]["weight_se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    assert m["statistical_error"]["weight"] == pytest.approx(abs(coef[0] - 3.0), abs=1e-12)
    assert m["optimisation_gap"]["weight"] == pytest.approx(abs(2.9 - coef[0]), abs=1e-12)

    xt, yt = test["x"].to_numpy(), test["y"].to_numpy()
    residual = yt - (2.9 * xt + 0.1)
    assert m["test"]["mse_learned"] == pytest.approx(np.mean(residual**2), rel=1e-12)
    assert m["test"]["r2_learned"] == pytest.approx(1 - np.sum(residual**2) / np.sum((yt - yt.mean()) ** 2), rel=1e-12)
    assert m["train"]["mse_closed_form"] == pytest.approx(rss[0] / len(x), rel=1e-10)
    assert m["weight"]["true"] == 3.0 and m["weight"]["learned"] == 2.9


def test_noise_free_data_has_zero_error_and_standard_error(cfg: config.Config) -> None:
    train, test = data.generate(dataclasses.replace(cfg.generate, noise_std=0.0))
    m = evaluate.compute_metrics(cfg.generate, LineFit(np.array([3.0]), 0.0), train, test)
    assert m["statistical_error"]["weight"] < 1e-12 and m["statistical_error"]["weight_se"] < 1e-7
    assert m["test"]["r2_closed_form"] == pytest.approx(1.0)


def test_several_features_get_one_entry_per_coefficient(cfg: config.Config) -> None:
    p = dataclasses.replace(cfg.generate, true_weights=[1.0, -2.0], n_samples=200)
    train, test = data.generate(p)
    X, y = data.split_xy(train)
    coef = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)[0]
    m = evaluate.compute_metrics(p, LineFit(np.array([1.0, -2.0]), 0.0), train, test)
    assert [m["weight_1"]["closed_form"], m["weight_2"]["closed_form"]] == pytest.approx(coef[:2], abs=1e-12)
    assert set(m["statistical_error"]) == {"weight_1", "weight_2", "weight_1_se", "weight_2_se"}
    assert m["weight_2"]["true"] == -2.0


def test_flatten_names_like_dvc_and_skips_what_does_not_apply() -> None:
    tree = {"a": {"b": 1, "c": {"d": 2.5}, "n": None}, "e": 3}
    assert tracking.flatten(tree) == {"a.b": 1.0, "a.c.d": 2.5, "e": 3.0}


def test_model_file_round_trips_without_pickle(tmp_path: Path) -> None:
    model = loop.make_model(3)
    (tmp_path / "m.safetensors").write_bytes(state_dict_bytes(model))
    line = evaluate.load_line(tmp_path / "m.safetensors")
    assert line.weight == model.weight.item() and line.bias == model.bias.item()
    assert state_dict_bytes(model) == state_dict_bytes(loop.make_model(3))  # same weights, same bytes
    back = loop.make_model(0)
    back.load_state_dict(safetensors.torch.load((tmp_path / "m.safetensors").read_bytes()))
    assert torch.equal(back.weight, model.weight) and torch.equal(back.bias, model.bias)


class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[object, ...]:
        return (Path.touch, (self.sentinel,))


def test_model_file_with_code_in_it_is_refused_and_not_run(tmp_path: Path) -> None:
    sentinel = tmp_path / "ran"
    path = tmp_path / "m.pt"
    torch.save({"weight": torch.zeros(1, 1), "bias": _Payload(sentinel)}, path)
    with pytest.raises(DataError, match="not a model state_dict"):
        evaluate.load_line(path)
    assert not sentinel.exists()


def test_plots_are_png_and_byte_stable(cfg: config.Config) -> None:
    epochs = np.arange(1, 11)
    loss = np.exp(-epochs / 3.0)
    first = plots.loss_plot(epochs, loss, 0.01)
    assert first.startswith(b"\x89PNG\r\n\x1a\n") and first == plots.loss_plot(epochs, loss, 0.01)
    line = LineFit(np.array([3.0]), 0.0)
    x = np.linspace(-1, 1, 5).reshape(-1, 1)
    assert plots.fit_plot(x, 3 * x[:, 0], x, 3 * x[:, 0], {"true": line}).startswith(b"\x89PNG")
    assert plots.params_plot(epochs, {"weight": loss, "bias": loss}, line, line).startswith(b"\x89PNG")
    two = LineFit(np.array([3.0, 1.0]), 0.0)
    X2 = np.column_stack([x[:, 0], x[:, 0] ** 2])
    assert plots.fit_plot(X2, X2 @ two.weights, X2, X2 @ two.weights, {"true": two}).startswith(b"\x89PNG")
    path = np.linspace(0, 3, 10)
    assert plots.landscape_plot(x, 3 * x[:, 0], line, line, path, path / 10, "weight").startswith(b"\x89PNG")
    assert plots.convergence_plot(np.geomspace(3, 1e-5, 20), 1e-4, 0.5, 16).startswith(b"\x89PNG")


def test_scatter_plots_draw_a_bounded_sample_of_large_data() -> None:
    X = np.arange(1_000_003, dtype=np.float64).reshape(-1, 1)
    thinned, y = plots._thin(X, X[:, 0])
    assert len(thinned) <= plots.MAX_POINTS and thinned[0, 0] == 0 and thinned[-1, 0] > 0.99 * len(X) - 1 - 201
    assert np.array_equal(thinned[:, 0], y)  # rows stay paired


def test_closed_form_is_exact_on_a_known_line() -> None:
    x = np.array([0.0, 1.0, 2.0, 3.0])
    fit = theory.closed_form(x.reshape(-1, 1), 2.0 * x - 1.0)
    assert fit.weight == pytest.approx(2.0) and fit.bias == pytest.approx(-1.0)
