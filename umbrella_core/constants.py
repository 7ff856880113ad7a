"""Constants that several parts of the core share.

They live here, apart from the modules that use them, so that ``model/``
needs nothing from ``data/`` (and the reverse) to agree on them. The module
imports nothing.
"""

from __future__ import annotations

__all__ = ["CHECKS_VERSION", "CORE_VERSION", "IGNORE_INDEX", "IMAGING_VERSION"]

#: umbrella-core's version (``umbrella_core.__version__``; pyproject.toml says the
#: same, tests/test_versions.py checks).
CORE_VERSION = "0.6.0"

#: The label of a token that is not learned (the prompt, padding, image
#: placeholders): PyTorch's ``cross_entropy`` default ``ignore_index``, which
#: transformers' Trainer counts learned tokens against too.
IGNORE_INDEX = -100

#: The version of what ``umbrella_core.imaging`` makes of a file: the headers it
#: reads, the arrays it loads, reorients, resamples and normalises. The
#: preprocessed cache and the header index key on it beside each modality
#: plugin's version, so any change to those outputs raises it
#: (tests/test_versions.py checks that the code and this number move together).
IMAGING_VERSION = 2

#: The version of the core's rules for an image (``umbrella_core/data/checks.py``:
#: what a header or a decoded image is refused for). The header index keys its
#: outcomes on it, so a tightened rule is applied to every image again instead of
#: serving the outcome of the old one (tests/test_versions.py ties it to the code).
CHECKS_VERSION = 1
