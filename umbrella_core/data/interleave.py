"""Weighted, deterministic interleaving of per-(study, modality) datasets.

The order of an epoch is a pure function of ``(seed, epoch)``. Each source gets
its share of the epoch's draws exactly (largest-remainder rounding of
``length * weight``), the shares are shuffled together, and each source's draws
walk a fresh permutation of it (a source that runs out starts another). With
the default weights (proportional to size) an epoch is therefore a permutation
of all samples. Nothing random lives in a Dataset, so DataLoader workers
cannot duplicate draws.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["Interleaving", "InterleavedSampler"]


class Interleaving:
    """Concatenate sources and describe how to mix them.

    Args:
        sizes: Number of samples of each source.
        weights: Relative weight of each source (normalised); default: proportional to size.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None) -> None:
        if not sizes or any(s <= 0 for s in sizes):
            raise ValueError(f"every source needs at least one sample, got sizes {list(sizes)}")
        self.sizes = [int(s) for s in sizes]
        w = np.asarray(weights if weights is not None else self.sizes, dtype=np.float64)
        if w.shape != (len(self.sizes),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"weights must be {len(self.sizes)} non-negative numbers, got {weights}"
            )
        self.weights = w / w.sum()
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)

    def epoch_order(self, seed: int, epoch: int, length: int | None = None) -> np.ndarray:
        """Global indices of one epoch (default length: the total number of samples)."""
        length = int(sum(self.sizes) if length is None else length)
        rng = np.random.default_rng([seed, epoch])
        exact = self.weights * length
        counts = np.floor(exact).astype(np.int64)
        remainder = length - int(counts.sum())
        if remainder:
            counts[np.argsort(-(exact - counts), kind="stable")[:remainder]] += 1
        choices = rng.permutation(np.repeat(np.arange(len(self.sizes)), counts))
        out = np.empty(length, dtype=np.int64)
        for source, size in enumerate(self.sizes):
            where = np.flatnonzero(choices == source)
            if not len(where):
                continue
            reps = -(-len(where) // size)
            perm = np.concatenate([rng.permutation(size) for _ in range(reps)])[: len(where)]
            out[where] = self.offsets[source] + perm
        return out


class InterleavedSampler:
    """A torch Sampler yielding :meth:`Interleaving.epoch_order`; ``set_epoch`` moves it on."""

    def __init__(
        self, interleaving: Interleaving, seed: int = 0, length: int | None = None
    ) -> None:
        self.interleaving = interleaving
        self.seed = int(seed)
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.interleaving.epoch_order(self.seed, self.epoch, self.length).tolist())

    def __len__(self) -> int:
        return int(self.length if self.length is not None else sum(self.interleaving.sizes))
