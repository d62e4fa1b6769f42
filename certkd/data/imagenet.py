"""ImageNet (ILSVRC-2012) from an ImageFolder tree, read lazily through torchvision.

Expected layout (the validation images sorted into class folders, e.g. with the usual
``valprep.sh``)::

    data_dir/train/<wnid>/*.JPEG      data_dir/val/<wnid>/*.JPEG

Split ``train`` reads ``train/``, split ``test`` reads ``val/``. ImageNet does not fit in
memory, so ``load_dataset("imagenet", ...)`` returns an ``ImageFolderDataset``: a lazy,
minimal Dataset-like object (``info``, ``y``, ``len``, ``ds[i] -> (x, y)``, ``subset``,
and ``x`` for subsets of at most ``MAX_MATERIALIZED`` images). Each image is resized to
256 (shorter side), center-cropped to 224x224 and scaled to [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from certkd.data._files import import_torchvision, resolve_data_dir
from certkd.data._registry import DatasetInfo, register_dataset
from certkd.errors import DataError

IMAGE_SIZE = 224
RESIZE = 256
MAX_MATERIALIZED = 2048
SPLIT_FOLDERS = {"train": "train", "test": "val"}
INFO = DatasetInfo("imagenet", (3, IMAGE_SIZE, IMAGE_SIZE), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
URL = "https://image-net.org/download-images.php"


class ImageFolderDataset:
    """A lazy view of an ImageFolder split (or of a subset of it).

    ``y`` (int64 labels) is known without reading any image; ``ds[i]`` reads one image
    as a (3, 224, 224) float tensor in [0, 1]; ``x`` stacks every image of the view and
    is refused above ``MAX_MATERIALIZED`` images (take a ``subset`` first).
    """

    def __init__(self, folder: Any, info: DatasetInfo, indices: torch.Tensor | None = None):
        self.folder = folder
        self.info = info
        self.indices = torch.arange(len(folder.targets)) if indices is None else indices
        self.y = torch.as_tensor(folder.targets, dtype=torch.long)[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, _ = self.folder.samples[int(self.indices[i])]
        try:
            image = self.folder.transform(self.folder.loader(path))
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read this image ({' '.join(str(exc).split())})") from None
        return image, self.y[i]

    def subset(self, indices: torch.Tensor | list[int]) -> ImageFolderDataset:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageFolderDataset(self.folder, self.info, self.indices[idx])

    @property
    def x(self) -> torch.Tensor:
        if len(self) > MAX_MATERIALIZED:
            raise DataError(f"imagenet: refusing to load {len(self)} images into memory at once; take a subset of "
                            f"at most {MAX_MATERIALIZED} first (dataset.subset(indices))")
        return torch.stack([self[i][0] for i in range(len(self))])


def class_folders(split_dir: Path) -> list[str]:
    """The sorted class sub-folder names of one split folder (empty when there is none)."""
    if not split_dir.is_dir():
        return []
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


@register_dataset("imagenet", INFO)
def load_imagenet(split: str, data_dir: Path | None = None) -> ImageFolderDataset:
    """ImageNet-1k, 224x224x3, lazy ImageFolder (DATA_DIR/train, DATA_DIR/val; needs torchvision)."""
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
    torchvision = import_torchvision("the imagenet dataset")
    transforms = torchvision.transforms
    transform = transforms.Compose([transforms.Resize(RESIZE), transforms.CenterCrop(IMAGE_SIZE),
                                    transforms.ToTensor()])
    try:
        folder = torchvision.datasets.ImageFolder(str(split_dir), transform=transform)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"imagenet {split}: {' '.join(str(exc).split())}") from None
    info = DatasetInfo(INFO.name, INFO.input_shape, len(folder.classes), INFO.mean, INFO.std,
                       tuple(folder.classes))
    return ImageFolderDataset(folder, info, None)
