"""The figures of an evaluation and of a dataset (matplotlib, Agg canvas): confusion matrices, per-class bars,
precision-recall curves, label statistics. Each function returns a Figure; `save_figure` writes it as a PNG
and returns the picture (for TensorBoard and the HTML report)."""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from tasks.analysis.visualize import class_colour


def save_figure(fig: Figure, path: str | Path | None = None, dpi: int = 100) -> Image.Image:
    """Render `fig` (a bare Figure: pyplot's global state is left alone) to a PNG at `path` and return it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png", pil_kwargs={"compress_level": 1})
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def confusion_matrix_figure(matrix: np.ndarray, row_names: Sequence[str], column_names: Sequence[str] | None = None,
                            title: str = "confusion matrix", xlabel: str = "prediction", ylabel: str = "truth",
                            normalise: bool = True) -> Figure:
    """A heat map of `matrix` (rows = truth): each row divided by its sum when `normalise` (so the diagonal is
    the recall), the raw counts written in the cells when there is room."""
    matrix = np.asarray(matrix, np.float64)
    column_names = list(column_names or row_names)
    sums = matrix.sum(1, keepdims=True)
    shown = np.divide(matrix, sums, out=np.zeros_like(matrix), where=sums > 0) if normalise else matrix
    n_rows, n_cols = shown.shape
    side = min(16.0, max(5.0, 0.45 * max(n_rows, n_cols) + 2.5))
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalise else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
                 label="share of the row (truth)" if normalise else "count")
    ax.set_xticks(range(n_cols), column_names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n_rows), list(row_names))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if max(n_rows, n_cols) <= 25:
        for i in range(n_rows):
            for j in range(n_cols):
                if matrix[i, j]:
                    text = f"{shown[i, j]:.2f}" if normalise else f"{int(matrix[i, j])}"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8,
                            color="white" if shown[i, j] > 0.5 * (shown.max() or 1) else "black")
    fig.tight_layout()
    return fig


def class_bars_figure(values: Mapping[str, float], title: str, xlabel: str, colours: Sequence[str] | None = None,
                      limit: tuple[float, float] | None = (0.0, 1.0), sort: bool = False,
                      log: bool = False) -> Figure:
    """Horizontal bars, one per class, the value written beside each; NaN (no such objects) shows as "n/a"."""
    names = list(values)
    numbers = np.asarray([values[n] for n in names], np.float64)
    colours = list(colours) if colours is not None else ["#4c72b0"] * len(names)
    if sort:
        order = np.argsort(np.nan_to_num(numbers, nan=-np.inf), kind="stable")[::-1]
        names, numbers, colours = [names[i] for i in order], numbers[order], [colours[i] for i in order]
    fig = Figure(figsize=(7, max(2.5, 0.3 * len(names) + 1.2)))
    ax = fig.add_subplot()
    positions = np.arange(len(names))
    ax.barh(positions, np.nan_to_num(numbers, nan=0.0), color=colours, edgecolor="#333333", linewidth=0.5)
    ax.set_yticks(positions, names)
    ax.invert_yaxis()
    if log:
        ax.set_xscale("log")
    elif limit is not None:
        ax.set_xlim(limit[0], limit[1] * 1.12)
    for y, value in zip(positions, numbers):
        label = "n/a" if np.isnan(value) else (f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}")
        ax.text(value if np.isfinite(value) and value > 0 else (limit[0] if limit and not log else 1), y,
                f" {label}", va="center", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def pr_curves_figure(recall: np.ndarray, precision: Mapping[str, np.ndarray], ap: Mapping[str, float],
                     overall: np.ndarray | None = None, title: str = "precision-recall",
                     colours: Mapping[str, str] | None = None) -> Figure:
    """One curve per class on a shared recall grid (NaN where a class has no ground truth: left out), the
    mean over classes drawn thick in black as "all classes"."""
    fig = Figure(figsize=(7, 5.5))
    ax = fig.add_subplot()
    for name, curve in precision.items():
        curve = np.asarray(curve, np.float64)
        if np.all(np.isnan(curve)):
            continue
        ax.plot(recall, curve, linewidth=1.2, label=f"{name} (AP {ap.get(name, float('nan')):.3f})",
                color=(colours or {}).get(name))
    if overall is not None and not np.all(np.isnan(overall)):
        mean_ap = float(np.nanmean([v for v in ap.values()])) if ap else float("nan")
        ax.plot(recall, overall, color="black", linewidth=3, label=f"all classes (mAP {mean_ap:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles = len(ax.lines)
    if handles:
        ax.legend(fontsize="x-small" if handles > 12 else "small", loc="lower left",
                  ncol=2 if handles > 12 else 1)
    fig.tight_layout()
    return fig


def class_colours(class_names: Sequence[str], offset: int = 0) -> list[str]:
    """The colours boxes (offset 0) or masks (offset -1: label k takes palette entry k) are drawn in."""
    return [_hex(class_colour(k + offset)) for k in range(len(class_names))]


def detection_label_stats_figure(widths: np.ndarray, heights: np.ndarray, labels: np.ndarray,
                                 class_names: Sequence[str], default_boxes: np.ndarray | None = None,
                                 title: str = "labels") -> Figure:
    """Instances per class; box width vs height, normalised to the image (what the square-resized model sees),
    with the SSD default boxes' (w, h) on top; box scale sqrt(w h) and aspect ratio w / h histograms with
    the default boxes' values marked."""
    widths, heights = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    labels = np.asarray(labels, np.int64)
    colours = class_colours(class_names)
    fig = Figure(figsize=(max(13.0, 0.16 * len(class_names) + 6.0), 9))
    axes = fig.subplots(2, 2)
    counts = np.bincount(labels, minlength=len(class_names))[:len(class_names)]
    ax = axes[0, 0]
    ax.bar(range(len(class_names)), counts, color=colours, edgecolor="#333333", linewidth=0.5)
    ax.set_xticks(range(len(class_names)), class_names, rotation=60 if len(class_names) > 6 else 0,
                  ha="right" if len(class_names) > 6 else "center", rotation_mode="anchor", fontsize=8)
    ax.set_ylabel("instances")
    ax.set_title(f"instances per class ({len(labels):,} boxes)")
    ax = axes[0, 1]
    if len(widths):
        sample = np.random.default_rng(0).permutation(len(widths))[:20000]
        ax.scatter(widths[sample], heights[sample], s=7, alpha=0.5, c=[colours[k] for k in labels[sample]],
                   label="ground truth", linewidths=0)
    if default_boxes is not None and len(default_boxes):
        ax.scatter(default_boxes[:, 0], default_boxes[:, 1], marker="x", s=60, c="black", label="default boxes")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(5e-3, 1.2)
    ax.set_ylim(5e-3, 1.2)
    ax.set_xlabel("box width / image width")
    ax.set_ylabel("box height / image height")
    ax.set_title("box sizes vs the SSDLite default boxes")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="upper left")
    scale = np.sqrt(widths * heights)
    ax = axes[1, 0]
    ax.hist(scale, bins=np.geomspace(5e-3, 1.0, 40), color="#4c72b0", alpha=0.8)
    ax.set_xscale("log")
    if default_boxes is not None and len(default_boxes):
        for value in np.unique(np.round(np.sqrt(default_boxes[:, 0] * default_boxes[:, 1]), 4)):
            ax.axvline(value, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel("box scale sqrt(w h) (normalised); dashed: default-box scales")
    ax.set_ylabel("boxes")
    ax.set_title("box scales")
    ax = axes[1, 1]
    ratio = widths / np.maximum(heights, 1e-9)
    ax.hist(ratio, bins=np.geomspace(1 / 8, 8, 40), color="#55a868", alpha=0.8)
    ax.set_xscale("log")
    if default_boxes is not None and len(default_boxes):
        for value in np.unique(np.round(default_boxes[:, 0] / default_boxes[:, 1], 3)):
            ax.axvline(value, color="black", linestyle="--", linewidth=1)
    ticks = [1 / 8, 1 / 4, 1 / 3, 1 / 2, 1, 2, 3, 4, 8]
    ax.set_xticks(ticks, ["1/8", "1/4", "1/3", "1/2", "1", "2", "3", "4", "8"])
    ax.set_xticks([], minor=True)
    ax.set_xlabel("aspect ratio w / h (normalised); dashed: default-box ratios")

    ax.set_ylabel("boxes")
    ax.set_title("aspect ratios")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def segmentation_label_stats_figure(pixels: np.ndarray, images_with: np.ndarray, ignored: int, images: int,
                                    class_names: Sequence[str], title: str = "labels") -> Figure:
    """Share of the (non-ignored) pixels per class and the number of images each class appears in."""
    pixels = np.asarray(pixels, np.float64)
    share = pixels / max(pixels.sum(), 1.0)
    colours = class_colours(class_names, offset=-1)
    fig = Figure(figsize=(12, max(3.0, 0.3 * len(class_names) + 1.5)))
    left, right = fig.subplots(1, 2)
    positions = np.arange(len(class_names))
    left.barh(positions, share, color=colours, edgecolor="#333333", linewidth=0.5)
    left.set_xscale("log")
    left.set_yticks(positions, class_names)
    left.invert_yaxis()
    floor = share[share > 0].min() / 3 if (share > 0).any() else 1e-6
    left.set_xlim(floor, 1.5)
    for y, value in zip(positions, share):
        left.text(max(value, floor), y, f" {100 * value:.2f}%" if value > 0 else " none", va="center", fontsize=8)
    total = pixels.sum() + ignored
    left.set_xlabel("share of labelled pixels (log)")
    left.set_title(f"pixel share per class ({100 * ignored / max(total, 1):.1f}% of pixels are 'ignore')")
    right.barh(positions, images_with, color=colours, edgecolor="#333333", linewidth=0.5)
    right.set_yticks(positions, class_names)
    right.invert_yaxis()
    right.set_xlabel("images")
    right.set_title(f"images containing the class (of {images:,})")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


__all__ = ["save_figure", "confusion_matrix_figure", "class_bars_figure", "pr_curves_figure", "class_colours",
           "detection_label_stats_figure", "segmentation_label_stats_figure"]
