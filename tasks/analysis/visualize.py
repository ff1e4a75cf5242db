"""Pictures of results: boxes with labels, mask overlays, image grids (PIL), and a run's loss/metric curves
(matplotlib). The evaluation and dataset figures (confusion matrices, PR curves, label statistics) are in
tasks/analysis/plots.py; predict, browse and the evaluation report all draw with these."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tasks.segmentation.palette import VOC_PALETTE, overlay


def _numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _rgb(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3]; got {array.dtype} {array.shape}.")
    return Image.fromarray(array)


def class_colour(label: int) -> tuple[int, int, int]:
    """Object label k takes VOC palette entry k + 1 (entry 0 is background's black)."""
    r, g, b = VOC_PALETTE[(int(label) + 1) % 255]
    return int(r), int(g), int(b)


def draw_detections(image: Image.Image | np.ndarray, boxes: Any, scores: Any, labels: Any,
                    class_names: Sequence[str] | None = None, score_threshold: float = 0.0,
                    line_width: int | None = None) -> Image.Image:
    """A copy of `image` with each box (xyxy pixels) whose score >= threshold drawn with "name 0.87".
    `scores=None` draws ground truth: every box, labelled with its class name only."""
    canvas = _rgb(image).copy()
    boxes = _numpy(boxes).reshape(-1, 4)
    labels = _numpy(labels).reshape(-1).astype(np.int64)
    truth = scores is None
    scores = np.ones(len(labels)) if truth else _numpy(scores).reshape(-1)
    if not len(boxes) == len(scores) == len(labels):
        raise ValueError(f"draw_detections got {len(boxes)} boxes, {len(scores)} scores and {len(labels)} "
                         f"labels; expected equal counts.")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = line_width or max(1, round(max(canvas.size) / 200))
    for i in np.argsort(scores, kind="stable"):  # the best box is drawn last, on top
        if scores[i] < score_threshold:
            continue
        label = int(labels[i])
        name = class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)
        colour = class_colour(label)
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=width)
        text = name if truth else f"{name} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1
        draw.rectangle((x1, ty, x1 + tw + 4, ty + th + 2), fill=colour)
        text_colour = (0, 0, 0) if sum(colour) > 382 else (255, 255, 255)
        draw.text((x1 + 2, ty - top + 1), text, fill=text_colour, font=font)
    return canvas


def draw_mask(image: Image.Image | np.ndarray, mask: Any, alpha: float = 0.5,
              class_names: Sequence[str] | None = None, legend: bool = True) -> Image.Image:
    """The mask's VOC colours blended over the image (background and ignore left clear), with a legend
    of the classes present when `class_names` is given."""
    rgb = _rgb(image)
    labels = _numpy(mask)
    canvas = Image.fromarray(overlay(np.asarray(rgb), labels, alpha=alpha))
    if legend and class_names is not None:
        present = [int(k) for k in np.unique(labels) if 0 < k < len(class_names)]
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        y = 2
        for k in present:
            colour = tuple(int(c) for c in VOC_PALETTE[k])
            draw.rectangle((2, y, 10, y + 8), fill=colour, outline=(255, 255, 255))
            draw.text((13, y - 1), class_names[k], fill=(255, 255, 255), font=font)
            y += 11
    return canvas


# Headline metrics, plotted when a run logs more than MAX_METRIC_CURVES (COCOeval logs 12 numbers).
PREFERRED_METRICS = ("AP", "AP50", "AP75", "AR100", "mAP50", "mIoU", "pixel_acc", "mean_acc")
MAX_METRIC_CURVES = 6


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) where the value is a finite number; COCOeval's -1 ("no such objects") is left out."""
    xs, ys = [], []
    for i, record in enumerate(history):
        value = record.get(key)
        if isinstance(value, (int, float)) and np.isfinite(value) and not (key.startswith("val/") and value == -1):
            xs.append(float(record.get("epoch", i + 1)))
            ys.append(float(value))
    return xs, ys


