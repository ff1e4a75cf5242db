"""One GPU check for issue 15, one command: training steps, inference + post-processing and device augmentation.

    python -m benchmarks.gpu --out DIR [--images PHOTOS] [--only SECTION ...]   # on a CUDA machine
    python -m benchmarks.gpu --device cpu --quick --out /tmp/gpu                  # dry run: every code path, tiny

Sections (each in its own try/except: a failing one is recorded with its error and the others still run; a
markdown table is printed as each ends, and DIR/gpu.json is rewritten after each, so a run stopped half-way keeps
what it measured):

- environment: GPU, torch / torchvision / CUDA / cuDNN versions, CPU model and count;
- detection_train: SSDLite-MobileNetV2 training step (benchmarks/detection.py's ours and its like-for-like
  torchvision peer, our weights copied), NCHW vs channels_last x fp32 / bf16 autocast (and fp16 autocast +
  GradScaler for ours), all contenders of a batch size interleaved in the same rounds;
- segmentation_train: Mobile DeepLabv3 (MobileNetV2*, light head) training step, NCHW vs channels_last x fp32 /
  bf16;
- inference: batch 1 eager network vs our head's post-processing (random weights = worst case, and
  benchmarks/postprocess.py's realistic scores), torchvision's postprocess_detections on the same outputs;
- augmentation: the training loader's CPU work per core (classic CPU pipeline vs device augmentation's
  decode + draw), the device painting the planned batches, and the CPU cores each mode needs to feed 2,000
  images/s.

Times on CUDA are synchronised (torch.cuda.synchronize before each clock read), after warm-up rounds, and each
figure is the median over rounds in which every contender ran once in a rotating order (benchmarks/timing.py).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .run import cpu_model
from .timing import interleaved, paired_ratio, summarise

SECTIONS = ("environment", "detection_train", "segmentation_train", "inference", "augmentation")
GPU_STEP_IMAGES_PER_S = 2000.0  # the step rate to feed (issue 15)
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
NO_CUDA = ("benchmarks.gpu measures a CUDA GPU, but torch.cuda.is_available() is False on this machine; run it "
           "where there is one, or use --device cpu --quick for a dry run.")


@dataclass(frozen=True)
class GpuSettings:
    det_size: int = 320
    det_classes: int = 80
    det_batches: tuple[int, ...] = (64, 128)  # 128 only while the time budget lasts
    seg_size: int = 513
    seg_classes: int = 21
    seg_batches: tuple[int, ...] = (16, 32)
    train_repeats: int = 10
    train_warmup: int = 3
    infer_repeats: int = 50
    infer_warmup: int = 5
    aug_det_size: int = 320
    aug_seg_size: int = 513
    aug_det_batch: int = 64
    aug_seg_batch: int = 16
    aug_images: int = 64  # photos used (cycled); synthetic ones when --images is not given
    aug_planned_batches: int = 3  # distinct planned batches painted in turn
    aug_repeats: int = 10
    aug_warmup: int = 2
    cpu_batch: int = 16  # per-core measurement: one batch per mode and round, one thread
    cpu_rounds: int = 3
    synthetic_size: tuple[int, int] = (480, 640)  # (h, w) of the synthetic photos: COCO's usual size
    max_boxes: int = 5
    lr: float = 1e-3
    budget_s: float = 300.0  # sections that would start after this are skipped (recorded as such)
    seed: int = 0


FULL = GpuSettings()
QUICK = GpuSettings(det_size=64, det_classes=3, det_batches=(2,), seg_size=65, seg_classes=4, seg_batches=(2,),
                    train_repeats=1, train_warmup=1, infer_repeats=2, infer_warmup=1, aug_det_size=64,
                    aug_seg_size=65, aug_det_batch=4, aug_seg_batch=2, aug_images=4, aug_planned_batches=2,
                    aug_repeats=1, aug_warmup=1, cpu_batch=2, cpu_rounds=1, synthetic_size=(96, 128))


class Clock:
    """Seconds since the start, the time budget, and a synchronised wall clock for the device."""

    def __init__(self, device: torch.device, budget_s: float):
        self.device, self.budget_s, self.start = device, budget_s, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """perf_counter after the device has finished what was queued: CUDA kernels run asynchronously."""
        self.sync()
        return time.perf_counter()

    def log(self, message: str) -> None:
        print(f"[gpu {self.elapsed():6.1f} s] {message}", flush=True)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bracket(summary: dict) -> str:
    return f"{summary['median']:.2f} [{summary['q1']:.2f}, {summary['q3']:.2f}]"


# ----------------------------------------------------------------------------------------------- environment


def environment(s: GpuSettings, clock: Clock) -> dict:
    import torchvision

    env = {"device": str(clock.device), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "python": platform.python_version(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
           "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
           "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if clock.device.type == "cuda":
        props = torch.cuda.get_device_properties(clock.device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   compute_capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(),
                   bf16_supported=torch.cuda.is_bf16_supported())
    table = markdown(["what", "value"], [[k, v] for k, v in env.items()])
    return {"result": env, "table": table}


# ------------------------------------------------------------------------------------------------ training


LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=AMP[precision], enabled=AMP[precision] is not None)


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def our_step(model, images: torch.Tensor, targets: list[dict], precision: str, lr: float) -> Callable[[], None]:
    """tasks/training/engine.py's step: forward under autocast, the loss in fp32, fp16 with a GradScaler; SGD."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    device = images.device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            outputs = model(images)
        if precision != "fp32":
            outputs = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in outputs.items()}
        loss = sum(model.loss(outputs, targets).values())
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return step


