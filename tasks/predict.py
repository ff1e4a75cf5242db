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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig

from tasks.analysis.visualize import draw_detections, draw_mask
from tasks.cli import CONFIG_DIR, run
from tasks.deploy.sidecar import write_json
from tasks.errors import ConfigError, user_errors_exit
from tasks.inference.inputs import batches, iter_inputs
from tasks.inference.results import coco_results
from tasks.inference.runtime import Preprocessor, decode, forward, load_runtime, val_transforms_config
from tasks.segmentation.palette import save_label_png

log = logging.getLogger(__name__)

PER_IMAGE_FOLDERS = ("images", "detections", "masks")


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
