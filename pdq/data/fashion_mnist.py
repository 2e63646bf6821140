"""Fashion-MNIST from its real IDX files (Debian's `dataset-fashion-mnist` or a user folder)."""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from pdq.checks import check_bool, check_int
from pdq.data.calib import draw_indices
from pdq.data.settings import check_eval_subset, resolve_num_workers
from pdq.errors import PdqError

log = logging.getLogger("pdq")

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
SPLITS = {"train": "train", "test": "t10k"}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; validates magic number and size."""
    path = Path(path)
    data = _read(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PdqError(f"{path} is not an unsigned-byte IDX file (bad magic number {data[:4]!r})")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise PdqError(f"{path} is truncated or corrupt: header says {dims}, "
                       f"payload has {len(data) - offset} bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _read(path: Path, size: int = -1) -> bytes:
    """The first `size` bytes (all: -1) of an IDX file, decompressed when it ends in .gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read(size)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a download cut short, a damaged copy
        raise PdqError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); replace it (Debian: "
                       f"apt-get install --reinstall dataset-fashion-mnist)") from None
    except OSError as e:
        raise PdqError(f"{path} cannot be read ({e.strerror or type(e).__name__})") from None


def idx_length(path: str | os.PathLike) -> int:
    """The number of items an IDX file's header announces (reads only the header)."""
    path = Path(path)
    head = _read(path, 8)
    if len(head) < 8 or head[:3] != bytes([0, 0, 0x08]):
        raise PdqError(f"{path} is not an unsigned-byte IDX file (bad header {head!r})")
    return int.from_bytes(head[4:8], "big")


def _find_split(folder: Path, prefix: str) -> tuple[Path, Path] | None:
    for sub in (folder, folder / "FashionMNIST" / "raw"):
        for ext in ("", ".gz"):
            images = sub / f"{prefix}-images-idx3-ubyte{ext}"
            labels = sub / f"{prefix}-labels-idx1-ubyte{ext}"
            if images.is_file() and labels.is_file():
                return images, labels
    return None


def resolve_files(root: str | None, download: bool = True) -> dict[str, tuple[Path, Path]]:
    """Locate the IDX files: `root`, then Debian's folder, then a torchvision download into `root`."""
    candidates = ([Path(root).expanduser()] if root else []) + [DEBIAN_ROOT]
    for folder in candidates:
        found = {split: _find_split(folder, prefix) for split, prefix in SPLITS.items()}
        if all(found.values()):
            return _used(found, root, folder)
    if download and root:
        try:
            from torchvision.datasets import FashionMNIST

            for train in (True, False):
                FashionMNIST(root, train=train, download=True)
            found = {split: _find_split(Path(root).expanduser(), p) for split, p in SPLITS.items()}
            if all(found.values()):
                return _used(found, root, Path(root).expanduser())
        except Exception:  # offline machine: fall through to the clear error below
            pass
    places = "\n".join(
        [f"  1. data.root={root!r}" if root else "  1. data.root (not set)",
         f"  2. {DEBIAN_ROOT} (Debian/Ubuntu: apt-get install -y dataset-fashion-mnist)",
         "  3. a torchvision download into data.root" + ("" if download else " (disabled: data.download=false)")
         + " (needs internet)"])
    raise PdqError(f"Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] ...) not found. Looked in:\n{places}")


def _used(found: dict[str, tuple[Path, Path]], root: str | None, folder: Path) -> dict[str, tuple[Path, Path]]:
    """Log which files a run reads; warn when a given data.root was passed over."""
    if root and folder != Path(root).expanduser():
        log.warning("data.root=%r holds no Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz] ...); "
                    "using %s instead", root, folder)
    log.info("Fashion-MNIST files: %s", ", ".join(str(p) for pair in found.values() for p in pair))
    return found


def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float [N,1,28,28], normalised with the training-set mean/std."""
    return ((images_u8.float() / 255.0 - MEAN) / STD).unsqueeze(1)


class FashionMNISTDataModule(L.LightningDataModule):
    """Real Fashion-MNIST; evaluation on the 10,000-image test split."""

    num_classes = 10
    name = "fashion_mnist"

    def __init__(self, root: str | None = None, download: bool = True, eval_batch_size: int = 1000,
                 eval_subset: int | None = None, num_workers: int | None = 0):
        super().__init__()
        self.root, self.download = root, check_bool("data.download", download)
        self.eval_batch_size = check_int("data.eval_batch_size", eval_batch_size, 1)
        self.eval_subset, self.num_workers = eval_subset, resolve_num_workers(num_workers)
        self._files: dict[str, tuple[Path, Path]] | None = None
        self._sizes: dict[str, int] = {}
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def files(self) -> dict[str, tuple[Path, Path]]:
        if self._files is None:
            self._files = resolve_files(self.root, self.download)
        return self._files

    def prepare_data(self) -> None:
        """Cheap checks before anything is loaded: the files exist, and their headers give the split sizes
        that data.eval_subset (and the pipeline's calib.size) are checked against."""
        for split, (img, lab) in self.files().items():
            n, labels = idx_length(img), idx_length(lab)
            if n != labels:
                raise PdqError(f"{img} announces {n} images but {lab} {labels} labels; accepted: matching files")
            self._sizes[split] = n
        if self.eval_subset is not None:  # checked here, where the test split's size is known
            check_eval_subset(self.eval_subset, self._sizes["test"])

    def setup(self, stage: str | None = None) -> None:
        if self._data:
            return
        for split, (img, lab) in self.files().items():
            x = torch.from_numpy(read_idx(img).copy())
            y = torch.from_numpy(read_idx(lab).astype(np.int64))
            if x.ndim != 3 or len(x) != len(y):
                raise PdqError(f"{img}: expected [N,28,28] images matching {len(y)} labels, got {tuple(x.shape)}")
            self._data[split] = (x, y)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw uint8 images and int64 labels of `train` or `test`."""
        self.setup()
        return self._data[name]

    @property
    def train_size(self) -> int:
        if not self._data and not self._sizes:
            self.prepare_data()
        return self._sizes["train"] if not self._data else len(self._data["train"][1])

    def calibration_set(self, size: int, seed: int) -> torch.Tensor:
        """`size` training images drawn by `seed` (labels are never used by quantization)."""
        x, _ = self.split("train")
        return normalize(x[draw_indices(len(x), size, seed)])

    def test_dataloader(self) -> DataLoader:
        x, y = self.split("test")
        if self.eval_subset is not None:
            check_eval_subset(self.eval_subset, len(y))
            x, y = x[: self.eval_subset], y[: self.eval_subset]
        return DataLoader(TensorDataset(normalize(x), y), batch_size=self.eval_batch_size,
                          shuffle=False, num_workers=self.num_workers)

    val_dataloader = test_dataloader

