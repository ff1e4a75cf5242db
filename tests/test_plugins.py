"""Plug-ins without editing the package: docs/plugins' timm backbone (the user's own module and config
folder) composes, passes the start-up checks, builds, and (slow) trains, evaluates and exports from a
temporary folder. The checks look at contracts, not at this project's class names."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import ROOT, compose_train, tiny_shapes_overrides

from tasks.datasets.check import check_dataset
from tasks.training.config_checks import check_train_config

PLUGINS = ROOT / "docs" / "plugins"
SEARCHPATH = f"hydra.searchpath=[{(PLUGINS / 'conf').as_uri()}]"


@pytest.fixture
def plugin_module(monkeypatch):
    pytest.importorskip("timm", reason="the example adapts a timm model (pip install 'mobilevision[timm]')")
    monkeypatch.syspath_prepend(str(PLUGINS))


def test_the_timm_backbone_honours_the_backbone_contract(plugin_module):
    import mobilevision

    model = mobilevision.build_model("timm_mobilenetv3", "ssdlite", num_classes=3, config_dirs=[PLUGINS / "conf"],
                                     backbone__model_name="mobilenetv3_small_050").eval()
    backbone = model.backbone
    assert set(backbone.all_feature_info) == {"C2", "C3", "C4", "C5"} and list(backbone.out_features) == ["C4", "C5"]
    with torch.no_grad():
        maps = backbone.forward_all(torch.zeros(1, 3, 128, 128))
        outputs = model(torch.zeros(2, 3, 128, 128))
    for name, info in backbone.all_feature_info.items():  # what it promises is what it returns
        assert tuple(maps[name].shape[1:]) == (info.channels, 128 // info.stride, 128 // info.stride), name
    assert [info.stride for info in backbone.all_feature_info.values()] == [4, 8, 16, 32]
    assert outputs["cls_logits"].shape[0] == 2 and outputs["cls_logits"].shape[-1] == 4  # 3 classes + background


def test_a_plugin_backbone_without_width_mult_passes_the_start_up_checks(plugin_module, tmp_path):
    cfg = compose_train([SEARCHPATH, "backbone=timm_mobilenetv3", f"dataset.root={tmp_path}"])
    assert "width_mult" not in cfg.backbone
    check_train_config(cfg)


def test_a_dataset_class_of_the_users_own_skips_the_file_check_with_a_note():
    dataset = {"task": "detection", "num_classes": 2, "root": "/nowhere",
               "train": {"_target_": "my_data.ParquetDetection", "path": "/nowhere/train.parquet"},
               "val": {"_target_": "my_data.ParquetDetection", "path": "/nowhere/val.parquet"}}
    report = check_dataset(dataset)
    assert report.ok and report.num_warnings == 2
    assert report.warnings[0].message.startswith("dataset.train._target_=my_data.ParquetDetection is not one of "
                                                 "the built-in formats")


def _trusted(entry: str) -> list[str]:
    """Interface 1: once the safe resolver is in, the plug-in module is trusted by name on the command line."""
    keys = yaml.safe_load((ROOT / "conf" / f"{entry}.yaml").read_text())
    return ["trusted_targets=[timm_backbone]"] if "trusted_targets" in keys else []


@pytest.mark.slow
def test_the_plugin_example_trains_evaluates_and_exports_from_a_temporary_folder(tmp_path):
    pytest.importorskip("timm", reason="the example adapts a timm model (pip install 'mobilevision[timm]')")
    pytest.importorskip("onnxruntime", reason="the export's parity check runs ONNX Runtime (mobilevision[deploy])")
    work = tmp_path / "my_project"
    shutil.copytree(PLUGINS, work)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)

    def run(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", *args], cwd=work, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    run("tasks.train", "--config-dir", "conf", "backbone=timm_mobilenetv3", "backbone.model_name=mobilenetv3_small_050",
        "experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=4", "threads=1", "head.extra_depths=[32,32]",
        "hydra.run.dir=run", *tiny_shapes_overrides(work / "shapes", "coco", num_train=8, num_val=4, size=64))
    state = torch.load(work / "run" / "last.ckpt", weights_only=True)
    assert state["config"]["backbone"]["_target_"] == "timm_backbone.TimmBackbone"
    printed = run("tasks.evaluate", "checkpoint=run/last.ckpt", "progress=false", "hydra.run.dir=eval",
                  *_trusted("evaluate"))
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    assert metrics["AP"] == pytest.approx(state["history"][-1]["val/AP"], abs=1e-6)  # same model, same data
    assert "AP=" in printed
    run("tasks.export", "checkpoint=run/last.ckpt", "hydra.run.dir=export", *_trusted("export"))
    sidecar = json.loads((work / "export" / "model.json").read_text())
    assert max(sidecar["parity"]["max_abs_diff"].values()) < 1e-3
