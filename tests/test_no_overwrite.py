"""No run overwrites or deletes what it did not create, and every way a run cannot go on is one sentence
with exit code 2 (130 for Ctrl-C)."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, compose_train, tiny_shapes_overrides
from omegaconf import OmegaConf
from PIL import Image

from tasks.datasets.shapes import META_FILE, ensure_shapes
from tasks.deploy.int8 import quantize_checkpoint
from tasks.deploy.onnx_export import export_checkpoint
from tasks.deploy.sidecar import read_sidecar
from tasks.errors import ConfigError, Interrupted, user_errors_exit
from tasks.predict import predict
from tasks.train import train
from tasks.training import checkpoint as checkpoint_module
from tasks.training.checkpoint import load_checkpoint, save_checkpoint
from tasks.training.engine import Engine
from tasks.training.run_guard import check_resumable, interrupted_sentence, run_lock

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_train_config(root: Path, *extra: str):
    return compose_train(["experiment=demo_ssdlite_shapes", "epochs=1", "batch_size=4", "backbone.width_mult=0.25",
                          "head.extra_depths=[32,32]", *tiny_shapes_overrides(root / "shapes_det", "coco", 8, 4, 64),
                          *extra])


def one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith("."), message
    assert not re.search(r"[.!?]\s+[A-Z]", message), f"more than one sentence: {message}"


# -- train -------------------------------------------------------------------------------------
def test_train_refuses_a_run_directory_that_holds_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best.ckpt").write_bytes(b"someone's weights")
    with pytest.raises(ConfigError) as err:
        train(tiny_train_config(tmp_path), run_dir)
    assert str(err.value) == (f"run directory {run_dir} already holds best.ckpt from an earlier run; continue that "
                              f"run with resume=true, or choose another directory with hydra.run.dir=<new folder>.")
    assert (run_dir / "best.ckpt").read_bytes() == b"someone's weights"


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    run_dir = tmp_path / "run"
    with run_lock(run_dir):
        with pytest.raises(ConfigError) as err:
            train(tiny_train_config(tmp_path), run_dir)
        message = str(err.value)
        one_sentence(message)
        assert message.startswith(f"run directory {run_dir} is in use by another training run (process "
                                  f"{os.getpid()} on ")
    with run_lock(run_dir):  # released with the first run
        pass


def test_temporary_files_are_unique_per_process(tmp_path, monkeypatch):
    seen = []
    real_save = torch.save
    monkeypatch.setattr(checkpoint_module.torch, "save", lambda obj, f: (seen.append(Path(f).name), real_save(obj, f)))
    save_checkpoint({"model": {}}, tmp_path / "last.ckpt")
    assert seen == [f".last.ckpt.{os.getpid()}.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_two_processes_saving_one_checkpoint_both_finish(tmp_path):
    """Before, both wrote `.last.ckpt.tmp` and one died when the other renamed it away."""
    script = ("import sys, torch; from tasks.training.checkpoint import save_checkpoint\n"
              "for i in range(15): save_checkpoint({'model': {'w': torch.full((1000,), float(i))}}, sys.argv[1])")
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "shared.ckpt")], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    assert float(load_checkpoint(tmp_path / "shared.ckpt")["model"]["w"][0]) == 14.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.ckpt"]


@pytest.mark.slow
def test_default_run_directories_of_runs_started_together_differ(tmp_path):
    """Both runs stop at once (bad format) after Hydra made their run folders: one folder each, named by time
    and the launching process."""
    procs = [subprocess.Popen([sys.executable, "-m", "tasks.export", "checkpoint=x.ckpt", "format=nope"], cwd=tmp_path,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 2, proc.stderr.read()
    folders = sorted(p.name for p in (tmp_path / "outputs" / "export").iterdir())
    assert len(folders) == 2 and all(re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+", f) for f in folders)
    assert {f.rsplit("_", 1)[1] for f in folders} == {str(p.pid) for p in procs}


def test_resuming_another_model_or_optimizer_or_a_finished_run_is_refused(artifacts):
    path = artifacts["detection"]["checkpoint"]
    state = load_checkpoint(path)
    same = OmegaConf.create(state["config"])
    with pytest.raises(ConfigError) as err:
        check_resumable(state, same, path)
    assert str(err.value) == (f"resume={path} has already finished its 1 epochs (epochs=1); to train on, resume "
                              f"with a larger epochs=, or start a new run with init_from={path}.")
    longer = same.copy()
    longer.epochs = 3
    check_resumable(state, longer, path)  # the same run, with epochs left: fine
    other_backbone = longer.copy()
    other_backbone.backbone._target_ = "backbones.MobileNetV1"
    with pytest.raises(ConfigError) as err:
        check_resumable(state, other_backbone, path)
    assert str(err.value) == (f"resume={path} was trained with backbone._target_=backbones.MobileNetV2 but this run "
                              f"has backbone._target_=backbones.MobileNetV1; resume with the checkpoint's settings, "
                              f"or start a new run that takes its weights with init_from={path}.")
    other_optimizer = longer.copy()
    other_optimizer.optim.optimizer._target_ = "torch.optim.SGD"
    with pytest.raises(ConfigError, match=r"was trained with optim\.optimizer\._target_=torch\.optim\.AdamW but "
                                          r"this run has optim\.optimizer\._target_=torch\.optim\.SGD"):
        check_resumable(state, other_optimizer, path)
    inference_only = {k: v for k, v in state.items() if k not in ("optimizer", "scheduler", "rng")}
    with pytest.raises(ConfigError) as err:
        check_resumable(inference_only, longer, path)
    assert str(err.value) == (f"resume={path} is an inference-only checkpoint (it has no optimizer state); start a "
                              f"new run from its weights with init_from={path}.")


def test_ctrl_c_during_training_says_what_is_kept_and_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(self):
        self.step = 3
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "train_epoch", interrupted)
    run_dir = tmp_path / "run"
    with pytest.raises(Interrupted) as err:
        train(tiny_train_config(tmp_path), run_dir)
    assert str(err.value) == ("interrupted at step 3, before any checkpoint was written; nothing to resume, start "
                              "the run again.")
    (run_dir / "last.ckpt").write_bytes(b"x")
    assert interrupted_sentence(7, run_dir) == (f"interrupted at step 7; {run_dir / 'last.ckpt'} is kept (the last "
                                                f"completed checkpoint); continue with resume=true "
                                                f"hydra.run.dir={run_dir}.")

    @user_errors_exit
    def main():
        raise Interrupted(interrupted_sentence(7, run_dir))

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == f"error: {interrupted_sentence(7, run_dir)}\n"


@pytest.mark.slow
def test_a_real_ctrl_c_keeps_last_ckpt_and_exits_130(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "run"
    overrides = ["experiment=demo_ssdlite_shapes", "epochs=50", "batch_size=2", "backbone.width_mult=0.25",
                 "head.extra_depths=[32,32]", "checkpoint_every_steps=1", "threads=1",
                 *tiny_shapes_overrides(tmp_path / "shapes_det", "coco", 8, 4, 64), f"hydra.run.dir={run_dir}"]
    # A runner started as a background job (`cmd &` without job control) ignores SIGINT, and so would the training
    # process it starts: Python installs no KeyboardInterrupt handler then. A user's Ctrl-C meets the default.
    proc = subprocess.Popen([sys.executable, "-m", "tasks.train", *overrides], cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 240
    while not (run_dir / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    kept, folder = re.escape(str(run_dir / "last.ckpt")), re.escape(str(run_dir))
    assert re.fullmatch(rf"error: interrupted at step \d+; {kept} is kept \(the last completed checkpoint\); "
                        rf"continue with resume=true hydra\.run\.dir={folder}\.", last_line), last_line
    assert "Traceback" not in stderr and load_checkpoint(run_dir / "last.ckpt")["step"] >= 1


@pytest.mark.slow
def test_missing_mandatory_values_are_one_sentence_with_exit_2(tmp_path):
    commands = {"checkpoint": ["tasks.evaluate"], "inputs": ["tasks.predict", "checkpoint=x.ckpt"],
                "dataset.root": ["tasks.train", "dataset=coco"]}
    procs = {key: subprocess.Popen([sys.executable, "-m", *args, f"hydra.run.dir={tmp_path / key}"], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, args in commands.items()}
    for key, proc in procs.items():
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2, stderr[-2000:]
        expected = (f"error: {key} is required but was not given; expected {key}=<value> on the command line."
                    if key != "dataset.root" else  # the start-up config check words it with an example path
                    "error: dataset.root is not set; expected dataset.root=/path/to/the/data.")
        assert stderr.strip() == expected


# -- predict -------------------------------------------------------------------------------------
def _image(path: Path, colour=(200, 30, 30), size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_predict_never_writes_beside_its_inputs(artifacts, tmp_path):
    inputs = tmp_path / "photos"
    _image(inputs / "a.png")
    loose = _image(tmp_path / "b.png")
    earlier = _image(inputs / "images" / "c.png")  # e.g. an earlier run's pictures given as inputs
    for given, out in (([inputs], inputs), ([loose], tmp_path), ([earlier], inputs)):
        with pytest.raises(ConfigError) as err:
            predict(artifacts["detection"]["checkpoint"], given, out)
        one_sentence(str(err.value))
        assert str(err.value) == (f"output_dir={out} would write beside the input {given[0]}; expected an output "
                                  f"folder apart from the inputs (leave output_dir unset for a fresh run folder).")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "b.png", "photos", "photos/a.png", "photos/images", "photos/images/c.png"]


def test_predict_names_every_output_uniquely_and_keeps_run_files_apart(artifacts, tmp_path, caplog):
    folder = tmp_path / "in"
    for name in ("a.png", "a.jpg", "a_1.jpg", "results.jpg", "predictions.png"):
        _image(folder / name)
    other = _image(tmp_path / "other" / "a.png", (10, 200, 10))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    summary = predict(artifacts["detection"]["checkpoint"], [folder, other], out, draw_score_threshold=0.0)
    names = {Path(e["path"]).relative_to(tmp_path).as_posix(): e["name"] for e in summary["outputs"]}
    # sorted folder order: a.jpg, a.png, a_1.jpg, broken.jpg (skipped), predictions.png, results.jpg
    assert names == {"in/a.jpg": "a", "in/a.png": "a_1", "in/a_1.jpg": "a_1_1", "in/predictions.png": "predictions",
                     "in/results.jpg": "results", "other/a.png": "a_2"}
    assert summary["skipped"] == [{"path": str(folder / "broken.jpg"), "reason": summary["skipped"][0]["reason"]}]
    assert "broken.jpg" in summary["skipped"][0]["reason"] and "broken.jpg" in caplog.text
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert written == sorted(["predictions.json", "results.json",
                              *(f"images/{n}.png" for n in names.values()),
                              *(f"detections/{n}.json" for n in names.values())])
    assert json.loads((out / "predictions.json").read_text()) == summary
    assert len(json.loads((out / "results.json").read_text())) == sum(e["detections"] for e in summary["outputs"])
    with pytest.raises(ConfigError, match="already holds the predictions.json of an earlier run"):
        predict(artifacts["detection"]["checkpoint"], [other], out)


def test_segmentation_masks_never_collide_with_an_input_named_like_one(artifacts, tmp_path):
    folder = tmp_path / "in"
    _image(folder / "x.jpg")
    _image(folder / "x_mask.jpg", (0, 0, 250))
    summary = predict(artifacts["segmentation"]["checkpoint"], [folder], tmp_path / "out")
    assert [(e["image"], e["mask"]) for e in summary["outputs"]] == [("images/x.png", "masks/x.png"),
                                                                   ("images/x_mask.png", "masks/x_mask.png")]


def test_predict_refuses_an_unwritable_folder_and_a_missing_gpu(artifacts, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    image = _image(tmp_path / "in" / "a.png")
    with pytest.raises(ConfigError) as err:
        predict(artifacts["detection"]["checkpoint"], [image], blocker / "out")
    assert str(err.value) == (f"output_dir={blocker / 'out'} cannot be written (Not a directory); expected a folder "
                              f"you can write to.")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present, so device=cuda is valid here")
    with pytest.raises(ConfigError) as err:
        predict(artifacts["detection"]["checkpoint"], [image], tmp_path / "out", device="cuda")
    assert str(err.value) == "device=cuda but PyTorch sees no CUDA GPU here; use device=cpu."


# -- export, shapes, quantize ------------------------------------------------------------------
def test_export_refuses_to_overwrite_a_file_it_did_not_write(artifacts, tmp_path):
    annotations = tmp_path / "instances.json"
    annotations.write_text('{"images": []}')
    with pytest.raises(ConfigError) as err:
        export_checkpoint(artifacts["detection"]["checkpoint"], tmp_path / "instances.onnx", check=False)
    assert str(err.value) == (f"{annotations} already exists and this export would replace it; pass overwrite=true "
                              f"to replace it, or choose another output=.")
    assert annotations.read_text() == '{"images": []}' and not (tmp_path / "instances.onnx").exists()
    export_checkpoint(artifacts["detection"]["checkpoint"], tmp_path / "instances.onnx", dynamo=False, check=False,
                      overwrite=True)
    assert read_sidecar(tmp_path / "instances.onnx")["task"] == "detection"


def test_the_shapes_writer_removes_only_the_files_its_manifest_lists(tmp_path):
    root = tmp_path / "shapes"
    ensure_shapes(root, "coco", num_train=4, num_val=2, image_size=32)
    first = json.loads((root / META_FILE).read_text())["files"]
    assert "train2017/000000000004.jpg" in first and "annotations/instances_train2017.json" in first
    (root / "my_notes.txt").write_text("mine")
    (root / "train2017" / "my_photo.jpg").write_bytes(b"mine too")
    ensure_shapes(root, "coco", num_train=3, num_val=2, image_size=32)
    second = json.loads((root / META_FILE).read_text())["files"]
    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted([*second, META_FILE, "my_notes.txt", "train2017/my_photo.jpg"])
    assert "train2017/000000000004.jpg" not in on_disk  # ours, no longer wanted: removed
    marker = json.loads((root / META_FILE).read_text())
    del marker["files"]  # a marker from before manifests: cannot tell our files from the user's
    (root / META_FILE).write_text(json.dumps(marker))
    with pytest.raises(ValueError, match="written before shapes_meta.json listed its files"):
        ensure_shapes(root, "coco", num_train=2, num_val=2, image_size=32)
    assert (root / "my_notes.txt").read_text() == "mine"


def test_quantize_refuses_a_folder_holding_an_earlier_report(artifacts, tmp_path):
    (tmp_path / "quantize.json").write_text("{}")
    with pytest.raises(ConfigError) as err:
        quantize_checkpoint(artifacts["detection"]["checkpoint"], tmp_path)
    assert str(err.value) == (f"output_dir={tmp_path} already holds the quantize.json of an earlier run; choose "
                              f"another output_dir (or leave it unset for a fresh run folder).")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quantize.json"]


@pytest.mark.slow
def test_quantize_writes_its_calibration_data_under_its_run_directory(artifacts, tmp_path, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = tmp_path / "run"
    report = quantize_checkpoint(artifacts["detection"]["checkpoint"], out, calibration_images=2, latency_runs=1,
                                 warmup_runs=0, max_eval_images=2, agreement_images=1, threads=1)
    assert report["calibration"]["images"] == 2
    assert (out / "calibration_data" / "annotations" / "instances_train2017.json").is_file()
    assert list(elsewhere.iterdir()) == []
    meta = read_sidecar(out / "model.onnx")
    assert meta["class_names"] == load_checkpoint(artifacts["detection"]["checkpoint"])["artifact"]["class_names"]


# -- images --------------------------------------------------------------------------------------
def test_wide_and_unusual_image_modes_are_scaled_not_clipped(tmp_path):
    from tasks.images import load_rgb

    ramp16 = np.linspace(0, 65535, 64 * 32).reshape(32, 64).astype(np.uint16)
    expected16 = np.rint(ramp16 / 257.0).astype(np.uint8)
    Image.fromarray(ramp16).save(tmp_path / "gray16.png")  # PIL writes a 16-bit grayscale PNG
    cases = {"gray16.png": expected16}
    Image.fromarray(ramp16.astype(np.int32), mode="I").save(tmp_path / "int32.tif")
    cases["int32.tif"] = expected16
    ramp01 = np.linspace(0, 1, 64 * 32, dtype=np.float32).reshape(32, 64)
    Image.fromarray(ramp01, mode="F").save(tmp_path / "float.tif")
    cases["float.tif"] = np.rint(ramp01 * 255).astype(np.uint8)
    for name, expected in cases.items():
        got = load_rgb(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (32, 64, 3), name
        assert np.abs(got.astype(int) - expected[..., None]).max() <= 1, name
        assert got.max() == 255 and got.min() == 0 and (got == 255).mean() < 0.01, name  # not clipped to white

    la = Image.fromarray(np.stack([expected16, np.full_like(expected16, 100)], axis=2), mode="LA")
    la.save(tmp_path / "la.png")
    assert np.array_equal(load_rgb(tmp_path / "la.png"), np.repeat(expected16[..., None], 3, axis=2))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg", quality=100)
    assert np.abs(load_rgb(tmp_path / "cmyk.jpg").astype(int) - [255, 0, 0]).max() <= 3
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert np.array_equal(load_rgb(tmp_path / "palette.png")[0, 0], [10, 200, 30])


def test_training_and_predict_read_a_16_bit_png_through_the_same_reader(tmp_path):
    from tasks.detection.coco import load_rgb as coco_reader
    from tasks.images import load_rgb
    from tasks.predict import iter_inputs
    from tasks.segmentation.voc import VOCSegmentation

    assert coco_reader is load_rgb
    value = np.full((16, 16), 30000, np.uint16)
    (tmp_path / "in").mkdir()
    Image.fromarray(value).save(tmp_path / "in" / "frame.png")
    frame = next(iter_inputs([tmp_path / "in" / "frame.png"]))
    assert np.all(frame.image == round(30000 / 257))
    root = tmp_path / "voc"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    Image.fromarray(value).save(root / "JPEGImages" / "a.png")
    shutil.copy(root / "JPEGImages" / "a.png", root / "JPEGImages" / "a.jpg")
    Image.fromarray(np.zeros((16, 16), np.uint8), mode="L").save(root / "SegmentationClass" / "a.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\n")
    image, _ = VOCSegmentation(root, "val").load(0)
    assert np.all(image == round(30000 / 257))
