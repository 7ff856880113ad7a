"""``data.cache_dtype: float16``: half-size cache entries, read back as float32."""

from __future__ import annotations

import os
import shutil

import attrs
import numpy as np
import pytest
from nibabel.testing import data_path

from umbrella_core.config import DataConfig, load_config
from umbrella_core.data.cache import PreprocessedCache
from umbrella_core.data.cache_build import build_cache, verify_cache
from umbrella_core.data.dataset import load_image
from umbrella_core.errors import ConfigError
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.testing import toy_modality

#: float16 keeps 11 significant bits: rounding moves a value by at most half a
#: unit in its last place; below float16's smallest normal, by half a subnormal step.
RELATIVE = 2.0**-11
ABSOLUTE = 2.0**-25


def _within_half_precision(half: np.ndarray, full: np.ndarray) -> None:
    assert half.dtype == np.float32 and half.shape == full.shape
    error = np.abs(half.astype(np.float64) - full.astype(np.float64))
    bound = RELATIVE * np.abs(full.astype(np.float64)) + ABSOLUTE
    assert (error <= bound).all(), f"largest excess {np.max(error - bound)}"


@pytest.fixture(scope="module")
def t1():
    spec = get_plugin_manager().resolve_modality("t1").item
    return spec.with_geometry((32, 32, 32), (16, 16, 16))


@pytest.fixture
def anatomical(tmp_path):
    """nibabel's real T1 (anatomical.nii), copied so that its stat is the test's own."""
    return (shutil.copy(os.path.join(data_path, "anatomical.nii"), str(tmp_path / "T1w.nii")),)


@pytest.fixture
def bold(tmp_path):
    """nibabel's real 20-frame BOLD series (functional.nii)."""
    return (shutil.copy(os.path.join(data_path, "functional.nii"), str(tmp_path / "bold.nii")),)


@pytest.fixture(scope="module")
def fmri():
    spec = get_plugin_manager().resolve_modality("fmri").item
    return attrs.evolve(
        spec.with_geometry((16, 16, 16, 8), (8, 8, 8, 4)),
        windows=attrs.evolve(spec.windows, stride=4),
    )


@pytest.mark.usefixtures("umbrella_cache")  # windows read without a cache keep statistics there
def test_float16_reads_equal_a_fresh_load_to_half_precision(tmp_path, t1, anatomical, fmri, bold):
    fresh = load_image(t1, anatomical).numpy()
    assert np.ptp(fresh) > 1.0  # a real image: truncation or a wrong scale would show
    half = PreprocessedCache(tmp_path / "c", {}, dtype="float16")
    first = load_image(t1, anatomical, cache=half)  # a miss: preprocessed and stored
    again = PreprocessedCache(tmp_path / "c", {}, dtype="float16")  # as another process would
    second = load_image(t1, anatomical, cache=again)
    assert again.stats.hits == 1 and str(second.dtype) == "torch.float32"
    _within_half_precision(second.numpy(), fresh)
    assert not np.array_equal(second.numpy(), fresh)  # it was rounded ...
    # ... and the miss gave the stored values, so a run does not depend on when the cache filled.
    np.testing.assert_array_equal(first.numpy(), second.numpy())
    assert np.load(half.entry(t1, anatomical), mmap_mode="r").dtype == np.float16

    windows = fmri.window_count(20)
    assert windows == 4
    for i in range(windows):
        direct = load_image(fmri, bold, window=i).numpy()
        cached = load_image(fmri, bold, cache=again, window=i).numpy()
        _within_half_precision(cached, direct)
    assert np.load(again.window_entry(fmri, bold), mmap_mode="r").dtype == np.float16


def test_float16_entry_is_half_the_size_and_the_two_dtypes_share_nothing(tmp_path, t1, anatomical):
    full = PreprocessedCache(tmp_path / "c", {"t1": "1"})
    half = PreprocessedCache(tmp_path / "c", {"t1": "1"}, dtype="float16")
    assert half.entry(t1, anatomical) != full.entry(t1, anatomical)
    full.load(t1, anatomical)
    half.load(t1, anatomical)  # the float32 entry is there, but not the float16 run's
    assert (full.stats.misses, half.stats.misses) == (1, 1)
    for cache in (PreprocessedCache(tmp_path / "c", {"t1": "1"}), half):
        cache.load(t1, anatomical)
    assert half.stats.hits == 1
    sizes = [os.path.getsize(c.entry(t1, anatomical)) for c in (full, half)]
    assert 0.49 < sizes[1] / sizes[0] < 0.51  # 32³ values, same header and trailer
    assert PreprocessedCache(tmp_path / "c", {}).info() == {
        "t1": {"entries": 2, "bytes": sum(sizes)}
    }
    # A whole-folder verify of a folder shared by both kinds finds nothing wrong.
    assert verify_cache(PreprocessedCache(tmp_path / "c", {}), dry_run=True).corrupt == []


