"""Data loading against the training step: which one limits SSDLite training on this machine.

Supply: images/s of the training DataLoader (tasks.training.loaders.build_loader, batch 16, shuffled, drop_last) over
the built-in shapes detection set (tasks.datasets.shapes.ensure_shapes, written to a temp folder with images
of the input size) with all of SSD's augmentations on (photometric, zoom-out, IoU crop, flip), for each
number of workers. The clock starts when the first batch has arrived (worker start-up is recorded apart)
and stops at the last one.

Demand: images/s of one training step at batch 16 (zero_grad, forward, loss, backward, AdamW step with the
demo's settings), eager, model and images channels_last, on a batch from that loader; SSDLite-MobileNetV2
(conf/head/ssdlite.yaml, 3 classes), random weights.

The two are measured one at a time, then together: the loader feeding the step for a few steps (the
training loop without logging), which is what training gets. With workers the two run side by side on
the same cores here, so the pipeline can fall below both: read the three columns together.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import DataLoader

import tasks.images as images_module
import tasks.segmentation.voc as voc_module
from tasks.datasets.shapes import SHAPE_CLASSES, ensure_shapes
from tasks.detection.coco import CocoDetection
from tasks.detection.transforms import build_detection_transforms
from tasks.segmentation.transforms import build_segmentation_transforms
from tasks.segmentation.voc import VOCSegmentation
from tasks.training.loaders import PerSampleSeeds, build_loader, collate, set_loader_epoch
from tasks.training.model import build_model

from .timing import interleaved, paired_ratio, summarise

CONF = Path(__file__).resolve().parents[1] / "conf"
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"  # real photos, when present
AUGMENTATIONS = {"photometric": True, "zoom_out": True, "iou_crop": True, "hflip": True}
GPU_STEP_IMAGES_PER_S = 2000.0  # a GPU step rate to feed: how many cores would each mode need
BEFORE = "Pillow decode, float32 out"
OPENCV = "OpenCV decode, float32 out"
UINT8 = "OpenCV decode, uint8 out (normalised on the device)"
PLANNED = "device augmentation, CPU side: decode + draw + collate"
PAINTED = "device augmentation, device side, run on this CPU"


@dataclass(frozen=True)
class DataSettings:
    sizes: tuple[int, ...] = (320, 160)  # 320: SSDLite's COCO size; 160: the demo's (make demo)
    workers: tuple[int, ...] = (0, 1, 2)
    num_images: int = 200
    batch: int = 16
    loader_epochs: int = 1  # full passes over the set per worker count
    train_repeats: int = 5
    train_warmup: int = 1
    pipeline_steps: int = 6  # loader + step together, per worker count, after train_warmup steps
    width_mult: float = 1.0
    lr: float = 0.003  # the demo's AdamW (conf/experiment/demo_ssdlite_shapes.yaml)
    weight_decay: float = 1e-4
    # Per core: the training pipeline (decode + augmentations + resize + normalise + collate) in one process
    # on one thread, each mode in turn per round (benchmarks/timing.py), one batch per mode and round.
    per_core: bool = True
    per_core_rounds: int = 6
    detection_size: int = 320  # on coco128's photos when ../shared/data/coco128 exists, else 640 px shapes JPEGs
    segmentation_size: int = 513  # on 500 px shapes JPEGs (VOC's photo size), SegmentationTransform's train crop
    per_core_images: int = 64
    seed: int = 0


def _pillow_rgb(path: Path) -> np.ndarray:
    """What both datasets decoded with before tasks.images used OpenCV."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@contextlib.contextmanager
def pillow_decoding() -> Iterator[None]:
    """Both datasets decode with Pillow (the previous path) inside this block: tasks.images.load_rgb (COCO
    detection) and VOC segmentation's own reference to decode_rgb."""
    saved = images_module.decode_rgb, voc_module.decode_rgb
    images_module.decode_rgb = voc_module.decode_rgb = _pillow_rgb
    try:
        yield
    finally:
        images_module.decode_rgb, voc_module.decode_rgb = saved


