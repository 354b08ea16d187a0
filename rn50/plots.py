"""The pictures the stages write beside their numbers: training curves, confusion matrices,
benchmark bars. Matplotlib with the Agg backend (no display needed); every PNG is written
atomically (``rn50.atomic``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path

DPI = 100
# beyond this many classes the confusion matrices carry no class names and no cell numbers
MAX_LABELLED_CLASSES = 30
MAX_ANNOTATED_CLASSES = 20


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    plt = _pyplot()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(fig)


def smooth(y: Sequence[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred moving average of ``y`` over ``window`` points: (positions in ``y``'s index, values)."""
    v = np.asarray(y, dtype=np.float64)
    w = max(1, min(window, len(v)))
    out = np.convolve(v, np.ones(w) / w, mode="valid")
    return np.arange(len(out)) + (w - 1) / 2, out


def training_curves(steps: Sequence[Mapping[str, Any]], history: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Four panels over the schedule, in epochs: training loss per record with a smoothed line,
    the learning rate, validation top-1/top-5 per epoch and training images/s.

    ``steps`` are ``train.steplog`` records (may be empty: a run without
    ``steps.jsonl`` draws its per-epoch figures only), ``history`` the per-epoch records of ``metrics.jsonl``.
    """
    plt = _pyplot()
    fig, ((a_loss, a_lr), (a_val, a_ips)) = plt.subplots(2, 2, figsize=(11, 7))
    ep_x = [r["epoch"] for r in history]  # validation: at the end of its epoch (counted from 1)
    mid_x = [r["epoch"] - 0.5 for r in history]  # an epoch's mean: in its middle
    marker = "o" if len(history) <= 30 else None
    window = max(1, len(steps) // 30)

    def per_step(ax: Any, key: str, label: str) -> None:
        x = np.asarray([r["epoch"] for r in steps], dtype=np.float64)
        y = [r[key] for r in steps]
        every = _every(steps)
        ax.plot(
            x,
            y,
            color="tab:blue",
            alpha=0.3,
            lw=0.8,
            label=f"{label}, every {every} steps" if every > 1 else f"{label}, every step",
        )
        if window > 1:
            pos, sm = smooth(y, window)
            ax.plot(
                np.interp(pos, np.arange(len(x)), x),
                sm,
                color="tab:blue",
                lw=2,
                label=f"moving average of {window} records",
            )

    if steps:
        per_step(a_loss, "loss", "training loss")
    a_loss.plot(mid_x, [r["train_loss"] for r in history], color="tab:orange", marker=marker, lw=1, label="epoch mean")
    a_loss.set(xlabel="epoch", ylabel="loss", title="training loss")
    if steps:
        a_lr.plot([r["epoch"] for r in steps], [r["lr"] for r in steps], color="tab:green")
    else:
        a_lr.plot(ep_x, [r["lr"] for r in history], color="tab:green", marker=marker)
    a_lr.set(xlabel="epoch", ylabel="learning rate", title="learning-rate schedule")
    a_lr.set_ylim(bottom=0)

    top1 = [r["val_top1"] for r in history]
    a_val.plot(ep_x, top1, marker=marker, label="top-1")
    a_val.plot(ep_x, [r["val_top5"] for r in history], marker=marker, label="top-5")
    finite = [(v, -x) for v, x in zip(top1, ep_x) if isinstance(v, (int, float)) and math.isfinite(v)]
    best = ""
    if finite:
        v, at = max(finite)  # the first epoch that reached the best
        best = f"; best top-1 {v:.2f} % (epoch {-at})"
    a_val.set(xlabel="epoch", ylabel="accuracy (%)", title=f"validation accuracy per epoch{best}")

    if steps:
        per_step(a_ips, "img_per_s", "images/s")
    a_ips.plot(
        mid_x,
        [r["img_per_s"] for r in history],
        color="tab:orange",
        marker=marker,
        lw=1,
        label="epoch mean (with loader start)",
    )
    a_ips.set(xlabel="epoch", ylabel="images/s", title="training throughput (all ranks)")
    a_ips.set_ylim(bottom=0)
    for ax in (a_loss, a_val, a_ips):
        ax.legend(fontsize=8)
    for ax in (a_loss, a_lr, a_val, a_ips):
        ax.grid(alpha=0.3)
        if ep_x or steps:
            end = max([*ep_x, *(r["epoch"] for r in steps), 1])
            ax.set_xlim(0, end * 1.03)  # room for the last epoch's markers, drawn on its end
    fig.tight_layout()
    _save(fig, path)


def _every(steps: Sequence[Mapping[str, Any]]) -> int:
    return int(steps[1]["step"] - steps[0]["step"]) if len(steps) > 1 else 1


def confusion_matrices(
    engine: np.ndarray,
    reference: np.ndarray,
    classes: Sequence[str],
    path: str | Path,
    engine_name: str = "engine",
    reference_name: str = "PyTorch",
) -> None:
    """Two panels: the engine's confusion matrix (rows true class, columns predicted; colour the
    share of the row, numbers the image counts) and engine minus reference (counts; red where
    the engine puts more images than the reference, blue fewer)."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    n = len(classes)
    interp = "nearest" if n <= 200 else "antialiased"  # more classes than pixels: average, not drop, cells
    side = min(7.0, max(4.5, 0.45 * n))
    fig, (a_eng, a_diff) = plt.subplots(1, 2, figsize=(2 * side + 1.5, side + 0.8))
    rows = engine.sum(1, keepdims=True)
    share = np.divide(engine, rows, out=np.zeros(engine.shape, dtype=np.float64), where=rows > 0)
    im = a_eng.imshow(share * 100, cmap="Blues", vmin=0, vmax=100, interpolation=interp)
    fig.colorbar(im, ax=a_eng, fraction=0.046, pad=0.04, label="% of the true class")
    a_eng.set_title(f"{engine_name}: confusion matrix", fontsize=10)
    diff = engine.astype(np.int64) - reference.astype(np.int64)
    lim = max(1, int(np.abs(diff).max()))
    im2 = a_diff.imshow(diff, cmap="RdBu_r", norm=TwoSlopeNorm(0, -lim, lim), interpolation=interp)
    fig.colorbar(im2, ax=a_diff, fraction=0.046, pad=0.04, label="images")
    a_diff.set_title(f"{engine_name} minus {reference_name} (images)", fontsize=10)
    for ax, values, skip_zero in ((a_eng, engine, False), (a_diff, diff, True)):
        ax.set(xlabel="predicted class", ylabel="true class")
        if n <= MAX_LABELLED_CLASSES:
            ax.set_xticks(range(n), classes, rotation=60, ha="right", fontsize=8)
            ax.set_yticks(range(n), classes, fontsize=8)
        if n <= MAX_ANNOTATED_CLASSES:
            for i in range(n):
                for j in range(n):
                    v = int(values[i, j])
                    if v or not skip_zero:
                        dark = share[i, j] > 0.6 if ax is a_eng else abs(v) > 0.6 * lim
                        ax.text(
                            j,
                            i,
                            f"{v:+d}" if skip_zero else str(v),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="white" if dark else "black",
                        )
    fig.tight_layout()
    _save(fig, path)


def throughput_bars(
    title: str, panels: Mapping[str, Mapping[str, float]], path: str | Path, unit: str = "images/s"
) -> None:
    """Horizontal bars, one panel per key of ``panels`` (e.g. a batch size), each bar labelled with
    its value. A panel whose values span more than 20x uses a log scale."""
    plt = _pyplot()
    n_bars = max((len(v) for v in panels.values()), default=1)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 2.5, 0.45 * n_bars + 1.6), squeeze=False)
    for ax, (name, bars) in zip(axes[0], panels.items()):
        labels, values = list(bars)[::-1], list(bars.values())[::-1]
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels, fontsize=9)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_xscale("log")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
        ax.set_xlim(right=max(values, default=1) * (4 if ax.get_xscale() == "log" else 1.25))
        ax.set(xlabel=unit, title=name)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    _save(fig, path)
