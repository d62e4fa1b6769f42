"""ImageNet (ILSVRC-2012) from an ImageFolder tree, decoded lazily one image at a time.

Expected layout (the validation images sorted into class folders, e.g. with the usual
``valprep.sh``)::

    data_dir/train/<wnid>/*.JPEG      data_dir/val/<wnid>/*.JPEG

Split ``train`` reads ``train/``, split ``test`` reads ``val/``. ``load_dataset("imagenet")``
returns an ``ImageFolderDataset``: the file list and labels are read from the directory
tree (no image is opened), and ``batch(indices)`` decodes only those images, each
resized to 256 (shorter side, bilinear), center-cropped to 224x224 and scaled to [0, 1]
(torchvision's ``Resize(256), CenterCrop(224), ToTensor()``). A 50,000-image split costs
its file list in memory, never its pixels. Decoding needs Pillow (imported on first use).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

from certkd.data._files import resolve_data_dir
from certkd.data._registry import DatasetInfo, register_dataset
from certkd.errors import DataError

IMAGE_SIZE = 224
RESIZE = 256
SPLIT_FOLDERS = {"train": "train", "test": "val"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision's ImageFolder extensions (matched case-insensitively)."""
INFO = DatasetInfo("imagenet", (3, IMAGE_SIZE, IMAGE_SIZE), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
URL = "https://image-net.org/download-images.php"


def import_pil() -> ModuleType:
    """``PIL.Image``, imported lazily; without Pillow, one DataError sentence naming the install command."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image folders needs Pillow, which is not installed: pip install pillow") from None
    return Image


def resized_crop_size(width: int, height: int, resize: int = RESIZE) -> tuple[int, int]:
    """The (width, height) after scaling the shorter side to ``resize`` (torchvision's integer ``Resize``)."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def decode_image(path: Path, resize: int = RESIZE, crop: int = IMAGE_SIZE) -> torch.Tensor:
    """One image file -> a (3, crop, crop) float32 tensor in [0, 1]: RGB, resize shorter side, center crop."""
    image_module = import_pil()
    try:
        with image_module.open(path) as img:
            rgb = img.convert("RGB")
            width, height = rgb.size
            rgb = rgb.resize(resized_crop_size(width, height, resize), image_module.BILINEAR)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read this image ({' '.join(str(exc).split())})") from None
    w, h = rgb.size
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    array = np.asarray(rgb.crop((left, top, left + crop, top + crop)), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


@dataclass
class ImageFolderDataset:
    """A lazy ImageFolder split (or a subset of it): file paths and labels; pixels decoded per batch.

    Parameters
    ----------
    paths : the image files, in ImageFolder order (sorted classes, sorted files)
    y : int64 labels, one per path (the index of the file's class folder)
    info : the dataset's metadata (class names are the folder names)
    """

    paths: list[Path]
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, indices: torch.Tensor | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode the images at ``indices``: inputs (B, 3, 224, 224) in [0, 1] and their labels."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        shape = (0, *self.info.input_shape)
        images = [decode_image(self.paths[int(i)]) for i in idx]
        return (torch.stack(images) if images else torch.zeros(shape)), self.y[idx]

    def subset(self, indices: torch.Tensor | list[int]) -> ImageFolderDataset:
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        return ImageFolderDataset([self.paths[int(i)] for i in idx], self.y[idx], self.info)


def class_folders(split_dir: Path) -> list[str]:
    """The sorted class sub-folder names of one split folder (empty when there is none)."""
    if not split_dir.is_dir():
        return []
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


def scan_image_folder(split_dir: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """Every image file under ``split_dir/<class>/`` (recursively, sorted) and its class index."""
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        paths += files
        labels += [label] * len(files)
    return paths, labels


@register_dataset("imagenet", INFO)
def load_imagenet(split: str, data_dir: Path | None = None) -> ImageFolderDataset:
    """ImageNet-1k, 224x224x3, streamed from an ImageFolder tree (DATA_DIR/train, DATA_DIR/val; needs Pillow)."""
    root = resolve_data_dir(data_dir)
    split_dir = root / SPLIT_FOLDERS[split]
    classes = class_folders(split_dir)
    if not classes:
        raise DataError(f"imagenet {split} data not found: expected class folders {split_dir}/<wnid>/*.JPEG "
                        f"(validation images sorted into class folders); get ILSVRC-2012 from {URL}")
    other = class_folders(root / SPLIT_FOLDERS["test" if split == "train" else "train"])
    if other and other != classes:
        raise DataError(f"imagenet: {root}/train and {root}/val hold different class folders "
                        f"({len(set(classes) ^ set(other))} differ), so their labels would not agree")
    if len(classes) > INFO.num_classes:
        raise DataError(f"imagenet {split}: {len(classes)} class folders in {split_dir}, more than the "
                        f"{INFO.num_classes} classes of ImageNet-1k")
    paths, labels = scan_image_folder(split_dir, classes)
    if not paths:
        raise DataError(f"imagenet {split}: no image files ({', '.join(IMAGE_SUFFIXES)}) under {split_dir}/<class>/")
    return ImageFolderDataset(paths, torch.tensor(labels, dtype=torch.long),
                              DatasetInfo(INFO.name, INFO.input_shape, INFO.num_classes, INFO.mean, INFO.std,
                                          tuple(classes)))
