"""The plugin author's kit catches what the core would trip over, and passes a good plugin."""

from __future__ import annotations

from pathlib import Path

import attrs
import numpy as np
import pytest

from umbrella_core import StudyRecord, hookimpl
from umbrella_core.errors import DataError
from umbrella_core.testing import (
    ConformanceError,
    ToyModalityPlugin,
    check_loader,
    check_modality_plugin,
    check_patch_embedder,
    check_phantom_round_trip,
    check_records,
    check_registration,
    check_reports_bad_records,
    check_study_reader,
    toy_modality,
    write_phantom,
)
from umbrella_core.types import ImageRef, Turn

TOY = toy_modality("toy", aliases=("toy3d",))


def test_a_good_toy_plugin_passes(tmp_path):
    checked = check_modality_plugin(ToyModalityPlugin(TOY), tmp_path, light_import=False)
    assert checked == [TOY]


def test_the_pytest_plugin_fixtures_are_registered(
    umbrella_conformance, modality_conformance, umbrella_plugin_manager, umbrella_cache
):
    import os

    assert os.environ["UMBRELLA_CACHE"] == str(umbrella_cache) and umbrella_cache.is_dir()
    assert modality_conformance(TOY, ToyModalityPlugin(TOY)) == TOY
    # Built-ins only: no installed entry point (t1 is installed here) is loaded.
    assert umbrella_plugin_manager.modality_registry() == {}


def test_a_loader_that_skips_the_reorientation_to_ras_is_caught(tmp_path):
    """Reading the voxels in storage order swaps left and right for files stored LAS."""
    import nibabel as nib

    def storage_order(spec, paths):
        data = np.asarray(nib.load(paths[0]).get_fdata(), dtype=np.float32)[None]
        return data / (float(np.abs(data).max()) or 1.0)

    careless = attrs.evolve(TOY, load=storage_order)
    with pytest.raises(ConformanceError, match="does not reorient to RAS"):
        check_phantom_round_trip(careless, tmp_path)
    check_phantom_round_trip(TOY, tmp_path / "toy")  # load_nifti reorients: it passes


def test_a_loader_returning_float64_is_caught(tmp_path):
    spec = attrs.evolve(TOY, load=lambda s, p: TOY.load(TOY, p).astype(np.float64))
    paths = write_phantom(spec, tmp_path, "left")
    with pytest.raises(ConformanceError, match="dtype float64, expected float32"):
        check_loader(spec, paths)


def test_a_loader_of_the_wrong_shape_or_with_nan_is_caught(tmp_path):
    paths = write_phantom(TOY, tmp_path, "left")
    short = attrs.evolve(TOY, load=lambda s, p: TOY.load(TOY, p)[:, :4])
    with pytest.raises(ConformanceError, match=r"shape \(1, 4, 8, 8\), expected"):
        check_loader(short, paths)

    def nan(s, p):
        out = TOY.load(TOY, p)
        out[0, 0, 0, 0] = np.nan
        return out

    with pytest.raises(ConformanceError, match="NaN or Inf"):
        check_loader(attrs.evolve(TOY, load=nan), paths)


def test_a_nondeterministic_loader_is_caught(tmp_path):
    rng = np.random.default_rng(0)
    noisy = attrs.evolve(
        TOY, load=lambda s, p: TOY.load(TOY, p) + rng.normal(size=(1, 8, 8, 8)).astype(np.float32)
    )
    with pytest.raises(ConformanceError, match="not deterministic"):
        check_loader(noisy, write_phantom(TOY, tmp_path, "left"))


def test_a_phantom_that_ignores_its_label_is_caught(tmp_path):
    def same(spec, rng, label):
        return TOY.demo.phantom(spec, rng, "left")

    with pytest.raises(ConformanceError, match="label is not in the image"):
        same_toy = attrs.evolve(TOY, demo=attrs.evolve(TOY.demo, phantom=same))
        check_phantom_round_trip(same_toy, tmp_path)


def test_a_loader_that_loses_the_label_is_caught(tmp_path):
    # Mirroring half the samples (an affine ignored, say) puts their label on the wrong side.
    def flipped(spec, paths):
        out = TOY.load(TOY, paths)
        seed_one = Path(paths[0]).parent.name.endswith("-1")
        return np.ascontiguousarray(out[:, ::-1]) if seed_one else out

    with pytest.raises(ConformanceError, match="does not survive writing and loading") as caught:
        check_phantom_round_trip(attrs.evolve(TOY, load=flipped), tmp_path, seeds=(0, 1, 2))
    # The hint names the likelier cause first: a normalisation that clips a small lesion.
    assert "robust_normalise clips at the 99.5th percentile" in str(caught.value)


class _Greedy(ToyModalityPlugin):
    @hookimpl
    def umbrella_patch_embedder(self, spec, hidden_size):
        from umbrella_core.model.patch import PatchEmbedding

        return PatchEmbedding(spec.channels, spec.shape, spec.patch_size, hidden_size)


def test_an_embedder_for_every_name_is_caught():
    with pytest.raises(ConformanceError, match="dispatch by spec.name"):
        check_patch_embedder(_Greedy(TOY), TOY)


