"""A user's own data in one override: dataset=voc_det_custom | coco_custom | voc_seg_custom with
dataset.root=... alone; class names read from the data (or set once), num_classes following them."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_train
from hydra.utils import instantiate
from PIL import Image

import tasks  # noqa: F401  (registers the ${mv.*} resolvers the configs use)
from benchmarks.coco_subset import write_voc_subset
from tasks.datasets.check import check_dataset
from tasks.errors import ConfigError
from tasks.segmentation.palette import VOC_PALETTE

CLASSES = ["person", "car", "dog"]  # the coco128 classes with the most images (61, 12 and 9)


@pytest.fixture(scope="module")
def voc_subset(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc_subset")
    write_voc_subset(shared_data / "coco128", root, CLASSES, seed=5)  # seed 5: every class has val boxes
    return root


def _xml_names(root: Path) -> set[str]:
    return {name for xml in (root / "Annotations").glob("*.xml")
            for name in re.findall(r"<name>(\w+)</name>", xml.read_text())}


def test_voc_classes_come_from_the_xml_sorted_and_num_classes_follows(voc_subset):
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={voc_subset}"])
    assert list(cfg.dataset.class_names) == sorted(_xml_names(voc_subset)) == sorted(CLASSES)
    assert cfg.dataset.num_classes == 3
    assert cfg.dataset.val.use_07_metric is False  # all-points AP on custom data
    train = instantiate(cfg.dataset.train)
    assert train.class_names == sorted(CLASSES) and len(train) == len(
        (voc_subset / "ImageSets/Main/train.txt").read_text().split())


def test_class_names_set_once_reach_both_splits_and_num_classes(voc_subset):
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={voc_subset}",
                         "dataset.class_names=[dog,car,person]"])
    assert cfg.dataset.num_classes == 3
    val = instantiate(cfg.dataset.val)
    assert val.class_names == ["dog", "car", "person"] and val.evaluator().class_names == ["dog", "car", "person"]


def test_a_labels_file_sets_the_classes_and_their_order(tmp_path, voc_subset):
    (tmp_path / "labels.txt").write_text("_background_\nperson\ndog\ncar\n")  # labelme's labels.txt style
    for name in ("JPEGImages", "Annotations", "ImageSets"):
        (tmp_path / name).symlink_to(voc_subset / name)
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={tmp_path}"])
    assert list(cfg.dataset.class_names) == ["person", "dog", "car"] and cfg.dataset.num_classes == 3


def test_a_class_subset_keeps_only_those_objects_and_counts_the_rest(voc_subset, caplog):
    xml_counts = {c: sum(xml.read_text().count(f"<name>{c}</name>")
                         for xml in (voc_subset / "Annotations").glob("*.xml")
                         if xml.stem in (voc_subset / "ImageSets/Main/train.txt").read_text().split())
                  for c in CLASSES}
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={voc_subset}", "dataset.class_names=[dog]"])
    assert cfg.dataset.num_classes == 1
    with caplog.at_level("INFO", logger="tasks.detection.voc"):
        train = instantiate(cfg.dataset.train)
    assert sum(len(r.labels) for r in train.records) == xml_counts["dog"]
    assert {int(label) for r in train.records for label in r.labels} == {0}
    left = xml_counts["person"] + xml_counts["car"]
    assert f"{left} objects of classes outside class_names were left out" in caplog.text
    report = check_dataset(cfg.dataset)  # the start-up check agrees with the loader
    assert report.ok and report.splits[0].per_class == {"dog": xml_counts["dog"]}


def test_a_misspelt_class_in_a_subset_names_what_the_xml_holds(voc_subset):
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={voc_subset}", "dataset.class_names=[Dog]"])
    sentence = r"class_names \['Dog'\] have no object in this split; expected names as the xml writes them " \
               r"\(car, dog, person\)"
    report = check_dataset(cfg.dataset)  # what tasks.train says before it builds anything
    assert not report.ok and re.search(sentence, report.sentence())
    with pytest.raises(Exception, match=sentence):  # the loader itself refuses too (DataError, inside Hydra's)
        instantiate(cfg.dataset.train)


def test_without_imagesets_train_and_val_are_a_seeded_split_of_the_xml(tmp_path, voc_subset):
    for name in ("JPEGImages", "Annotations"):
        (tmp_path / name).symlink_to(voc_subset / name)
    stems = sorted(p.stem for p in (voc_subset / "Annotations").glob("*.xml"))
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={tmp_path}", "dataset.val_fraction=0.25"])
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert sorted(train.image_names + val.image_names) == stems  # disjoint and complete
    assert len(val) == round(len(stems) * 0.25)
    again = instantiate(compose_train(["dataset=voc_det_custom", f"dataset.root={tmp_path}",
                                       "dataset.val_fraction=0.25"]).dataset.val)
    other = instantiate(compose_train(["dataset=voc_det_custom", f"dataset.root={tmp_path}",
                                       "dataset.val_fraction=0.25", "dataset.split_seed=1"]).dataset.val)
    assert again.image_names == val.image_names != other.image_names
    report = check_dataset(cfg.dataset)
    assert report.ok and [s.images for s in report.splits] == [len(train), len(val)]


def test_custom_voc_passes_the_dataset_check_and_check_data(voc_subset):
    cfg = compose_train(["dataset=voc_det_custom", f"dataset.root={voc_subset}"])
    report = check_dataset(cfg.dataset)
    assert report.ok and [set(s.per_class) for s in report.splits] == [set(CLASSES), set(CLASSES)]
    result = subprocess.run([sys.executable, "-m", "tasks.check_data", "dataset=voc_det_custom",
                             f"dataset.root={voc_subset}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "result: OK" in result.stdout


def test_class_names_on_a_dataset_that_ignores_them_stop_training(tmp_path):
    from tasks.train import build_datasets

    cfg = compose_train(["+dataset.class_names=[a,b,c]", f"dataset.root={tmp_path}", "dataset.prepare.num_train=2",
                         "dataset.prepare.num_val=1", "dataset.prepare.image_size=64"])
    with pytest.raises(ConfigError, match=r"dataset.class_names=\['a', 'b', 'c'\] is not what dataset.train reads"):
        build_datasets(cfg)


def _coco_one_json(tmp_path: Path, shared_data: Path) -> Path:
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images").symlink_to(shared_data / "coco128" / "train2017")
    data = json.loads((shared_data / "coco128" / "annotations" / "instances_train2017.json").read_text())
    (root / "annotations" / "all.json").write_text(json.dumps(data))
    return root


def test_coco_one_json_is_split_by_a_seeded_ratio(tmp_path, shared_data):
    root = _coco_one_json(tmp_path, shared_data)
    cfg = compose_train(["dataset=coco_custom", f"dataset.root={root}", "dataset.val_fraction=0.25"])
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert not set(train.image_ids) & set(val.image_ids)
    assert sorted(train.image_ids + val.image_ids) == sorted(train.coco.imgs)
    assert len(val) == round(0.25 * len(train.coco.imgs))
    again = instantiate(compose_train(["dataset=coco_custom", f"dataset.root={root}",
                                       "dataset.val_fraction=0.25"]).dataset.val)
    assert again.image_ids == val.image_ids  # reproducible
    assert cfg.dataset.num_classes == len(train.coco.cats) == 80
    assert check_dataset(cfg.dataset).ok


def test_coco_class_names_keep_only_those_categories(tmp_path, shared_data):
    root = _coco_one_json(tmp_path, shared_data)
    cfg = compose_train(["dataset=coco_custom", f"dataset.root={root}", "dataset.class_names=[dog,person]"])
    assert cfg.dataset.num_classes == 2
    val = instantiate(cfg.dataset.val)
    cat_of = {c["name"]: c["id"] for c in val.coco.cats.values()}
    assert val.label_to_cat_id == [cat_of["dog"], cat_of["person"]]
    for index in range(len(val)):
        boxes, labels = val.get_annotations(index)
        expected = [a for a in val.coco.imgToAnns[val.image_ids[index]]
                    if a["category_id"] in (cat_of["dog"], cat_of["person"]) and not a.get("iscrowd", 0)]
        assert len(labels) == len(expected) and set(labels.tolist()) <= {0, 1}
    with pytest.raises(Exception, match="zebraz"):
        instantiate(compose_train(["dataset=coco_custom", f"dataset.root={root}",
                                   "dataset.class_names=[zebraz]"]).dataset.val)


def test_one_json_named_like_a_train_split_is_still_split(tmp_path, shared_data):
    root = _coco_one_json(tmp_path, shared_data)
    (root / "annotations" / "all.json").rename(root / "annotations" / "instances_train2017.json")
    cfg = compose_train(["dataset=coco_custom", f"dataset.root={root}"])
    assert cfg.dataset.train.ann_file == cfg.dataset.val.ann_file
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert val.image_ids and not set(train.image_ids) & set(val.image_ids)


def test_coco_split_files_are_used_when_present(tmp_path, shared_data):
    root = _coco_one_json(tmp_path, shared_data)
    data = json.loads((root / "annotations" / "all.json").read_text())
    (root / "annotations" / "all.json").unlink()
    for split, images in (("train", data["images"][:100]), ("val", data["images"][100:])):
        ids = {i["id"] for i in images}
        (root / "annotations" / f"{split}.json").write_text(json.dumps(
            {**data, "images": images, "annotations": [a for a in data["annotations"] if a["image_id"] in ids]}))
    cfg = compose_train(["dataset=coco_custom", f"dataset.root={root}"])
    assert cfg.dataset.val.holdout is None and cfg.dataset.val.ann_file.endswith("val.json")
    assert len(instantiate(cfg.dataset.val)) == len(data["images"]) - 100


def _seg_root(tmp_path: Path, largest_class: int) -> Path:
    root = tmp_path / "seg"
    for name in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / name).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{i}.jpg")
        mask = np.zeros((40, 60), np.uint8)
        mask[5:20, 5:20] = min(i + 1, largest_class)
        mask[0, :] = 255
        png = Image.fromarray(mask, mode="P")
        png.putpalette(VOC_PALETTE.reshape(-1).tolist())
        png.save(root / "SegmentationClass" / f"{i}.png")
    (root / "ImageSets/Segmentation/train.txt").write_text("0\n1\n")
    (root / "ImageSets/Segmentation/val.txt").write_text("2\n")
    return root


def test_segmentation_classes_from_the_palette_masks_or_a_labels_file(tmp_path):
    root = _seg_root(tmp_path, largest_class=3)
    cfg = compose_train(["experiment=deeplabv3_finetune", f"dataset.root={root}", "backbone.pretrained=null"])
    assert list(cfg.dataset.class_names) == ["background", "class_1", "class_2", "class_3"]
    assert cfg.dataset.num_classes == 4 and check_dataset(cfg.dataset).ok
    (root / "labels.txt").write_text("background\nroad\ncar\nsky\n")
    cfg = compose_train(["experiment=deeplabv3_finetune", f"dataset.root={root}", "backbone.pretrained=null"])
    assert list(cfg.dataset.class_names) == ["background", "road", "car", "sky"]
    assert instantiate(cfg.dataset.val).evaluator().class_names == ["background", "road", "car", "sky"]


@pytest.mark.slow
def test_one_override_trains_evaluates_predicts_and_exports_real_photos(voc_subset, tmp_path):
    """The whole path on real coco128 photos in VOC layout, as a new user runs it (tiny model, 1 epoch)."""
    run = tmp_path / "run"
    common = [sys.executable, "-m"]
    train = subprocess.run([*common, "tasks.train", "dataset=voc_det_custom", f"dataset.root={voc_subset}",
                            "dataset.input_size=64", "epochs=1", "batch_size=16", "backbone.width_mult=0.25",
                            "head.extra_depths=[32,32]", "num_workers=0", "progress=false", "threads=2",
                            "amp=auto", f"hydra.run.dir={run}"], capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "final metrics: mAP50=" in train.stdout
    checkpoint = run / "last.ckpt"
    evaluate = subprocess.run([*common, "tasks.evaluate", f"checkpoint={checkpoint}", "progress=false",
                               f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics) == {"mAP50", "mAP", *(f"AP50/{c}" for c in CLASSES)}  # mAP: over IoU 0.5:0.95
    assert metrics["mAP50"] == pytest.approx(np.mean([metrics[f"AP50/{c}"] for c in CLASSES]))
    photo = sorted((voc_subset / "JPEGImages").iterdir())[0]
    predict = subprocess.run([*common, "tasks.predict", f"checkpoint={checkpoint}", f"inputs=[{photo}]",
                              f"output_dir={tmp_path / 'pred'}", f"hydra.run.dir={tmp_path / 'p'}"],
                             capture_output=True, text=True, timeout=300)
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (tmp_path / "pred" / "detections" / f"{photo.stem}.json").is_file()
    export = subprocess.run([*common, "tasks.export", f"checkpoint={checkpoint}", f"output={tmp_path / 'm.onnx'}",
                             f"hydra.run.dir={tmp_path / 'e'}"], capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-3000:]
    sidecar = json.loads((tmp_path / "m.json").read_text())
    assert sidecar["class_names"] == sorted(CLASSES) and sidecar["mean"] == [0.485, 0.456, 0.406]
