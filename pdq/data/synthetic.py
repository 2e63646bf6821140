"""Random images of a given size, drawn from a seeded generator: for speed and memory checks of models at
their real input size (e.g. a ResNet-18 at 224x224) where no dataset is at hand. No evaluation set, so
top-1 is not measured."""

from __future__ import annotations

import lightning as L
import torch

from pdq.checks import check_int
from pdq.data.calib import draw_indices


class SyntheticDataModule(L.LightningDataModule):
    """`size` images of `channels` x `image_size` x `image_size`, standard normal (already "normalised")."""

    name = "synthetic"

    def __init__(self, size: int, image_size: int, channels: int, seed: int):
        super().__init__()
        self.size = check_int("data.size", size, 1)
        self.image_size = check_int("data.image_size", image_size, 1)
        self.channels = check_int("data.channels", channels, 1)
        self.seed = check_int("data.seed", seed, 0)

    def setup(self, stage: str | None = None) -> None:
        pass

    @property
    def train_size(self) -> int:
        return self.size

    def calibration_set(self, size: int, seed: int) -> torch.Tensor:
        """The images drawn by `seed` (each image is a function of the data seed and its index only)."""
        gen = torch.Generator().manual_seed(self.seed)
        images = torch.randn(self.size, self.channels, self.image_size, self.image_size, generator=gen)
        return images[draw_indices(self.size, size, seed)]

    def test_dataloader(self) -> None:
        return None