def peer_step(model, images: list[torch.Tensor], targets: list[dict], precision: str,
              lr: float) -> Callable[[], None]:
    """torchvision's SSD step: the model computes its loss inside forward, so all of it under autocast."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    device = images[0].device

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            losses = model(images, targets)
        sum(losses.values()).backward()
        optimizer.step()

    return step


def timed_contenders(builders: dict[str, Callable[[], Callable[[], None]]], s: GpuSettings, clock: Clock,
                     repeats: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, str]]:
    """Each contender built and tried once (one that fails is left out, its error kept), then the others timed
    in interleaved rounds with the synchronised clock: milliseconds per call."""
    ready, failed = {}, {}
    for name, build in builders.items():
        try:
            step = build()
            step()
            clock.sync()
            ready[name] = step
        except Exception as err:  # noqa: BLE001 - one contender's failure is a result, not the end of the run
            failed[name] = f"{type(err).__name__}: {err}"
            clock.log(f"  {name} failed: {failed[name]}")
    samples = interleaved(ready, repeats, warmup, clock=clock.now) if ready else {}
    return samples, failed


def training_rows(samples: dict[str, list[float]], keys: dict[str, tuple], batch: int,
                  peer_of: Callable[[tuple], tuple | None], base_of: Callable[[tuple], tuple]) -> list[dict]:
    """One row per contender: ms, images/s, ratio to the peer's same configuration, and to its own NCHW fp32."""
    names = {key: name for name, key in keys.items() if name in samples}
    rows = []
    for name, key in keys.items():
        if name not in samples:
            continue
        summary = summarise(samples[name])
        row = {"key": list(key), "batch": batch, "time_ms": summary.as_dict(), "samples_ms": samples[name],
               "images_per_s": batch / (summary.median / 1e3)}
        peer = peer_of(key)
        if peer is not None and peer in names:
            row["ours_over_peer"] = paired_ratio(samples[name], samples[names[peer]]).as_dict()
        base = base_of(key)
        if base in names and base != key:
            row["over_nchw_fp32"] = paired_ratio(samples[name], samples[names[base]]).as_dict()
        rows.append(row)
    return rows


def fastest(rows: list[dict]) -> str:
    """One line per (batch, model): the configuration with the most images/s."""
    best: dict[tuple, dict] = {}
    for row in rows:
        key = (row["batch"], row["key"][0])
        if key not in best or row["images_per_s"] > best[key]["images_per_s"]:
            best[key] = row
    return "; ".join(f"batch {b} {who}: {' '.join(r['key'][1:])} ({r['images_per_s']:.0f} images/s)"
                     for (b, who), r in best.items())


