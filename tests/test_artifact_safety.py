"""A checkpoint or sidecar is data, never code (tasks.resolve's allow-list, before anything runs), and a
checkpoint describes itself (state["artifact"]) so it is used without its dataset, from any folder."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, compose_train, tiny_shapes_overrides
from hydra.utils import instantiate

from tasks.deploy.int8 import quantize_checkpoint
from tasks.deploy.onnx_export import export_checkpoint
from tasks.deploy.sidecar import read_sidecar, sidecar_path
from tasks.deploy.weights_only import export_weights
from tasks.detection.coco import CocoDetection
from tasks.errors import ConfigError
from tasks.evaluate import evaluate_checkpoint
from tasks.predict import predict
from tasks.resolve import check_file_config, instantiate_from_file
from tasks.training.artifact import ARTIFACT_KEYS
from tasks.training.checkpoint import load_checkpoint
from tasks.training.trained import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")


def payloads(marker: Path, source: Path, npy: Path) -> dict[str, dict]:
    """Where a hostile config puts a callable, and what it would do: each writes or creates `marker`."""
    opener = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    return {
        "write_text": {"_target_": "pathlib.Path.write_text",
                       "_args_": [{"_target_": "pathlib.Path", "_args_": [str(marker)]}, "pwned"]},
        "open": opener,
        "copyfile": {"_target_": "shutil.copyfile", "src": str(source), "dst": str(marker)},
        "numpy_load_chain": {"_target_": "numpy.load", "file": str(npy), "allow_pickle": True},
        "nested_args": {"_target_": "tasks.detection.transforms.build_detection_transforms", "_args_": [opener]},
        "partial": {**opener, "_partial_": True},
        "hidden_in_list": {"_target_": "tasks.detection.transforms.build_detection_transforms", "size": 64,
                           "train": False, "mean": [opener, 0.4, 0.4]},
        "through_an_allowed_module": {"_target_": "backbones.mobilenet_v2.math.exp", "x": 1.0},
    }


class ShellOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile(tmp_path):
    marker = tmp_path / "marker.txt"
    source = tmp_path / "secret.txt"
    source.write_text("secret")
    npy = tmp_path / "evil.npy"
    np.save(npy, np.array([ShellOnLoad(marker)], dtype=object), allow_pickle=True)
    return marker, payloads(marker, source, npy)


def test_each_payload_really_runs_through_plain_instantiate(hostile):
    """The attacks are real: hydra's own instantiate writes the marker with each of them."""
    marker, cases = hostile
    for name in ("write_text", "open", "copyfile", "numpy_load_chain"):
        handle = instantiate(cases[name])
        if hasattr(handle, "close"):
            handle.close()
        assert marker.exists(), name
        marker.unlink()


@pytest.mark.parametrize("name", sorted(payloads(Path("m"), Path("s"), Path("n"))))
def test_the_resolver_refuses_every_payload_before_it_runs(hostile, name):
    marker, cases = hostile
    node = {"val": {"transforms": cases[name]}}
    with pytest.raises(ConfigError) as err:
        instantiate_from_file(node, "checkpoint evil.ckpt")
    message = str(err.value)
    assert message.startswith("checkpoint evil.ckpt asks to build val.transforms") and "\n" not in message
    assert "_target_=" in message and "trusted_targets" in message and message.endswith(".")
    assert not marker.exists()


def test_a_file_config_never_loads_weights(artifacts, tmp_path, monkeypatch):
    import backbones.weights

    monkeypatch.setattr(backbones.weights, "load_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    nested = {"_target_": "tasks.detection.transforms.build_detection_transforms",
              "_args_": [{"_target_": "backbones.MobileNetV2", "pretrained": "imagenet"}]}
    with pytest.raises(ConfigError) as err:
        instantiate_from_file({"transforms": nested}, "checkpoint x.ckpt")
    assert str(err.value) == ("checkpoint x.ckpt asks to build transforms._args_[0]._target_='backbones.MobileNetV2' "
                              "with pretrained='imagenet', which would download or read weight files; a file's "
                              "config never loads weights (expected pretrained: null there).")
    loader = {"_target_": "backbones.weights.load_pretrained", "source": "imagenet"}
    with pytest.raises(ConfigError, match=r"^checkpoint x\.ckpt asks to build _target_='backbones\.weights\."):
        instantiate_from_file(loader, "checkpoint x.ckpt")
    # The checkpoint's own backbone is built without its pretrained source (the trained weights replace them).
    state = load_checkpoint(artifacts["segmentation"]["checkpoint"])
    state["config"]["backbone"]["pretrained"] = "torchvision:IMAGENET1K_V1"
    torch.save(state, tmp_path / "finetuned.ckpt")
    model, cfg = load_trained_model(tmp_path / "finetuned.ckpt")
    assert cfg.backbone.pretrained is None


