"""Own-data detection recipe against torchvision's reference recipe, on real photos (issue 11's bar).

    python -m benchmarks.finetune                       # coco128 person/car/dog in VOC layout, 60 epochs, scratch
    python -m benchmarks.finetune --epochs 120 --init-from det.ckpt   # + ours from a checkpoint stand-in
    python -m benchmarks.finetune --fp32-too            # + ours with amp=null (the recipe's amp=auto: bf16 if native)
    python -m benchmarks.finetune --variant 'dataset.input_size=256'   # + ours with other overrides
    python -m benchmarks.finetune --quick               # 2 epochs: checks that everything runs

Data: the coco128 photos (../shared/data/coco128) holding any of --classes, written in VOC layout with a
seeded train/val split. Contenders, trained one after the other for the same number of epochs, with the
same threads (DataLoader workers: --workers for torchvision's, our default num_workers=auto for ours):
- ours: `python -m tasks.train experiment=ssdlite_finetune dataset.root=<subset> backbone.pretrained=null`
  as a user runs it (its own start-up checks, periodic evaluation and reports included in its time);
- torchvision's reference recipe for its SSDLite (references/detection, `--model ssdlite320_mobilenet_v3_large
  --lr 0.15 --batch-size 24 --weight-decay 0.00004 --lr-scheduler cosineannealinglr
  --data-augmentation ssdlite`, run on one process as its README's command reads): SGD momentum 0.9, a
  linear warm-up over the first epoch's iterations (at most 1000) from lr/1000, cosine over the epochs,
  RandomIoUCrop + horizontal flip, full batches only. Its time is that of the training loop; the reference's
  train.py also evaluates after every epoch inside the "Training time" it prints, so that evaluation is run
  too (our VOC evaluator standing in for its CocoEvaluator) and timed apart: the table gives the ratio
  against both.
Both are scored the same way on the same val photos: all-points VOC AP at IoU 0.5 (what the VOC-layout
custom dataset reports) and its mean over IoU 0.5:0.95, from their last weights, at their own decoding
settings. The result is AP ratio and time ratio (ours / torchvision's) for the issue's bar: >= 1.25x AP
in <= 0.75x time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.coco_subset import write_voc_subset
from benchmarks.macs import ours_detection_gmacs, torchvision_ssdlite_gmacs
from benchmarks.own_data import ROOT, SHARED_COCO, evaluate_like_reference, reference_seconds, train_with_tasks
from benchmarks.run import environment
from tasks.detection.voc import VOCDetection
from tasks.detection.voc_eval import VOCEvaluator
from tasks.images import load_rgb

DEFAULT_OUT = ROOT / "outputs" / "bench" / "finetune.json"
Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]  # image -> boxes px, scores, labels


def score(predict: Predict, val: VOCDetection) -> dict[str, float]:
    """mAP50 and mAP (the mAP50 averaged over IoU 0.5:0.95) of `predict` on every val photo, as the
    VOC-layout custom dataset reports them."""
    evaluator = VOCEvaluator(val.ground_truth(), val.class_names, iou_threshold=0.5, iou_range=True)
    for index, record in enumerate(val.records):
        boxes, scores, labels = predict(load_rgb(record.root / "JPEGImages" / f"{record.name}.jpg"))
        evaluator.update([{"image_id": index}], [{"boxes": boxes, "scores": scores, "labels": labels}])
    metrics = evaluator.compute()
    return {"AP50": metrics["mAP50"], "AP50:95": metrics["mAP"]}


# -- ours -------------------------------------------------------------------------------------------------
def train_ours(root: Path, epochs: int, run_dir: Path, threads: int, overrides: Sequence[str]) -> dict[str, Any]:
    trained = train_with_tasks("ssdlite_finetune", root, epochs, run_dir, threads, overrides)
    import mobilevision

    predictor = mobilevision.load(trained.pop("checkpoint"), threads=threads)

    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        result = predictor.predict(image)
        return result.boxes, result.scores, result.labels

    return {**trained, "predict": predict}


# -- torchvision's reference recipe ---------------------------------------------------------------------
class ReferenceDataset(torch.utils.data.Dataset):
    """The VOC subset as torchvision's detection references feed it: PIL image, boxes in pixels, labels 1..K."""

    def __init__(self, voc: VOCDetection, train: bool):
        from torchvision.transforms import v2

        self.voc = voc
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        self.transforms = v2.Compose([v2.RandomIoUCrop(), v2.RandomHorizontalFlip(0.5), *to_float,
                                      v2.SanitizeBoundingBoxes()] if train else to_float)

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision import tv_tensors

        record = self.voc.records[index]
        image = Image.open(record.root / "JPEGImages" / f"{record.name}.jpg").convert("RGB")
        boxes, labels = self.voc.get_annotations(index)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                                    canvas_size=(image.height, image.width)),
                  "labels": torch.from_numpy(labels) + 1}
        return self.transforms(image, target)