def time_training_batch(builders: dict[str, Callable[[], Callable[[], None]]], keys: dict[str, tuple], batch: int,
                        s: GpuSettings, clock: Clock, failures: dict[str, str],
                        peer_of: Callable[[tuple], tuple | None] | None) -> tuple[list[dict], str]:
    """One batch size's contenders timed: (their rows, their markdown table); failures are added to `failures`.
    `peer_of` maps our key to torchvision's (None: no peer column); each row's base is its own NCHW fp32."""
    samples, failed = timed_contenders(builders, s, clock, s.train_repeats, s.train_warmup)
    failures.update({f"batch {batch}: {k}": v for k, v in failed.items()})
    rows = training_rows(samples, keys, batch, peer_of=peer_of or (lambda k: None),
                         base_of=lambda k: (k[0], "NCHW", "fp32"))
    del samples
    if clock.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, training_table(rows, with_peer=peer_of is not None)


def detection_train(s: GpuSettings, clock: Clock) -> dict:
    from . import detection as det

    device, size = clock.device, s.det_size
    torch.manual_seed(s.seed)
    ours = det.build_ours(s.det_classes)
    peer = det.build_peer(s.det_classes, size, ours.head)
    det.copy_weights(ours, peer)
    precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
    results, failures, tables = [], {}, []
    for batch in s.det_batches:
        if results and clock.left() < 0.5 * s.budget_s:
            clock.log(f"detection_train: batch {batch} skipped (time budget)")
            failures[f"batch {batch}"] = "skipped: time budget"
            continue
        generator = torch.Generator().manual_seed(s.seed)
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        ours_targets, peer_targets = det.random_targets(batch, size, s.det_classes, s.max_boxes, generator)
        ours_targets, peer_targets = to_device(ours_targets, device), to_device(peer_targets, device)
        builders, keys = {}, {}
        for layout, memory_format in LAYOUTS.items():
            x = images.contiguous(memory_format=memory_format)
            for precision in precisions:
                for who in ("ours", "torchvision"):
                    if who == "torchvision" and precision == "fp16":
                        continue  # fp16 + GradScaler for ours only: the question is which amp our engine should use
                    name = f"{who} {layout} {precision}"
                    keys[name] = (who, layout, precision)
                    if who == "ours":
                        builders[name] = (lambda f=memory_format, x=x, p=precision, t=ours_targets: our_step(
                            copy.deepcopy(ours).to(device, memory_format=f).train(), x, t, p, s.lr))
                    else:
                        builders[name] = (lambda f=memory_format, x=x, p=precision, t=peer_targets: peer_step(
                            copy.deepcopy(peer).to(device, memory_format=f).train(), list(x), t, p, s.lr))
        clock.log(f"detection_train: batch {batch}, {len(builders)} contenders at {size} px")
        rows, table = time_training_batch(builders, keys, batch, s, clock, failures,
                                          peer_of=lambda k: ("torchvision", k[1], k[2]) if k[0] == "ours" else None)
        results += rows
        tables.append(table)
        del builders
    title = (f"detection_train: SSDLite-MobileNetV2 @ {size}, {s.det_classes} classes, SGD step; ratios paired per "
             f"round (< 1: faster); torchvision = benchmarks/detection.py's like-for-like peer, our weights")
    return {"result": {"rows": results, "failures": failures, "size": size, "classes": s.det_classes,
                       "fastest": fastest(results)},
            "table": "\n\n".join([title, *tables, f"fastest: {fastest(results)}"])}


def training_table(rows: list[dict], with_peer: bool) -> str:
    """One batch size's training rows as markdown; `with_peer`: the ours / torchvision column too."""
    peer = ["ours / torchvision"] if with_peer else []
    headers = ["batch", "model", "layout", "precision", "ms [q1, q3]", "images/s", *peer,
               "vs own NCHW fp32" if with_peer else "vs NCHW fp32"]
    cells = []
    for r in rows:
        ratio = [bracket(r["ours_over_peer"]) if "ours_over_peer" in r else ""] if with_peer else []
        cells.append([r["batch"], *r["key"], bracket(r["time_ms"]), r["images_per_s"], *ratio,
                      bracket(r["over_nchw_fp32"]) if "over_nchw_fp32" in r else ""])
    return markdown(headers, cells)


