"""A term of the loss (``umbrella_loss_terms``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from umbrella_core.types._convert import lowered


@attrs.frozen(kw_only=True)
class LossTerm:
    """A term added to the unified next-token loss.

    ``compute(outputs, batch)`` returns a scalar tensor; ``outputs`` is the
    model's :class:`umbrella_core.model.umbrella.UmbrellaOutput` (the NLL,
    ``token_loss`` per position, image features per modality) and ``batch``
    the collated batch (a :class:`umbrella_core.types.Batch`, every key present:
    ``input_ids``, ``labels``, ``pixel_values``, ``image_places``, ...). The
    term is multiplied by ``weight`` and logged under ``loss/<name>``.

    Training computes logits only where labels are learned (full-vocabulary
    logits at every position cost ~1 GB per 1,000-token sample with a
    262k-token vocabulary): ``outputs.logits`` is None unless a term sets
    ``needs_logits``, which makes every training forward compute and keep them.
    """

    name: str = attrs.field(converter=lowered)
    compute: Callable[..., Any] = attrs.field(eq=False, repr=False)
    weight: float = attrs.field(default=1.0, converter=float)
    needs_logits: bool = attrs.field(default=False, converter=bool)
