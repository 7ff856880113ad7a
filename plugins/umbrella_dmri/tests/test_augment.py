"""RandFAScale, the plugin's own augmentation, on maps fitted from dipy's real DWI crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from umbrella_dmri.plugin import DMRI
from umbrella_dmri.preprocess import FA_CENTRE, FA_SCALE

from umbrella_core.augmentation import build_pipelines
from umbrella_core.testing import fresh_plugin_manager

pytest.importorskip("dipy")


@pytest.fixture(scope="module")
def maps(tmp_path_factory) -> torch.Tensor:
    """FA and MD of dipy's real 64-direction crop, as the loader gives them (32^3)."""
    from dipy.data import get_fnames

    image, bval, bvec = (str(p) for p in get_fnames(name="small_64D"))
    folder = Path(tmp_path_factory.mktemp("dwi"))
    for source, name in ((image, "dwi.nii.gz"), (bval, "dwi.bval"), (bvec, "dwi.bvec")):
        (folder / name).write_bytes(Path(source).read_bytes())
    spec = DMRI.with_geometry((32, 32, 32), (16, 16, 16))
    return torch.from_numpy(np.asarray(spec.load(spec, (str(folder / "dwi.nii.gz"),))))


def _fa_scale(**arguments):
    from umbrella_dmri import plugin

    pm = fresh_plugin_manager(plugin)
    spec = DMRI.with_geometry((32, 32, 32), (16, 16, 16))
    offered = pm.augmentations()
    steps = [{"name": "RandFAScale", "prob": 1.0, **arguments}]
    return build_pipelines({"dmri": steps}, {"dmri": spec}, offered)["dmri"]


def test_fa_is_scaled_on_its_own_scale_and_md_and_background_are_kept(maps):
    pipeline = _fa_scale(factors=0.2)
    out, mirrored = pipeline.apply(maps, (0, 0, 0, 0))
    assert not mirrored
    brain = (maps != 0).any(dim=0)
    assert torch.equal(out[1], maps[1])  # MD is z-scored per image: left alone
    assert torch.equal(out[:, ~brain], maps[:, ~brain])  # background stays 0
    fa, fa_out = maps[0][brain] * FA_SCALE + FA_CENTRE, out[0][brain] * FA_SCALE + FA_CENTRE
    assert float(fa_out.min()) >= -1e-6 and float(fa_out.max()) <= 1 + 1e-6
    inside = (fa > 0.05) & (fa_out < 0.999)  # clipped voxels aside, one factor for all
    ratios = fa_out[inside] / fa[inside]
    assert float(ratios.std()) < 1e-4 and 0.8 <= float(ratios.mean()) <= 1.2
    assert abs(float(ratios.mean()) - 1) > 1e-3
    # Its seed decides the factor: the same again, another seed another.
    assert torch.equal(pipeline.apply(maps, (0, 0, 0, 0))[0], out)
    assert not torch.equal(pipeline.apply(maps, (0, 0, 1, 0))[0], out)


def test_bad_factors_are_a_config_error_naming_the_key(maps):
    from umbrella_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.augment.dmri\[0\]: RandFAScale: ValueError"):
        _fa_scale(factors=1.5)
