"""Run a trained model on images, folders or videos:
`python -m tasks.predict checkpoint=... inputs=[img.jpg,folder/,clip.mp4] [runtime=onnxruntime] [onnx=model.onnx]`
(or `runtime=litert|executorch artifact=model.tflite|model.pte`).

Preprocessing is the checkpoint's own val transforms (instantiated, through tasks.resolve's allow-list,
from the training config it carries, or from the ONNX sidecar's copy of it); class names and category ids
come from the checkpoint's artifact (or the sidecar), never from the dataset. Per input image, or per
`video_stride`-th video frame, named `<name>` (the file's stem; a name already taken in this run gets
`_1`, `_2`, ... in input order), it writes:
- `images/<name>.png`: boxes with class names and scores, or the colour mask overlay;
- detection: `detections/<name>.json`, a list of COCO results
  {"image_id", "file_name", "category_id", "label", "category_name", "bbox" [x, y, w, h] pixels, "score"};
  `category_id` goes back through the checkpoint's label_to_cat_id (COCO), else it is label + 1;
- segmentation: `masks/<name>.png` (VOC palette PNG of class indices).
Run-level files sit apart at the top: `results.json` (every detection in one list) and `predictions.json`
(per input: its path, the name chosen and the files written; and the inputs skipped as unreadable).
The output folder never holds an input, and a folder that already holds predictions.json is refused.
"""
from __future__ import annotations

import logging
import os
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
from tasks.cli import CONFIG_DIR, run
from tasks.deploy.onnx_export import export_model
from tasks.deploy.sidecar import model_metadata, read_sidecar, refuse_to_overwrite, sidecar_path, write_json
from tasks.errors import ConfigError, user_errors_exit
from tasks.images import load_rgb
from tasks.resolve import check_file_config, instantiate_from_file
from tasks.segmentation.metrics import sliding_window_logits
from tasks.segmentation.palette import save_label_png
from tasks.segmentation.transforms import eval_valid_size
from tasks.training.trained import load_trained_model

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
RUNTIMES = ("pytorch", "onnxruntime", "litert", "executorch")
PER_IMAGE_FOLDERS = ("images", "detections", "masks")


# -- inputs --------------------------------------------------------------------------------------
@dataclass
class Frame:
    name: str          # stem of the files written for it, unique within a run
    source: str        # the image file name, or "<video name>#frame=<index>"
    image: np.ndarray  # uint8 [H, W, 3] RGB
    path: str = ""     # the input file as given


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
                            cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), str(path))
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


