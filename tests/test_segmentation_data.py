import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from scipy.io import savemat
from torch.utils.data import DataLoader, Dataset

from tasks.segmentation.coco_masks import CocoVOCSegmentation
from tasks.segmentation.palette import VOC_CLASSES, VOC_PALETTE, colorize, overlay, save_label_png
from tasks.segmentation.transforms import IMAGENET_MEAN, IMAGENET_STD, build_segmentation_transforms
from tasks.segmentation.voc import VOCSegmentation
from tasks.training.loaders import collate

CONF = Path(__file__).resolve().parents[1] / "conf"
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)

# Colours from the VOC devkit's documentation (VOCdevkit/VOCcode/VOClabelcolormap.m output).
DEVKIT_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 3: (128, 128, 0), 7: (128, 128, 128), 15: (192, 128, 128),
                  20: (0, 64, 128), 255: (224, 224, 192)}


@pytest.fixture(scope="module")
def voc_root(shared_data) -> Path:
    return shared_data / "voc_samples" / "VOC2012"


def unnormalise(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy() * STD * 255 + MEAN * 255


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_palette_is_the_voc_devkit_palette():
    for index, colour in DEVKIT_COLOURS.items():
        assert tuple(VOC_PALETTE[index]) == colour
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[15] == "person" and VOC_CLASSES[20] == "tvmonitor"


def test_voc_masks_load_as_class_indices(voc_root):
    dataset = VOCSegmentation(voc_root, "val")
    assert len(dataset) == 17 and dataset.num_classes == 21
    seen = set()
    rng = np.random.default_rng(0)
    for index, image_id in enumerate(dataset.ids):
        image, mask = dataset.load(index)
        assert image.shape[:2] == mask.shape and image.dtype == np.uint8
        values = set(np.unique(mask).tolist())
        assert values <= set(range(21)) | {255}
        seen |= values - {0, 255}
        # PIL's own palette conversion of the file gives, at every pixel, palette[index].
        rgb = np.array(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png").convert("RGB"))
        for y, x in zip(rng.integers(0, mask.shape[0], 50), rng.integers(0, mask.shape[1], 50)):
            assert tuple(rgb[y, x]) == tuple(VOC_PALETTE[mask[y, x]])
        for cls in values - {0, 255}:
            y, x = np.argwhere(mask == cls)[0]
            assert tuple(rgb[y, x]) == tuple(VOC_PALETTE[cls])
    assert len(seen) >= 10


def test_dataset_item_follows_the_contract(voc_root):
    dataset = VOCSegmentation(voc_root, "val", transforms=build_segmentation_transforms(513, train=False))
    image, target = dataset[dataset.ids.index("2011_000003")]
    assert image.shape == (3, 513, 513) and image.dtype == torch.float32
    assert target["mask"].dtype == torch.int64 and target["mask"].shape == (513, 513)
    assert target["image_id"] == "2011_000003" and target["orig_size"].tolist() == [338, 500]
    images, targets = collate([dataset[0], dataset[1]])
    assert images.shape == (2, 3, 513, 513) and len(targets) == 2
    names = dataset.evaluator().compute()
    assert "IoU/aeroplane" in names and dataset.evaluator().primary == "mIoU"


def _fake_voc(tmp_path: Path, voc_root: Path, ids: list[str], mask_fn=None) -> Path:
    root = tmp_path / "VOC2012"
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for image_id in ids:
        (root / "JPEGImages" / f"{image_id}.jpg").symlink_to(voc_root / "JPEGImages" / f"{image_id}.jpg")
        source = Image.open(voc_root / "SegmentationClass" / f"{image_id}.png")
        (mask_fn(source) if mask_fn else source).save(root / "SegmentationClass" / f"{image_id}.png")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")
    return root


def test_colour_masks_and_size_mismatches_raise_naming_the_file(tmp_path, voc_root):
    root = _fake_voc(tmp_path / "rgb", voc_root, ["vainf_0060"], lambda m: m.convert("RGB"))
    with pytest.raises(ValueError, match=r"vainf_0060\.png is a 'RGB' image"):
        VOCSegmentation(root, "val")[0]
    root = _fake_voc(tmp_path / "size", voc_root, ["vainf_0060"], lambda m: m.crop((0, 0, 500, 400)))
    with pytest.raises(ValueError, match=r"vainf_0060\.png is 500x400 .* its image is 513x513"):
        VOCSegmentation(root, "val")[0]
    with pytest.raises(FileNotFoundError, match="train.txt does not exist"):
        VOCSegmentation(root, "train")


def test_trainaug_reads_sbd_mat_files_and_builds_deeplabs_list(tmp_path, voc_root):
    voc_ids = ["2011_000003", "2011_000006", "vainf_0060"]
    sbd_only = ["vainf_0114", "vainf_0120"]
    root = _fake_voc(tmp_path, voc_root, voc_ids)
    for image_id in sbd_only:
        (root / "JPEGImages" / f"{image_id}.jpg").symlink_to(voc_root / "JPEGImages" / f"{image_id}.jpg")
    lists = root / "ImageSets" / "Segmentation"
    lists.joinpath("train.txt").write_text("2011_000003\n2011_000006\n")
    lists.joinpath("val.txt").write_text("vainf_0060\n")
    sbd = tmp_path / "benchmark_RELEASE" / "dataset"
    (sbd / "cls").mkdir(parents=True)
    expected = {}
    for image_id in sbd_only + ["vainf_0060"]:
        mask = np.array(Image.open(voc_root / "SegmentationClass" / f"{image_id}.png"))
        mask[mask == 255] = 0  # SBD has no void label
        expected[image_id] = mask
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {
            "Segmentation": mask, "Boundaries": np.zeros((1, 1)), "CategoriesPresent": np.unique(mask)[1:]}})
    (sbd / "train.txt").write_text("vainf_0114\n")
    (sbd / "val.txt").write_text("vainf_0120\nvainf_0060\n")
    dataset = VOCSegmentation(root, "trainaug", aug_root=sbd)
    assert dataset.ids == ["2011_000003", "2011_000006", "vainf_0114", "vainf_0120"]  # VOC val left out
    for image_id in sbd_only:
        _, mask = dataset.load(dataset.ids.index(image_id))
        np.testing.assert_array_equal(mask, expected[image_id])
    _, mask = dataset.load(0)  # in VOC train: VOC's own PNG, with its 255 boundaries
    assert 255 in mask
    # A SegmentationClassAug folder wins over both.
    aug = root / "SegmentationClassAug"
    aug.mkdir()
    save_label_png(np.full((375, 500), 9, np.uint8), aug / "2011_000006.png")
    lists.joinpath("trainaug.txt").write_text("2011_000006\n")
    dataset = VOCSegmentation(root, "trainaug")
    assert dataset.ids == ["2011_000006"] and (dataset.load(0)[1] == 9).all()


