"""What the collator gives the model: :class:`Batch`, one typed mapping.

Why a ``TypedDict`` and not an attrs class: a batch goes where transformers
and PyTorch take it, and they take mappings. ``Trainer._prepare_inputs``
(transformers 5) moves a batch to the device by recursing into ``Mapping``,
``list`` and ``tuple`` (rebuilding each with ``type(data)(...)``), accelerate's
``send_to_device`` and the DataLoader's ``pin_memory`` do the same, and the
Trainer calls ``model(**inputs)``. An attrs instance is none of these: its
tensors would stay on the CPU and ``**`` would refuse it. A ``TypedDict`` is a
plain ``dict`` at run time, so all of that keeps working, while mypy and
readers get each key's type here, in one place. (A ``dict`` subclass would
work too, but types no key and must survive every ``type(data)(...)``.)

Its keys are the arguments of the model's ``forward`` (``model(**batch)``), which
hands the loss terms the same ``Batch``.

The module imports neither torch (until :func:`batch_to` runs) nor anything
of the core: ``import umbrella_core`` exports :class:`Batch`. It is what loss
terms (``umbrella_loss_terms``) get beside the model's outputs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

__all__ = ["Batch", "batch_to"]


class Batch(TypedDict):
    """One batch, as :class:`~umbrella_core.data.collate.UmbrellaCollator` makes it.

    ``B`` rows, ``L`` tokens each (padded); image ``i`` of a row is the
    ``i``-th image placeholder run of that row (its *ordinal*), and expands to
    exactly its modality's token count (I3).

    Attributes:
        input_ids: ``(B, L)`` long, the token ids with image placeholders.
        attention_mask: ``(B, L)`` long, 1 on tokens, 0 on padding.
        labels: ``(B, L)`` long, ``IGNORE_INDEX`` where nothing is learned
            (everywhere for prompts to generate from).
        pixel_values: Per modality present, its images stacked ``(n, C, *shape)``;
            keys in the run's canonical modality order (I2: dispatch by name).
        image_places: Per modality, where each image of ``pixel_values[m]`` goes:
            entry ``j`` is ``(row, ordinal)`` of ``pixel_values[m][j]``. The
            model places each image by this record, not by the order images
            were stacked in, and refuses a record that disagrees with the
            placeholders (:meth:`UmbrellaModel.splice`).
        image_modalities: Each image's modality in placeholder order over the
            batch (row by row, ordinal by ordinal), for loss terms and checks.
        sample_keys: Per row, the sample's modality key (``t1``, ``t1+dmri``),
            for per-modality losses.
        sample_sources: Per row, where the sample's record was read
            (``manifest.jsonl:12``), or None: what a report of a non-finite
            loss names.
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    pixel_values: dict[str, Tensor]
    image_places: dict[str, list[tuple[int, int]]]
    image_modalities: list[str]
    sample_keys: list[str]
    sample_sources: list[str | None]


def batch_to(batch: Batch, device: Any) -> Batch:
    """``batch`` with its tensors on ``device`` (the rest as it is)."""
    import torch

    def move(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to(device)
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return move(batch)