def iter_inputs(inputs: Sequence[str | Path], video_stride: int = 1, max_frames: int | None = None,
                skipped: list[dict[str, str]] | None = None) -> Iterator[Frame]:
    """Images, folders (their images and videos, not recursive) and videos, in the order given. An image
    that cannot be decoded is skipped with a warning (and appended to `skipped`)."""
    if video_stride < 1:
        raise ConfigError(f"video_stride={video_stride} must be a positive integer.")
    used: set[str] = set()

    def unique(name: str) -> str:
        """The name, or name_1, name_2, ...: the first not yet used in this run (case-insensitively, for
        file systems that fold case), so names never collide and the same inputs always get the same ones."""
        candidate, n = name, 0
        while candidate.casefold() in used:
            n += 1
            candidate = f"{name}_{n}"
        used.add(candidate.casefold())
        return candidate

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
                except (OSError, ValueError) as err:
                    log.warning("skipping %s: %s", file, err)
                    if skipped is not None:
                        skipped.append({"path": str(file), "reason": str(err)})
                    continue
                yield Frame(unique(file.stem), file.name, image, str(file))
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

    def __init__(self, task: str, transforms_cfg: dict[str, Any], input_size: Sequence[int],
                 source: str = "the model's config", trusted: Sequence[str] = ()):
        self.task = task
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.transform = instantiate_from_file(transforms_cfg, source, trusted)
        # segmentation trained with dataset.base_size > input size: the photo, its longer side resized to
        # base_size, is covered by input-size windows (as evaluation does)
        base_size = getattr(self.transform, "base_size", None) if task == "segmentation" else None
        side = max(self.input_size[0], int(base_size or 0))
        self.canvas = (side, side) if side > self.input_size[0] else self.input_size

    def __call__(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        h, w = image.shape[:2]
        if self.task == "detection":
            tensor = self.transform(image)[0]
            valid = self.input_size
        else:
            tensor = self.transform(image, np.zeros((h, w), np.uint8))[0]
            valid_size = getattr(self.transform, "valid_size", None)  # base_size: the longer side resized to it
            valid = valid_size(h, w) if valid_size is not None else eval_valid_size(h, w, self.input_size[0])
        if tuple(tensor.shape[-2:]) != self.canvas:
            raise ValueError(f"the val transforms made a {tuple(tensor.shape[-2:])} input of a {h}x{w} image; "
                             f"the model takes {self.canvas}.")
        return tensor, valid


def load_runtime(checkpoint: str | None, onnx: str | None, runtime: str, out_dir: Path,
                 threads: int | None = None, device: str = "cpu",
                 trusted: Sequence[str] = ()) -> tuple[Any, dict[str, Any]]:
    """(model with the PyTorch model's surface, its sidecar-style description). For litert and executorch,
    `onnx` is the deployed file (.tflite / .pte) made by `tasks.export format=...`."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"runtime={runtime} is not allowed; expected one of {', '.join(RUNTIMES)}.")
    if runtime == "pytorch":
        if not checkpoint:
            raise ConfigError("runtime=pytorch needs checkpoint=<path to a tasks.train checkpoint>.")
        if onnx:
            log.warning("runtime=pytorch runs %s; onnx=%s is not used (set runtime=onnxruntime)", checkpoint, onnx)
        model, cfg = load_trained_model(checkpoint, trusted=trusted)
        meta = model_metadata(cfg) | {"train_config": OmegaConf.to_container(cfg, resolve=True),
                                      "config_source": f"checkpoint {checkpoint}"}
        return model.to(device), meta
    if runtime != "onnxruntime":
        from tasks.deploy.runner import load_deployed

        if not onnx:
            raise ConfigError(f"runtime={runtime} needs artifact=<file made by tasks.export format=...>.")
        model = load_deployed(onnx, runtime, threads)
        return model, dict(model.metadata) | {"config_source": f"the sidecar of {onnx}"}
    from tasks.deploy.onnx_runtime import OnnxModel

    if not onnx:
        if not checkpoint:
            raise ConfigError("runtime=onnxruntime needs onnx=<model.onnx> or checkpoint=<path> to export.")
        refuse_to_overwrite([out_dir / "model.onnx", out_dir / "model.json"])
        model, cfg = load_trained_model(checkpoint, trusted=trusted)
        onnx = str(export_model(model, cfg, out_dir / "model.onnx", source=str(checkpoint)))
        log.info("exported %s to %s", checkpoint, onnx)
    elif checkpoint:
        log.info("runtime=onnxruntime runs %s; checkpoint=%s is not used", onnx, checkpoint)
    meta = read_sidecar(onnx) | {"config_source": f"ONNX sidecar {sidecar_path(onnx)}"}
    if meta.get("train_config"):  # checked before anything else: the sidecar is someone else's file
        check_file_config(meta["train_config"].get("dataset") or {}, meta["config_source"], trusted, "dataset")
    model = OnnxModel(onnx, threads=threads, metadata=meta)
    return model, meta


def forward(model: Any, images: torch.Tensor, input_size: Sequence[int]) -> dict[str, torch.Tensor]:
    """The model's outputs for a batch; a segmentation input larger than the model's input size (base_size) is
    covered by overlapping input-size windows, whatever runs the model (PyTorch or a deployed file)."""
    window = int(input_size[0])
    if max(images.shape[-2:]) <= window:
        return model(images)

    def logits(tile: torch.Tensor) -> torch.Tensor:
        out = model(tile)
        if "logits" not in out:
            raise ConfigError(f"this model outputs {sorted(out)} but a {tuple(images.shape[-2:])} input (base_size "
                              f"above the {window}-px input) is predicted window by window from 'logits'; export "
                              f"it without the label map in the graph.")
        return out["logits"]

    return {"logits": sliding_window_logits(logits, images, window)}


def decode(model: Any, outputs: dict[str, torch.Tensor], image_sizes: list[tuple[int, int]], task: str,
           input_size: Sequence[int], valid_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
    """The head's predict (PyTorch) or the ONNX runner's; segmentation crops the padding away first."""
    predictor = getattr(model, "head", model)  # BackboneWithHead.predict does not pass the crop arguments
    if task == "segmentation":
        return predictor.predict(outputs, image_sizes, input_size=tuple(input_size), valid_sizes=valid_sizes)
    return predictor.predict(outputs, image_sizes)


# -- outputs -------------------------------------------------------------------------------------
def check_output_dir(out_dir: Path, inputs: Sequence[str | Path]) -> None:
    """Refuse a folder (or its per-image subfolders) that holds an input, or that holds an earlier run's
    predictions; then create it."""
    written = {(out_dir / sub).resolve() for sub in ("", *PER_IMAGE_FOLDERS)}
    for item in inputs:
        path = Path(item)
        folder = path if path.is_dir() else path.parent
        if folder.resolve() in written:
            raise ConfigError(f"output_dir={out_dir} would write beside the input {path}; expected an output "
                              f"folder apart from the inputs (leave output_dir unset for a fresh run folder).")
    if (out_dir / "predictions.json").exists():
        raise ConfigError(f"output_dir={out_dir} already holds the predictions.json of an earlier run; choose "
                          f"another output_dir (or leave it unset for a fresh run folder).")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write_test.{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir={out_dir} cannot be written ({err.strerror or type(err).__name__}); "
                          f"expected a folder you can write to.") from None


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
            device: str = "cpu", trusted_targets: Sequence[str] = (), channels_last: bool = True) -> dict[str, Any]:
    """Writes the pictures and JSONs described in the module docstring; returns predictions.json's content."""
    if not inputs:
        raise ConfigError("inputs is empty; expected inputs=[image.jpg, folder/, video.mp4].")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer.")
    if str(device).startswith("cuda") and runtime == "pytorch" and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but PyTorch sees no CUDA GPU here; use device=cpu.")
    out_dir = Path(out_dir)
    check_output_dir(out_dir, inputs)
    model, meta = load_runtime(checkpoint, onnx, runtime, out_dir, threads, device, trusted_targets)
    layout = torch.channels_last if channels_last and runtime == "pytorch" else torch.preserve_format
    if runtime == "pytorch":
        model = model.to(memory_format=layout)
    task, class_names, cat_ids = meta["task"], list(meta["class_names"]), meta.get("label_to_cat_id")
    preprocess = Preprocessor(task, val_transforms_config(meta), meta["input_size"],
                              meta.get("config_source", "the model's config"), trusted_targets)
    written: list[dict[str, Any]] = []
    all_results: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for batch in batches(iter_inputs(inputs, video_stride, max_frames, skipped), batch_size):
        tensors, valid = zip(*(preprocess(f.image) for f in batch))
        images = torch.stack(tensors)
        with torch.no_grad():
            outputs = forward(model, images.to(device, memory_format=layout) if runtime == "pytorch" else images,
                              preprocess.input_size)
            results = decode(model, outputs, [f.image.shape[:2] for f in batch], task, preprocess.canvas,
                             list(valid))
        for frame, result in zip(batch, results):
            result = {k: v.detach().cpu() for k, v in result.items()}
            entry: dict[str, Any] = {"source": frame.source, "path": frame.path, "name": frame.name,
                                     "image": f"images/{frame.name}.png"}
            if task == "detection":
                picture = draw_detections(frame.image, result["boxes"], result["scores"], result["labels"],
                                          class_names, draw_score_threshold)
                detections = coco_results(frame, result, class_names, cat_ids)
                write_json(detections, out_dir / "detections" / f"{frame.name}.json")
                all_results += detections
                entry |= {"json": f"detections/{frame.name}.json", "detections": len(detections)}
            else:
                picture = draw_mask(frame.image, result["mask"], mask_alpha, class_names)
                (out_dir / "masks").mkdir(exist_ok=True)
                save_label_png(result["mask"], out_dir / "masks" / f"{frame.name}.png")
                counts = np.bincount(result["mask"].numpy().reshape(-1), minlength=len(class_names))
                pixels = {class_names[k]: int(c) for k, c in enumerate(counts[:len(class_names)]) if c}
                entry |= {"mask": f"masks/{frame.name}.png", "pixels": pixels}
            (out_dir / "images").mkdir(exist_ok=True)
            picture.save(out_dir / "images" / f"{frame.name}.png")
            written.append(entry)
    if task == "detection":
        write_json(all_results, out_dir / "results.json")
    source = str(checkpoint) if runtime == "pytorch" else str(model.path)
    summary = {"task": task, "runtime": runtime, "model": source, "class_names": class_names, "outputs": written,
               "skipped": skipped}
    write_json(summary, out_dir / "predictions.json")
    return summary


@hydra.main(config_path=CONFIG_DIR, config_name="predict", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    inputs = list(cfg.inputs) if isinstance(cfg.inputs, (ListConfig, list, tuple)) else [cfg.inputs]
    out_dir = Path(cfg.output_dir) if cfg.output_dir else Path(HydraConfig.get().runtime.output_dir)
    summary = predict(cfg.checkpoint, inputs, out_dir, cfg.runtime, cfg.get("artifact") or cfg.onnx, cfg.batch_size,
                      cfg.video_stride, cfg.max_frames, cfg.draw_score_threshold, cfg.mask_alpha, cfg.threads,
                      cfg.device, list(cfg.trusted_targets), cfg.get("channels_last", True))
    skipped = f", {len(summary['skipped'])} unreadable skipped" if summary["skipped"] else ""
    print(f"{len(summary['outputs'])} images predicted ({summary['task']}, {summary['runtime']}){skipped}; "
          f"results in {out_dir}")


def cli() -> None:
    """Console-script and `python -m` entry: a bad command line stops with one sentence."""
    run(main, "predict")


if __name__ == "__main__":
    cli()
