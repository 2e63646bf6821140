"""Calibration images held in memory: `pdq.quantize`'s tensors, and the base of `data=synthetic`."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from pdq.data.calib import draw_indices


class TensorDataModule:
    """Calibration images held in memory (and an optional evaluation loader of (image, label) batches)."""

    name = "tensor"

    def __init__(self, images: torch.Tensor, eval_loader: DataLoader | None = None):
        self.images, self.eval_loader = images, eval_loader

    @property
    def train_size(self) -> int:
        return len(self.images)

    def prepare_data(self) -> None:
        pass

    def setup(self, stage: str | None = None) -> None:
        pass

    def calibration_set(self, size: int, seed: int) -> torch.Tensor:
        return self.images[draw_indices(len(self.images), size, seed)]

    def test_dataloader(self) -> DataLoader | None:
        return self.eval_loader