def test_an_embedder_with_the_wrong_token_count_is_caught():
    class Wrong(ToyModalityPlugin):
        @hookimpl
        def umbrella_patch_embedder(self, spec, hidden_size):
            from umbrella_core.model.patch import PatchEmbedding

            return PatchEmbedding(spec.channels, spec.shape, (2, 2, 2), hidden_size)

    with pytest.raises(ConformanceError, match=r"must give \(2, 8, 16\)"):
        check_patch_embedder(Wrong(TOY), TOY)


def test_bad_registration_is_caught():
    class Misspelt:
        @hookimpl
        def umbrella_modalites(self):
            return []

    with pytest.raises(ConformanceError, match="umbrella_modalites"):
        check_registration(Misspelt())
    clash = toy_modality("other", aliases=("toy",))
    with pytest.raises(ConformanceError, match="'toy' names both"):
        check_registration(ToyModalityPlugin(TOY, clash))
    spaced = toy_modality("my pet")
    with pytest.raises(ConformanceError, match="lower-case letters"):
        check_registration(ToyModalityPlugin(spaced))
    with pytest.raises(ConformanceError, match="no 'umbrella' entry point named 'nope'"):
        check_registration(ToyModalityPlugin(TOY), entry_point="nope")
    loose = attrs.evolve(TOY, file_patterns=("*",))
    with pytest.raises(ConformanceError, match="matches unrelated files"):
        check_registration(ToyModalityPlugin(loose))


def _record(path, source: str | None = None) -> StudyRecord:
    return StudyRecord(
        subject="s1",
        images=[ImageRef(modality="toy", paths=[str(path)])],
        turns=[Turn(role="user", content="<image>\nSide?"), Turn(role="assistant", content="left")],
        source=str(path) if source is None else source,
    )


def test_a_reader_claiming_every_location_is_caught(tmp_path):
    image = write_phantom(TOY, tmp_path / "study", "left")[0]

    class Claims:
        @hookimpl
        def umbrella_study_reader(self, location):
            return [_record(image)]

    with pytest.raises(ConformanceError, match="claimed a location that is not its kind"):
        check_study_reader(Claims(), "mine:x", tmp_path / "scratch")


def test_a_reader_raising_on_foreign_locations_or_naming_missing_files_is_caught(tmp_path):
    class Raises:
        @hookimpl
        def umbrella_study_reader(self, location):
            if not location.startswith("mine:"):
                raise FileNotFoundError(location)
            return [_record(tmp_path / "gone.nii.gz")]

    with pytest.raises(ConformanceError, match="raised FileNotFoundError"):
        check_study_reader(Raises(), "mine:x", tmp_path / "scratch")

    class Missing(Raises):
        @hookimpl
        def umbrella_study_reader(self, location):
            return [_record(tmp_path / "gone.nii.gz")] if location.startswith("mine:") else None

    with pytest.raises(ConformanceError, match="gone.nii.gz does not exist"):
        check_study_reader(Missing(), "mine:x", tmp_path / "scratch")


def test_a_record_source_must_name_a_place_to_open(tmp_path):
    image = write_phantom(TOY, tmp_path / "study", "left")[0]
    table = tmp_path / "study" / "table.csv"
    table.write_text("subject\ns1\n")
    for good in (
        f"{table}:2",
        f"{table}: records[0]",
        f"{image} ({table}:2)",
        f"{image} + {image}",
    ):
        check_records([_record(image, good)])
    with pytest.raises(ConformanceError, match="source '' is empty"):
        check_records([_record(image, "")])
    with pytest.raises(ConformanceError, match="does not start with a file"):
        check_records([_record(image, "row 2 of the clinical table")])


def _reader(image, table, *, report: str):
    """A reader of ``mine:`` whose table's second row is bad, handled as ``report`` says."""

    class Reader:
        @hookimpl
        def umbrella_study_reader(self, location, on_error):
            if not location.startswith("mine:"):
                return None
            records = [_record(image, f"{table}:2")]
            if location.endswith("bad"):
                error = DataError(
                    f"{table}:3: field 'label' is empty",
                    source=f"{table}:3",
                    field="" if report == "no field" else "label",
                )
                if report == "raise":
                    raise error
                on_error(error)
            return records

    return Reader()


def test_a_reader_must_report_bad_records_and_go_on(tmp_path):
    image = write_phantom(TOY, tmp_path / "study", "left")[0]
    table = tmp_path / "study" / "table.csv"
    table.write_text("subject,label\ns1,left\ns2,\n")
    good = _reader(image, table, report="on_error")
    check_study_reader(good, "mine:ok", tmp_path / "a", bad_location="mine:bad")
    (error,) = check_reports_bad_records(good, "mine:bad")
    assert (error.source, error.field) == (f"{table}:3", "label")
    with pytest.raises(ConformanceError, match="report a bad record through on_error"):
        check_reports_bad_records(_reader(image, table, report="raise"), "mine:bad")
    with pytest.raises(ConformanceError, match="names no field"):
        check_reports_bad_records(_reader(image, table, report="no field"), "mine:bad")
    with pytest.raises(ConformanceError, match="no bad record of 'mine:ok' reached on_error"):
        check_reports_bad_records(good, "mine:ok")
    # A bad record in the sample that should have none is a failure too.
    with pytest.raises(ConformanceError, match="should have none"):
        check_study_reader(good, "mine:bad", tmp_path / "b")
