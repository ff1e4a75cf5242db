"""The speed defaults (channels_last for train, evaluate and predict) change no result: the same model in
NCHW is the reference."""
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from tasks.training.model import build_model

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("entry", ["train", "evaluate", "predict"])
def test_channels_last_is_the_default(entry):
    assert OmegaConf.load(CONF / f"{entry}.yaml").channels_last is True


@pytest.mark.parametrize("head", ["ssdlite", "deeplabv3"])
def test_channels_last_gives_the_nchw_results(head):
    backbone = OmegaConf.load(CONF / "backbone" / "mobilenet_v2.yaml")
    backbone.width_mult = 0.35
    head_cfg = OmegaConf.load(CONF / "head" / f"{head}.yaml")
    torch.manual_seed(0)
    model = build_model(backbone, head_cfg, 5).eval()
    images = torch.randn(2, 3, 160, 160)
    sizes = [(160, 160), (120, 200)]
    with torch.no_grad():
        reference = model(images)
        ref_pred = model.predict(reference, sizes)
        fast = model.to(memory_format=torch.channels_last)
        outputs = fast(images.contiguous(memory_format=torch.channels_last))
        pred = fast.predict(outputs, sizes)
    for name, value in reference.items():
        torch.testing.assert_close(outputs[name], value, rtol=1e-4, atol=1e-4)
    for a, b in zip(pred, ref_pred, strict=True):
        if head == "ssdlite":  # untrained scores nearly tie, and rounding may swap two of them: compare as sets
            assert len(a["scores"]) == len(b["scores"]) > 0
            torch.testing.assert_close(a["scores"].sort().values, b["scores"].sort().values, rtol=1e-4, atol=1e-5)
            assert torch.equal(a["labels"].bincount(minlength=5), b["labels"].bincount(minlength=5))
        else:
            assert (a["mask"] != b["mask"]).float().mean() < 1e-3


def test_export_is_the_same_graph_whatever_the_training_layout(tmp_path):
    """ONNX has no memory format: a model held in channels_last (as train/predict now hold it) exports the same
    operators, and ONNX Runtime chooses its own layout; so export needs no layout setting of its own."""
    import onnx

    from tasks.deploy.onnx_export import export_model

    backbone = OmegaConf.load(CONF / "backbone" / "mobilenet_v2.yaml")
    backbone.width_mult = 0.35
    head = OmegaConf.load(CONF / "head" / "ssdlite.yaml")
    cfg = OmegaConf.create({"backbone": backbone, "head": head, "dataset": {
        "task": "detection", "input_size": 96, "num_classes": 3, "val": {
            "_target_": "tasks.detection.coco.CocoDetection", "image_dir": "absent", "ann_file": "absent.json"}}})
    torch.manual_seed(0)
    model = build_model(cfg.backbone, cfg.head, 3).eval()
    nchw = export_model(model, cfg, tmp_path / "nchw.onnx")
    nhwc = export_model(model.to(memory_format=torch.channels_last), cfg, tmp_path / "nhwc.onnx")
    graphs = [onnx.load(path).graph for path in (nchw, nhwc)]
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    assert "Transpose" not in {n.op_type for n in graphs[1].node if n.input and n.input[0] == "images"}