def _batches(dataset, batch: int, pillow: bool) -> Callable[[], object]:
    """A call = the next `batch` items of `dataset` (cycling, per-sample seeds) collated into one batch."""
    wrapped, position = PerSampleSeeds(dataset, seed=0), [0]

    def next_batch():
        indices = [(position[0] + i) % len(wrapped) for i in range(batch)]
        position[0] += batch
        with pillow_decoding() if pillow else contextlib.nullcontext():
            return collate([wrapped[i] for i in indices])

    return next_batch


def _painted(dataset: CocoDetection | VOCSegmentation, batch: int, batches: int = 4) -> Callable[[], object]:
    """A call = the device half of device augmentation (detection's DeviceAugment: photometric, zoom-out + crop +
    flip + resize, normalise; segmentation's: scale + pad + crop + flip of image and mask, normalise) on the next
    of `batches` planned batches, here on the CPU."""
    planned = _batches(dataset, batch, pillow=False)
    ready, position = [planned()[0] for _ in range(batches)], [0]

    def next_batch():
        position[0] += 1
        return dataset.transforms.device_augment(ready[position[0] % batches])

    return next_batch


def per_core_pipelines(s: DataSettings, tmp: Path) -> dict[str, dict[str, Callable[[], object]]]:
    """{task @ size: {mode: next batch}}: the training datasets in each decoding/output mode."""
    if COCO128.is_dir():
        coco_root, source = COCO128, "coco128 photos"
    else:
        coco_root = ensure_shapes(tmp / "shapes_640", "coco", num_train=s.per_core_images, num_val=0,
                                  image_size=640, seed=s.seed)
        source = "640 px shapes JPEGs"
    images, ann = coco_root / "train2017", coco_root / "annotations" / "instances_train2017.json"

    def detection(normalize: bool, device_augment: bool = False) -> CocoDetection:
        return CocoDetection(images, ann, build_detection_transforms(s.detection_size, train=True, normalize=normalize,
                                                                     device_augment=device_augment, **AUGMENTATIONS),
                             train=True)

    voc_root = ensure_shapes(tmp / "shapes_voc_500", "voc", num_train=s.per_core_images, num_val=0, image_size=500,
                             seed=s.seed)

    def segmentation(device_augment: bool = False) -> VOCSegmentation:
        return VOCSegmentation(voc_root, "train", build_segmentation_transforms(s.segmentation_size, train=True,
                                                                                device_augment=device_augment),
                               class_names=("background", *SHAPE_CLASSES))

    return {
        f"detection @ {s.detection_size} ({source}, SSD augmentations)": {
            BEFORE: _batches(detection(True), s.batch, pillow=True),
            OPENCV: _batches(detection(True), s.batch, pillow=False),
            UINT8: _batches(detection(False), s.batch, pillow=False),
            PLANNED: _batches(detection(False, device_augment=True), s.batch, pillow=False),
            PAINTED: _painted(detection(False, device_augment=True), s.batch)},
        f"segmentation @ {s.segmentation_size} (500 px shapes JPEGs, scale + crop + flip)": {
            BEFORE: _batches(segmentation(), s.batch, pillow=True),
            OPENCV: _batches(segmentation(), s.batch, pillow=False),
            PLANNED: _batches(segmentation(device_augment=True), s.batch, pillow=False),
            PAINTED: _painted(segmentation(device_augment=True), s.batch)},
    }


def per_core_throughput(s: DataSettings, tmp: Path) -> list[dict]:
    """Images/s of one core (one thread for torch and OpenCV) per pipeline and mode, paired per round."""
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rows = []
    try:
        for pipeline, modes in per_core_pipelines(s, tmp).items():
            samples = interleaved(modes, s.per_core_rounds, warmup=1)
            for mode, times in samples.items():
                summary = summarise(times)
                per_s = s.batch / (summary.median / 1e3)
                rows.append({"pipeline": pipeline, "mode": mode, "batch": s.batch, "time_ms": summary.as_dict(),
                             "samples_ms": times, "images_per_s_per_core": per_s,
                             "cores_for_gpu_rate": GPU_STEP_IMAGES_PER_S / per_s,
                             "speedup_vs_before": 1.0 / paired_ratio(times, samples[BEFORE]).median})
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    return rows


