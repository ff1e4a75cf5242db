"""The box rules every detection check applies: finite, positive size, inside the image (or clipped)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.datasets.report import Collector

# A box may reach this far beyond the image and still be clipped (a warning); farther is refused.
CLIP_TOLERANCE_PX = 3.0
CLIP_TOLERANCE_FRACTION = 0.02


def check_boxes(probs: Collector, boxes: np.ndarray, sizes: np.ndarray,
                 describe: Callable[[int], tuple[Path | str, str]]) -> np.ndarray:
    """boxes: float64 [N,4] xyxy in 0-based continuous pixels; sizes: [N,2] (width, height) of each box's
    image; describe(i) -> (file, "subject of the sentence"). Returns which boxes the loader keeps."""
    x1, y1, x2, y2 = boxes.T
    W, H = sizes.T
    with np.errstate(invalid="ignore", over="ignore"):
        w, h = x2 - x1, y2 - y1
        finite = np.isfinite(boxes).all(1) & np.isfinite(w) & np.isfinite(h)
        negative = finite & ((w < 0) | (h < 0))
        empty = finite & ~negative & ((w == 0) | (h == 0))
        sane = finite & ~negative & ~empty
        outside = sane & ((x1 >= W) | (y1 >= H) | (x2 <= 0) | (y2 <= 0))
        huge = sane & ~outside & ((w > 2 * W) | (h > 2 * H))
        over_x = np.maximum(np.maximum(-x1, x2 - W), 0.0)
        over_y = np.maximum(np.maximum(-y1, y2 - H), 0.0)
        tol_x = np.maximum(CLIP_TOLERANCE_PX, CLIP_TOLERANCE_FRACTION * W)
        tol_y = np.maximum(CLIP_TOLERANCE_PX, CLIP_TOLERANCE_FRACTION * H)
        inside = sane & ~outside & ~huge
        far = inside & ((over_x > tol_x) | (over_y > tol_y))
        clipped = inside & ~far & ((over_x > 0) | (over_y > 0))

    def with_text(text: Callable[[int], str]) -> Callable[[int], tuple[Path | str, str]]:
        def fn(i: int) -> tuple[Path | str, str]:
            file, subject = describe(i)
            return file, f"{subject} {text(i)}"
        return fn

    def img(i: int) -> str:
        return f"{W[i]:g}x{H[i]:g} image"

    probs.first("bad box", ~finite, with_text(
        lambda i: "holds a NaN or infinite number; expected finite pixel coordinates."))
    probs.first("bad box", negative, with_text(
        lambda i: f"has width {w[i]:g} and height {h[i]:g}; expected a positive width and height."))
    probs.first("box outside image", outside, with_text(
        lambda i: f"lies entirely outside the {img(i)}; expected a box inside the image."))
    probs.first("box outside image", huge, with_text(
        lambda i: f"is {w[i]:g}x{h[i]:g}, more than twice the {img(i)}; expected a box inside the image."))
    probs.first("box outside image", far, with_text(
        lambda i: f"reaches {max(over_x[i], over_y[i]):g} px beyond the {img(i)}; expected at most "
                  f"{tol_x[i] if over_x[i] > tol_x[i] else tol_y[i]:g} px outside ({CLIP_TOLERANCE_FRACTION:.0%} "
                  f"of the side, at least {CLIP_TOLERANCE_PX:g} px), which would be clipped."))
    probs.first("box clipped", clipped, with_text(
        lambda i: f"reaches {max(over_x[i], over_y[i]):g} px beyond the {img(i)} and is clipped to it."),
        fatal=False)
    probs.first("empty box dropped", empty, with_text(
        lambda i: f"has width {w[i]:g} and height {h[i]:g}, so it is dropped; expected a positive size."),
        fatal=False)
    return sane & ~outside & ~huge & ~far


# ----------------------------------------------------------------------------------------- COCO
