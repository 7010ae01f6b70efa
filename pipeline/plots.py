"""The evaluation figures as PNG bytes. Pure: data in, bytes out (byte-identical for identical data)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from pipeline.data import Table, weight_names
from pipeline.theory import LineFit, Moments, mse_grid

# Figures are built with matplotlib's object API, not pyplot: no global figure state, no GUI backend.


def _png(fig: Figure, left: float = 0.12, right: float = 0.97, bottom: float = 0.12, top: float = 0.91) -> bytes:
    # Fixed margins instead of tight_layout, which took most of this stage's plotting (bench P1).
    fig.subplots_adjust(left=left, right=right, bottom=bottom, top=top)
    buf = io.BytesIO()
    # No "Software" metadata: it carries matplotlib's version; the bytes should depend on the data only.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


MAX_POINTS = 5000  # per scatter: more only slows the drawing (bench P5 evaluate at N=1e8)


def _thin(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every k-th row so that at most MAX_POINTS remain: deterministic, and as spread out as the data."""
    step = max(1, -(-len(arrays[0]) // MAX_POINTS))
    return tuple(a[::step] for a in arrays)


def fit_plot(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, lines: dict[str, LineFit]) -> bytes:
    """One feature: the data with each fitted line over it. More: predicted against actual y, per model."""
    X, y = _thin(X, y)
    Xt, yt = _thin(Xt, yt)
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    styles = ("-", "--", ":")
    if X.shape[1] == 1:
        ax.scatter(X[:, 0], y, s=12, alpha=0.7, label="train")
        ax.scatter(Xt[:, 0], yt, s=12, alpha=0.7, marker="x", label="test")
        xs = np.linspace(min(X.min(), Xt.min()), max(X.max(), Xt.max()), 2).reshape(-1, 1)
        for (label, line), style in zip(lines.items(), styles, strict=False):
            ax.plot(xs, line.predict(xs), style, lw=1.8, label=f"{label}: y = {line.weight:.4f} x + {line.bias:.4f}")
        ax.set(xlabel="x", ylabel="y", title="Data and fitted lines")
    else:
        for (label, line), marker in zip(lines.items(), ("o", "x", "+"), strict=False):
            ax.scatter(yt, line.predict(Xt), s=12, alpha=0.7, marker=marker, label=f"{label} (test rows)")
        lo, hi = float(yt.min()), float(yt.max())
        ax.plot([lo, hi], [lo, hi], "k-", lw=1, label="prediction = actual")
        ax.set(xlabel="actual y", ylabel="predicted y", title=f"Predictions with {X.shape[1]} features")
    ax.legend(fontsize=8)
    return _png(fig)


def loss_plot(epochs: np.ndarray, loss: np.ndarray, test_loss: np.ndarray, floor: float) -> bytes:
    """Training and test loss per epoch on a log scale, with the closed form's training loss as the floor the
    first approaches; the gap between the two curves is how much worse the line does on rows it never saw."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(epochs, loss, lw=1.5, label="training loss (MSE)")
    ax.plot(epochs, test_loss, lw=1.5, color="tab:orange", label="test loss (MSE, held-out rows)")
    ax.axhline(floor, color="k", ls="--", lw=1, label=f"closed-form training MSE = {floor:.6g}")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="MSE", title="Loss per epoch")
    ax.legend(fontsize=8)
    return _png(fig)


def params_plot(epochs: np.ndarray, series: dict[str, np.ndarray], closed: LineFit, true: LineFit) -> bytes:
    """Each parameter after each epoch, against its closed-form and true values."""
    refs = dict(zip(series, closed.params(), strict=True)), dict(zip(series, true.params(), strict=True))
    fig = Figure(figsize=(6, 2.5 * len(series)))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, values) in zip(axes, series.items(), strict=True):
        ax.plot(epochs, values, lw=1.5, label=f"learned {name}")
        ax.axhline(refs[0][name], color="k", ls="--", lw=1, label=f"closed form = {refs[0][name]:.4f}")
        ax.axhline(refs[1][name], color="tab:red", ls=":", lw=1, label=f"true = {refs[1][name]:g}")
        ax.set_ylabel(name)
        ax.legend(fontsize=8, loc="best")
    axes[-1].set_xlabel("epoch")
    axes[0].set_title("Parameters per epoch")
    return _png(fig)


def landscape_plot(
    moments: Moments,
    closed: LineFit,
    true: LineFit,
    path_w: np.ndarray,
    path_b: np.ndarray,
    weight_name: str,
) -> bytes:
    """Contours of the training MSE over (first weight, bias), with the optimiser's path across them."""
    w_all = np.concatenate((path_w, [closed.weight, true.weight]))
    b_all = np.concatenate((path_b, [closed.bias, true.bias]))
    finite = np.isfinite(w_all) & np.isfinite(b_all)
    w_lo, w_hi = float(w_all[finite].min()), float(w_all[finite].max())
    b_lo, b_hi = float(b_all[finite].min()), float(b_all[finite].max())
    # A square window on equal axes: the contours keep their true shape and the path crosses them at right
    # angles (gradient descent follows the steepest slope), which a stretched axis would hide.
    half = 0.6 * max(w_hi - w_lo, b_hi - b_lo, 0.1)
    ws = np.linspace((w_lo + w_hi) / 2 - half, (w_lo + w_hi) / 2 + half, 160)
    bs = np.linspace((b_lo + b_hi) / 2 - half, (b_lo + b_hi) / 2 + half, 160)
    Z = mse_grid(moments, closed, ws, bs)
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    # Log-spaced levels: the quadratic bowl is steep far out and flat near the optimum.
    levels = np.geomspace(max(float(Z.min()), 1e-12) * 1.001, float(Z.max()), 18)
    cs = ax.contour(ws, bs, Z, levels=levels, cmap="viridis", linewidths=0.8)
    fig.colorbar(cs, ax=ax, label="training MSE")
    ax.plot(path_w, path_b, ".-", color="tab:orange", ms=3, lw=1, label="gradient descent, epoch by epoch")
    ax.plot(path_w[0], path_b[0], "s", color="tab:orange", label="initialisation")
    ax.plot(closed.weight, closed.bias, "k*", ms=12, label="closed-form optimum")
    ax.plot(true.weight, true.bias, "rx", ms=9, mew=2, label=f"true ({true.weight:g}, {true.bias:g})")
    ax.set(xlabel=weight_name, ylabel="bias", title="Loss landscape and the optimiser's path", aspect="equal")
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def convergence_plot(distances: np.ndarray, tol: float, contraction: float, predicted: int | None) -> bytes:
    """Distance to the closed-form optimum per epoch (epoch 0 = start) against theory's bound."""
    epochs = np.arange(len(distances))
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.semilogy(epochs, np.maximum(distances, 1e-300), lw=1.5, label="observed ‖θ − θ*‖")
    if contraction < 1:
        ax.semilogy(
            epochs, distances[0] * contraction**epochs, "k--", lw=1, label=f"bound ‖θ₀ − θ*‖·{contraction:.4f}^t"
        )
    ax.axhline(tol, color="tab:red", ls=":", lw=1, label=f"tolerance {tol:g}")
    if predicted is not None:
        ax.axvline(predicted, color="tab:green", ls=":", lw=1, label=f"predicted epochs: {predicted}")
    ax.set(xlabel="epoch", ylabel="distance to the optimum", title="Convergence: theory vs observed")
    ax.legend(fontsize=8)
    return _png(fig)


def figures(
    train: Moments,
    train_sample: Table,
    test_sample: Table,
    trajectory: dict[str, np.ndarray],
    test_loss: np.ndarray,
    train_metrics: dict[str, Any],
    lines: dict[str, LineFit],
) -> dict[str, bytes]:
    """The evaluation's PNGs, by file name. lines: "learned", "closed form" and "true"; train_metrics: train.json;
    test_loss: the test MSE per epoch."""
    init, convergence = train_metrics["init"], train_metrics["convergence"]
    closed, true = lines["closed form"], lines["true"]
    names = weight_names(train.k)
    epochs = trajectory["epoch"]
    # The optimiser's path through (first weight, bias), starting from the random initialisation.
    path_w = np.concatenate(([init[names[0]]], trajectory[names[0]]))
    path_b = np.concatenate(([init["bias"]], trajectory["bias"]))
    params = np.column_stack([trajectory[n] for n in [*names, "bias"]]).astype(np.float64)
    start = np.array([init[n] for n in [*names, "bias"]])
    distances = np.linalg.norm(np.vstack([start, params]) - closed.params(), axis=1)
    return {
        "fit.png": fit_plot(train_sample.X, train_sample.y, test_sample.X, test_sample.y, lines),
        "loss.png": loss_plot(epochs, trajectory["loss"], test_loss, train.mse(closed)),
        "params.png": params_plot(epochs, {n: trajectory[n] for n in [*names, "bias"]}, closed, true),
        "landscape.png": landscape_plot(train, closed, true, path_w, path_b, names[0]),
        "convergence.png": convergence_plot(
            distances,
            convergence["tolerance"],
            train_metrics["stability"]["contraction"],
            convergence.get("predicted_epochs"),
        ),
    }
