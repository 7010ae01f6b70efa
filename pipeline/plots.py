"""The evaluation figures as PNG bytes. Pure: data in, bytes out (byte-identical for identical data)."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

from pipeline.theory import LineFit

# Figures are built with matplotlib's object API, not pyplot: no global figure state, no GUI backend.


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    # No "Software" metadata: it carries matplotlib's version; the bytes should depend on the data only.
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def fit_plot(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, lines: dict[str, LineFit]
) -> bytes:
    """The data with each fitted line drawn over it."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.scatter(x_train, y_train, s=12, alpha=0.7, label="train")
    ax.scatter(x_test, y_test, s=12, alpha=0.7, marker="x", label="test")
    xs = np.linspace(min(x_train.min(), x_test.min()), max(x_train.max(), x_test.max()), 2)
    for (label, line), style in zip(lines.items(), ("-", "--", ":"), strict=False):
        ax.plot(xs, line.predict(xs), style, lw=1.8, label=f"{label}: y = {line.weight:.4f} x + {line.bias:.4f}")
    ax.set(xlabel="x", ylabel="y", title="Data and fitted lines")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def loss_plot(epochs: np.ndarray, loss: np.ndarray, floor: float) -> bytes:
    """Training loss per epoch on a log scale, with the closed form's loss as the floor it approaches."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(epochs, loss, lw=1.5, label="training loss (MSE)")
    ax.axhline(floor, color="k", ls="--", lw=1, label=f"closed-form MSE = {floor:.6g}")
    ax.set_yscale("log")
    ax.set(xlabel="epoch", ylabel="MSE", title="Loss per epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def params_plot(epochs: np.ndarray, weight: np.ndarray, bias: np.ndarray, closed: LineFit, true: LineFit) -> bytes:
    """Weight and bias after each epoch against the closed-form and true values."""
    fig = Figure(figsize=(6, 5))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, name, values, ref, truth in (
        (axes[0], "weight", weight, closed.weight, true.weight),
        (axes[1], "bias", bias, closed.bias, true.bias),
    ):
        ax.plot(epochs, values, lw=1.5, label=f"learned {name}")
        ax.axhline(ref, color="k", ls="--", lw=1, label=f"closed form = {ref:.4f}")
        ax.axhline(truth, color="tab:red", ls=":", lw=1, label=f"true = {truth:g}")
        ax.set_ylabel(name)
        ax.legend(fontsize=8, loc="best")
    axes[1].set_xlabel("epoch")
    axes[0].set_title("Parameters per epoch")
    fig.tight_layout()
    return _png(fig)
