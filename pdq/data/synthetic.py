"""Random images of a given size, drawn from a seeded generator: for speed and memory checks of models at
their real input size (e.g. a ResNet-18 at 224x224) where no dataset is at hand. No evaluation set, so
top-1 is not measured."""

from __future__ import annotations

import torch

from pdq.checks import check_int
from pdq.data.tensor import TensorDataModule


class SyntheticDataModule(TensorDataModule):
    """`size` images of `channels` x `image_size` x `image_size`, standard normal (already "normalised"),
    drawn once by `setup` from the data's own `seed`; the run's seed draws the calibration set from them."""

    name = "synthetic"

    def __init__(self, size: int, image_size: int, channels: int, seed: int):
        super().__init__(torch.empty(0))
        self.size = check_int("data.size", size, 1)
        self.shape = (check_int("data.channels", channels, 1), check_int("data.image_size", image_size, 1),
                      image_size)
        self.seed = check_int("data.seed", seed, 0)

    @property
    def train_size(self) -> int:
        return self.size

    def setup(self, stage: str | None = None) -> None:
        if len(self.images) != self.size:
            self.images = torch.randn(self.size, *self.shape, generator=torch.Generator().manual_seed(self.seed))