def test_the_project_configs_pass_and_trusted_targets_extend_the_list():
    for experiment in ("demo_ssdlite_shapes", "demo_deeplabv3_shapes", "ssdlite_mobilenet_v1_coco"):
        # as a checkpoint holds them once loaded: the backbone's pretrained source cleared (file_config)
        cfg = compose_train([f"experiment={experiment}", "dataset.root=/data", "backbone.pretrained=null"])
        for section in ("backbone", "head", "dataset", "optim"):
            check_file_config(cfg[section], "checkpoint x", path=section)
    plugin = {"_target_": "json.loads", "s": "[1]"}
    with pytest.raises(ConfigError, match="'json.loads'"):
        instantiate_from_file(plugin, "checkpoint x")
    assert instantiate_from_file(plugin, "checkpoint x", trusted=["json"]) == [1]
    with pytest.raises(ConfigError):  # a prefix is a module path, not a string prefix
        instantiate_from_file(plugin, "checkpoint x", trusted=["js"])


def hostile_checkpoint(real: str, path: Path, section: str, payload: dict) -> Path:
    state = load_checkpoint(real)
    config = state["config"]
    if section == "backbone":
        config["backbone"]["out_features"] = [payload]
    elif section == "head":
        config["head"]["extra_depths"] = payload
    elif section == "dataset.val":
        config["dataset"]["val"] = payload
    else:
        config["dataset"]["val"]["transforms"] = payload
    torch.save(state, path)
    return path


ENTRY_POINTS = ("evaluate", "predict", "export_onnx", "export_weights", "quantize")
SECTIONS = ("backbone", "head", "dataset.val", "dataset.val.transforms")


def run_entry(entry: str, checkpoint: Path, out: Path, image: Path):
    if entry == "evaluate":
        return evaluate_checkpoint(checkpoint, out, num_workers=0, progress=False)
    if entry == "predict":
        return predict(str(checkpoint), [image], out)
    if entry == "export_onnx":
        return export_checkpoint(checkpoint, out / "model.onnx", check=False)
    if entry == "export_weights":
        return export_weights(checkpoint, out / "model.ckpt")
    return quantize_checkpoint(checkpoint, out, calibration_images=1, latency_runs=1)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", sorted(payloads(Path("m"), Path("s"), Path("n"))))
def test_every_entry_point_refuses_a_hostile_checkpoint_and_writes_nothing(artifacts, hostile, tmp_path, entry, name):
    marker, cases = hostile
    names = sorted(payloads(Path("m"), Path("s"), Path("n")))
    section = SECTIONS[(ENTRY_POINTS.index(entry) + names.index(name)) % len(SECTIONS)]  # each entry: all four
    checkpoint = hostile_checkpoint(artifacts["detection"]["checkpoint"], tmp_path / "evil.ckpt", section, cases[name])
    image = next((Path(artifacts["detection"]["data"]) / "val2017").glob("*.jpg"))
    out = tmp_path / "out"
    with pytest.raises(ConfigError) as err:
        run_entry(entry, checkpoint, out, image)
    assert str(err.value).startswith(f"checkpoint {checkpoint} asks to build {section}"), str(err.value)
    assert not marker.exists()
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*")), sorted(out.rglob("*"))


@pytest.mark.parametrize("entry", ["predict", "quantize"])
def test_the_onnx_runtime_path_refuses_a_hostile_sidecar(artifacts, hostile, tmp_path, entry):
    marker, cases = hostile
    onnx = tmp_path / "model.onnx"
    shutil.copyfile(artifacts["detection"]["onnx"], onnx)
    meta = read_sidecar(artifacts["detection"]["onnx"])
    meta["train_config"]["dataset"]["val"]["transforms"] = cases["write_text"]
    sidecar_path(onnx).write_text(json.dumps(meta))
    image = next((Path(artifacts["detection"]["data"]) / "val2017").glob("*.jpg"))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"^ONNX sidecar {sidecar_path(onnx)} asks to build "
                                          r"dataset\.val\.transforms\._target_='pathlib\.Path\.write_text'"):
        if entry == "predict":
            predict(None, [image], out, runtime="onnxruntime", onnx=str(onnx))
        else:
            quantize_checkpoint(None, out, calibration_images=1, latency_runs=1, onnx=onnx)
    assert not marker.exists()
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