def test_cache_dtype_setting(tmp_path):
    assert DataConfig().cache_dtype == "float32"
    assert load_config(None, ["data.cache_dtype=float16"]).data.cache_dtype == "float16"
    with pytest.raises(ConfigError, match="data.cache_dtype: expected one of float32, float16"):
        load_config(None, ["data.cache_dtype=int8"])
    with pytest.raises(ConfigError, match="cache dtype"):
        PreprocessedCache(tmp_path, {}, dtype="bfloat16")


def test_values_beyond_float16_keep_a_float32_entry_with_a_warning(tmp_path, anatomical):
    big = np.linspace(-1.0, 1.0, 8**3, dtype=np.float32).reshape(1, 8, 8, 8)
    big[0, 0, 0, 0] = 1e5  # finite in float32, infinite in float16
    spec = attrs.evolve(toy_modality("toy"), load=lambda s, p: big.copy())
    messages: list[str] = []
    cache = PreprocessedCache(tmp_path / "c", {}, dtype="float16", log=messages.append)
    np.testing.assert_array_equal(cache.load(spec, anatomical), big)
    (message,) = messages
    assert anatomical[0] in message and "65504" in message and "kept in float32" in message
    assert np.load(cache.entry(spec, anatomical), mmap_mode="r").dtype == np.float32
    messages.clear()
    again = PreprocessedCache(tmp_path / "c", {}, dtype="float16", log=messages.append)
    np.testing.assert_array_equal(again.load(spec, anatomical), big)
    assert again.stats.hits == 1 and messages == []
    assert verify_cache(again, [(spec, anatomical)], dry_run=True).corrupt == []


def _flip(entry, at):
    """Change one stored value in place: header and checksum trailer left as they were."""
    stored = np.load(entry, mmap_mode="r")
    offset, itemsize = stored.offset, stored.itemsize
    assert stored.dtype == np.float16
    del stored
    with open(entry, "r+b") as handle:
        handle.seek(offset + at * itemsize)
        value = handle.read(2)
        handle.seek(offset + at * itemsize)
        handle.write(bytes([value[0] ^ 0x01, value[1]]))  # the last bit of one value


def test_verify_finds_a_corrupt_float16_entry_and_window(tmp_path, t1, anatomical, fmri, bold):
    cache = PreprocessedCache(tmp_path / "c", {}, dtype="float16")
    built = build_cache(cache, [(t1, anatomical), (fmri, bold)])
    assert (built.done, built.problems) == (2, [])
    assert verify_cache(cache, dry_run=True).corrupt == []
    image, series = cache.entry(t1, anatomical), cache.window_entry(fmri, bold)
    _flip(image, 1000)
    window = int(np.prod(fmri.input_shape))
    _flip(series, 2 * window + 5)
    found = verify_cache(cache, [(t1, anatomical), (fmri, bold)], dry_run=True).corrupt
    assert len(found) == 2
    assert found[0].startswith(f"{image}: checksum mismatch") and anatomical[0] in found[0]
    assert found[1].startswith(f"{series}: checksum mismatch in window 2") and bold[0] in found[1]
    # A read finds it too, and rebuilds it.
    messages: list[str] = []
    reader = PreprocessedCache(tmp_path / "c", {}, dtype="float16", log=messages.append)
    _within_half_precision(reader.load(t1, anatomical), load_image(t1, anatomical).numpy())
    assert reader.stats.rebuilt == 1 and str(image) in messages[0]
    assert verify_cache(reader, [(t1, anatomical)]).corrupt == []


def test_cache_build_takes_the_dtype_from_its_flag_or_the_runs_config(umbrella_cache, capsys):
    from umbrella_core.commands import main

    root = umbrella_cache / "preprocessed"
    run = ["--modalities", "dmri", "--set", "data.demo_subjects=1"]
    assert main(["cache", "build", *run, "--cache-dtype", "float16"]) == 0
    assert "images ready as float16" in capsys.readouterr().out
    (entry,) = PreprocessedCache(root, {}).entries()
    assert np.load(entry, mmap_mode="r").dtype == np.float16
    # The run's own setting: its float16 entries are there, so nothing is rebuilt.
    assert main(["cache", "verify", *run, "--set", "data.cache_dtype=float16"]) == 0
    assert "1 entries checked (0 not built yet), 0 corrupt" in capsys.readouterr().out
    assert main(["cache", "verify", *run]) == 0  # a float32 run has none yet
    assert "0 entries checked (1 not built yet)" in capsys.readouterr().out
