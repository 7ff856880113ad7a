"""Constants that several parts of the core share.

They live here, apart from the modules that use them, so that ``model/``
needs nothing from ``data/`` (and the reverse) to agree on them. The module
imports nothing.
"""

from __future__ import annotations

__all__ = ["IGNORE_INDEX"]

#: The label of a token that is not learned (the prompt, padding, image
#: placeholders): PyTorch's ``cross_entropy`` default ``ignore_index``, which
#: transformers' Trainer counts learned tokens against too.
IGNORE_INDEX = -100
