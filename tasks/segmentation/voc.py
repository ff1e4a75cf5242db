"""PASCAL VOC 2012 segmentation: palette PNG masks, and DeepLab's SBD "trainaug" set."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tasks.images import decode_rgb

from .metrics import ConfusionMatrix
from .palette import IGNORE_INDEX, VOC_CLASSES
from .transforms import IMAGENET_MEAN, IMAGENET_STD

Transform = Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
AUG_SETS = ("trainaug", "train_aug")


def to_tensor(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """No augmentation: the image normalised with ImageNet statistics at its own size."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std, torch.from_numpy(np.ascontiguousarray(mask)).to(torch.int64)


def _undecodable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} cannot be decoded ({type(err).__name__}: {' '.join(str(err).split())}); "
                      f"expected a readable image file.")


def read_index_png(path: Path) -> np.ndarray:
    """A palette ("P") or grey ("L") PNG as its stored indices, never converted to colours."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise ValueError(f"mask {path} is a '{image.mode}' image; expected a palette ('P') or grey "
                                 f"('L') PNG whose pixel values are class indices.")
            return np.array(image)
    except (OSError, SyntaxError) as err:  # truncated or not a PNG (FileNotFoundError is checked before)
        raise _undecodable(path, err) from None


def read_sbd_mat(path: Path) -> np.ndarray:
    """SBD's `cls/<id>.mat`: the class map is GTcls.Segmentation (0 = background, no ignore label)."""
    from scipy.io import loadmat

    try:
        mask = loadmat(str(path))["GTcls"][0]["Segmentation"][0]
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"SBD file {path} has no GTcls.Segmentation class map ({err}).") from None
    return np.asarray(mask).astype(np.uint8)


def _read_ids(path: Path) -> list[str]:
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def check_mask(mask: np.ndarray, path: Path, image_size: tuple[int, int], num_classes: int) -> np.ndarray:
    if mask.shape != image_size:
        raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
                         f"{image_size[1]}x{image_size[0]}; expected the same size.")
    bad = (mask >= num_classes) & (mask != IGNORE_INDEX)
    if bad.any():
        raise ValueError(f"mask {path} holds class index {int(mask[bad][0])}; expected 0..{num_classes - 1} "
                         f"or {IGNORE_INDEX} (ignore).")
    return mask


