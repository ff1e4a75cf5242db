"""Check a dataset before training on it: every file parses, every image exists, ids and boxes make sense.

`check_dataset(cfg.dataset)` is the library entry point (training start-up and `python -m tasks.check_data`
call it): it returns a `DataReport` whose `.fatal` problems stop training and whose `.warnings` (boxes
clipped to the image, empty boxes dropped, a VOC xml without <size>) do not.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

from tasks.datasets.report import Collector, DataReport, describe_error, short_list
from tasks.detection.check_coco import check_coco
from tasks.detection.check_voc import check_voc_det
from tasks.detection.voc import VOC_CLASSES as VOC_DET_CLASSES
from tasks.errors import ConfigError
from tasks.segmentation.check_voc import check_voc_seg
from tasks.segmentation.palette import VOC_CLASSES as VOC_SEG_CLASSES

LAYOUTS = {  # dataset _target_ -> (task, layout)
    "tasks.detection.coco.CocoDetection": ("detection", "coco"),
    "tasks.detection.voc.VOCDetection": ("detection", "voc_det"),
    "tasks.segmentation.voc.VOCSegmentation": ("segmentation", "voc_seg"),
    "tasks.segmentation.coco_masks.CocoVOCSegmentation": ("segmentation", "coco"),
}


def _dataset_node(dataset_cfg: Any) -> DictConfig:
    """The dataset config with its ${dataset.*} interpolations resolvable (a bare dict is wrapped)."""
    if isinstance(dataset_cfg, DictConfig):
        try:
            OmegaConf.to_container(dataset_cfg, resolve=True)
            return dataset_cfg
        except InterpolationKeyError:  # a dataset config on its own, outside a composed config
            dataset_cfg = OmegaConf.to_container(dataset_cfg, resolve=False)
        except OmegaConfBaseException:
            return dataset_cfg  # reported with the key's name by _split_args
    return OmegaConf.create({"dataset": dataset_cfg}).dataset


def _split_args(node: DictConfig, split: str) -> tuple[str, dict]:
    if OmegaConf.is_missing(node, "root"):
        raise ConfigError("dataset.root is not set; expected dataset.root=/path/to/the/data.")
    try:
        split_node = node[split]
        # transforms are left out: they interpolate the backbone's mean/std, absent from check_data's config
        args = ({key: OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
                 for key, value in split_node.items() if key != "transforms"}
                if OmegaConf.is_dict(split_node) else split_node)
    except OmegaConfBaseException as err:
        raise ConfigError(f"dataset.{split} cannot be resolved ({describe_error(err)}); expected a dataset=... config "
                          f"whose paths are set.") from None
    if not isinstance(args, dict) or "_target_" not in args:
        raise ConfigError(f"dataset.{split} has no _target_; expected one of {', '.join(LAYOUTS)}.")
    args.pop("transforms", None)
    return str(args.pop("_target_")), args


def check_dataset(dataset_cfg: Any, decode_images: bool = False, max_examples: int = 5) -> DataReport:
    """Check the files behind `dataset_cfg.train` and `dataset_cfg.val` (a Hydra dataset config: cfg.dataset,
    or the same as a plain dict). `decode_images` also decodes every image (slow: the pixels are read) and
    compares its size with the annotation's. Raises ConfigError only for a config that names no data."""
    start = time.perf_counter()
    node = _dataset_node(dataset_cfg)
    task = str(node.get("task", ""))
    num_classes = node.get("num_classes")
    splits: list[tuple[str, str, dict]] = []
    unchecked: list[tuple[str, str]] = []  # a dataset class of the user's own: its files are its business
    for split in ("train", "val"):
        if node.get(split) is None:
            continue
        target, args = _split_args(node, split)
        if target not in LAYOUTS:
            unchecked.append((split, target))
            continue
        if LAYOUTS[target][0] != task:
            raise ConfigError(f"dataset.task={task or None} but dataset.{split}._target_={target} reads "
                              f"{LAYOUTS[target][0]} data; expected them to agree.")
        same = next((i for i, (_, t, a) in enumerate(splits) if t == target and a == args), None)
        if same is not None:
            splits[same] = (f"{splits[same][0]}+{split}", target, args)
        else:
            splits.append((split, target, args))
    if not splits and not unchecked:
        raise ConfigError("the dataset config has neither 'train' nor 'val'; expected a dataset=... config group.")
    layout = LAYOUTS[splits[0][1]][1] if splits else "custom"
    report = DataReport(task=task, layout=layout)
    probs = Collector(report, max_examples)
    for split, target in unchecked:
        probs.add("not checked", target, f"dataset.{split}._target_={target} is not one of the built-in formats "
                  f"({', '.join(LAYOUTS)}), so its files were not checked; they are read as the class reads them.",
                  fatal=False)
    for name, target, args in splits:
        layout = LAYOUTS[target][1]
        if layout == "coco":
            expected = num_classes if task == "detection" and not args.get("class_names") else None  # a subset
            report.splits.append(check_coco(name, Path(str(args["image_dir"])), Path(str(args["ann_file"])),
                                             decode_images, probs, expected))
        elif layout == "voc_det":
            root = args["root"]
            roots = [Path(str(root))] if isinstance(root, str) else [Path(str(r)) for r in root]
            image_set = args.get("image_set", "train")
            sets = [image_set] * len(roots) if isinstance(image_set, str) else [str(s) for s in image_set]
            report.splits.append(check_voc_det(
                name, roots, sets, list(args.get("class_names") or VOC_DET_CLASSES), decode_images, probs,
                args.get("holdout"), float(args.get("val_fraction", 0.2)), int(args.get("split_seed", 0)),
                str(args.get("other_classes", "error"))))
        else:
            names = list(args.get("class_names") or VOC_SEG_CLASSES)
            if num_classes is not None and int(num_classes) != len(names):
                probs.add("class count mismatch", args["root"], f"{args['root']}: the masks use {len(names)} "
                          f"classes ({short_list(names, 5)}) but dataset.num_classes={num_classes}; expected "
                          f"them to agree.")
            report.splits.append(check_voc_seg(name, args, names, decode_images, probs))
    report.seconds = time.perf_counter() - start
    return report


