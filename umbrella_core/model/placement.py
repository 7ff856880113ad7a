"""Where each image's features go: a batch's placement record checked against its placeholders.

A collated batch records, per modality, each image's ``(row, ordinal)``: the
ordinal-th image of that row (:class:`umbrella_core.types.Batch`,
``image_places``). :func:`placement` checks that record against the rows'
placeholder tokens (every image of a row present once, each image's tokens
one unbroken run of placeholders, the counts agreeing) and gives the order in
which the model scatters the features; a disagreement is a
:class:`~umbrella_core.errors.TokenCountError`, never a misplaced image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from umbrella_core.errors import TokenCountError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ordered_features", "placement", "places_in_order", "runs"]


def ordered_features(
    mask: torch.Tensor,
    features: Mapping[str, torch.Tensor],
    image_modalities: Sequence[str] | None,
    image_places: Mapping[str, Sequence[tuple[int, int]]] | None,
) -> torch.Tensor:
    """Every image's feature tokens, one after another in the order of the placeholders.

    ``mask`` marks the placeholder tokens of the batch; ``features[m][j]`` are
    the tokens of the j-th image of modality ``m``, placed at
    ``image_places[m][j]``. The result fills the placeholders row by row,
    ordinal by ordinal: the order ``masked_scatter`` writes them in. Without a
    record, the placement is derived from ``image_modalities``
    (:func:`places_in_order`).
    """
    import torch

    # Placeholder columns per row (one device sync).
    columns: list[list[int]] = [[] for _ in range(mask.shape[0])]
    for row, column in mask.nonzero().tolist():
        columns[row].append(column)
    if image_places is None:
        image_places = places_in_order(image_modalities or (), features, columns)
    order = placement(image_places, features, columns)
    placed = [m for row in order for m, _ in row]
    if image_modalities is not None and list(image_modalities) != placed:
        raise TokenCountError(
            f"the batch lists its images' modalities as {list(image_modalities)} in "
            f"placeholder order, but its placement record puts {placed} there"
        )
    return torch.cat([features[m][j] for row in order for m, j in row], dim=0)


def places_in_order(
    image_modalities: Sequence[str],
    features: Mapping[str, torch.Tensor],
    columns: Sequence[Sequence[int]],
) -> dict[str, list[tuple[int, int]]]:
    """The placement of images stacked per modality in placeholder order (no record given):
    rows filled in turn, each image taking its modality's token count."""
    places: dict[str, list[tuple[int, int]]] = {m: [] for m in features}
    rows = [row for row, cols in enumerate(columns) if cols]
    row_index, used, ordinal = 0, 0, 0
    for modality in image_modalities:
        if modality not in features or len(places[modality]) >= features[modality].shape[0]:
            raise TokenCountError(f"image of modality {modality!r} has no features in this batch")
        if row_index >= len(rows):
            raise TokenCountError("the batch has more images than image placeholders")
        places[modality].append((rows[row_index], ordinal))
        used += features[modality].shape[1]
        ordinal += 1
        if used >= len(columns[rows[row_index]]):
            row_index, used, ordinal = row_index + 1, 0, 0
    return places


def placement(
    image_places: Mapping[str, Sequence[tuple[int, int]]],
    features: Mapping[str, torch.Tensor],
    columns: Sequence[Sequence[int]],
) -> list[list[tuple[str, int]]]:
    """Per row, ``(modality, index in features[modality])`` of its images in ordinal order.

    Raises:
        TokenCountError: The record disagrees with the features or the placeholders.
    """
    rows: list[dict[int, tuple[str, int]]] = [{} for _ in columns]
    for modality in sorted({*features, *image_places}):
        places = list(image_places.get(modality, ()))
        count = features[modality].shape[0] if modality in features else 0
        if len(places) != count:
            raise TokenCountError(
                f"the batch has {count} {modality} image(s) but places {len(places)}"
            )
        for index, (row, ordinal) in enumerate(places):
            row, ordinal = int(row), int(ordinal)
            if not 0 <= row < len(rows):
                raise TokenCountError(
                    f"{modality} image {index} is placed in row {row}; the batch has {len(rows)}"
                )
            if ordinal in rows[row]:
                other = rows[row][ordinal][0]
                raise TokenCountError(
                    f"row {row}: image {ordinal} is placed twice ({other} and {modality})"
                )
            rows[row][ordinal] = (modality, index)
    order = []
    for row, placed in enumerate(rows):
        if sorted(placed) != list(range(len(placed))):
            raise TokenCountError(
                f"row {row}: images are placed at ordinals {sorted(placed)}, not 0 to "
                f"{len(placed) - 1}"
            )
        cols = columns[row]
        start = 0
        for ordinal in range(len(placed)):
            modality, _ = placed[ordinal]
            n = features[modality].shape[1]
            span = cols[start : start + n]
            # A span that is short or broken straddles the end of this image's
            # placeholder run: the record puts another modality's image here.
            if len(span) != n or span[-1] - span[0] != n - 1:
                raise TokenCountError(
                    f"row {row}: image {ordinal} ({modality}, {n} tokens) does not fit its "
                    f"placeholder run; the row's image placeholders are "
                    f"{runs(cols)} tokens long"
                )
            start += n
        if start != len(cols):
            raise TokenCountError(
                f"row {row} has {len(cols)} image placeholder tokens but its images give {start}"
            )
        order.append([placed[ordinal] for ordinal in range(len(placed))])
    return order


def runs(columns: Sequence[int]) -> list[int]:
    """Lengths of the unbroken runs in sorted ``columns``."""
    runs: list[int] = []
    for i, column in enumerate(columns):
        if i and column == columns[i - 1] + 1:
            runs[-1] += 1
        else:
            runs.append(1)
    return runs
