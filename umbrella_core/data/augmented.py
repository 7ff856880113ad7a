"""The training dataset with augmentation drawn per sample (since 0.3).

Which augmentation a sample gets is a function of ``(run seed, epoch, its
position in the epoch's order)`` alone (I5): the interleaved sampler hands
each index on with its epoch and position (``InterleavedSampler(draws=True)``),
so the same run gives the same augmented batches with 0 or 4 DataLoader
workers, on 1 or 2 ranks (the global order is the same, each rank takes its
positions of it), and after ``--resume`` (the skipped batches are the same
positions). The position, not the sample's index, seeds it: a sample drawn
twice in an epoch (a small, up-weighted study) is augmented twice, differently.

Only the training dataset is wrapped: validation, test and ``umbrella
evaluate`` read the images as they are.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

from torch.utils.data import ConcatDataset

from umbrella_core.augmentation import Pipeline
from umbrella_core.augmentation.laterality import effective_laterality, swapped

__all__ = ["AugmentedDataset", "log_augmented_slices"]


class AugmentedDataset(ConcatDataset):
    """A ``ConcatDataset`` of :class:`~umbrella_core.data.dataset.RecordDataset` whose
    items' images are augmented by their modality's :class:`Pipeline`.

    An item is asked for by ``(index, epoch, position)`` (what the sampler
    yields with ``draws=True``) or by a plain index (epoch 0, position = index).
    A record whose laterality is ``swap`` gets left and right swapped in its
    turns when its images came out mirrored; the steps its ``forbid_augment``
    names are skipped for its images.
    """

    #: Tells the trainer to make its sampler yield draws (index, epoch, position).
    wants_draws = True
    #: The parts: RecordDatasets (ConcatDataset types them as bare Datasets).
    datasets: list[Any]

    def __init__(
        self,
        datasets: Sequence[Any],
        pipelines: Mapping[str, Pipeline],
        *,
        seed: int,
        laterality: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(list(datasets))
        self.pipelines = dict(pipelines)
        self.seed = int(seed)
        self.laterality = dict(laterality or {})

    def locate(self, index: int) -> tuple[Any, int]:
        """The dataset holding global ``index`` and the index within it."""
        which = bisect.bisect_right(self.cumulative_sizes, index)
        return self.datasets[which], index - (self.cumulative_sizes[which - 1] if which else 0)

    def __getitem__(self, draw: Any) -> dict[str, Any]:
        if isinstance(draw, (tuple, list)):
            index, epoch, position = (int(v) for v in draw)
        else:
            index, epoch, position = int(draw), 0, int(draw)
        dataset, local = self.locate(index)
        item = dataset[local]
        record = dataset.record(dataset.items[local][0])
        images, mirrored = [], False
        for slot, (modality, image) in enumerate(item["images"]):
            pipeline = self.pipelines.get(modality)
            if pipeline is not None:
                image, flipped = pipeline.apply(
                    image, (self.seed, epoch, position, slot), record.forbid_augment
                )
                mirrored |= flipped
            images.append((modality, image))
        item["images"] = images
        if mirrored and effective_laterality(record, self.laterality) == "swap":
            encoded = dataset.encode(swapped(record))
            item["input_ids"], item["labels"] = encoded.input_ids, encoded.labels
        return item


def log_augmented_slices(writer: Any, dataset: AugmentedDataset, samples: int = 4) -> list[str]:
    """Mid-slices of a few training images, as read and augmented, in TensorBoard's images.

    Per augmented modality, tag ``augment/<modality>``: ``samples`` images,
    each the axial mid-slice of its first channel (first frame of a series),
    as read on the left and augmented on the right, scaled together to [0, 1].
    Returns the tags written.
    """
    import torch

    tags = []
    for modality, pipeline in dataset.pipelines.items():
        rows: list[torch.Tensor] = []
        start = 0
        for part in dataset.datasets:
            # A RecordDataset holds one modality key: a part without the modality is
            # passed over without reading any of its images.
            if modality not in part.record(part.items[0][0]).modalities:
                start += len(part)
                continue
            for local in range(min(len(part), samples - len(rows))):
                item = part[local]
                forbid = part.record(part.items[local][0]).forbid_augment
                for slot, (name, image) in enumerate(item["images"]):
                    if name == modality:
                        draw = start + local
                        augmented, _ = pipeline.apply(image, (dataset.seed, 0, draw, slot), forbid)
                        pair = torch.cat([_plane(image), _plane(augmented)], dim=1)
                        low, high = pair.min(), pair.max()
                        rows.append((pair - low) / (high - low) if high > low else pair * 0)
                        break
            start += len(part)
        if rows:
            tag = f"augment/{modality}"
            writer.add_images(tag, torch.stack(rows)[:, None], 0, dataformats="NCHW")
            tags.append(tag)
    return tags


def _plane(image: Any) -> Any:
    """The axial (z) mid-slice of channel 0 and first frame: anterior up, x to the right."""
    volume = image[0]
    while volume.dim() > 3:
        volume = volume[..., 0]
    return volume[:, :, volume.shape[2] // 2].T.flip(0)
