"""The user's own images: a folder of calibration images (labels unused) and, optionally, an ImageFolder
to evaluate on."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from pdq.checks import check_choice, check_int
from pdq.data.calib import draw_indices
from pdq.data.settings import check_eval_subset, resolve_num_workers
from pdq.errors import PdqError, cause


def open_image(path: str | Path, mode: str | None = None, role: str = "image") -> Image.Image | None:
    """The image at `path` decoded and converted to `mode`; with no `mode`, only its header is read (cheap: the
    check of a file before the work). A file PIL cannot read is one error naming it."""
    try:
        with Image.open(path) as im:
            return im.convert(mode) if mode else None
    except OSError as e:  # PIL's UnidentifiedImageError included
        raise PdqError(f"{role} {path} cannot be read: {cause(e)}; accepted: image files PIL can decode "
                       f"({', '.join(IMG_EXTENSIONS)}): replace or remove it") from None


class _Images(Dataset):
    def __init__(self, files: list[Path], transform, mode: str):
        self.files, self.transform, self.mode = files, transform, mode

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(open_image(self.files[i], self.mode, "calibration image"))


class FolderDataModule(L.LightningDataModule):
    """Calibration: every image under `root` (any depth), resized (shorter side to `resize`), center-cropped
    to `image_size`, converted to `channels` (1: grayscale, 3: RGB), scaled to [0, 1] and normalised with
    `mean` / `std`. Evaluation (optional): `eval_root/<class>/*`, classes in sorted folder order, the same
    transform."""

    name = "folder"

    def __init__(self, root: str | None = None, eval_root: str | None = None, image_size: int = 224,
                 resize: int | None = None, channels: int = 3, mean: list[float] | None = None,
                 std: list[float] | None = None, eval_batch_size: int = 64, eval_subset: int | None = None,
                 num_workers: int | None = None):
        super().__init__()
        self.root, self.eval_root = root, eval_root
        self.classes_from = f"the class folders of data.eval_root={eval_root!r}"  # for check_input's message
        self.image_size = check_int("data.image_size", image_size, 1)
        self.resize = check_int("data.resize", resize if resize is not None else image_size, 1)
        self.channels = check_choice("data.channels", channels, (1, 3))
        for key, values in (("mean", mean), ("std", std)):
            if not isinstance(values, Sequence) or isinstance(values, str) or len(values) != channels or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise PdqError(f"data.{key}={values!r} is not accepted; accepted: a list of {channels} numbers "
                               f"(one per channel, data.channels={channels})")
        if any(v <= 0 for v in std):
            raise PdqError(f"data.std={list(std)} is not accepted; accepted: positive numbers")
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, 1)
        if eval_subset is not None:
            check_eval_subset(eval_subset)
        self.eval_subset, self.num_workers = eval_subset, resolve_num_workers(num_workers)
        self._files: list[Path] | None = None
        self._eval = None

    @property
    def transform(self):
        return transforms.Compose([transforms.Resize(self.resize), transforms.CenterCrop(self.image_size),
                                   transforms.ToTensor(), transforms.Normalize(self.mean, self.std)])

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def prepare_data(self) -> None:
        """Cheap: the folders exist and hold images."""
        if self._files is not None:
            return
        if not self.root or not Path(self.root).expanduser().is_dir():
            raise PdqError(f"data.root={self.root!r} is not a folder; accepted: a folder of calibration images "
                           f"({', '.join(IMG_EXTENSIONS)}), at any depth")
        root = Path(self.root).expanduser()
        self._files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not self._files:
            raise PdqError(f"data.root={self.root!r} holds no image files; accepted: {', '.join(IMG_EXTENSIONS)}")
        if self.eval_root is not None and not Path(self.eval_root).expanduser().is_dir():
            raise PdqError(f"data.eval_root={self.eval_root!r} is not a folder; accepted: a folder with one "
                           f"subfolder of images per class, or null (no evaluation)")

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()
        if self.eval_root is None or self._eval is not None:
            return
        try:
            self._eval = datasets.ImageFolder(str(Path(self.eval_root).expanduser()), transform=self.transform,
                                              loader=partial(open_image, mode=self.mode, role="evaluation image"))
        except (FileNotFoundError, OSError) as e:
            raise PdqError(f"data.eval_root={self.eval_root!r}: {cause(e)}") from None
        if self.eval_subset is not None:
            check_eval_subset(self.eval_subset, len(self._eval))
        for path, _ in self._eval.samples[:self.eval_subset]:  # the files evaluated: their headers, now
            open_image(path, role="evaluation image")

    @property
    def num_classes(self) -> int | None:
        """The evaluation classes (one folder each under `eval_root`); None without an evaluation set."""
        self.setup()
        return None if self._eval is None else len(self._eval.classes)

    @property
    def train_size(self) -> int:
        self.prepare_data()
        return len(self._files)

    def calibration_set(self, size: int, seed: int) -> torch.Tensor:
        """`size` images of `root` drawn by `seed`."""
        images = _Images(self._files, self.transform, self.mode)
        return torch.stack([images[int(i)] for i in draw_indices(len(images), size, seed)])

    def test_dataloader(self) -> DataLoader | None:
        self.setup()
        if self._eval is None:
            return None
        ds = self._eval if not self.eval_subset else Subset(self._eval, range(self.eval_subset))
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)