def _collate(batch):
    return tuple(zip(*batch))


def train_reference(train: VOCDetection, epochs: int, workers: int, seed: int, batch_size: int = 24,
                    lr: float = 0.15, val: VOCDetection | None = None, device: str = "cpu") -> dict[str, Any]:
    """`seconds`: its training loop alone. With `val`, also `seconds_as_run`: the loop plus the evaluation
    after every epoch that references/detection/train.py runs inside the time it prints as "Training time"."""
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    torch.manual_seed(seed)
    start = time.perf_counter()
    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                          num_classes=train.num_classes + 1).to(device)
    to_tensor = ReferenceDataset(train, train=False).transforms

    @torch.no_grad()
    def predict(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        image = to_tensor(torch.from_numpy(image).permute(2, 0, 1)).to(device)
        out = {k: v.cpu() for k, v in model([image])[0].items()}
        return out["boxes"].numpy(), out["scores"].numpy(), out["labels"].numpy() - 1

    eval_seconds = 0.0
    dataset = ReferenceDataset(train, train=True)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset), batch_size, drop_last=True)
    if len(sampler) == 0:
        sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(dataset), batch_size, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=_collate,
                                         persistent_workers=workers > 0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=4e-5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    for epoch in range(epochs):
        model.train()
        warmup = None
        if epoch == 0:
            warmup_iters = min(1000, len(loader) - 1)
            if warmup_iters > 0:
                warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, total_iters=warmup_iters)
        for images, targets in loader:
            losses = model([image.to(device) for image in images],
                           [{k: v.to(device) for k, v in target.items()} for target in targets])
            loss = sum(losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if warmup is not None:
                warmup.step()
        cosine.step()
        if val is not None:
            eval_seconds += evaluate_like_reference(model, lambda: score(predict, val))
    timing = reference_seconds(time.perf_counter() - start, eval_seconds, val is not None)
    model.eval()
    return {**timing, "predict": predict}


# -- the run ----------------------------------------------------------------------------------------------
def run(coco_root: Path, classes: Sequence[str], epochs: int, threads: int, workers: int, seed: int, workdir: Path,
        init_from: str | None, fp32_too: bool = False, variants: Sequence[str] = (),
        log: Callable[[str], None] = print, device: str = "cpu") -> dict[str, Any]:
    torch.set_num_threads(threads)
    data = workdir / "voc_subset"
    sizes = write_voc_subset(coco_root, data, list(classes), seed=seed)
    (data / "labels.txt").write_text("".join(f"{c}\n" for c in classes))
    log(f"data: {data} ({sizes['train']} train / {sizes['val']} val photos, classes {list(classes)})")
    train = VOCDetection(data, "train", class_names=classes)
    val = VOCDetection(data, "val", class_names=classes)
    common = [f"seed={seed}"]  # ours loads with its own default (num_workers=auto); --workers is the peer's
    rows: list[dict[str, Any]] = []

    contenders: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("torchvision reference (SSDLite320-MobileNetV3-Large), scratch",
         lambda: train_reference(train, epochs, workers, seed, val=val, device=device)),
        ("ours (experiment=ssdlite_finetune), scratch",
         lambda: train_ours(data, epochs, workdir / "ours_scratch", threads, ["backbone.pretrained=null", *common])),
    ]
    if fp32_too:
        contenders.append(("ours, amp=null (fp32 training), scratch",
                           lambda: train_ours(data, epochs, workdir / "ours_fp32", threads,
                                              ["backbone.pretrained=null", "amp=null", *common])))
    for number, variant in enumerate(variants):
        contenders.append((f"ours, {variant}, scratch",
                           lambda number=number, variant=variant: train_ours(
                               data, epochs, workdir / f"ours_variant{number}", threads,
                               ["backbone.pretrained=null", *variant.split(), *common])))
    if init_from:
        contenders.append((f"ours, init_from={init_from}",
                           lambda: train_ours(data, epochs, workdir / "ours_init", threads,
                                              ["backbone.pretrained=null", f"init_from={init_from}", *common])))
    for name, train_fn in contenders:
        log(f"training {name} for {epochs} epochs ...")
        trained = train_fn()
        metrics = score(trained.pop("predict"), val)
        rows.append({"contender": name, **trained, **metrics})
        log(f"  {trained['seconds']:.0f} s, AP50 {metrics['AP50']:.4f}, AP50:95 {metrics['AP50:95']:.4f}")
    peer, ours = rows[0], rows[1]
    # what each network costs per 320-px image: the time ratio over the MACs ratio is the per-MAC efficiency
    macs = {"ours": ours_detection_gmacs(len(classes)), "torchvision": torchvision_ssdlite_gmacs(len(classes))}
    ratios = {"AP50": ours["AP50"] / peer["AP50"] if peer["AP50"] > 0 else float("inf"),
              "AP50:95": ours["AP50:95"] / peer["AP50:95"] if peer["AP50:95"] > 0 else float("inf"),
              "time": ours["seconds"] / peer["seconds"], "gmacs": macs["ours"] / macs["torchvision"],
              "time_vs_reference_as_run": ours["seconds"] / peer["seconds_as_run"]}
    return {"data": {"classes": list(classes), **sizes}, "epochs": epochs, "threads": threads, "workers": workers,
            "gmacs_per_image": macs, "rows": rows, "ours_over_torchvision": ratios}


