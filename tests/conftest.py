from __future__ import annotations

import pytest

from umbrella_core.testing import ToyModalityPlugin, fresh_plugin_manager, toy_modality


@pytest.fixture
def toy_specs():
    """Two 3D toy modalities of identical shape: only their name tells them apart."""
    return (
        toy_modality("t1", channels=1, aliases=("t1w",)),
        toy_modality("dmri", channels=1, aliases=("dwi",)),
    )


@pytest.fixture
def toy_pm(toy_specs):
    return fresh_plugin_manager(ToyModalityPlugin(*toy_specs))