def training_set(root: Path, size: int) -> CocoDetection:
    return CocoDetection(root / "train2017", root / "annotations" / "instances_train2017.json",
                         build_detection_transforms(size, train=True, **AUGMENTATIONS), train=True)


def loader_throughput(loader: DataLoader, epochs: int) -> dict:
    """Images/s from the first batch's arrival to the last batch, over `epochs` passes."""
    images, seconds, first = 0, 0.0, []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        start = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        arrived = time.perf_counter()
        first.append(arrived - start)
        for batch, _targets in iterator:
            images += batch.shape[0]
        seconds += time.perf_counter() - arrived
    if images == 0:
        raise ValueError(f"the loader gave fewer than 2 batches per epoch ({len(loader)}); raise num_images.")
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "first_batch_s": summarise(first).median}


def training_step(num_classes: int, s: DataSettings) -> Callable[[torch.Tensor, list[dict]], None]:
    """`step(images, targets)`: tasks/training/engine.py's training step without AMP, clipping or logging."""
    backbone = OmegaConf.load(CONF / "backbone" / "mobilenet_v2.yaml")
    backbone.width_mult = s.width_mult
    torch.manual_seed(s.seed)
    model = build_model(backbone, OmegaConf.load(CONF / "head" / "ssdlite.yaml"), num_classes)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)

    def step(images: torch.Tensor, targets: list[dict]) -> None:
        images = images.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        losses = model.loss(model(images), targets)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def step_throughput(step: Callable, images: torch.Tensor, targets: list[dict], s: DataSettings) -> dict:
    """The step alone, on one batch held in memory."""
    samples = interleaved({"step": lambda: step(images, targets)}, s.train_repeats, s.train_warmup)["step"]
    summary = summarise(samples)
    return {"batch": images.shape[0], "time_ms": summary.as_dict(), "samples_ms": samples,
            "images_per_s": images.shape[0] / (summary.median / 1e3)}


def pipeline_throughput(step: Callable, loader: DataLoader, warmup: int, steps: int) -> dict:
    """The loader feeding the step: images/s over `steps` steps after `warmup` ones (worker start-up)."""
    if len(loader) < warmup + steps:
        raise ValueError(f"the loader has {len(loader)} batches per epoch, fewer than the {warmup} + {steps} "
                         f"pipeline steps; raise num_images or lower pipeline_steps.")
    set_loader_epoch(loader, 0)
    iterator = iter(loader)
    for _ in range(warmup):
        step(*next(iterator))
    images, start = 0, time.perf_counter()
    for _ in range(steps):
        batch, targets = next(iterator)
        step(batch, targets)
        images += batch.shape[0]
    seconds = time.perf_counter() - start
    del iterator  # stops the workers
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def verdict(supply: float, demand: float, workers: int) -> dict:
    """Which side is slower, and what the pipeline would reach if nothing else interfered: in-process
    (0 workers) loading and the step take turns, so their times add; workers overlap with the step."""
    bottleneck = "data loading" if supply < demand else "training step"
    if workers == 0:
        expected = 1.0 / (1.0 / supply + 1.0 / demand)
        note = f"in-process loading adds {100.0 * demand / supply:.0f}% to each step's time"
    else:
        expected = min(supply, demand)
        keep_up = "cannot keep up" if supply < demand else "keep up"
        note = f"{workers} worker(s) {keep_up} if given cores of their own"
    return {"bottleneck": bottleneck, "supply_over_demand": supply / demand,
            "expected_images_per_s": expected, "note": note}


