"""Run a trained model on images, folders or videos:
`python -m tasks.predict checkpoint=... inputs=[img.jpg,folder/,clip.mp4] [runtime=onnxruntime] [onnx=model.onnx]`
(or `runtime=litert|executorch artifact=model.tflite|model.pte`).

Preprocessing is the checkpoint's own val transforms (instantiated from the training config it carries,
or from the ONNX sidecar's copy of it). Per input image, or per `video_stride`-th video frame, it writes:
- detection: `<name>.png` (boxes with class names and scores) and `<name>.json`, a list of COCO results
  {"image_id", "file_name", "category_id", "label", "category_name", "bbox" [x, y, w, h] pixels, "score"};
  `category_id` goes back through the dataset's label_to_cat_id (COCO), else it is label + 1;
  `results.json` holds every image's detections in one list;
- segmentation: `<name>.png` (colour overlay) and `<name>_mask.png` (VOC palette PNG of class indices).
`predictions.json` lists what was written for each input.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from tasks.analysis.visualize import draw_detections, draw_mask
from tasks.cli import run
from tasks.deploy.onnx_export import export_model
from tasks.deploy.sidecar import model_metadata, read_sidecar, write_json
from tasks.detection.coco import load_rgb
from tasks.errors import ConfigError, user_errors_exit
from tasks.resolve import instantiate_node
from tasks.segmentation.palette import save_label_png
from tasks.segmentation.transforms import eval_valid_size
from tasks.training.trained import load_trained_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
RUNTIMES = ("pytorch", "onnxruntime", "litert", "executorch")


# -- inputs --------------------------------------------------------------------------------------
@dataclass
class Frame:
    name: str          # stem of the files written for it, unique within a run
    source: str        # the image file name, or "<video name>#frame=<index>"
    image: np.ndarray  # uint8 [H, W, 3] RGB


def read_video(path: Path, stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """Every `stride`-th frame (0, stride, 2 stride, ...) of a video, decoded by OpenCV."""
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise ValueError(f"video {path} cannot be opened by OpenCV; expected a readable video file "
                         f"({', '.join(sorted(VIDEO_SUFFIXES))}).")
    index = kept = 0
    try:
        while max_frames is None or kept < max_frames:
            ok = capture.grab()
            if not ok:
                break
            if index % stride == 0:
                ok, frame = capture.retrieve()
                if not ok:
                    break
                kept += 1
                yield Frame(f"{path.stem}_frame{index:06d}", f"{path.name}#frame={index}",
                            cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise ValueError(f"video {path} has no frames OpenCV can decode.")


def _files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
    if not files:
        raise ValueError(f"folder {folder} holds no images or videos; expected files ending in "
                         f"{', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))}.")
    return files


def iter_inputs(inputs: Sequence[str | Path], video_stride: int = 1, max_frames: int | None = None) -> Iterator[Frame]:
    """Images, folders (their images and videos, not recursive) and videos, in the order given."""
    if video_stride < 1:
        raise ConfigError(f"video_stride={video_stride} must be a positive integer.")
    used: dict[str, int] = {}

    def unique(name: str) -> str:
        count = used.get(name, 0)
        used[name] = count + 1
        return name if count == 0 else f"{name}_{count}"

    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise FileNotFoundError(f"input {path} does not exist; expected an image, a folder or a video.")
        for file in _files(path) if path.is_dir() else [path]:
            suffix = file.suffix.lower()
            if suffix in VIDEO_SUFFIXES:
                for frame in read_video(file, video_stride, max_frames):
                    frame.name = unique(frame.name)
                    yield frame
            elif suffix in IMAGE_SUFFIXES:
                try:
                    image = load_rgb(file)
                except OSError as err:
                    raise ValueError(f"image {file} cannot be decoded ({err}).") from None
                yield Frame(unique(file.stem), file.name, image)
            else:
                raise ValueError(f"input {file} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))}) "
                                 f"nor a video ({', '.join(sorted(VIDEO_SUFFIXES))}).")


def batches(frames: Iterable[Frame], size: int) -> Iterator[list[Frame]]:
    batch: list[Frame] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- model and preprocessing --------------------------------------------------------------------
def val_transforms_config(meta: dict[str, Any]) -> dict[str, Any]:
    """The val transforms of the training config; a plain rebuild from the sidecar if it has none."""
    train_config = meta.get("train_config") or {}
    transforms = ((train_config.get("dataset") or {}).get("val") or {}).get("transforms")
    if transforms:
        return dict(transforms)
    size = int(meta["input_size"][0])
    if meta["task"] == "detection":
        return {"_target_": "tasks.detection.transforms.build_detection_transforms", "size": size,
                "train": False, "mean": meta["mean"], "std": meta["std"]}
    return {"_target_": "tasks.segmentation.transforms.build_segmentation_transforms", "crop_size": size,
            "train": False, "mean": meta["mean"], "std": meta["std"]}


class Preprocessor:
    """RGB uint8 image -> (normalised [3, H, W] input, (h, w) of the input region the image fills)."""

    def __init__(self, task: str, transforms_cfg: dict[str, Any], input_size: Sequence[int]):
        self.task = task
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.transform = instantiate_node(transforms_cfg)

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = image.shape[:2]
        if self.task == "detection":
            tensor = self.transform(image)[0]
            valid = self.input_size
        else:
            tensor = self.transform(image, np.zeros((h, w), np.uint8))[0]
            valid = eval_valid_size(h, w, self.input_size[0])
        if tuple(tensor.shape[-2:]) != self.input_size:
            raise ValueError(f"the val transforms made a {tuple(tensor.shape[-2:])} input of a {h}x{w} image; "
                             f"the model takes {self.input_size}.")
        return tensor, valid


def load_runtime(checkpoint: str | None, onnx: str | None, runtime: str, out_dir: Path,
                 threads: int | None = None, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """(model with the PyTorch model's surface, its sidecar-style description). For litert and executorch,
    `onnx` is the deployed file (.tflite / .pte) made by `tasks.export format=...`."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime} is not allowed; expected one of {', '.join(RUNTIMES)}.")
    if runtime == "pytorch":
        if not checkpoint:
            raise ConfigError("runtime=pytorch needs checkpoint=<path to a tasks.train checkpoint>.")
        if onnx:
            log.warning("runtime=pytorch runs %s; onnx=%s is not used (set runtime=onnxruntime)", checkpoint, onnx)
        model, cfg = load_trained_model(checkpoint)
        meta = model_metadata(cfg) | {"train_config": OmegaConf.to_container(cfg, resolve=True)}
        return model.to(device), meta
    if runtime != "onnxruntime":
        from tasks.deploy.runner import load_deployed

        if not onnx:
            raise ConfigError(f"runtime={runtime} needs artifact=<file made by tasks.export format=...>.")
        model = load_deployed(onnx, runtime, threads)
        return model, model.metadata
    from tasks.deploy.onnx_runtime import OnnxModel

    if not onnx:
        if not checkpoint:
            raise ConfigError("runtime=onnxruntime needs onnx=<model.onnx> or checkpoint=<path> to export.")
        model, cfg = load_trained_model(checkpoint)
        onnx = str(export_model(model, cfg, out_dir / "model.onnx", source=str(checkpoint)))
        log.info("exported %s to %s", checkpoint, onnx)
    elif checkpoint:
        log.info("runtime=onnxruntime runs %s; checkpoint=%s is not used", onnx, checkpoint)
    model = OnnxModel(onnx, threads=threads)
    return model, read_sidecar(onnx)


