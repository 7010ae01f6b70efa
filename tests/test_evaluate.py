"""The evaluation numbers against independent computations (numpy least squares, textbook formulas)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from pipeline import config, data, evaluate, loop, plots, record, theory
from pipeline.data import DataError
from pipeline.theory import LineFit
from tests.training import run


def metrics_of(p: config.GenerateParams, learned: LineFit, train: data.Table, test: data.Table) -> dict:  # type: ignore[type-arg]
    """compute_metrics as the stage calls it: scikit-learn's fit and the tables' moments."""
    ols = theory.closed_form(train.X, train.y)
    return evaluate.compute_metrics(
        p, learned, ols, theory.Moments.of(train.X, train.y), theory.Moments.of(test.X, test.y)
    )


def test_metrics_match_numpy_least_squares_and_textbook_formulas(cfg: config.Config) -> None:
    train, test = data.generate(cfg.generate)
    learned = LineFit(weights=np.array([2.9]), bias=0.1)
    m = metrics_of(cfg.generate, learned, train, test)

    x, y = train.X[:, 0].astype(np.float64), train.y.astype(np.float64)
    A = np.column_stack([x, np.ones_like(x)])
    coef, rss, *_ = np.linalg.lstsq(A, y, rcond=None)
    assert m["weight"]["closed_form"] == pytest.approx(coef[0], abs=1e-12)
    assert m["bias"]["closed_form"] == pytest.approx(coef[1], abs=1e-12)
    # Var(coef) = s^2 (A^T A)^-1 with s^2 = RSS / (n - 2): the slope's standard error is the [0, 0] entry.
    cov = rss[0] / (len(x) - 2) * np.linalg.inv(A.T @ A)
    assert m["statistical_error"]["weight_se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    assert m["statistical_error"]["bias_se"] == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-10)
    assert m["statistical_error"]["bias"] == pytest.approx(abs(coef[1] - 0.0), abs=1e-12)
    assert m["statistical_error"]["weight"] == pytest.approx(abs(coef[0] - 3.0), abs=1e-12)
    assert m["optimisation_gap"]["weight"] == pytest.approx(abs(2.9 - coef[0]), abs=1e-12)

    xt, yt = test.X[:, 0].astype(np.float64), test.y.astype(np.float64)
    residual = yt - (2.9 * xt + 0.1)
    assert m["test"]["mse_learned"] == pytest.approx(np.mean(residual**2), rel=1e-12)
    assert m["test"]["r2_learned"] == pytest.approx(1 - np.sum(residual**2) / np.sum((yt - yt.mean()) ** 2), rel=1e-12)
    assert m["train"]["mse_closed_form"] == pytest.approx(rss[0] / len(x), rel=1e-10)
    assert m["weight"]["true"] == 3.0 and m["weight"]["learned"] == 2.9


def test_the_gate_passes_the_closed_form_and_names_each_check_it_fails(cfg: config.Config) -> None:
    train, test = data.generate(cfg.generate)
    x, y = train.X[:, 0].astype(np.float64), train.y.astype(np.float64)
    A = np.column_stack([x, np.ones_like(x)])
    coef, rss, *_ = np.linalg.lstsq(A, y, rcond=None)
    se = np.sqrt(rss[0] / (len(x) - 2) * np.diag(np.linalg.inv(A.T @ A)))  # the oracle's standard errors
    closed = LineFit(np.array([coef[0]]), float(coef[1]))
    verdict = evaluate.gate(metrics_of(cfg.generate, closed, train, test), tolerance=1e-4)
    assert verdict.reasons == [] and verdict.numbers["passed"] is True
    assert verdict.numbers["max_z"] == pytest.approx(max(abs(coef[0] - 3.0) / se[0], abs(coef[1]) / se[1]), rel=1e-8)
    # 1. Stopped short of the closed form: 0.001 off in the weight moves the test MSE by less than the margin.
    near = LineFit(np.array([coef[0] + 0.001]), float(coef[1]))
    (reason,) = evaluate.gate(metrics_of(cfg.generate, near, train, test), tolerance=1e-4).reasons
    assert reason == "learned parameters 0.001 from the closed form, beyond the tolerance 0.0001", reason
    # 2. A truth the data does not support: the weight 5 standard errors from it (the bias is left where it is).
    far = dataclasses.replace(cfg.generate, true_weights=[coef[0] - 5 * se[0]], b_true=float(coef[1]))
    verdict = evaluate.gate(metrics_of(far, closed, train, test), tolerance=1e-4)
    assert verdict.reasons == ["closed-form weight 5 standard errors from the truth, beyond 3"]
    assert verdict.numbers["passed"] is False and verdict.numbers["max_z"] == pytest.approx(5.0)
    # 3. Worse on the held-out rows than the closed form by more than the margin (and far from it, so both fail).
    worse = LineFit(np.array([coef[0] + 0.2]), float(coef[1]))
    m = metrics_of(cfg.generate, worse, train, test)
    reasons = evaluate.gate(m, tolerance=1e-4).reasons
    assert len(reasons) == 2 and reasons[1].startswith("test MSE ") and reasons[1].endswith("beyond 1.01")
    xt, yt = test.X[:, 0].astype(np.float64), test.y.astype(np.float64)
    ratio = np.mean((worse.weights[0] * xt + worse.bias - yt) ** 2) / np.mean((coef[0] * xt + coef[1] - yt) ** 2)
    assert (
        evaluate.gate(m, tolerance=1e-4).numbers["test_mse_ratio"] == pytest.approx(ratio, rel=1e-10) and ratio > 1.01
    )


def test_noise_free_data_has_zero_error_and_standard_error(cfg: config.Config) -> None:
    train, test = data.generate(dataclasses.replace(cfg.generate, noise_std=0.0))
    m = metrics_of(cfg.generate, LineFit(np.array([3.0]), 0.0), train, test)
    # Exact up to the float32 rounding of the stored x and y (relative 6e-8).
    assert m["statistical_error"]["weight"] < 1e-6 and m["statistical_error"]["weight_se"] < 1e-6
    assert m["test"]["r2_closed_form"] == pytest.approx(1.0)
    # The gate still gives a verdict, whatever the rounding left of the closed form's MSE (0 or either side of it).
    for closed_mse in (0.0, -1e-18, 1e-18):
        exact = {**m, "test": {**m["test"], "mse_closed_form": closed_mse, "mse_learned": 0.0}}
        assert evaluate.gate(exact, tolerance=1.0).numbers["test_mse_ratio"] <= 1.0
    worse = {**m, "test": {**m["test"], "mse_closed_form": 0.0, "mse_learned": 1e-3}}
    assert "test MSE inf times" in evaluate.gate(worse, tolerance=1.0).reasons[-1]


def test_several_features_get_one_entry_per_coefficient(cfg: config.Config) -> None:
    p = dataclasses.replace(cfg.generate, true_weights=[1.0, -2.0], n_samples=200)
    train, test = data.generate(p)
    X, y = train.X.astype(np.float64), train.y.astype(np.float64)
    coef = np.linalg.lstsq(np.column_stack([X, np.ones(len(X))]), y, rcond=None)[0]
    m = metrics_of(p, LineFit(np.array([1.0, -2.0]), 0.0), train, test)
    assert [m["weight_1"]["closed_form"], m["weight_2"]["closed_form"]] == pytest.approx(coef[:2], abs=1e-12)
    assert set(m["statistical_error"]) == {"weight_1", "weight_2", "bias", "weight_1_se", "weight_2_se", "bias_se"}
    assert m["weight_2"]["true"] == -2.0


def test_flatten_names_like_dvc_and_skips_what_does_not_apply() -> None:
    tree = {"a": {"b": 1, "c": {"d": 2.5}, "n": None}, "e": 3}
    assert record.flatten(tree) == {"a.b": 1.0, "a.c.d": 2.5, "e": 3.0}


def test_model_file_round_trips_without_pickle(tmp_path: Path) -> None:
    model = loop.make_model(3)
    (tmp_path / "m.safetensors").write_bytes(safetensors.torch.save(model.state_dict()))
    line = evaluate.load_line(tmp_path / "m.safetensors")
    assert line.weight == model.weight.item() and line.bias == model.bias.item()
    assert safetensors.torch.save(model.state_dict()) == safetensors.torch.save(
        loop.make_model(3).state_dict()
    )  # same weights, same bytes
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
    first = plots.loss_plot(epochs, loss, 2 * loss, 0.01)
    assert first.startswith(b"\x89PNG\r\n\x1a\n") and first == plots.loss_plot(epochs, loss, 2 * loss, 0.01)
    line = LineFit(np.array([3.0]), 0.0)
    x = np.linspace(-1, 1, 5).reshape(-1, 1)
    assert plots.fit_plot(x, 3 * x[:, 0], x, 3 * x[:, 0], {"true": line}).startswith(b"\x89PNG")
    assert plots.params_plot(epochs, {"weight": loss, "bias": loss}, line, line).startswith(b"\x89PNG")
    two = LineFit(np.array([3.0, 1.0]), 0.0)
    X2 = np.column_stack([x[:, 0], x[:, 0] ** 2])
    assert plots.fit_plot(X2, X2 @ two.weights, X2, X2 @ two.weights, {"true": two}).startswith(b"\x89PNG")
    path = np.linspace(0, 3, 10)
    moments = theory.Moments.of(x, 3 * x[:, 0])
    assert plots.landscape_plot(moments, line, line, path, path / 10, "weight").startswith(b"\x89PNG")
    assert plots.convergence_plot(np.geomspace(3, 1e-5, 20), 1e-4, 0.5, 16).startswith(b"\x89PNG")


def as_read(trajectory: loop.Trajectory) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The trajectory as evaluate reads it (the CSV's columns, in float64) and train.json's `init`."""
    names = data.weight_names(trajectory.n_features)
    columns = {c: trajectory.column(c).astype(np.float64) for c in data.trajectory_columns(trajectory.n_features)}
    init = dict(zip([*names, "bias"], [*trajectory.init_weight.tolist(), trajectory.init_bias], strict=True))
    return columns, init