def _square_pair(height=300, width=400):
    """A green image with a magenta square (class 3) and a blue bar (class 7) at the left."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (0, 200, 0)
    mask = np.zeros((height, width), np.uint8)
    image[60:200, 40:160] = (255, 0, 255)
    mask[60:200, 40:160] = 3
    image[230:280, 10:300] = (0, 0, 255)
    mask[230:280, 10:300] = 7
    return image, mask


def _colour_region(image: np.ndarray, colour, tol: float = 40.0) -> np.ndarray:
    return np.abs(image - np.array(colour, np.float32)).max(axis=2) < tol


def test_train_augmentation_keeps_mask_and_image_aligned():
    image, mask = _square_pair()
    fill = tuple(round(m * 255) for m in IMAGENET_MEAN)
    padded_runs = 0
    for seed in range(16):
        transform = build_segmentation_transforms(256, train=True, seed=seed)
        out_image, out_mask = transform(image, mask)
        assert out_image.shape == (3, 256, 256) and out_mask.shape == (256, 256)
        assert out_mask.dtype == torch.int64
        pixels, labels = unnormalise(out_image), out_mask.numpy()
        assert set(np.unique(labels).tolist()) <= {0, 3, 7, 255}
        for cls, colour in ((3, (255, 0, 255)), (7, (0, 0, 255))):
            if (labels == cls).sum() > 200:
                assert iou(labels == cls, _colour_region(pixels, colour)) > 0.9, (seed, cls)
        pad = _colour_region(pixels, fill, tol=2.0)
        assert iou(labels == 255, pad) > 0.99 or (labels == 255).sum() == pad.sum() == 0
        padded_runs += bool(pad.any())
    assert padded_runs >= 2  # scales below 256/400 must pad


def test_same_seed_same_augmentation_and_photometric_keeps_geometry():
    image, mask = _square_pair()
    a = build_segmentation_transforms(256, train=True, seed=3)(image, mask)
    b = build_segmentation_transforms(256, train=True, seed=3)(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = build_segmentation_transforms(256, train=True, seed=3, photometric=True)(image, mask)
    assert c[0].shape == (3, 256, 256) and set(c[1].unique().tolist()) <= {0, 3, 7, 255}


def test_real_voc_pair_stays_aligned_through_augmentation(voc_root):
    image = np.array(Image.open(voc_root / "JPEGImages" / "vainf_0060.jpg").convert("RGB"))
    mask = np.array(Image.open(voc_root / "SegmentationClass" / "vainf_0060.png"))
    image[mask == 3] = (255, 0, 255)  # paint the bird a colour the photo does not have
    for seed in range(6):
        out_image, out_mask = build_segmentation_transforms(321, train=True, seed=seed)(image, mask)
        labels = out_mask.numpy()
        if (labels == 3).sum() > 500:
            assert iou(labels == 3, _colour_region(unnormalise(out_image), (255, 0, 255))) > 0.9


def test_eval_pads_without_resizing_small_images(voc_root):
    image = np.array(Image.open(voc_root / "JPEGImages" / "2011_000003.jpg").convert("RGB"))
    mask = np.array(Image.open(voc_root / "SegmentationClass" / "2011_000003.png"))
    out_image, out_mask = build_segmentation_transforms(513, train=False)(image, mask)
    h, w = mask.shape
    np.testing.assert_array_equal(out_mask[:h, :w].numpy(), mask)
    assert (out_mask[h:] == 255).all() and (out_mask[:, w:] == 255).all()
    assert np.abs(unnormalise(out_image)[:h, :w] - image).max() < 0.51
    assert out_image[:, h:].abs().max() < 0.01  # padded with the mean colour: ~0 once normalised


def test_eval_shrinks_large_images_with_nearest_masks():
    image, mask = _square_pair(600, 800)
    out_image, out_mask = build_segmentation_transforms(513, train=False)(image, mask)
    labels = out_mask.numpy()
    valid = (513 * 600 + 400) // 800  # longer side 800 -> 513
    assert (labels[valid + 1:] == 255).all() and (labels[:valid - 1] != 255).all()
    assert set(np.unique(labels).tolist()) == {0, 3, 7, 255}
    assert iou(labels == 3, _colour_region(unnormalise(out_image), (255, 0, 255))) > 0.95


class _Repeat(Dataset):
    def __init__(self, transform):
        self.transform = transform
        self.image, self.mask = _square_pair(120, 160)

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return self.transform(self.image, self.mask)[1]


def test_dataloader_workers_do_not_repeat_each_others_augmentations():
    loader = DataLoader(_Repeat(build_segmentation_transforms(96, train=True)), batch_size=1, num_workers=2)
    masks = [batch[0] for batch in loader]  # items 0, 2 from worker 0; items 1, 3 from worker 1
    assert not torch.equal(masks[0], masks[1]) or not torch.equal(masks[2], masks[3])


def test_voc_config_instantiates_train_and_val(voc_root):
    cfg = OmegaConf.create({"dataset": OmegaConf.load(CONF / "dataset" / "voc_seg.yaml"),
                            "backbone": OmegaConf.load(CONF / "backbone" / "mobilenet_v2.yaml")})
    cfg.dataset.root = str(voc_root)
    cfg.dataset.train.image_set = "val"  # the samples only ship a val list
    assert cfg.dataset.task == "segmentation" and cfg.dataset.num_classes == 21
    train, val = instantiate(cfg.dataset.train), instantiate(cfg.dataset.val)
    assert len(val) == 17
    image, target = train[0]
    assert image.shape == (3, 513, 513) and target["mask"].shape == (513, 513)


def test_palette_png_round_trip_and_colourise(tmp_path, voc_root):
    mask = np.array(Image.open(voc_root / "SegmentationClass" / "2011_000006.png"))
    path = save_label_png(torch.from_numpy(mask), tmp_path / "out.png")
    written = Image.open(path)
    assert written.mode == "P"
    np.testing.assert_array_equal(np.array(written), mask)
    reference = np.array(Image.open(voc_root / "SegmentationClass" / "2011_000006.png").convert("RGB"))
    np.testing.assert_array_equal(colorize(mask), reference)
    photo = np.array(Image.open(voc_root / "JPEGImages" / "2011_000006.jpg").convert("RGB"))
    blended = overlay(photo, mask, alpha=0.5)
    np.testing.assert_array_equal(blended[mask == 0], photo[mask == 0])
    person = mask == 15
    expected = np.rint(0.5 * photo[person] + 0.5 * np.array((192, 128, 128)))
    assert np.abs(blended[person].astype(int) - expected).max() <= 1


@pytest.fixture(scope="module")
def coco(shared_data):
    root = shared_data / "coco128"
    return root / "train2017", root / "annotations" / "instances_train2017.json"


def test_coco_masks_follow_the_voc_mapping(coco):
    image_dir, ann_file = coco
    raw = json.loads(ann_file.read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    voc_cats = {i for i, n in names.items() if n in {"airplane", "bicycle", "bird", "boat", "bottle", "bus",
                "car", "cat", "chair", "cow", "dining table", "dog", "horse", "motorcycle", "person",
                "potted plant", "sheep", "couch", "train", "tv"}}
    assert len(voc_cats) == 20
    with_voc = {a["image_id"] for a in raw["annotations"] if a["category_id"] in voc_cats and not a["iscrowd"]}
    dataset = CocoVOCSegmentation(image_dir, ann_file)
    assert set(dataset.ids) == with_voc
    assert len(CocoVOCSegmentation(image_dir, ann_file, keep_empty=True)) == len(raw["images"])

    by_image = {}
    for a in raw["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    # Images with exactly one annotation, a VOC-class one: its class covers ~ its COCO "area".
    singles = [anns[0] for anns in by_image.values()
               if len(anns) == 1 and anns[0]["category_id"] in voc_cats and anns[0]["area"] > 2000]
    assert singles
    for ann in singles[:3]:
        mask = dataset.build_mask(ann["image_id"])
        voc_name = {"airplane": "aeroplane", "motorcycle": "motorbike", "dining table": "diningtable",
                    "potted plant": "pottedplant", "couch": "sofa", "tv": "tvmonitor"}.get(
                        names[ann["category_id"]], names[ann["category_id"]])
        cls = VOC_CLASSES.index(voc_name)
        assert set(np.unique(mask).tolist()) == {0, cls}
        assert (mask == cls).sum() == pytest.approx(ann["area"], rel=0.05)
    # Crowd regions of VOC classes are ignored; other categories stay background.
    crowd = next(a for a in raw["annotations"] if a["iscrowd"] and names[a["category_id"]] == "person")
    mask = dataset.build_mask(crowd["image_id"])
    assert (mask == 255).sum() > 0.5 * crowd["area"]
    non_voc_only = next(i for i, anns in by_image.items() if not any(a["category_id"] in voc_cats for a in anns))
    empty = CocoVOCSegmentation(image_dir, ann_file, keep_empty=True)
    assert (empty.build_mask(non_voc_only) == 0).all()
    image, target = dataset[0]
    assert image.dtype == torch.float32 and target["mask"].shape == image.shape[1:]