def segmentation_train(s: GpuSettings, clock: Clock) -> dict:
    from .segmentation import build_ours

    device, size = clock.device, s.seg_size
    torch.manual_seed(s.seed)
    model = build_ours(s.seg_classes, aspp=False)
    results, failures, tables = [], {}, []
    for batch in s.seg_batches:
        if results and clock.left() < 0.4 * s.budget_s:
            failures[f"batch {batch}"] = "skipped: time budget"
            continue
        generator = torch.Generator().manual_seed(s.seed)
        images = torch.randn(batch, 3, size, size, generator=generator).to(device)
        masks = torch.randint(0, s.seg_classes, (batch, size, size), generator=generator)
        masks[:, :, : size // 16] = 255  # some ignore, as VOC's borders
        targets = [{"mask": m} for m in masks.to(device)]
        builders, keys = {}, {}
        for layout, memory_format in LAYOUTS.items():
            x = images.contiguous(memory_format=memory_format)
            for precision in ("fp32", "bf16"):
                name = f"ours {layout} {precision}"
                keys[name] = ("ours", layout, precision)
                builders[name] = (lambda f=memory_format, x=x, p=precision, t=targets: our_step(
                    copy.deepcopy(model).to(device, memory_format=f).train(), x, t, p, s.lr))
        clock.log(f"segmentation_train: batch {batch}, {len(builders)} contenders at {size} px")
        rows, table = time_training_batch(builders, keys, batch, s, clock, failures, peer_of=None)
        results += rows
        tables.append(table)
        del builders
    title = (f"segmentation_train: Mobile DeepLabv3 (MobileNetV2* OS16, light head) @ {size}, {s.seg_classes} "
             f"classes, SGD step")
    return {"result": {"rows": results, "failures": failures, "size": size, "fastest": fastest(results)},
            "table": "\n\n".join([title, *tables, f"fastest: {fastest(results)}"])}


# ----------------------------------------------------------------------------------------------- inference


def inference(s: GpuSettings, clock: Clock) -> dict:
    from tasks.training.model import build_model

    from . import postprocess as pp

    device = clock.device
    ps = pp.PostprocessSettings(input_size=s.det_size, num_classes=s.det_classes, repeats=s.infer_repeats,
                                warmup=s.infer_warmup, onnx=False, seed=s.seed)
    cfg = pp.model_config(ps)  # conf/ as shipped: our head with its nms_pre
    torch.manual_seed(s.seed)
    model = build_model(cfg.backbone, cfg.head, s.det_classes).eval().to(device)
    head = model.head
    generator = torch.Generator().manual_seed(s.seed)
    images = torch.randn(1, 3, s.det_size, s.det_size, generator=generator).to(device)
    layouts = {"NCHW": (model, images),
               "channels_last": (copy.deepcopy(model).to(memory_format=torch.channels_last),
                                 images.contiguous(memory_format=torch.channels_last))}
    sizes = [(s.det_size, s.det_size)]
    with torch.no_grad():
        raw = model(images)
    fake = pp.realistic_logits(raw["cls_logits"].shape, ps, generator).to(device)
    candidates = {pp.REGIMES[0]: pp.candidates(raw["cls_logits"].cpu(), head),
                  pp.REGIMES[1]: pp.candidates(fake.cpu(), head)}
    peer_post = pp.torchvision_post(head, s.det_size)

    def synced(call: Callable) -> Callable:
        def run(*args):
            out = call(*args)
            clock.sync()
            return out
        return run

    rows = []
    for regime in pp.REGIMES:
        def swap(outputs: dict, regime=regime) -> dict:
            return outputs if regime == pp.REGIMES[0] else {**outputs, "cls_logits": fake}

        paths = {}
        for layout, (net, x) in layouts.items():
            network = synced(torch.no_grad()(lambda net=net, x=x: net(x)))
            paths[f"network {layout} + head.predict"] = (network, synced(
                torch.no_grad()(lambda o, swap=swap: head.predict(swap(o), sizes))))
        paths["network channels_last + torchvision postprocess_detections"] = (
            paths["network channels_last + head.predict"][0],
            synced(torch.no_grad()(lambda o, swap=swap: peer_post(swap(o)))))
        clock.log(f"inference: {regime}, {len(paths)} paths")
        per_path = pp.paired_rounds(paths, s.infer_repeats, s.infer_warmup)
        for name, times in per_path.items():
            rows.append({"regime": regime, "path": name, "candidates": candidates[regime],
                         "network_ms": summarise(times["network"]).as_dict(),
                         "post_ms": summarise(times["post"]).as_dict(), "samples_ms": times,
                         "post_over_network": paired_ratio(times["post"], times["network"]).as_dict()})
    table = markdown(["scores", "candidates", "path", "network ms", "post ms", "post / network [q1, q3]"],
                     [[r["regime"], r["candidates"]["above_threshold"], r["path"], r["network_ms"]["median"],
                       r["post_ms"]["median"], bracket(r["post_over_network"])] for r in rows])
    title = (f"inference: SSDLite-MobileNetV2 @ {s.det_size}, {s.det_classes} classes, batch 1, eager, nms_pre="
             f"{getattr(head, 'nms_pre', None)}; target post / network <= 0.10")
    return {"result": {"rows": rows, "nms_pre": getattr(head, "nms_pre", None)}, "table": f"{title}\n\n{table}"}


# -------------------------------------------------------------------------------------------- augmentation


def synthetic_photos(folder: Path, count: int, shape: tuple[int, int], seed: int) -> Path:
    """`count` JPEGs of smooth colour fields with a few rectangles (as a photo compresses, not as noise)."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = shape
    for i in range(count):
        hh, ww = (h, w) if i % 3 else (w, h)  # some portrait
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = cv2.resize(small, (ww, hh), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            x, y = int(rng.integers(0, ww // 2)), int(rng.integers(0, hh // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.rectangle(image, (x, y), (x + ww // 4, y + hh // 4), colour, -1)
        cv2.imwrite(str(folder / f"{i:06d}.jpg"), image)
    return folder


def list_photos(folder: Path, limit: int) -> list[Path]:
    photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)[:limit]
    if not photos:
        raise ValueError(f"--images {folder} holds no .jpg/.jpeg/.png photos; expected a folder of photos.")
    return photos


def photo_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def coco_annotations(photos: list[Path], path: Path, classes: int, seed: int) -> Path:
    """A COCO instances file for these photos: 1-5 random boxes each (they steer the IoU crop's search)."""
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for image_id, photo in enumerate(photos, start=1):
        h, w = photo_size(photo)
        images.append({"id": image_id, "file_name": photo.name, "height": h, "width": w})
        for _ in range(int(rng.integers(1, 6))):
            bw, bh = float(rng.uniform(0.1, 0.6) * w), float(rng.uniform(0.1, 0.6) * h)
            x, y = float(rng.uniform(0, w - bw)), float(rng.uniform(0, h - bh))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": [x, y, bw, bh],
                                "area": bw * bh, "iscrowd": 0, "category_id": int(rng.integers(1, classes + 1))})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, classes + 1)]
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


