"""Weighted, deterministic interleaving of per-(study, modality) datasets (I5).

The order of an epoch is a pure function of ``(seed, epoch)``. Each source gets
its share of the epoch's draws exactly (largest-remainder rounding of
``length * weight``), the shares are shuffled together, and each source's draws
walk a fresh permutation of it (a source that runs out starts another). With
the default weights (proportional to size) an epoch is therefore a permutation
of all samples.

Ranks and workers: every rank computes the same global order, and the sampler
cuts it into global batches of ``batch_size * world_size`` samples; rank ``r``
takes the ``r``-th per-device batch of each (the split accelerate, and so the
transformers Trainer, makes of a sampler's batches). The epoch is trimmed to
whole global batches, so no rank wraps around to samples another rank already
drew. DataLoader workers only receive indices from the sampler in the main
process, and nothing random lives in a Dataset, so workers cannot duplicate
draws either. Resuming mid-epoch is skipping the first ``k`` batches of the
same order, which the Trainer does from its saved step.

The batchings only rearrange an epoch's draws into global batches, so each of
them keeps all of the above: ``modality`` makes each global batch hold one
modality key; ``length`` also sorts each key's draws by length within windows
of many global batches before cutting them, so a batch pads little (see
:meth:`Interleaving.length_order`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["Interleaving", "InterleavedSampler", "size_weights", "BATCHING"]

#: ``mixed``: any modality in any batch; ``modality``: every global batch (one
#: optimizer step on all ranks) holds one modality key, as LLaVA's
#: group-by-modality; ``length`` (since 0.3): one modality key and similar
#: lengths, as transformers' ``group_by_length`` within each key.
BATCHING = ("mixed", "modality", "length")

#: Global batches per window of ``length`` batching: a window's draws are sorted
#: by length, so the larger it is the less a batch pads, and the fewer the
#: different neighbours a sample can have (transformers' LengthGroupedSampler
#: sorts 50 batches at a time too).
LENGTH_WINDOW = 50


def size_weights(sizes: Sequence[int], temperature: float = 1.0) -> list[float]:
    """Weights proportional to ``size ** (1 / temperature)``.

    Temperature 1 samples in proportion to size (every sample once an epoch);
    larger temperatures flatten the mixture towards uniform over sources, so a
    small cohort is not drowned by a large one (as in multilingual models'
    temperature sampling).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return [float(s) ** (1.0 / float(temperature)) for s in sizes]


class Interleaving:
    """Concatenate sources and describe how to mix them.

    Args:
        sizes: Number of samples of each source.
        weights: Relative weight of each source (normalised); default: proportional to size.
        keys: The modality key of each source (``t1``, ``t1+dmri``), for
            modality-homogeneous batches; default: every source its own key.
        lengths: Each sample's length in tokens, sources concatenated (as the
            global indices run), for ``length`` batching (since 0.3).
        batching: How a sampler of it batches samples by default: ``mixed``,
            ``modality`` or ``length`` (:data:`BATCHING`; since 0.6).

    :meth:`of_datasets` builds one from a run's training sets, with what its
    batching needs.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        keys: Sequence[str] | None = None,
        lengths: Sequence[int] | np.ndarray | None = None,
        batching: str = "mixed",
    ) -> None:
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
        self.keys = (
            [str(k) for k in keys] if keys is not None else [str(i) for i in range(len(sizes))]
        )
        if len(self.keys) != len(self.sizes):
            raise ValueError(f"need {len(self.sizes)} keys, got {len(self.keys)}")
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        if self.lengths is not None and self.lengths.shape != (self.total,):
            raise ValueError(f"need {self.total} lengths, got {len(self.lengths)}")
        _check_batching(batching, self)
        self.batching = batching

    @classmethod
    def of_datasets(
        cls,
        datasets: Sequence[Any],
        weights: Sequence[float],
        batching: str = "mixed",
        log: Callable[[str], None] | None = None,
    ) -> Interleaving:
        """The interleaving of a run's training sets (each with ``key`` and ``lengths``).

        Counts the samples' lengths only where ``batching`` is ``length``, and
        then before the records are packed (counting packed ones decodes each),
        saying how long it took through ``log``.
        """
        lengths = None
        if batching == "length":
            started = time.perf_counter()
            lengths = np.concatenate([ds.lengths for ds in datasets])
            if log is not None:
                log(
                    f"length batching: {len(lengths)} samples, {int(np.median(lengths))} tokens "
                    f"(median), {int(lengths.max())} the longest; counted in "
                    f"{time.perf_counter() - started:.1f} s"
                )
        return cls(
            [len(ds) for ds in datasets],
            weights,
            keys=[ds.key for ds in datasets],
            lengths=lengths,
            batching=batching,
        )

    @property
    def total(self) -> int:
        return int(sum(self.sizes))

    def epoch_order(self, seed: int, epoch: int, length: int | None = None) -> np.ndarray:
        """Global indices of one epoch (default length: the total number of samples)."""
        length = int(self.total if length is None else length)
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

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        """The source of each global index."""
        return np.searchsorted(self.offsets, indices, side="right") - 1

    def grouped_order(
        self, seed: int, epoch: int, block: int, length: int | None = None
    ) -> np.ndarray:
        """:meth:`epoch_order` rearranged into blocks of ``block`` samples of one key each.

        The draws are the same as the mixed order's (weights, no repeats);
        only their arrangement changes: each key's draws are cut into whole
        blocks, in the order they were drawn, and the blocks are shuffled. A
        key's last, partial block cannot be homogeneous without repeating or
        dropping samples: those leftovers are pooled into mixed blocks at the
        end of the epoch (at most one per key).
        """
        if block <= 0:
            raise ValueError(f"block must be positive, got {block}")
        order = self.epoch_order(seed, epoch, length)
        blocks: list[np.ndarray] = []
        leftovers: list[np.ndarray] = []
        for mine in self._draws_by_key(order):
            whole = len(mine) // block * block
            blocks.extend(mine[i : i + block] for i in range(0, whole, block))
            if whole < len(mine):
                leftovers.append(mine[whole:])
        rng = np.random.default_rng([seed, epoch, 1])
        shuffled = [blocks[i] for i in rng.permutation(len(blocks))]
        return np.concatenate(shuffled + leftovers) if shuffled or leftovers else order

    def _draws_by_key(self, order: np.ndarray) -> list[np.ndarray]:
        """``order``'s draws of each key (in first-seen key order), each in drawn order."""
        key_of_source = np.asarray(self.keys)[self.source_of(order)]
        return [order[key_of_source == key] for key in dict.fromkeys(self.keys)]

    def length_order(
        self,
        seed: int,
        epoch: int,
        block: int,
        length: int | None = None,
        window: int = LENGTH_WINDOW,
    ) -> np.ndarray:
        """:meth:`grouped_order` with each block's samples of similar length.

        The draws are the mixed order's. Each key's draws are cut, as in
        :meth:`grouped_order`, into whole blocks and a leftover (fewer than
        ``block``, taken in drawn order so that which samples are left over
        does not depend on their length). The whole blocks' samples are taken
        ``window`` blocks at a time, in drawn order; each window is sorted by
        length (longest first, equal lengths in drawn order) and cut into
        blocks again, so a block, and each per-device batch within it, holds
        neighbours in length. All blocks are shuffled. The keys' leftovers are
        pooled at the end, shuffled and cut into blocks, each sorted by length:
        the last one, partial, is what the sampler trims.
        """
        lengths = self.lengths
        if lengths is None:
            raise ValueError("length batching needs the samples' lengths (Interleaving(lengths=))")
        if block <= 0 or window <= 0:
            raise ValueError(f"block and window must be positive, got {block} and {window}")
        order = self.epoch_order(seed, epoch, length)
        blocks: list[np.ndarray] = []
        leftovers: list[np.ndarray] = []
        for mine in self._draws_by_key(order):
            whole = len(mine) // block * block
            for start in range(0, whole, block * window):
                part = _longest_first(mine[start : min(start + block * window, whole)], lengths)
                blocks.extend(part[i : i + block] for i in range(0, len(part), block))
            leftovers.append(mine[whole:])
        rng = np.random.default_rng([seed, epoch, 1])
        shuffled = [blocks[i] for i in rng.permutation(len(blocks))]
        pool = np.concatenate(leftovers)
        pool = pool[rng.permutation(len(pool))]
        pooled = [_longest_first(pool[i : i + block], lengths) for i in range(0, len(pool), block)]
        return np.concatenate(shuffled + pooled) if shuffled or pooled else order


