"""Load a trained model (a tasks.train checkpoint or an exported ONNX model) in one call, predict in one more.

    model = mobilevision.load("best.ckpt")      # or "model.onnx" (with its model.json beside it)
    result = model.predict("photo.jpg")          # a path, a PIL image or an RGB uint8 numpy array
    result.plot()                                # PIL image: boxes with names and scores, or the mask overlay
    result.to_coco()                             # detection: COCO result dicts
    result.mask_image()                          # segmentation: VOC palette PNG (a PIL "P" image)

Preprocessing and decoding are tasks.predict's (the checkpoint's own val transforms, the head's decoding),
and the pictures tasks.analysis.visualize's, so a notebook sees exactly what `python -m tasks.predict` writes.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

ImageInput = str | Path | Image.Image | np.ndarray


@dataclass
class Result:
    """One image's prediction, in the image's own pixels."""

    image: np.ndarray                      # uint8 [H, W, 3] RGB, as predicted on
    task: str                              # detection | segmentation
    class_names: list[str]
    source: str = "image"
    boxes: np.ndarray | None = None        # detection: [N, 4] xyxy pixels
    scores: np.ndarray | None = None       # detection: [N]
    labels: np.ndarray | None = None       # detection: [N] in 0..K-1 (index into class_names)
    mask: np.ndarray | None = None         # segmentation: [H, W] class indices (0 = background)
    label_to_cat_id: list[int] | None = field(default=None, repr=False)

    def plot(self, score_threshold: float = 0.3, alpha: float = 0.5) -> Image.Image:
        """The picture tasks.predict writes: boxes >= score_threshold, or the mask blended at alpha."""
        from tasks.analysis.visualize import draw_detections, draw_mask

        if self.task == "detection":
            return draw_detections(self.image, self.boxes, self.scores, self.labels, self.class_names,
                                   score_threshold)
        return draw_mask(self.image, self.mask, alpha, self.class_names)

    def to_coco(self, image_id: int | str | None = None) -> list[dict[str, Any]]:
        """Detection: COCO result dicts (bbox [x, y, w, h] pixels, category_id through the dataset's ids)."""
        from tasks.inference.inputs import Frame
        from tasks.inference.results import coco_results

        if self.task != "detection":
            raise ValueError("to_coco() is for detection results; a segmentation result has mask_image().")
        name = str(image_id) if image_id is not None else Path(self.source).stem
        result = {"boxes": torch.as_tensor(self.boxes), "scores": torch.as_tensor(self.scores),
                  "labels": torch.as_tensor(self.labels)}
        return coco_results(Frame(name, self.source, self.image), result, self.class_names, self.label_to_cat_id)

    def mask_image(self) -> Image.Image:
        """Segmentation: the label map as a VOC palette PNG image (pixel values are class indices)."""
        from tasks.segmentation.palette import label_to_image

        if self.task != "segmentation":
            raise ValueError("mask_image() is for segmentation results; a detection result has to_coco().")
        return label_to_image(self.mask)

    def __len__(self) -> int:
        return len(self.scores) if self.task == "detection" else int((self.mask > 0).sum())


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3] (or gray [H, W]); got shape {array.shape}.")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


class Predictor:
    """A trained model with its own preprocessing and decoding; `predict` takes one image or many."""

    def __init__(self, model: Any, meta: dict[str, Any], runtime: str, device: str = "cpu",
                 trusted_targets: Sequence[str] = ()):
        from tasks.inference.runtime import Preprocessor, val_transforms_config

        self.model = model
        self.meta = meta
        self.runtime = runtime
        self.device = device
        self.task: str = meta["task"]
        self.class_names: list[str] = list(meta["class_names"])
        self.preprocess = Preprocessor(self.task, val_transforms_config(meta), meta["input_size"],
                                       meta.get("config_source", "the model's config"), trusted_targets)

    def _frames(self, inputs: Iterable[ImageInput]) -> Iterator[tuple[str, np.ndarray]]:
        from tasks.inference.inputs import iter_inputs

        for item in inputs:
            if isinstance(item, (str, Path)):
                for frame in iter_inputs([item], video_stride=1):
                    yield frame.source, frame.image
            else:
                yield "image", _as_rgb(item)

    @torch.no_grad()
    def predict(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 8) -> Result | list[Result]:
        """One image (path, PIL, numpy) -> Result; a list of them, or a folder or video path -> list[Result]."""
        from tasks.inference.runtime import decode, forward

        single = not isinstance(images, (list, tuple)) and not (
            isinstance(images, (str, Path)) and not Path(images).is_file())
        items = [images] if not isinstance(images, (list, tuple)) else list(images)
        frames = list(self._frames(items))
        results: list[Result] = []
        for start in range(0, len(frames), batch_size):
            batch = frames[start:start + batch_size]
            tensors, valid = zip(*(self.preprocess(image) for _, image in batch))
            inputs = torch.stack(tensors)
            outputs = forward(self.model, inputs.to(self.device) if self.runtime == "pytorch" else inputs,
                              self.preprocess.input_size)
            decoded = decode(self.model, outputs, [image.shape[:2] for _, image in batch], self.task,
                             self.preprocess.canvas, list(valid))
            for (source, image), out in zip(batch, decoded):
                out = {k: v.detach().cpu().numpy() for k, v in out.items()}
                results.append(Result(image, self.task, self.class_names, source, out.get("boxes"), out.get("scores"),
                                      out.get("labels"), out.get("mask"), self.meta.get("label_to_cat_id")))
        return results[0] if single and len(results) == 1 else results

    __call__ = predict

    def __repr__(self) -> str:
        return (f"Predictor(task={self.task}, runtime={self.runtime}, input_size={self.preprocess.input_size}, "
                f"classes={self.class_names})")


def load(path: str | Path, device: str = "cpu", threads: int | None = None,
         trusted_targets: Sequence[str] = ()) -> Predictor:
    """A tasks.train checkpoint (.ckpt/.pt, run by PyTorch) or an exported .onnx (run by ONNX Runtime, its
    model.json sidecar beside it) as a Predictor. Its config is data: it may only name this project's own
    classes, or those under the module prefixes in `trusted_targets` (e.g. ["my_plugins"])."""
    from tasks.inference.runtime import load_runtime

    path = Path(path)
    runtime = "onnxruntime" if path.suffix == ".onnx" else "pytorch"
    with tempfile.TemporaryDirectory() as scratch:  # load_runtime writes only when it exports on the fly
        model, meta = load_runtime(str(path) if runtime == "pytorch" else None,
                                   str(path) if runtime == "onnxruntime" else None, runtime, Path(scratch),
                                   threads, device, trusted_targets)
    return Predictor(model.eval(), meta, runtime, device, trusted_targets)