def voc_layout(photos: list[Path], root: Path, classes: int, seed: int) -> Path:
    """VOC2012's layout over these photos (links) with synthetic masks: rectangles of classes, void borders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for photo in photos:
        image_id = photo.stem
        link = root / "JPEGImages" / f"{image_id}.jpg"
        if photo.suffix.lower() in (".jpg", ".jpeg"):
            link.symlink_to(photo.resolve())
        else:
            Image.open(photo).convert("RGB").save(link)
        h, w = photo_size(photo)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(3):
            y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
            mask[y:y + h // 3, x:x + w // 3] = int(rng.integers(1, classes))
            mask[y:y + h // 3, x:x + 2] = 255
        Image.fromarray(mask, mode="L").save(root / "SegmentationClass" / f"{image_id}.png")
        ids.append(image_id)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return root


def real_coco_annotations(folder: Path) -> Path | None:
    """`<folder>/../annotations/instances_<folder name>.json` (coco128's layout) when every photo it lists is in
    the folder, else None."""
    path = folder.parent / "annotations" / f"instances_{folder.name}.json"
    if not path.is_file():
        return None
    listed = [image["file_name"] for image in json.loads(path.read_text())["images"]]
    return path if listed and all((folder / name).is_file() for name in listed) else None


def painted_rate(augment: Callable, planned: list, batch: int, s: GpuSettings, clock: Clock) -> dict:
    """Images/s of the device painting planned batches: alone (already on the device), and with the pinned
    uint8 host-to-device copy the training loop does first."""
    device = clock.device
    pinned = [b.pin_memory() for b in planned] if device.type == "cuda" else planned
    resident = [b.to(device) for b in planned]
    position = [0, 0]

    def paint() -> object:
        position[0] += 1
        return augment(resident[position[0] % len(resident)])

    def copy_and_paint() -> object:
        position[1] += 1
        return augment(pinned[position[1] % len(pinned)].to(device, non_blocking=True))

    samples = interleaved({"paint": paint, "copy + paint": copy_and_paint}, s.aug_repeats, s.aug_warmup,
                          clock=clock.now)
    return {name: {"time_ms": summarise(times).as_dict(), "samples_ms": times,
                   "images_per_s": batch / (summarise(times).median / 1e3)} for name, times in samples.items()}


def per_core_rates(modes: dict[str, Callable], batch: int, rounds: int) -> dict:
    """Images/s of one core (one torch and one OpenCV thread) for each loader mode, interleaved."""
    import cv2

    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        samples = interleaved(modes, rounds, warmup=1)
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    rates = {}
    for mode, times in samples.items():
        per_s = batch / (summarise(times).median / 1e3)
        rates[mode] = {"time_ms": summarise(times).as_dict(), "samples_ms": times, "images_per_s_per_core": per_s,
                       "cores_for_2000_images_per_s": GPU_STEP_IMAGES_PER_S / per_s}
    return rates


def augmentation(s: GpuSettings, clock: Clock, images: Path | None) -> dict:
    from tasks.detection.coco import CocoDetection
    from tasks.detection.transforms import build_detection_transforms
    from tasks.segmentation.transforms import build_segmentation_transforms
    from tasks.segmentation.voc import VOCSegmentation

    from .dataloading import AUGMENTATIONS, PLANNED, UINT8, _batches  # _batches: per-sample seeds, as the loader

    device = clock.device
    result: dict = {}
    with tempfile.TemporaryDirectory(prefix="mobilevision-gpu-aug-") as tmp:
        folder = images if images is not None else synthetic_photos(Path(tmp) / "photos", s.aug_images,
                                                                    s.synthetic_size, s.seed)
        photos = list_photos(folder, s.aug_images)
        source = f"{len(photos)} photos from {folder}" if images is not None else \
            f"{len(photos)} synthetic {s.synthetic_size[1]}x{s.synthetic_size[0]} JPEGs"
        ann = real_coco_annotations(folder)
        if ann is not None:  # detection then reads every photo its annotations list
            source += f"; detection: the {len(json.loads(ann.read_text())['images'])} photos of {ann.name}"
        result["source"] = source
        if ann is None:
            ann = coco_annotations(photos, Path(tmp) / "instances.json", s.det_classes, s.seed)
        clock.log(f"augmentation: {result['source']}")

        def detection(**options) -> CocoDetection:
            return CocoDetection(folder, ann, build_detection_transforms(s.aug_det_size, train=True, **AUGMENTATIONS,
                                                                         **options), train=True)

        voc_root = voc_layout(photos, Path(tmp) / "voc", s.seg_classes, s.seed)

        def segmentation(**options) -> VOCSegmentation:
            return VOCSegmentation(voc_root, "train", build_segmentation_transforms(s.aug_seg_size, train=True,
                                                                                   **options),
                                   class_names=[f"class{c}" for c in range(s.seg_classes)])

        tasks = {
            "detection": (s.aug_det_size, s.aug_det_batch, "SSD augmentations (photometric, zoom-out, IoU crop, flip)",
                          {"CPU pipeline, float32 out": lambda: detection(),
                           UINT8: lambda: detection(normalize=False),
                           PLANNED: lambda: detection(device_augment=True)}),
            "segmentation": (s.aug_seg_size, s.aug_seg_batch, "scale + pad + crop + flip (DeepLab's recipe)",
                             {"CPU pipeline, float32 out": lambda: segmentation(),
                              PLANNED: lambda: segmentation(device_augment=True)}),
        }
        rows = []
        for task, (size, batch, what, modes) in tasks.items():
            datasets = {mode: make() for mode, make in modes.items()}
            clock.log(f"augmentation: {task} @ {size}: CPU side per core ({len(datasets)} modes)")
            rates = per_core_rates({mode: _batches(ds, s.cpu_batch, pillow=False) for mode, ds in datasets.items()},
                                   s.cpu_batch, s.cpu_rounds)
            planned_set = datasets[PLANNED]
            next_batch = _batches(planned_set, batch, pillow=False)
            planned = [next_batch()[0] for _ in range(s.aug_planned_batches)]
            augment = planned_set.transforms.device_augment
            clock.log(f"augmentation: {task} @ {size}: painting batches of {batch} on {device}")
            painted = painted_rate(augment, planned, batch, s, clock)
            result[task] = {"size": size, "batch": batch, "augmentations": what, "per_core": rates,
                            "device": painted}
            paint_rate = painted["copy + paint"]["images_per_s"]
            for mode, rate in rates.items():
                rows.append([task, size, mode, rate["images_per_s_per_core"], rate["cores_for_2000_images_per_s"],
                             "" if mode != PLANNED else painted["paint"]["images_per_s"],
                             "" if mode != PLANNED else paint_rate,
                             "" if mode != PLANNED else GPU_STEP_IMAGES_PER_S / paint_rate])
    table = markdown(["task", "size", "loader mode (CPU side)", "img/s per core", "cores for 2000 img/s",
                      f"{device} paint img/s", "copy + paint img/s", f"{device} s per s at 2000 img/s"], rows)
    title = (f"augmentation: {result['source']}; CPU side = the training loader's per-image work on one core "
             f"(decode + augment or draw + collate, 1 thread); painting = DeviceAugment on planned batches, "
             f"synchronised")
    return {"result": result, "table": f"{title}\n\n{table}"}


# -------------------------------------------------------------------------------------------------- runner


def run_sections(names: Sequence[str], s: GpuSettings, clock: Clock, images: Path | None, out: Path) -> dict:
    report = {"settings": asdict(s), "command": " ".join(sys.argv), "sections": {}}
    functions = {"environment": lambda: environment(s, clock), "detection_train": lambda: detection_train(s, clock),
                 "segmentation_train": lambda: segmentation_train(s, clock), "inference": lambda: inference(s, clock),
                 "augmentation": lambda: augmentation(s, clock, images)}
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        entry: dict = {"started_s": round(clock.elapsed(), 1)}
        if name != "environment" and clock.left() <= 0:
            entry.update(status="skipped", error=f"the time budget of {s.budget_s:.0f} s was spent")
            clock.log(f"{name}: skipped (time budget spent)")
        else:
            clock.log(f"{name}: start")
            try:
                done = functions[name]()
                entry.update(status="ok", result=done["result"])
                print(f"\n## {name}\n\n{done['table']}\n", flush=True)
            except Exception as err:  # noqa: BLE001 - a section's failure is recorded; the others still run
                entry.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
                print(f"\n## {name}: FAILED\n\n{traceback.format_exc()}", flush=True)
            if clock.device.type == "cuda":
                entry["max_memory_gib"] = round(torch.cuda.max_memory_allocated(clock.device) / 2 ** 30, 2)
                torch.cuda.empty_cache()
        entry["seconds"] = round(clock.elapsed() - entry["started_s"], 1)
        report["sections"][name] = entry
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))
        clock.log(f"{name}: {entry['status']} in {entry['seconds']} s")
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Issue 15's GPU measurements in one run (benchmarks/README.md).")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu.json")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cuda (default); cpu only for a dry run of the code paths")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and repeats: checks that everything runs")
    parser.add_argument("--images", type=Path, default=None,
                        help="a folder of photos for the augmentation section (default: synthetic JPEGs)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only this section (repeatable)")
    parser.add_argument("--budget-s", type=float, default=None, help="sections starting later are skipped")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA, file=sys.stderr)
        raise SystemExit(2)
    if args.images is not None and not args.images.is_dir():
        print(f"--images {args.images} is not a folder; expected a folder of photos.", file=sys.stderr)
        raise SystemExit(2)
    settings = QUICK if args.quick else FULL
    if args.budget_s is not None:
        settings = replace(settings, budget_s=args.budget_s)
    clock = Clock(torch.device(args.device), settings.budget_s)
    names = [n for n in SECTIONS if not args.only or n in args.only]
    clock.log(f"sections {', '.join(names)} on {args.device}{' (quick)' if args.quick else ''}; results in "
              f"{args.out / 'gpu.json'}")
    report = run_sections(names, settings, clock, args.images, args.out)
    failed = [n for n, e in report["sections"].items() if e["status"] != "ok"]
    clock.log(f"done: {len(names) - len(failed)} of {len(names)} sections ok" + (f"; not ok: {failed}" if failed
                                                                                   else ""))
    return report


if __name__ == "__main__":
    main()