@pytest.mark.slow
def test_the_command_line_refuses_with_one_sentence_and_exit_2(artifacts, hostile, tmp_path):
    marker, cases = hostile
    checkpoint = hostile_checkpoint(artifacts["detection"]["checkpoint"], tmp_path / "evil.ckpt", "dataset.val",
                                    cases["open"])
    result = subprocess.run([sys.executable, "-m", "tasks.evaluate", f"checkpoint={checkpoint}",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: checkpoint {checkpoint} asks to build dataset.val._target_='builtins.open', which is not one of "
        f"this project's own classes or functions (backbones, heads, dataset loaders and transforms, torch.optim); "
        f"refused before anything ran (if you trust it, add its module with trusted_targets=[...]).")
    assert "Traceback" not in result.stderr and not marker.exists()


# -- the checkpoint describes itself ------------------------------------------------------------
@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A tiny detection run whose dataset we may delete."""
    root = tmp_path_factory.mktemp("own_run")
    experiment, dataset, kind, extra = TINY["detection"]
    cfg = compose_train([f"experiment={experiment}", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
                         "threads=1", *extra, *tiny_shapes_overrides(root / dataset, kind, num_train=8, num_val=4,
                                                                      size=64)])
    from tasks.train import train

    threads = torch.get_num_threads()
    train(cfg, root / "run")
    torch.set_num_threads(threads)
    data = root / dataset
    coco = CocoDetection(data / "val2017", data / "annotations" / "instances_val2017.json")
    return {"checkpoint": root / "run" / "last.ckpt", "data": data, "class_names": coco.class_names,
            "label_to_cat_id": [int(c) for c in coco.label_to_cat_id],
            "image": next((data / "val2017").glob("*.jpg")).read_bytes()}


def test_the_checkpoint_carries_its_artifact(own_run):
    artifact = load_checkpoint(own_run["checkpoint"])["artifact"]
    assert set(ARTIFACT_KEYS) <= set(artifact)
    assert artifact["task"] == "detection" and artifact["input_size"] == [64, 64]
    assert artifact["class_names"] == own_run["class_names"] == ["circle", "square", "triangle"]
    assert artifact["label_to_cat_id"] == own_run["label_to_cat_id"]
    assert own_run["label_to_cat_id"] != [1, 2, 3]  # the shapes ids are not label + 1: a guess would be wrong
    assert artifact["decoding"]["nms_iou_threshold"] == 0.55 and artifact["decoding"]["detections_per_image"] == 100
    assert artifact["mean"] == [0.485, 0.456, 0.406] and artifact["versions"]["torch"] == torch.__version__


def test_without_the_dataset_from_another_folder_predict_and_export_keep_names_and_ids(own_run, tmp_path,
                                                                                      monkeypatch):
    image = tmp_path / "inputs" / "photo.jpg"
    image.parent.mkdir()
    image.write_bytes(own_run["image"])
    shutil.rmtree(own_run["data"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    import backbones.weights

    monkeypatch.setattr(backbones.weights, "load_pretrained", lambda *a, **k: pytest.fail("read backbone weights"))
    state = load_checkpoint(own_run["checkpoint"])
    state["config"]["backbone"]["pretrained"] = "imagenet"  # what a fine-tuned model's config says
    checkpoint = tmp_path / "finetuned.ckpt"
    torch.save(state, checkpoint)

    summary = predict(str(checkpoint), [image], tmp_path / "pred", draw_score_threshold=0.0)
    assert summary["class_names"] == own_run["class_names"]
    detections = json.loads((tmp_path / "pred" / summary["outputs"][0]["json"]).read_text())
    assert detections, "the tiny model detects nothing at score 0.01"
    for d in detections:
        assert d["category_id"] == own_run["label_to_cat_id"][d["label"]]
        assert d["category_name"] == own_run["class_names"][d["label"]]
    meta = read_sidecar(export_checkpoint(checkpoint, tmp_path / "export" / "model.onnx", check=False))
    assert meta["class_names"] == own_run["class_names"] and meta["label_to_cat_id"] == own_run["label_to_cat_id"]
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing written into the working folder


def test_the_inference_only_checkpoint_is_smaller_and_accepted_everywhere(artifacts, tmp_path):
    full = Path(artifacts["detection"]["checkpoint"])
    small = export_weights(full, tmp_path / "model.ckpt")
    state = load_checkpoint(small)
    assert {"optimizer", "scheduler", "rng", "train_model", "history"}.isdisjoint(state)
    assert state["format"] == "mobilevision-weights" and state["artifact"]["class_names"]
    assert small.stat().st_size < full.stat().st_size
    model, cfg = load_trained_model(small)
    reference, _ = load_trained_model(full)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)["cls_logits"], reference(x)["cls_logits"])
    image = next((Path(artifacts["detection"]["data"]) / "val2017").glob("*.jpg"))
    assert predict(str(small), [image], tmp_path / "pred")["class_names"] == list(cfg.artifact.class_names)
    assert "AP" in evaluate_checkpoint(small, tmp_path / "eval", num_workers=0, progress=False)
    assert read_sidecar(export_checkpoint(small, tmp_path / "onnx" / "model.onnx", check=False))["class_names"]
    with pytest.raises(ConfigError, match="already exists"):
        export_weights(full, small)


@pytest.mark.slow
def test_export_format_weights_on_the_command_line(artifacts, tmp_path):
    out = tmp_path / "small.ckpt"
    command = [sys.executable, "-m", "tasks.export", f"checkpoint={artifacts['segmentation']['checkpoint']}",
               "format=weights", f"output={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"wrote {out} ({out.stat().st_size} bytes" in result.stdout
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip() == (
        f"error: {out} already exists and this export would replace it; pass overwrite=true to replace it, or "
        f"choose another output=.")