class VOCSegmentation(Dataset):
    """`root` = VOCdevkit/VOC2012. `image_set` names ImageSets/Segmentation/<image_set>.txt.

    image_set="trainaug" (DeepLab's 10,582 images) reads masks from, in order: `SegmentationClassAug`
    PNGs (under `aug_root`, or under `root` when aug_root is None), VOC's own SegmentationClass PNG,
    SBD's `cls/<id>.mat` under `aug_root` (the SBD `dataset` folder). Its list is the first of
    ImageSets/Segmentation/trainaug.txt, <aug_root>/trainaug.txt or train_aug.txt; failing those it is
    built as DeepLab does: VOC train + SBD train + SBD val, minus VOC val.
    """

    def __init__(self, root: str | Path, image_set: str = "train", transforms: Transform | None = None,
                 aug_root: str | Path | None = None, class_names: Sequence[str] = VOC_CLASSES):
        self.class_names = list(class_names)  # index = class id; background first
        self.num_classes = len(self.class_names)
        self.root = Path(root)
        self.image_set = image_set
        self.transforms = transforms if transforms is not None else to_tensor
        if not (self.root / "JPEGImages").is_dir():
            raise FileNotFoundError(f"dataset.root={self.root} has no JPEGImages folder; expected "
                                    f"VOCdevkit/VOC2012.")
        self.aug_root = Path(aug_root) if aug_root is not None else None
        lists = self.root / "ImageSets" / "Segmentation"
        self.mask_dirs: list[Path] = [self.root / "SegmentationClass"]
        self.sbd_dir: Path | None = None
        if image_set in AUG_SETS:
            self.ids = self._trainaug_ids(lists)
            aug_dir = (self.aug_root or self.root) / "SegmentationClassAug"
            if aug_dir.is_dir():
                self.mask_dirs.insert(0, aug_dir)
            if self.aug_root is not None and (self.aug_root / "cls").is_dir():
                self.sbd_dir = self.aug_root
        else:
            list_file = lists / f"{image_set}.txt"
            if not list_file.is_file():
                raise FileNotFoundError(f"image list {list_file} does not exist; dataset.image_set must name "
                                        f"a file in {lists}.")
            self.ids = _read_ids(list_file)

    def _trainaug_ids(self, lists: Path) -> list[str]:
        candidates = [lists / "trainaug.txt", lists / "train_aug.txt"]
        if self.aug_root is not None:
            candidates += [self.aug_root / "trainaug.txt", self.aug_root / "train_aug.txt"]
        for candidate in candidates:
            if candidate.is_file():
                return _read_ids(candidate)
        needed = [lists / "train.txt", lists / "val.txt"]
        if self.aug_root is not None:
            needed += [self.aug_root / "train.txt", self.aug_root / "val.txt"]
        missing = [str(p) for p in needed if not p.is_file()]
        if self.aug_root is None or missing:
            raise FileNotFoundError(f"image_set=trainaug needs a trainaug.txt list in {lists} or in aug_root, "
                                    f"or SBD's train.txt/val.txt beside VOC's ({missing or 'aug_root unset'}).")
        voc_train, voc_val, sbd_train, sbd_val = (_read_ids(p) for p in needed)
        val = set(voc_val)
        return sorted(set(voc_train + sbd_train + sbd_val) - val)

    def __len__(self) -> int:
        return len(self.ids)

    def _image_path(self, image_id: str) -> Path:
        path = self.root / "JPEGImages" / f"{image_id}.jpg"
        if not path.is_file() and self.sbd_dir is not None and (self.sbd_dir / "img" / f"{image_id}.jpg").is_file():
            path = self.sbd_dir / "img" / f"{image_id}.jpg"
        return path

    def _load_mask(self, image_id: str) -> tuple[np.ndarray, Path]:
        for folder in self.mask_dirs:
            path = folder / f"{image_id}.png"
            if path.is_file():
                return read_index_png(path), path
        if self.sbd_dir is not None:
            path = self.sbd_dir / "cls" / f"{image_id}.mat"
            if path.is_file():
                return read_sbd_mat(path), path
        raise FileNotFoundError(f"no mask for image '{image_id}' in {[str(d) for d in self.mask_dirs]}"
                                + (f" or {self.sbd_dir / 'cls'}" if self.sbd_dir is not None else "") + ".")

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed (image RGB uint8 [H, W, 3], mask uint8 [H, W]) pair."""
        image_id = self.ids[index]
        image_path = self._image_path(image_id)
        if not image_path.is_file():
            raise FileNotFoundError(f"image {image_path} listed in {self.image_set} does not exist.")
        try:
            image = decode_rgb(image_path)
        except (OSError, SyntaxError) as err:  # truncated or not an image
            raise _undecodable(image_path, err) from None
        mask, mask_path = self._load_mask(image_id)
        return image, check_mask(mask, mask_path, image.shape[:2], self.num_classes)

    def __getitem__(self, index: int):
        image, mask = self.load(index)
        tensor, mask_t = self.transforms(image, mask)
        target = {"mask": mask_t, "image_id": self.ids[index],
                  "orig_size": torch.tensor(image.shape[:2], dtype=torch.int64)}
        if getattr(self.transforms, "keeps_original_mask", False):  # scored at the photo's own resolution
            target["valid_size"] = torch.tensor(self.transforms.valid_size(*image.shape[:2]), dtype=torch.int64)
            target["window"] = self.transforms.crop_size
        return tensor, target

    def evaluator(self) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, IGNORE_INDEX, self.class_names)



__all__ = ["VOCSegmentation", "read_index_png", "read_sbd_mat", "to_tensor"]