def _longest_first(indices: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``indices`` by decreasing length; equal lengths keep their order (the drawn one)."""
    return indices[np.argsort(-lengths[indices], kind="stable")]


class InterleavedSampler:
    """A torch Sampler of the global order of an epoch; ``set_epoch`` moves it on.

    Args:
        interleaving: The sources and their weights.
        seed: Seeds every epoch's order (with the epoch number).
        length: Draws per epoch before trimming (default: all samples).
        global_batch: Samples per optimizer step over all ranks
            (``per_device_batch * world_size * gradient_accumulation``). The
            epoch is trimmed to a multiple of it (so no rank wraps around) and,
            with ``batching="modality"`` or ``"length"``, each global batch holds one key.
        batching: ``mixed``, ``modality`` or ``length`` (see :data:`BATCHING`;
            ``length`` needs the interleaving's ``lengths``); default: the
            interleaving's.
        draws: Yield ``(index, epoch, position)`` instead of the index: what
            seeds a sample's augmentation (:mod:`umbrella_core.data.augmented`;
            since 0.3).
    """

    def __init__(
        self,
        interleaving: Interleaving,
        seed: int = 0,
        length: int | None = None,
        *,
        global_batch: int = 1,
        batching: str | None = None,
        draws: bool = False,
    ) -> None:
        batching = interleaving.batching if batching is None else batching
        _check_batching(batching, interleaving)
        self.interleaving = interleaving
        self.seed = int(seed)
        self.length = length
        self.global_batch = max(1, int(global_batch))
        self.batching = batching
        self.draws = bool(draws)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The indices of an epoch (the current one by default), trimmed to whole global batches."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self.batching == "modality":
            full = self.interleaving.grouped_order(self.seed, epoch, self.global_batch, self.length)
        elif self.batching == "length":
            full = self.interleaving.length_order(self.seed, epoch, self.global_batch, self.length)
        else:
            full = self.interleaving.epoch_order(self.seed, epoch, self.length)
        return full[: len(self)]

    def __iter__(self) -> Iterator[Any]:
        order = self.order().tolist()
        if self.draws:
            epoch = self.epoch
            return ((index, epoch, position) for position, index in enumerate(order))
        return iter(order)

    def __len__(self) -> int:
        total = int(self.length if self.length is not None else self.interleaving.total)
        trimmed = total // self.global_batch * self.global_batch
        # Fewer samples than one global batch: keep them (a tiny study still trains).
        return trimmed or total


def _check_batching(batching: str, interleaving: Interleaving) -> None:
    if batching not in BATCHING:
        raise ValueError(f"batching must be one of {', '.join(BATCHING)}, got {batching!r}")
    if batching == "length" and interleaving.lengths is None:
        raise ValueError("batching 'length' needs the samples' lengths (Interleaving(lengths=))")
