"""Shared by the tests that run the real entry points."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def compose_train(overrides: list[str]):
    """The training config exactly as `python -m tasks.train <overrides>` would compose it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="conf", version_base="1.3"):
        return compose("train", overrides=overrides)


def tiny_shapes_overrides(root: Path, kind: str, num_train: int = 16, num_val: int = 8, size: int = 96) -> list[str]:
    """Overrides pointing the built-in shapes dataset at a small copy under `root`."""
    return [f"dataset.root={root}", f"dataset.prepare.num_train={num_train}",
            f"dataset.prepare.num_val={num_val}", f"dataset.prepare.image_size={size}",
            f"dataset.input_size={size}", "num_workers=0", "progress=false"]


TINY = {  # experiment, dataset, writer kind, extra overrides (few SSDLite maps: the export is faster)
    "detection": ("demo_ssdlite_shapes", "shapes_det", "coco", ["head.extra_depths=[32,32]"]),
    "segmentation": ("demo_deeplabv3_shapes", "shapes_seg", "voc", []),
}


def assert_same_detections(expected, got) -> None:
    """Deployed detections equal the PyTorch head's: same labels, scores within 1e-4, boxes within 1e-3 px."""
    import torch

    assert sum(len(e["scores"]) for e in expected) > 0
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(g["labels"], e["labels"])
        torch.testing.assert_close(g["scores"], e["scores"], atol=1e-4, rtol=0)
        torch.testing.assert_close(g["boxes"], e["boxes"], atol=1e-3, rtol=1e-4)