@pytest.mark.parametrize("weights", [[3.0], [3.0, -2.0, 0.5]])
def test_the_held_out_loss_is_the_mse_of_each_epochs_starting_parameters(
    cfg: config.Config, weights: list[float]
) -> None:
    g = dataclasses.replace(cfg.generate, true_weights=weights)
    train, test = data.generate(g)
    trajectory = run(cfg, X64=train.X.astype(np.float64), y64=train.y.astype(np.float64), epochs=30)
    columns, init = as_read(trajectory)
    got = evaluate.held_out_loss(columns, init, theory.Moments.of(test.X, test.y))
    # Oracle 1: the MSE summed row by row over the test table, at the start, then after each epoch but the last.
    X, y = test.X.astype(np.float64), test.y.astype(np.float64)
    expected = [np.mean((X @ p[:-1] + p[-1] - y) ** 2) for p in trajectory.path().astype(np.float64)[:-1]]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    # Oracle 2: the same function on the train table is the loss the training loop itself recorded (full batch:
    # each epoch's loss is measured before its one update), to float32's precision.
    on_train = evaluate.held_out_loss(columns, init, theory.Moments.of(train.X, train.y))
    np.testing.assert_allclose(on_train, trajectory.column("loss"), rtol=2e-6)


def test_the_held_out_loss_csv_reads_back_to_the_same_float64s() -> None:
    import io

    import pandas as pd

    values = np.array([9.301022465333917, 0.1 + 0.2, 1e-300, 2.5])
    text = evaluate.curve_csv(np.arange(1, 5), values, "test_loss")
    assert text.splitlines()[:2] == ["epoch,test_loss", "1,9.301022465333917"]
    back = pd.read_csv(io.StringIO(text), float_precision="round_trip")
    assert back["epoch"].tolist() == [1, 2, 3, 4] and back["test_loss"].to_numpy().tobytes() == values.tobytes()