def plot_history(history: Sequence[Mapping[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Loss curves (train/*loss*) and headline metrics (val/<name>, per-class entries left out) per epoch,
    side by side, as a PNG. `history` is the engine's list of per-epoch dicts."""
    # A bare Figure renders with the Agg canvas and leaves pyplot's global backend and figures alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("plot_history got an empty history; expected one dict per epoch with 'epoch' and "
                         "'train/...' / 'val/...' values.")
    keys: list[str] = []
    for record in history:
        keys += [k for k in record if k not in keys]
    losses = [k for k in keys if k.startswith("train/") and "loss" in k]
    metrics = [k for k in keys if k.startswith("val/") and k.count("/") == 1]
    if len(metrics) > MAX_METRIC_CURVES:
        preferred = [f"val/{name}" for name in PREFERRED_METRICS if f"val/{name}" in metrics]
        metrics = preferred or metrics[:MAX_METRIC_CURVES]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, squeeze=False)
    for ax, names, heading in ((axes[0, 0], losses, "training loss"), (axes[0, 1], metrics, "validation")):
        for name in names:
            xs, ys = _series(history, name)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=name.split("/", 1)[1])
        ax.set_title(heading)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100, format="png")
    return path


def denormalise(image: Any, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A model input [3, H, W] normalised as (x / 255 - mean) / std back to an RGB uint8 [H, W, 3] picture."""
    array = _numpy(image).astype(np.float32)
    if array.ndim != 3 or array.shape[0] != 3:
        raise ValueError(f"denormalise expects a [3, H, W] image tensor; got shape {array.shape}.")
    mean_ = np.asarray(mean, np.float32).reshape(3, 1, 1)
    std_ = np.asarray(std, np.float32).reshape(3, 1, 1)
    pixels = (array * std_ + mean_) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def caption(image: Image.Image | np.ndarray, text: str, height: int = 14) -> Image.Image:
    """The image with a white strip on top holding `text` (cut to the image's width)."""
    picture = _rgb(image)
    font = ImageFont.load_default()
    canvas = Image.new("RGB", (picture.width, picture.height + height), (255, 255, 255))
    canvas.paste(picture, (0, height))
    draw = ImageDraw.Draw(canvas)
    while text and draw.textlength(text, font=font) > picture.width - 4:
        text = text[:-2] + "…" if len(text) > 2 else ""
    draw.text((2, 1), text, fill=(0, 0, 0), font=font)
    return canvas


def side_by_side(images: Sequence[Image.Image | np.ndarray], gap: int = 2) -> Image.Image:
    """Pictures of the same height in one row, `gap` white pixels apart."""
    pictures = [_rgb(im) for im in images]
    height = max(p.height for p in pictures)
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + gap * (len(pictures) - 1), height), (255, 255, 255))
    x = 0
    for picture in pictures:
        canvas.paste(picture, (x, 0))
        x += picture.width + gap
    return canvas


def image_grid(images: Sequence[Image.Image | np.ndarray], captions: Sequence[str] | None = None,
               columns: int | None = None, tile_width: int = 320, gap: int = 4) -> Image.Image:
    """Tiles scaled to `tile_width` (keeping their aspect ratio), each under its caption, in rows of
    `columns` (default: a near-square layout)."""
    if not images:
        raise ValueError("image_grid got no images; expected at least one.")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"image_grid got {len(images)} images and {len(captions)} captions; expected equal counts.")
    tiles = []
    for i, image in enumerate(images):
        picture = _rgb(image)
        scale = tile_width / picture.width
        picture = picture.resize((tile_width, max(1, round(picture.height * scale))), Image.Resampling.BILINEAR)
        tiles.append(caption(picture, captions[i]) if captions is not None else picture)
    columns = columns or int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / columns))
    row_heights = [max(t.height for t in tiles[r * columns:(r + 1) * columns]) for r in range(rows)]
    canvas = Image.new("RGB", (columns * tile_width + (columns + 1) * gap, sum(row_heights) + (rows + 1) * gap),
                       (255, 255, 255))
    y = gap
    for r in range(rows):
        for c, tile in enumerate(tiles[r * columns:(r + 1) * columns]):
            canvas.paste(tile, (gap + c * (tile_width + gap), y))
        y += row_heights[r] + gap
    return canvas


__all__ = ["draw_detections", "draw_mask", "plot_history", "class_colour", "denormalise", "caption",
           "side_by_side", "image_grid"]
