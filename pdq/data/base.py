"""What a run needs of a data module (a `data=` config's `_target_`, pdq's or a user's)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch.utils.data import DataLoader


@runtime_checkable
class DataModule(Protocol):
    name: str                       # the dataset's name in logs and results.json

    @property
    def train_size(self) -> int:
        """Images in the split calibration images are drawn from; cheap after `prepare_data`."""

    def prepare_data(self) -> None:
        """Cheap checks that the files exist; no images loaded."""

    def setup(self, stage: str | None = None) -> None:
        """Load what the splits need."""

    def calibration_set(self, size: int, seed: int) -> torch.Tensor:
        """`size` training images drawn by `seed`, as one [N, C, H, W] float tensor."""

    def test_dataloader(self) -> DataLoader | None:
        """The labelled evaluation set, or None where there is none (top-1 is then not measured)."""