def test_scatter_plots_draw_a_bounded_sample_of_large_data() -> None:
    X = np.arange(1_000_003, dtype=np.float64).reshape(-1, 1)
    thinned, y = plots._thin(X, X[:, 0])
    assert len(thinned) <= plots.MAX_POINTS and thinned[0, 0] == 0 and thinned[-1, 0] > 0.99 * len(X) - 1 - 201
    assert np.array_equal(thinned[:, 0], y)  # rows stay paired


def test_closed_form_is_exact_on_a_known_line() -> None:
    x = np.array([0.0, 1.0, 2.0, 3.0])
    fit = theory.closed_form(x.reshape(-1, 1), 2.0 * x - 1.0)
    assert fit.weight == pytest.approx(2.0) and fit.bias == pytest.approx(-1.0)


def test_one_streaming_scan_gives_the_tables_moments_and_an_even_sample(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(10_007, 1)).astype(np.float32), rng.normal(size=10_007).astype(np.float32)
    pieces = [(0, data.Table(X[i : i + 999], y[i : i + 999])) for i in range(0, len(y), 999)]  # 11 row groups
    data.write_tables(iter(pieces), [tmp_path / "t.parquet"], 1)
    s = evaluate.scan(tmp_path / "t.parquet", max_rows=500)
    whole = theory.Moments.of(X, y)
    assert s.moments.n == len(y)
    np.testing.assert_allclose(s.moments.mean, whole.mean, rtol=1e-12)
    np.testing.assert_allclose(s.moments.comoment, whole.comoment, rtol=1e-10)
    step = -(-len(y) // 500)  # the rows 0, step, 2 step, ... of the whole table, across row groups
    assert np.array_equal(s.sample.X, X[::step]) and np.array_equal(s.sample.y, y[::step])


def test_above_the_scikit_learn_limit_the_reference_comes_from_moments_and_agrees(
    cfg: config.Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = dataclasses.replace(cfg.generate, n_samples=20_000, true_weights=[1.0, -2.0])
    train, _ = data.generate(p)
    data.write_table(train, tmp_path / "t.parquet")
    m = evaluate.scan(tmp_path / "t.parquet", plots.MAX_POINTS).moments
    small, gap = evaluate.reference_fit(tmp_path / "t.parquet", m)  # checked against scikit-learn
    assert gap is not None and gap <= 1e-12
    monkeypatch.setattr(evaluate, "SKLEARN_MAX_ROWS", 1000)
    monkeypatch.setattr(theory, "closed_form", lambda *a: pytest.fail("scikit-learn called above its limit"))
    large, gap = evaluate.reference_fit(tmp_path / "t.parquet", m)  # moments alone
    assert gap is None
    A = np.column_stack([train.X.astype(np.float64), np.ones(len(train))])
    expected = np.linalg.lstsq(A, train.y.astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(small.params(), expected, rtol=1e-10)
    np.testing.assert_allclose(large.params(), expected, rtol=1e-10)


def test_collinear_features_stop_evaluate_with_one_line_instead_of_a_wrong_closed_form(tmp_path: Path) -> None:
    # Two columns that are the same feature to float32 precision: scikit-learn returns its minimum-norm
    # answer, the moments' solve another; neither is "the" closed form, so the stage says so.
    rng = np.random.default_rng(0)
    x = rng.standard_normal(200).astype(np.float32)
    X = np.column_stack([x, x + np.float32(1e-7) * rng.standard_normal(200).astype(np.float32)])
    data.write_table(data.Table(X, (3 * x).astype(np.float32)), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="too close to collinear") as e:
        evaluate.reference_fit(tmp_path / "t.parquet", evaluate.scan(tmp_path / "t.parquet", plots.MAX_POINTS).moments)
    assert "\n" not in str(e.value)
