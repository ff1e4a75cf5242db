"""tasks.predict on folders and a video with both runtimes, and tasks.analysis.visualize's pictures and curves."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from helpers import ROOT
from PIL import Image

from tasks.analysis.visualize import class_colour, draw_detections, draw_mask, plot_history
from tasks.detection.coco import CocoDetection
from tasks.detection.transforms import build_detection_transforms
from tasks.errors import ConfigError
from tasks.predict import iter_inputs, predict
from tasks.segmentation.palette import VOC_PALETTE
from tasks.segmentation.transforms import build_segmentation_transforms, eval_valid_size
from tasks.segmentation.voc import VOCSegmentation
from tasks.training.trained import load_trained_model

pytestmark = pytest.mark.usefixtures("one_thread")


def write_video(path: Path, frames: int = 7, size=(80, 60)) -> Path:
    """A small synthetic clip: a red disc moving right. mp4v where this OpenCV can write it, else MJPG avi."""
    for fourcc, suffix in (("mp4v", ".mp4"), ("MJPG", ".avi")):
        target = path.with_suffix(suffix)
        writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*fourcc), 5, size)
        if writer.isOpened():
            for i in range(frames):
                frame = np.full((size[1], size[0], 3), 60, np.uint8)
                cv2.circle(frame, (15 + 8 * i, size[1] // 2), 10, (0, 0, 255), -1)
                writer.write(frame)
            writer.release()
            return target
    pytest.skip("this OpenCV build can write neither mp4v nor MJPG video")


def _inputs(tmp_path, val_images: list[Path]):
    """A folder with a val image (model-sized) and a larger non-square one, and a 7-frame video."""
    folder = tmp_path / "images"
    folder.mkdir()
    first, second = val_images[:2]
    Image.open(first).save(folder / first.name)
    Image.open(second).convert("RGB").resize((100, 70)).save(folder / "wide.png")
    return folder, first.name, write_video(tmp_path / "clip")


def assert_same_detections(got: list[dict], expected: list[dict], score_tol=1e-4, box_tol=2e-3) -> None:
    """One-to-one: each expected detection has its own got one of the same label, score and box. The
    order may differ where scores tie to within float noise (batch size changes the conv kernels)."""
    assert len(got) == len(expected)
    unused = list(range(len(got)))
    for e in expected:
        match = next((i for i in unused if got[i]["label"] == e["label"]
                      and abs(got[i]["score"] - e["score"]) <= score_tol
                      and np.abs(np.subtract(got[i]["bbox"], e["bbox"])).max() <= box_tol), None)
        assert match is not None, f"no detection matches {e}"
        unused.remove(match)


def _run(artifacts, task, runtime, tmp_path, inputs, exported=True, **kwargs):
    onnx = artifacts[task]["onnx"] if runtime == "onnxruntime" and exported else None
    out = tmp_path / f"{task}_{runtime}"
    summary = predict(artifacts[task]["checkpoint"], inputs, out, runtime=runtime, onnx=onnx, video_stride=3,
                      threads=1, **kwargs)
    return summary, out


def test_detection_in_both_runtimes_writes_coco_results_matching_the_val_pipeline(artifacts, tmp_path):
    data = artifacts["detection"]["data"]
    folder, val_name, video = _inputs(tmp_path, sorted((Path(data) / "val2017").glob("*.jpg")))
    coco = CocoDetection(f"{data}/val2017", f"{data}/annotations/instances_val2017.json",
                         transforms=build_detection_transforms(64, train=False))
    results = {}
    for runtime in ("pytorch", "onnxruntime"):
        summary, out = _run(artifacts, "detection", runtime, tmp_path, [folder, video], draw_score_threshold=0.0)
        names = [e["image"] for e in summary["outputs"]]
        assert names == [f"images/{val_name[:-4]}.png", "images/wide.png",
                         *(f"images/{video.stem}_frame{i:06d}.png" for i in (0, 3, 6))]
        for entry in summary["outputs"]:
            picture = Image.open(out / entry["image"])
            detections = json.loads((out / entry["json"]).read_text())
            width, height = picture.size
            assert (width, height) == ((64, 64) if entry["source"] == val_name else
                                       (100, 70) if entry["source"] == "wide.png" else (80, 60))
            assert len(detections) == entry["detections"] > 0
            for d in detections:
                assert {"image_id", "file_name", "category_id", "bbox", "score"} <= set(d)
                assert d["file_name"] == entry["source"]
                assert d["category_id"] == coco.label_to_cat_id[d["label"]]  # shapes ids are not contiguous
                assert d["category_name"] == coco.class_names[d["label"]]
                x, y, w, h = d["bbox"]
                assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
        all_results = json.loads((out / "results.json").read_text())
        assert len(all_results) == sum(e["detections"] for e in summary["outputs"])
        results[runtime] = {e["source"]: json.loads((out / e["json"]).read_text()) for e in summary["outputs"]}

    for source, expected in results["pytorch"].items():
        assert_same_detections(results["onnxruntime"][source], expected)

    # The same image through the dataset's own val pipeline gives the same detections.
    model, _ = load_trained_model(artifacts["detection"]["checkpoint"])
    index = [coco.coco.imgs[i]["file_name"] for i in coco.image_ids].index(val_name)
    image, target = coco[index]
    with torch.no_grad():
        expected = model.predict(model(image[None]), [tuple(target["orig_size"].tolist())])[0]
    expected = [{"label": int(label), "score": float(score), "bbox": [x1, y1, x2 - x1, y2 - y1]}
                for (x1, y1, x2, y2), score, label in zip(expected["boxes"].tolist(), expected["scores"],
                                                          expected["labels"])]
    assert_same_detections(results["pytorch"][val_name], expected)


def test_segmentation_in_both_runtimes_writes_palette_masks_cropped_to_each_image(artifacts, tmp_path):
    data = artifacts["segmentation"]["data"]
    val = VOCSegmentation(data, "val", transforms=build_segmentation_transforms(64, train=False),
                          class_names=["background", "circle", "square", "triangle"])
    folder, val_name, video = _inputs(tmp_path, [Path(data) / "JPEGImages" / f"{i}.jpg" for i in val.ids])
    masks = {}
    for runtime in ("pytorch", "onnxruntime"):
        # onnxruntime without onnx=: predict exports the checkpoint itself first
        summary, out = _run(artifacts, "segmentation", runtime, tmp_path, [folder, video], exported=False)
        if runtime == "onnxruntime":
            assert (out / "model.onnx").is_file() and (out / "model.json").is_file()
        assert len(summary["outputs"]) == 5
        for entry in summary["outputs"]:
            overlay = Image.open(out / entry["image"])
            mask = Image.open(out / entry["mask"])
            assert mask.mode == "P" and overlay.mode == "RGB" and overlay.size == mask.size
            assert np.array_equal(np.array(mask.getpalette()[:12]).reshape(-1, 3), VOC_PALETTE[:4])
            labels = np.array(mask)
            assert labels.max() < 4 and sum(entry["pixels"].values()) == labels.size
            expected_size = {val_name: (64, 64), "wide.png": (100, 70)}.get(entry["source"], (80, 60))
            assert mask.size == expected_size
        masks[runtime] = {e["source"]: np.array(Image.open(out / e["mask"])) for e in summary["outputs"]}
    for source, expected in masks["pytorch"].items():
        assert (masks["onnxruntime"][source] == expected).mean() > 0.999

    # The val image through the dataset's own pipeline: same mask. The wide image is shrunk to 64 x 45,
    # padded, and its prediction cropped back: that region is what eval_valid_size names.
    assert eval_valid_size(70, 100, 64) == (45, 64)
    model, _ = load_trained_model(artifacts["segmentation"]["checkpoint"])
    image, _ = val[val.ids.index(val_name[:-4])]
    with torch.no_grad():
        expected = model.head.predict(model(image[None]), [(64, 64)])[0]["mask"].numpy()
    assert np.array_equal(masks["pytorch"][val_name], expected)


def test_predict_cli_on_a_folder_and_a_video(artifacts, tmp_path):
    data = artifacts["detection"]["data"]
    folder, _, video = _inputs(tmp_path, sorted((Path(data) / "val2017").glob("*.jpg")))
    out = tmp_path / "cli"
    det = artifacts["detection"]
    result = subprocess.run([sys.executable, "-m", "tasks.predict", f"checkpoint={det['checkpoint']}",
                             "runtime=onnxruntime", f"onnx={det['onnx']}",
                             f"inputs=[{folder},{video}]", "video_stride=3", "threads=1", f"output_dir={out}",
                             f"hydra.run.dir={tmp_path / 'hydra'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "5 images predicted (detection, onnxruntime)" in result.stdout
    assert len(list((out / "images").glob("*.png"))) == 5 and len(list((out / "detections").glob("*.json"))) == 5
    assert sorted(p.name for p in out.glob("*.json")) == ["predictions.json", "results.json"]  # run-level apart


def test_inputs_are_checked(artifacts, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_inputs([tmp_path / "missing.jpg"]))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither an image"):
        list(iter_inputs([tmp_path / "notes.txt"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list(iter_inputs([tmp_path / "empty"]))
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="broken.mp4"):
        list(iter_inputs([tmp_path / "broken.mp4"]))
    with pytest.raises(ConfigError, match="runtime=tensorrt"):
        predict(artifacts["detection"]["checkpoint"], [tmp_path / "notes.txt"], tmp_path / "o", runtime="tensorrt")


def test_draw_detections_outlines_each_box_in_its_class_colour():
    image = np.full((40, 60, 3), 128, np.uint8)
    drawn = np.array(draw_detections(image, torch.tensor([[10.0, 20.0, 50.0, 35.0], [0, 0, 5, 5]]),
                                     torch.tensor([0.9, 0.1]), torch.tensor([2, 0]), ["a", "b", "c"],
                                     score_threshold=0.5, line_width=1))
    assert tuple(drawn[35, 30]) == class_colour(2) and tuple(drawn[27, 50]) == class_colour(2)  # bottom, right
    assert tuple(drawn[27, 30]) == (128, 128, 128)  # inside the box
    assert tuple(drawn[2, 2]) == (128, 128, 128)  # the low-score box is not drawn
    assert np.array_equal(image, np.full((40, 60, 3), 128, np.uint8))  # the input is left alone


def test_draw_mask_blends_object_pixels_only():
    image = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), np.int64)
    mask[4:, 4:] = 1
    mask[0, 7] = 255
    drawn = np.array(draw_mask(image, mask, alpha=0.5, legend=False))
    assert tuple(drawn[0, 0]) == (100, 100, 100) and tuple(drawn[0, 7]) == (100, 100, 100)
    expected = np.rint(0.5 * 100 + 0.5 * VOC_PALETTE[1].astype(float)).astype(np.uint8)
    assert np.array_equal(drawn[6, 6], expected)


def test_plot_history_writes_a_png(artifacts, tmp_path):
    from tasks.training.checkpoint import load_checkpoint

    history = load_checkpoint(artifacts["segmentation"]["checkpoint"])["history"]
    history = history + [{**history[-1], "epoch": 2, "train/loss": history[-1]["train/loss"] / 2}]
    path = plot_history(history, tmp_path / "curves" / "history.png", title="tiny run")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (1000, 400)
        assert np.asarray(picture.convert("L")).std() > 5  # something was drawn
    with pytest.raises(ValueError, match="empty history"):
        plot_history([], tmp_path / "none.png")
