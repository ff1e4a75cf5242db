"""The Python API: build a composed model by config names, load a checkpoint or an ONNX export in one call,
predict on a path / PIL image / numpy array (one or a batch), and get pictures, COCO json or VOC masks;
what it predicts is what `python -m tasks.predict` writes. The README's snippet runs as written."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_train
from PIL import Image

import mobilevision
from tasks.predict import predict as predict_to_files
from tasks.training.model import build_model as build_from_configs

pytestmark = pytest.mark.usefixtures("one_thread")


def val_image(artifact: dict) -> Path:
    data = Path(artifact["data"])
    folder = data / "val2017" if (data / "val2017").is_dir() else data / "JPEGImages"
    return sorted(folder.glob("*.jpg"))[0]


def test_build_model_is_the_command_lines_model():
    model = mobilevision.build_model("mobilenet_v2", "ssdlite", num_classes=5, backbone__width_mult=0.5)
    cfg = compose_train(["backbone.width_mult=0.5"])
    reference = build_from_configs(cfg.backbone, cfg.head, 5)
    shapes = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes
    seg = mobilevision.build_model("mobilenet_v1", "deeplabv3", num_classes=21, overrides=["backbone.output_stride=16"])
    assert seg.backbone.output_stride == 16 and seg.eval()(torch.zeros(1, 3, 64, 64))["logits"].shape[1] == 21
    classifier = mobilevision.build_model("mobilenet_v2", None)
    assert classifier.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_a_checkpoint_predicts_what_tasks_predict_writes(artifacts, tmp_path):
    artifact = artifacts["detection"]
    image_path = val_image(artifact)
    predictor = mobilevision.load(artifact["checkpoint"])
    result = predictor.predict(image_path)
    assert predictor.task == "detection" and result.source == image_path.name
    predict_to_files(artifact["checkpoint"], [image_path], tmp_path)
    written = json.loads((tmp_path / "detections" / f"{image_path.stem}.json").read_text())
    coco = result.to_coco()
    assert len(coco) == len(written) > 0
    for got, expected in zip(coco, written):
        assert got["category_id"] == expected["category_id"]
        assert got["score"] == pytest.approx(expected["score"], abs=1e-5)
        assert got["bbox"] == pytest.approx(expected["bbox"], abs=1e-2)
    picture = Image.open(tmp_path / "images" / f"{image_path.stem}.png")
    assert np.array_equal(np.asarray(result.plot(score_threshold=0.3)), np.asarray(picture))


def test_paths_pil_and_numpy_give_the_same_result_and_batches_match_singles(artifacts):
    artifact = artifacts["segmentation"]
    image_path = val_image(artifact)
    predictor = mobilevision.load(artifact["checkpoint"])
    pil = Image.open(image_path)
    from_path, from_pil = predictor.predict(str(image_path)), predictor.predict(pil)
    batch = predictor.predict([pil, np.asarray(pil), pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], batch_size=2)
    assert len(batch) == 3
    assert np.array_equal(from_path.mask, from_pil.mask) and np.array_equal(batch[1].mask, from_pil.mask)
    assert from_pil.mask.shape == (pil.height, pil.width)
    palette_png = from_pil.mask_image()
    assert palette_png.mode == "P" and np.array_equal(np.asarray(palette_png), from_pil.mask)
    assert from_pil.plot().size == pil.size
    with pytest.raises(ValueError, match="to_coco"):
        from_pil.to_coco()


def test_an_onnx_export_loads_and_agrees_with_the_checkpoint(artifacts):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is the deploy extra (mobilevision[deploy])")
    artifact = artifacts["detection"]
    image = np.asarray(Image.open(val_image(artifact)).convert("RGB"))
    onnx, torch_result = mobilevision.load(artifact["onnx"]), mobilevision.load(artifact["checkpoint"]).predict(image)
    onnx_result = onnx.predict(image)
    assert onnx.runtime == "onnxruntime" and len(onnx_result) == len(torch_result)
    assert np.allclose(onnx_result.scores, torch_result.scores, atol=1e-4)
    assert np.allclose(onnx_result.boxes, torch_result.boxes, atol=1e-2)


def test_the_readme_snippet_runs(artifacts, tmp_path, monkeypatch, capsys):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- tests/test_python_api.py runs this snippet[^\n]*\n```python\n(.*?)```", readme, re.S)
    assert snippet, "README.md lost its Python API snippet"
    code = snippet.group(1)
    assert 'mobilevision.load("outputs/train/<run>/best.ckpt")' in code
    artifact = artifacts["detection"]
    photo = Image.open(val_image(artifact)).convert("RGB").resize((120, 90))
    photo.save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("outputs/train/<run>/best.ckpt", artifact["checkpoint"]), "README.md", "exec"), {})
    assert Image.open(tmp_path / "photo_boxes.png").size == (120, 90)
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].startswith("2 [") and printed[2].startswith("BackboneWithHead ")
