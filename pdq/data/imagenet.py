"""ImageNet (or any ImageFolder tree): `root/{train,val}/<class>/*.JPEG`."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from pdq.checks import check_bool, check_int
from pdq.data.calib import draw_indices
from pdq.data.settings import check_eval_subset, resolve_num_workers
from pdq.errors import PdqError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetDataModule(L.LightningDataModule):
    """Val: Resize 256 + CenterCrop 224. Calibration: drawn from `train` by seed, with the official
    code's augmentation (RandomResizedCrop 224 + horizontal flip) unless `calib_augment=false`."""

    name = "imagenet"

    def __init__(self, root: str | None = None, image_size: int = 224, resize: int = 256,
                 calib_augment: bool = True, eval_batch_size: int = 64, eval_subset: int | None = None,
                 num_workers: int | None = None):
        super().__init__()
        self.root = root
        self.classes_from = f"the class folders of data.root={root!r}"  # for check_input's message
        self.image_size = check_int("data.image_size", image_size, 1)
        self.resize = check_int("data.resize", resize, 1)
        self.calib_augment = check_bool("data.calib_augment", calib_augment)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, 1)
        if eval_subset is not None:
            check_eval_subset(eval_subset)
        self.eval_subset, self.num_workers = eval_subset, resolve_num_workers(num_workers)
        self._train = self._val = None

    def _folder(self, split: str) -> Path:
        if not self.root:
            raise PdqError("data=imagenet needs data.root=PATH, a folder holding train/ and val/ class folders")
        folder = Path(self.root).expanduser() / split
        if not folder.is_dir():
            raise PdqError(f"data.root={self.root!r} has no '{split}/' folder "
                           f"(expected {folder}/<class>/*.JPEG for train/ and val/)")
        return folder

    def prepare_data(self) -> None:
        self._folder("train"), self._folder("val")

    def _transforms(self):
        norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        val = transforms.Compose([transforms.Resize(self.resize), transforms.CenterCrop(self.image_size), *norm])
        calib = (transforms.Compose([transforms.RandomResizedCrop(self.image_size),
                                     transforms.RandomHorizontalFlip(), *norm])
                 if self.calib_augment else val)
        return calib, val

    def setup(self, stage: str | None = None) -> None:
        if self._train is not None:
            return
        calib_tf, val_tf = self._transforms()
        try:
            self._train = datasets.ImageFolder(str(self._folder("train")), transform=calib_tf)
            self._val = datasets.ImageFolder(str(self._folder("val")), transform=val_tf)
        except FileNotFoundError as e:
            raise PdqError(f"data.root={self.root!r}: {e}") from None
        if self._train.classes != self._val.classes:
            raise PdqError(f"data.root={self.root!r}: train/ and val/ have different class folders")
        if self.eval_subset is not None:
            check_eval_subset(self.eval_subset, len(self._val))

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self._train.classes)

    @property
    def train_size(self) -> int:
        self.setup()
        return len(self._train)

    def calibration_set(self, size: int, seed: int) -> torch.Tensor:
        """`size` augmented training images drawn by `seed`; the augmentation is seeded too."""
        self.setup()
        idx = draw_indices(len(self._train), size, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return torch.stack([self._train[int(i)][0] for i in idx])

    def test_dataloader(self) -> DataLoader:
        self.setup()
        ds = self._val if not self.eval_subset else Subset(self._val, range(self.eval_subset))
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())

    val_dataloader = test_dataloader