def decode(model: Any, outputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]], task: str,
           input_size: Sequence[int], valid_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """The head's predict (PyTorch) or the ONNX runner's; segmentation crops the padding away first."""
    predictor = getattr(model, "head", model)  # BackboneWithHead.predict does not pass the crop arguments
    if task == "segmentation":
        return predictor.predict(outputs, image_sizes, input_size=tuple(input_size), valid_sizes=valid_sizes)
    return predictor.predict(outputs, image_sizes)


# -- outputs -------------------------------------------------------------------------------------
def coco_results(frame: Frame, result: dict[str, torch.Tensor], class_names: Sequence[str],
                 label_to_cat_id: Sequence[int] | None) -> list[dict[str, Any]]:
    # COCO file names are the image id (000000000139.jpg -> 139); anything else keeps its name.
    image_id: int | str = int(frame.name) if frame.name.isdigit() else frame.name
    entries = []
    for box, score, label in zip(result["boxes"].tolist(), result["scores"].tolist(), result["labels"].tolist()):
        x1, y1, x2, y2 = box
        entries.append({
            "image_id": image_id,
            "file_name": frame.source,
            "category_id": int(label_to_cat_id[label]) if label_to_cat_id else int(label) + 1,
            "label": int(label),
            "category_name": class_names[label] if label < len(class_names) else str(label),
            "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
            "score": round(float(score), 6),
        })
    return entries


