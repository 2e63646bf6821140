"""Which training images form the calibration set: a seeded draw without replacement."""

import torch

from pdq.errors import PdqError


def draw_indices(population: int, size: int, seed: int) -> torch.Tensor:
    if not 1 <= size <= population:
        raise PdqError(f"calib.size={size} is not possible: the training split has {population} images "
                       f"(accepted: 1..{population})")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(population, generator=g)[:size].sort().values
