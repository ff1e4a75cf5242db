"""The `${mv.*}` OmegaConf resolvers the configs use; registered once, when `tasks` is imported.

- dataset class names and splits read from the user's files (tasks/datasets/custom.py);
- the mean/std and activation that the chosen backbone weights expect (backbones/weights.py).
"""
from __future__ import annotations

from omegaconf import OmegaConf

from backbones.weights import weights_preprocessing
from tasks.datasets import custom


def _mean(source, backbone_class: str) -> list[float]:
    return list(weights_preprocessing(source, backbone_class)[0])


def _std(source, backbone_class: str) -> list[float]:
    return list(weights_preprocessing(source, backbone_class)[1])


def _act(source, backbone_class: str, default: str) -> str:
    return weights_preprocessing(source, backbone_class, default)[2]


RESOLVERS = {
    "mv.voc_det_classes": (custom.voc_det_class_names, True),
    "mv.voc_seg_classes": (custom.voc_seg_class_names, True),
    "mv.voc_seg_crop_shape": (custom.voc_seg_crop_shape, True),
    "mv.voc_holdout": (custom.voc_holdout, True),
    "mv.coco_classes": (custom.coco_class_names, True),
    "mv.coco_ann_file": (custom.coco_annotation_file, True),
    "mv.coco_holdout": (custom.coco_holdout, True),
    "mv.len": (len, False),
    "mv.weights_mean": (_mean, False),
    "mv.weights_std": (_std, False),
    "mv.weights_act": (_act, False),
}


def register_resolvers() -> None:
    for name, (fn, cache) in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=cache)


register_resolvers()
