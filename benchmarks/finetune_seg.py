"""Own-data segmentation recipe against torchvision's reference recipe, on real photos (issue 11's bar).

    python -m benchmarks.finetune_seg --epochs 10                     # coco128 as 480x360, 11 classes, scratch
    python -m benchmarks.finetune_seg --peer deeplabv3_mobilenet_v3_large --fp32-too
    python -m benchmarks.finetune_seg --quick                         # 1 epoch on 16 photos: checks that it runs

Data (`coco_seg_subset.py`): coco128's 128 photos centre-cropped to 4:3 and resized to 480x360, semantic
masks of the 10 categories covering the most pixels + background (11 classes), 255 = crowd, seeded split
100 train / 28 val: the shape of issue 11's street-scene set. Contenders, trained one after the other for
the same number of epochs, with the same threads (DataLoader workers: --workers for torchvision's, our
default num_workers=auto for ours):
- ours: `python -m tasks.train experiment=deeplabv3_finetune dataset.root=<set> backbone.pretrained=null`
  as a user runs it (start-up checks, periodic evaluation and reports included in its time);
- torchvision's reference recipe (references/segmentation/train.py with its README's command for the mobile
  models, run on one process: `-b 4 --wd 0.000001`, lraspp without / deeplabv3 with `--aux-loss`, weights and
  backbone weights None): SGD lr 0.01 momentum 0.9, the aux classifier at 10x lr, aux loss weight 0.5,
  PolynomialLR(power 0.9) stepped per iteration over all epochs, no warm-up (--lr-warmup-epochs 0 is its
  default), fp32 (no --amp), full batches only; SegmentationPresetTrain(base_size 520, crop_size 480):
  shorter side random in [260, 1040), flip, pad (255 in the mask) and crop 480. Base and crop are kept as the
  recipe states them: it was set for VOC's ~500x375 photos and these are 480x360, so 520 is the same ~1.4x
  upscale of the shorter side it gives VOC. Its time is that of the training loop; its train.py also evaluates
  after every epoch inside the "Training time" it prints, so that evaluation (its eval preset: shorter side
  520, then logits back to the photo) is run too and timed apart: the table gives the ratio against both.
Both are scored by the same evaluator, our ConfusionMatrix over the val masks at their own 480x360 (255
ignored), from their last weights: mIoU (over the classes present in truth or prediction) and pixel accuracy.
The result is the ratios ours / torchvision's for issue 11's bar: >= 1.25x mIoU in <= 0.75x time.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.coco_seg_subset import write_voc_segmentation
from benchmarks.own_data import (
    BAR,
    ROOT,
    SHARED_COCO,
    evaluate_like_reference,
    load_now,
    ratio,
    reference_seconds,
    train_with_tasks,
    write_json,
)
from benchmarks.run import environment
from tasks.segmentation.palette import IGNORE_INDEX
from tasks.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD
from tasks.segmentation.voc import VOCSegmentation

DEFAULT_OUT = ROOT / "outputs" / "bench" / "finetune_seg.json"
PEERS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
QUICK_TRAIN = 16  # photos --quick trains on (its own split list)
Predict = Callable[[np.ndarray], np.ndarray]  # RGB uint8 [H, W, 3] -> class indices [H, W]


def score(predict: Predict, val: VOCSegmentation) -> dict[str, float]:
    """mIoU and pixel accuracy of `predict` over every val photo, against its mask at its own resolution."""
    evaluator = val.evaluator()
    start = time.perf_counter()
    for index in range(len(val)):
        image, mask = val.load(index)
        evaluator.update([torch.from_numpy(mask)], [torch.from_numpy(np.asarray(predict(image)))])
    metrics = evaluator.compute()
    return {"mIoU": metrics["mIoU"], "pixel_acc": metrics["pixel_acc"], "mean_acc": metrics["mean_acc"],
            "score_s_per_image": (time.perf_counter() - start) / max(1, len(val)),
            "IoU": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("IoU/")}}


# -- ours -------------------------------------------------------------------------------------------------
def train_ours(root: Path, epochs: int, run_dir: Path, threads: int, overrides: Sequence[str]) -> dict[str, Any]:
    trained = train_with_tasks("deeplabv3_finetune", root, epochs, run_dir, threads, overrides)
    import mobilevision

    predictor = mobilevision.load(trained.pop("checkpoint"), threads=threads)
    return {**trained, "predict": lambda image: predictor.predict(image).mask}


# -- torchvision's reference recipe ---------------------------------------------------------------------
class ReferenceDataset(torch.utils.data.Dataset):
    """The VOC-layout set through torchvision's SegmentationPresetTrain (its v2 form): random shorter side in
    [base/2, 2 base), flip, pad to the crop (255 in the mask), random crop, ImageNet normalisation."""

    def __init__(self, voc: VOCSegmentation, base_size: int, crop_size: int):
        from torchvision import tv_tensors
        from torchvision.transforms import v2

        self.voc = voc
        self.transforms = v2.Compose([
            v2.RandomResize(min_size=int(0.5 * base_size), max_size=int(2.0 * base_size)),
            v2.RandomHorizontalFlip(0.5),
            v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Mask: IGNORE_INDEX, "others": 0}),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
            v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        ])

    def __len__(self) -> int:
        return len(self.voc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision import tv_tensors

        image, mask = self.voc.load(index)
        image_t = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
        image_t, mask_t = self.transforms(image_t, tv_tensors.Mask(torch.from_numpy(mask)))
        return image_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor)


def train_reference(name: str, train: VOCSegmentation, epochs: int, workers: int, seed: int, base_size: int = 520,
                    crop_size: int = 480, batch_size: int = 4, lr: float = 0.01,
                    weight_decay: float = 1e-6, val: VOCSegmentation | None = None) -> dict[str, Any]:
    """`seconds`: its training loop alone. With `val`, also `seconds_as_run`: the loop plus the evaluation after
    every epoch that references/segmentation/train.py runs inside the time it prints as "Training time"."""
    import torchvision
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(seed)
    start = time.perf_counter()
    aux = name.startswith("deeplabv3")  # the README trains deeplabv3_mobilenet_v3_large with --aux-loss, lraspp without
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=train.num_classes,
                                         aux_loss=aux)
    loader = torch.utils.data.DataLoader(ReferenceDataset(train, base_size, crop_size), batch_size=batch_size,
                                         shuffle=True, num_workers=workers, drop_last=len(train) >= batch_size,
                                         persistent_workers=workers > 0)
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad]},
              {"params": [p for p in model.classifier.parameters() if p.requires_grad]}]
    if aux:
        groups.append({"params": [p for p in model.aux_classifier.parameters() if p.requires_grad], "lr": lr * 10})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=len(loader) * epochs, power=0.9)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    @torch.no_grad()
    def predict(image: np.ndarray) -> np.ndarray:
        x = TF.resize(torch.from_numpy(image).permute(2, 0, 1), [base_size], antialias=True)  # its eval preset
        logits = model(((x.float() / 255 - mean) / std)[None])["out"]
        return F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)[0].argmax(0)

    built = time.perf_counter() - start
    epoch_seconds, eval_seconds = [], 0.0
    for _ in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        for images, masks in loader:
            outputs = model(images)
            loss = F.cross_entropy(outputs["out"], masks, ignore_index=IGNORE_INDEX)
            if "aux" in outputs:
                loss = loss + 0.5 * F.cross_entropy(outputs["aux"], masks, ignore_index=IGNORE_INDEX)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        epoch_seconds.append(time.perf_counter() - epoch_start)
        if val is not None:
            eval_seconds += evaluate_like_reference(model, lambda: score(predict, val))
    timing = reference_seconds(time.perf_counter() - start, eval_seconds, val is not None)
    model.eval()
    return {**timing, "time_split": {"build": built, "train": sum(epoch_seconds)},
            "epoch_seconds": epoch_seconds, "predict": predict}


# -- the run ----------------------------------------------------------------------------------------------
def run(coco_root: Path, epochs: int, threads: int, workers: int, seed: int, workdir: Path, peers: Sequence[str],
        fp32_too: bool = False, quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    torch.set_num_threads(threads)
    data = workdir / "coco128_seg"
    written = write_voc_segmentation(coco_root, data, seed=seed)
    classes = written["class_names"]
    train_split = "train"
    if quick:
        lists = data / "ImageSets" / "Segmentation"
        train_split = "train_quick"
        first = (lists / "train.txt").read_text().splitlines(True)[:QUICK_TRAIN]
        (lists / "train_quick.txt").write_text("".join(first))
    log(f"data: {data} ({written['train']} train / {written['val']} val photos at 480x360, classes {classes})")
    train = VOCSegmentation(data, train_split, class_names=classes)
    val = VOCSegmentation(data, "val", class_names=classes)
    common = [f"seed={seed}", f"dataset.train_split={train_split}"]  # ours loads with num_workers=auto
    contenders: list[tuple[str, str, Callable[[], dict[str, Any]]]] = [
        ("torchvision", f"torchvision reference ({peer}), scratch",
         lambda peer=peer: train_reference(peer, train, epochs, workers, seed, val=val)) for peer in peers]
    contenders.append(("ours", "ours (experiment=deeplabv3_finetune), scratch",
                       lambda: train_ours(data, epochs, workdir / "ours", threads,
                                          ["backbone.pretrained=null", *common])))
    if fp32_too:
        contenders.append(("ours", "ours, amp=null (fp32 training), scratch",
                           lambda: train_ours(data, epochs, workdir / "ours_fp32", threads,
                                              ["backbone.pretrained=null", "amp=null", *common])))
    rows: list[dict[str, Any]] = []
    for side, name, train_fn in contenders:
        log(f"training {name} for {epochs} epochs ... (load {load_now()[0]:.2f})")
        start = time.perf_counter()
        try:
            trained = train_fn()
        except RuntimeError as err:  # e.g. a non-finite loss: recorded, and the other contenders still run
            failure = str(err).strip().splitlines()[-1]
            rows.append({"contender": name, "side": side, "failed": failure, "seconds": time.perf_counter() - start,
                         "loadavg_after": load_now()})
            log(f"  failed after {rows[-1]['seconds']:.0f} s: {failure}")
            continue
        metrics = score(trained.pop("predict"), val)
        # per photo of the training set and epoch, data loading included
        train_s_per_image = trained["time_split"]["train"] / (epochs * len(train))
        rows.append({"contender": name, "side": side, "images_per_epoch": len(train), **trained,
                     "train_s_per_image": train_s_per_image, **metrics, "loadavg_after": load_now()})
        log(f"  {trained['seconds']:.0f} s, mIoU {metrics['mIoU']:.4f}, pixel acc {metrics['pixel_acc']:.4f}")
    ours = next(r for r in rows if r["side"] == "ours")
    ratios = {r["contender"]: {"mIoU": ratio(ours["mIoU"], r["mIoU"]),
                               "pixel_acc": ratio(ours["pixel_acc"], r["pixel_acc"]),
                               "time": ratio(ours["seconds"], r["seconds"]),
                               "time_vs_reference_as_run": ratio(ours["seconds"], r["seconds_as_run"])}
              for r in rows if r["side"] == "torchvision" and "failed" not in r and "failed" not in ours}
    return {"data": {**written, "size": [480, 360], "trained_on": len(train)}, "epochs": epochs, "threads": threads,
            "workers": workers, "rows": rows, "ours_over_torchvision": ratios}


def table(result: dict[str, Any]) -> str:
    lines = ["| contender | train s | where the time went (s) | train s / image | mIoU | pixel acc |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "failed" in r:
            lines.append(f"| {r['contender']} | failed after {r['seconds']:.0f} s: {r['failed']} | | | | |")
            continue
        split = ", ".join(f"{k} {v:.0f}" for k, v in r["time_split"].items() if v >= 0.5)
        lines.append(f"| {r['contender']} | {r['seconds']:.0f} | {split} | {r['train_s_per_image']:.2f} | "
                     f"{r['mIoU']:.4f} | {r['pixel_acc']:.4f} |")
    for peer, ratios in result["ours_over_torchvision"].items():
        lines.append(f"\nours / {peer}: mIoU {ratios['mIoU']:.2f}x, pixel acc {ratios['pixel_acc']:.2f}x, "
                     f"time {ratios['time']:.2f}x  {BAR}; against the reference as its train.py runs and times "
                     f"it (evaluating after every epoch): {ratios['time_vs_reference_as_run']:.2f}x")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coco", type=Path, default=SHARED_COCO, help="a COCO folder (annotations/, train2017/)")
    parser.add_argument("--epochs", type=int, default=30, help="for every contender (the reference's default: 30)")
    parser.add_argument("--peer", choices=PEERS, action="append", help=f"torchvision model(s); default {PEERS[0]}")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--workers", type=int, default=2, help="the torchvision reference's DataLoader workers "
                        "(ours runs with its default num_workers=auto)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--fp32-too", action="store_true", help="also train ours with amp=null (the recipe's "
                        "amp=auto picks bf16 on CPUs that compute it natively)")
    parser.add_argument("--quick", action="store_true", help=f"1 epoch on {QUICK_TRAIN} train photos: checks that "
                        "everything runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (args.coco / "annotations" / "instances_train2017.json").is_file():
        sys.exit(f"--coco {args.coco} holds no annotations/instances_train2017.json; expected coco128's layout.")
    if args.epochs < 1 or args.threads < 1 or args.workers < 0:
        sys.exit(f"--epochs {args.epochs}, --threads {args.threads}, --workers {args.workers}: expected at least "
                 f"1 epoch, 1 thread and 0 workers.")
    # loadavg_start is the load before the runs. OMP_WAIT_POLICY: with OpenMP's default spinning, 2 threads on 2
    # cores that another process also uses ran a training step ~20x slower here than with PASSIVE (README).
    started = environment() | {"threads": args.threads, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    with tempfile.TemporaryDirectory(prefix="mv_finetune_seg_") as scratch:
        result = run(args.coco, 1 if args.quick else args.epochs, args.threads, args.workers, args.seed,
                     Path(scratch), args.peer or [PEERS[0]], args.fp32_too, args.quick)
    command = " ".join(sys.argv if argv is None else ["benchmarks.finetune_seg", *argv])
    result["environment"] = started | {"loadavg_end": load_now(), "quick": args.quick, "command": command}
    print(table(result))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