def run(settings: DataSettings, log=print) -> dict:
    s = settings
    if any(w < 0 for w in s.workers) or not s.sizes:
        raise ValueError(f"DataSettings needs sizes and non-negative worker counts, got sizes={s.sizes} "
                         f"and workers={s.workers}.")
    loaders, steps, pipelines, verdicts, checks, per_core = [], [], [], [], {}, []
    with tempfile.TemporaryDirectory(prefix="mobilevision-bench-data-") as tmp:
        if s.per_core:
            per_core = per_core_throughput(s, Path(tmp))
            for row in per_core:
                log(f"data: {row['pipeline']}, {row['mode']}: {row['images_per_s_per_core']:.1f} images/s per core")
        for size in s.sizes:
            start = time.perf_counter()
            root = ensure_shapes(Path(tmp) / f"shapes_{size}", "coco", num_train=s.num_images, num_val=0,
                                 image_size=size, seed=s.seed)
            checks[f"shapes_{size}_written_s"] = round(time.perf_counter() - start, 2)
            dataset = training_set(root, size)
            step = training_step(len(SHAPE_CLASSES), s)
            images, targets = next(iter(build_loader(dataset, s.batch, True, 0, s.seed)))
            alone = {"input_size": size, **step_throughput(step, images, targets, s)}
            steps.append(alone)
            log(f"data: {size}px train step alone, batch {s.batch}: {alone['time_ms']['median']:.0f} ms = "
                f"{alone['images_per_s']:.1f} images/s")
            for workers in s.workers:
                loader = build_loader(dataset, s.batch, True, workers, s.seed)
                supply = {"input_size": size, "num_workers": workers, "batch": s.batch,
                          **loader_throughput(loader, s.loader_epochs)}
                loaders.append(supply)
                both = {"input_size": size, "num_workers": workers, "batch": s.batch,
                        **pipeline_throughput(step, loader, s.train_warmup, s.pipeline_steps)}
                pipelines.append(both)
                log(f"data: {size}px, {workers} workers: loader alone {supply['images_per_s']:.1f} images/s "
                    f"(first batch after {supply['first_batch_s']:.2f} s), loader + step "
                    f"{both['images_per_s']:.1f} images/s")
                verdicts.append({"input_size": size, "num_workers": workers,
                                 "loader_images_per_s": supply["images_per_s"],
                                 "step_images_per_s": alone["images_per_s"],
                                 "pipeline_images_per_s": both["images_per_s"],
                                 **verdict(supply["images_per_s"], alone["images_per_s"], workers)})
    checks["augmentations"] = AUGMENTATIONS
    return {"settings": asdict(s), "checks": checks,
            "section": {"loader": loaders, "train_step": steps, "pipeline": pipelines, "verdicts": verdicts,
                        "per_core": per_core}}


def format_table(section: dict) -> str:
    header = (f"{'input':>5} {'workers':>7} {'loader img/s':>12} {'step img/s':>10} {'loader/step':>11} "
              f"{'together img/s':>14}  {'slower side':<14} note")
    lines = ["", "data: SSD-augmented shapes DataLoader vs SSDLite-MobileNetV2 training step "
                 "(batch 16, eager, channels_last, AdamW; images/s)", header, "-" * len(header)]
    for v in section["verdicts"]:
        lines.append(f"{v['input_size']:>5} {v['num_workers']:>7} {v['loader_images_per_s']:>12.1f} "
                     f"{v['step_images_per_s']:>10.1f} {v['supply_over_demand']:>11.1f} "
                     f"{v['pipeline_images_per_s']:>14.1f}  {v['bottleneck']:<14} {v['note']}")
    lines.append("loader and step alone, then together (the loader feeding the step: what training gets); "
                 "workers share this machine's cores with the step")
    if section.get("per_core"):
        header = (f"{'pipeline':<72} {'mode':<54} {'img/s/core':>10} {'vs Pillow':>9} "
                  f"{f'cores for {GPU_STEP_IMAGES_PER_S:.0f} img/s':>22}")
        lines += ["", "data: training pipeline per CPU core (decode + augment + resize + normalise + collate, "
                      "1 thread, batch of 16 per mode and round)", header, "-" * len(header)]
        for r in section["per_core"]:
            lines.append(f"{r['pipeline']:<72} {r['mode']:<54} {r['images_per_s_per_core']:>10.1f} "
                         f"{r['speedup_vs_before']:>8.2f}x {r['cores_for_gpu_rate']:>22.0f}")
        lines.append("vs Pillow = median of the per-round speed-ups over the Pillow-decoded float32 pipeline "
                     "(the previous one); identical batches in every mode (identical boxes, images within 1 level "
                     "with detection's device augmentation; identical images and masks with segmentation's, whose "
                     "photometric step is off here as in DeepLab's recipe; the two sides are measured apart: on a GPU "
                     "the device side leaves the CPU)")
    return "\n".join(lines)
