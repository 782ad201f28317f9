"""nnU-Net's patch sampling as a dataset: random cases per iteration, foreground oversampling, seeded per sample."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset


class PatchDataset(Dataset):
    """nnU-Net patch sampling as a map-style dataset: one epoch is ``iterations_per_epoch`` batches.

    Sample ``i`` of epoch ``e`` draws a random case from ``data`` and seeds the random transforms with a
    generator derived from ``(seed, rank, e, i)``, so the stream of patches depends neither on the number of
    DataLoader workers nor on where a resumed run restarts. The last ``round(batch_size * fg_fraction)``
    positions of every batch get ``force_fg=True`` (nnU-Net's foreground oversampling, read by
    :class:`custom.transforms.dictionary.ForegroundOversampledCropd`). Use it with ``shuffle=False`` and the same
    ``batch_size`` in the DataLoader, and call :meth:`set_epoch` at the start of every epoch
    (:class:`custom.training.handlers.iteration.SetEpochHandler`).

    Args:
        data: items (dicts) handed to ``transform``; each sample is a shallow copy plus ``force_fg``.
        transform: a MONAI ``Compose`` (or any callable); Randomizable transforms are re-seeded per sample.
        batch_size: samples per batch (>= 1).
        iterations_per_epoch: batches per epoch (>= 1).
        fg_fraction: fraction of each batch forced to contain foreground, in [0, 1].
        seed: base seed.
        rank: distributed rank; every rank draws its own stream.
        force_fg_key: key receiving the boolean flag.
    """

    def __init__(
        self,
        data: Sequence[Mapping],
        transform: Callable | None,
        batch_size: int,
        iterations_per_epoch: int,
        fg_fraction: float = 0.33,
        seed: int = 0,
        rank: int = 0,
        force_fg_key: str = "force_fg",
    ) -> None:
        if len(data) == 0:
            raise ValueError("PatchDataset needs at least one training case, got an empty list")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(iterations_per_epoch) < 1:
            raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
        if not 0.0 <= float(fg_fraction) <= 1.0:
            raise ValueError(f"fg_fraction must be in [0, 1], got {fg_fraction}")
        self.data = list(data)
        self.transform = transform
        self.batch_size = int(batch_size)
        self.iterations_per_epoch = int(iterations_per_epoch)
        self.fg_fraction = float(fg_fraction)
        self.seed = int(seed)
        self.rank = int(rank)
        self.force_fg_key = force_fg_key
        self.num_forced = int(round(self.batch_size * self.fg_fraction))
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        """Select the sample stream of ``epoch`` (1-based, as Ignite counts)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.batch_size * self.iterations_per_epoch

    def force_fg(self, index: int) -> bool:
        """Whether sample ``index`` (position ``index % batch_size`` in its batch) must contain foreground."""
        return index % self.batch_size >= self.batch_size - self.num_forced

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, self.epoch, int(index)])

    def case_index(self, index: int) -> int:
        """Index into ``data`` of the case drawn for sample ``index`` of the current epoch."""
        return int(self._rng(index).integers(len(self.data)))

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < len(self):
            raise IndexError(f"PatchDataset index {index} out of range 0..{len(self) - 1}")
        rng = self._rng(index)
        item = dict(self.data[int(rng.integers(len(self.data)))])
        item[self.force_fg_key] = self.force_fg(index)
        if self.transform is None:
            return item
        if hasattr(self.transform, "set_random_state"):
            self.transform.set_random_state(seed=int(rng.integers(2**31 - 1)))
        from monai.transforms import apply_transform

        return apply_transform(self.transform, item)