def table(result: dict[str, Any]) -> str:
    lines = ["| contender | train s | AP50 | AP50:95 |", "|---|---|---|---|"]
    lines += [f"| {r['contender']} | {r['seconds']:.0f} | {r['AP50']:.4f} | {r['AP50:95']:.4f} |"
              for r in result["rows"]]
    ratio = result["ours_over_torchvision"]
    lines.append(f"\nours / torchvision's (scratch): AP50 {ratio['AP50']:.2f}x, AP50:95 {ratio['AP50:95']:.2f}x, "
                 f"time {ratio['time']:.2f}x  (bar: >= 1.25x AP in <= 0.75x time)")
    lines.append(f"time against the reference as its train.py runs and times it (evaluating after every epoch, "
                 f"{result['rows'][0]['seconds_as_run']:.0f} s): {ratio['time_vs_reference_as_run']:.2f}x")
    macs = result["gmacs_per_image"]
    lines.append(f"network GMACs per 320-px image: ours {macs['ours']:.3f}, torchvision's {macs['torchvision']:.3f} "
                 f"({ratio['gmacs']:.2f}x): ours trains {ratio['gmacs'] / ratio['time']:.2f}x the MACs per second")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, default=SHARED_COCO, help="a COCO folder (annotations/, train2017/)")
    parser.add_argument("--classes", nargs="+", default=["person", "car", "dog"])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workers", type=int, default=2, help="the torchvision reference's DataLoader workers "
                        "(ours runs with its default num_workers=auto; --variant num_workers=2 compares)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--init-from", default=None, help="also train ours from this checkpoint (a stand-in)")
    parser.add_argument("--fp32-too", action="store_true", help="also train ours with amp=null (the recipe's "
                        "amp=auto picks bf16 on CPUs that compute it natively)")
    parser.add_argument("--variant", action="append", default=[], help="also train ours with these extra "
                        "overrides, e.g. --variant 'dataset.input_size=256' (repeatable)")
    parser.add_argument("--quick", action="store_true", help="2 epochs: checks that everything runs")
    parser.add_argument("--device", default="cpu", help="where torchvision's reference trains (cuda: on a GPU "
                        "machine, to compare the metrics of longer runs; ours picks the GPU by itself)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (args.coco / "annotations" / "instances_train2017.json").is_file():
        sys.exit(f"--coco {args.coco} holds no annotations/instances_train2017.json; expected coco128's layout.")
    started = environment()  # its loadavg_start is the load before the runs
    with tempfile.TemporaryDirectory(prefix="mv_finetune_") as scratch:
        result = run(args.coco, args.classes, 2 if args.quick else args.epochs, args.threads, args.workers,
                     args.seed, Path(scratch), args.init_from, args.fp32_too, args.variant, device=args.device)
    result["environment"] = started | {"loadavg_end": list(os.getloadavg())}
    for row in result["rows"]:
        row.pop("predict", None)
    print(table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