def predict(checkpoint: str | None, inputs: Sequence[str | Path], out_dir: str | Path, runtime: str = "pytorch",
            onnx: str | None = None, batch_size: int = 8, video_stride: int = 10, max_frames: int | None = None,
            draw_score_threshold: float = 0.3, mask_alpha: float = 0.5, threads: int | None = None,
            device: str = "cpu") -> dict[str, Any]:
    """Writes the pictures and JSONs described in the module docstring; returns predictions.json's content."""
    if not inputs:
        raise ConfigError("inputs is empty; expected inputs=[image.jpg, folder/, video.mp4].")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, meta = load_runtime(checkpoint, onnx, runtime, out_dir, threads, device)
    task, class_names, cat_ids = meta["task"], list(meta["class_names"]), meta.get("label_to_cat_id")
    preprocess = Preprocessor(task, val_transforms_config(meta), meta["input_size"])
    written: list[dict[str, Any]] = []
    all_results: list[dict[str, Any]] = []
    for batch in batches(iter_inputs(inputs, video_stride, max_frames), batch_size):
        tensors, valid = zip(*(preprocess(f.image) for f in batch))
        images = torch.stack(tensors)
        with torch.no_grad():
            outputs = model(images.to(device) if runtime == "pytorch" else images)
            results = decode(model, outputs, [f.image.shape[:2] for f in batch], task, preprocess.input_size,
                             list(valid))
        for frame, result in zip(batch, results):
            result = {k: v.detach().cpu() for k, v in result.items()}
            entry: dict[str, Any] = {"source": frame.source, "image": f"{frame.name}.png"}
            if task == "detection":
                picture = draw_detections(frame.image, result["boxes"], result["scores"], result["labels"],
                                          class_names, draw_score_threshold)
                detections = coco_results(frame, result, class_names, cat_ids)
                write_json(detections, out_dir / f"{frame.name}.json")
                all_results += detections
                entry |= {"json": f"{frame.name}.json", "detections": len(detections)}
            else:
                picture = draw_mask(frame.image, result["mask"], mask_alpha, class_names)
                save_label_png(result["mask"], out_dir / f"{frame.name}_mask.png")
                counts = np.bincount(result["mask"].numpy().reshape(-1), minlength=len(class_names))
                pixels = {class_names[k]: int(c) for k, c in enumerate(counts[:len(class_names)]) if c}
                entry |= {"mask": f"{frame.name}_mask.png", "pixels": pixels}
            picture.save(out_dir / f"{frame.name}.png")
            written.append(entry)
    if task == "detection":
        write_json(all_results, out_dir / "results.json")
    source = str(checkpoint) if runtime == "pytorch" else str(model.path)
    summary = {"task": task, "runtime": runtime, "model": source, "class_names": class_names, "outputs": written}
    write_json(summary, out_dir / "predictions.json")
    return summary


@hydra.main(config_path="../conf", config_name="predict", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inputs = list(cfg.inputs) if isinstance(cfg.inputs, (ListConfig, list, tuple)) else [cfg.inputs]
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    summary = predict(cfg.checkpoint, inputs, out_dir, cfg.runtime, cfg.get("artifact") or cfg.onnx, cfg.batch_size,
                      cfg.video_stride,
                      cfg.max_frames, cfg.draw_score_threshold, cfg.mask_alpha, cfg.threads, cfg.device)
    print(f"{len(summary['outputs'])} images predicted ({summary['task']}, {summary['runtime']}); "
          f"results in {out_dir}")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "predict")


if __name__ == "__main__":
    cli()
