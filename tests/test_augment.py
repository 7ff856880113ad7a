"""Augmentation of training images: configured by name, refused where it would change an
answer, the same draws whatever the workers, ranks or resumption, and never on held-out data."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from nibabel.testing import data_path
from torch.utils.data import BatchSampler, DataLoader

from umbrella_core import Augmentation, hookimpl
from umbrella_core.augmentation import build_pipelines, run_pipelines
from umbrella_core.augmentation.laterality import check_laterality, swap_sides
from umbrella_core.config import load_config
from umbrella_core.data.augmented import AugmentedDataset
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.dataset import RecordDataset
from umbrella_core.data.interleave import InterleavedSampler, Interleaving
from umbrella_core.errors import ConfigError, DuplicateNameError, PluginError
from umbrella_core.model.tokenizer import build_byte_tokenizer
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.testing import fresh_plugin_manager
from umbrella_core.types import ImageRef, StudyRecord, Turn


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def specs(pm):
    t1 = pm.resolve_modality("t1").item.with_geometry((24, 24, 24), (8, 8, 8))
    fmri = pm.resolve_modality("fmri").item.with_geometry((16, 16, 16, 4), (8, 8, 8, 4))
    dmri = pm.resolve_modality("dmri").item.with_geometry((16, 16, 16), (8, 8, 8))
    return {"t1": t1, "fmri": fmri, "dmri": dmri}


def _pipelines(pm, specs, *settings):
    config = load_config(None, [f"data.augment.{s}" for s in settings])
    return run_pipelines(config, pm, specs, [], lambda line: None)


def _record(i, answer, *, study="cohort", laterality=None, forbid=(), split="train", path=""):
    return StudyRecord(
        subject=f"sub-{i:02d}",
        images=[ImageRef(modality="t1", paths=[path or f"sub-{i:02d}_T1w.nii"])],
        turns=[
            Turn(role="user", content="<image>\nWhich hemisphere holds the lesion?"),
            Turn(role="assistant", content=answer),
        ],
        study=study,
        split=split,
        laterality=laterality,
        forbid_augment=forbid,
        source=f"{study}.jsonl:{i + 1}",
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "t1=[{name: RandAfine}]",
            r"data.augment.t1\[0\]: no augmentation named 'RandAfine'.*"
            r"did you mean RandAffine",
        ),
        (
            "t1=[{name: RandAffine, rotate_rang: 0.1}]",
            r"data.augment.t1\[0\]: RandAffine takes "
            r"no argument 'rotate_rang' \(did you mean rotate_range\?\)",
        ),
        (
            "t1=[{name: RandAffined}]",
            r"data.augment.t1\[0\]: RandAffined is a dictionary "
            r"transform; name the array transform 'RandAffine'",
        ),
        (
            "t1=heavy",
            r"data.augment.t1: t1 has no augmentation preset 'heavy' \(its presets: "
            r"light\)",
        ),
        ("t2=light", r"data.augment.t2: unknown modality 't2'"),
        (
            "t1=[{name: Resize, spatial_size: [8, 8, 8]}]",
            r"data.augment.t1\[0\]: Resize changes "
            r"a t1 image's shape from \(1, 24, 24, 24\) to \(1, 8, 8, 8\)",
        ),
        ("t1=[{name: RandFAScale}]", r"data.augment.t1\[0\]: RandFAScale is for dmri, not t1"),
        (
            "t1=[{name: RandAffine, prob: 1.5}]",
            r"data.augment.t1\[0\]: RandAffine: prob must be "
            r"a number from 0 to 1, got 1.5",
        ),
        ("t1=[{prob: 0.5}]", r"data.augment.t1\[0\]: a transform needs a name"),
        (
            "t1=[{name: RandAffine, prob: 1.0, spatial_size: [2000, 2000, 2000]}]",
            r"data.augment.t1\[0\]: RandAffine: spatial_size \[2000, 2000, 2000\] is "
            r"8,000,000,000 voxels, over 8x the t1 image's 13,824 \(24x24x24\)",
        ),
        (
            "t1=[light, {name: RandGaussianNoise, std: -1}]",
            r"data.augment.t1\[1\]: "
            r"RandGaussianNoise",
        ),
    ],
)
def test_a_bad_augmentation_setting_is_a_config_error_naming_its_key(pm, specs, setting, message):
    with pytest.raises(ConfigError, match=message):
        _pipelines(pm, specs, setting)


def test_presets_and_lists_build_pipelines_that_keep_shape_and_dtype(pm, specs):
    pipelines = _pipelines(
        pm, specs, "t1=[light, {name: RandGaussianNoise, prob: 1.0}]", "fmri=light", "dmri=light"
    )
    assert [s.name for s in pipelines["t1"].steps] == [
        "RandAffine",
        "RandBiasField",
        "RandAdjustContrast",
        "RandGaussianNoise",
        "RandGaussianNoise",
    ]
    assert pipelines["t1"].steps[0].key == "data.augment.t1[0] (light[0])"
    assert "RandFAScale" in [s.name for s in pipelines["dmri"].steps]  # the plugin's own
    for name, pipeline in pipelines.items():
        spec = specs[name]
        image = torch.randn(spec.channels, *spec.shape)
        out, mirrored = pipeline.apply(image, (0, 0, 3, 0))
        assert out.shape == image.shape and out.dtype == torch.float32 and not mirrored
        assert type(out) is torch.Tensor  # not MONAI's MetaTensor: the collator stacks them
    # Off is off: nothing is built, MONAI need not even be imported.
    assert _pipelines(pm, specs, "t1=no") == {}
    assert _pipelines(pm, specs) == {}


def test_a_series_window_moves_alike_in_every_frame(pm, specs):
    (pipeline,) = _pipelines(
        pm, specs, "fmri=[{name: RandAffine, prob: 1.0, rotate_range: 0.3, translate_range: 3}]"
    ).values()
    frame = torch.rand(1, 16, 16, 16, 1)
    window = frame.repeat(1, 1, 1, 1, 4)
    out, _ = pipeline.apply(window, (1, 0, 0, 0))
    assert not torch.allclose(out, window)
    for t in range(1, 4):
        assert torch.equal(out[..., t], out[..., 0])


def test_a_mirror_by_a_negative_scale_is_said_to_be_one(pm, specs):
    records = [_record(0, "left")]
    scaled = _pipelines(pm, specs, "t1=[{name: RandAffine, prob: 0.5, scale_range: 1.2}]")
    with pytest.raises(ConfigError) as caught:
        check_laterality(scaled, records, {})
    message = str(caught.value)
    assert message.startswith(
        "data.augment.t1[0]: RandAffine can mirror left and right through a negative scale "
        "factor (scale_range of 1 or more)"
    )
    assert "turn the left-right axis" not in message


def test_a_flip_along_x_is_refused_for_answers_that_name_a_side(pm, specs):
    records = [_record(0, "left"), _record(1, "The right hemisphere.")]
    flip_x = _pipelines(pm, specs, "t1=[{name: RandFlip, prob: 0.5, spatial_axis: 0}]")
    with pytest.raises(ConfigError) as caught:
        check_laterality(flip_x, records, {})
    message = str(caught.value)
    assert message.startswith("data.augment.t1[0]: RandFlip can mirror left and right")
    assert "cohort.jsonl:1" in message and "names a side ('left')" in message
    assert "data.laterality.cohort: swap" in message
    # Any axis but x keeps the sides; a quarter turn in the x-y plane does not.
    check_laterality(
        _pipelines(pm, specs, "t1=[{name: RandFlip, prob: 0.5, spatial_axis: 1}]"), records, {}
    )
    for turn in (
        "[{name: RandRotate90, prob: 0.5}]",
        "[{name: RandAxisFlip, prob: 0.5}]",
        "[{name: RandAffine, prob: 0.5, rotate_range: 2.0}]",
    ):
        with pytest.raises(ConfigError, match="data.augment.t1"):
            check_laterality(_pipelines(pm, specs, f"t1={turn}"), records, {})
    # The study says how: swap rewrites the answer, ignore lets it be; either way no error.
    check_laterality(flip_x, records, {"cohort": "swap"})
    check_laterality(flip_x, records, {"cohort": "ignore"})
    check_laterality(flip_x, [_record(0, "left", laterality="ignore")], {})
    # A record's own word (its reader knows the task) is not overridden by the study's.
    measure = _record(2, "3 cm", laterality="refuse")
    with pytest.raises(ConfigError, match="cohort.jsonl:3, which declares laterality refuse"):
        check_laterality(flip_x, [*records, measure], {"cohort": "swap"})
    # A turn cannot be followed by swapping words.
    rot = _pipelines(pm, specs, "t1=[{name: RandRotate90, prob: 0.5}]")
    with pytest.raises(ConfigError, match="turn the left-right axis"):
        check_laterality(rot, records, {"cohort": "swap"})
    # Answers that do not name a side are free to be flipped; held-out records are not checked.
    check_laterality(flip_x, [_record(0, "63 years")], {})
    with pytest.raises(ConfigError, match="data.laterality.cohort: expected one of"):
        check_laterality(flip_x, records, {"cohort": "maybe"})


def test_a_swap_record_that_would_not_fit_with_its_sides_swapped_is_refused_at_start(pm, specs):
    from umbrella_core.errors import DataError

    config = load_config(
        None,
        [
            "data.augment.t1=[{name: RandFlip, prob: 0.5, spatial_axis: 0}]",
            "data.laterality.cohort=swap",
        ],
    )
    encoded = []

    def encode(record):  # "right" is one byte longer than "left": over by one, as at the limit
        encoded.append(record.turns[-1].content)
        if "right" in record.turns[-1].content:
            raise DataError(f"{record.source}: 1025 tokens, over model.max_length 1024")

    records = [_record(0, "left"), _record(1, "63 years")]
    with pytest.raises(ConfigError) as caught:
        run_pipelines(config, pm, specs, records, lambda _: None, encode=encode)
    assert str(caught.value) == (
        "data.augment.t1[0]: RandFlip mirrors study cohort's record cohort.jsonl:1, whose turns "
        "with left and right swapped do not fit: cohort.jsonl:1: 1025 tokens, over "
        "model.max_length 1024"
    )
    # Only a record whose text a swap changes is encoded again.
    assert encoded == ["right"]
    run_pipelines(config, pm, specs, records[1:], lambda _: None, encode=encode)


def test_a_record_that_forbids_a_transform_skips_it_and_says_so(pm, specs, anatomical):
    config = load_config(
        None,
        [
            "data.augment.t1=[{name: RandAffine, prob: 1.0, rotate_range: 0.3}, "
            "{name: RandGaussianNoise, prob: 1.0}, {name: RandFlip, prob: 1.0, spatial_axis: 0}]"
        ],
    )
    # A position (a coordinate) moves with any spatial transform; the flip would change
    # the side it names too, but the record never sees it: not refused.
    position = _record(0, "left, 3 cm", forbid=("spatial",), path=anatomical)
    noiseless = _record(1, "63 years", forbid=("RandGaussianNoise",), path=anatomical)
    free = _record(2, "63 years", path=anatomical)
    held_out = _record(3, "64 years", forbid=("spatial",), split="test", path=anatomical)
    logged = []
    records = [position, noiseless, free, held_out]
    pipelines = run_pipelines(config, pm, specs, records, logged.append)
    # Held-out records are never augmented, so they are not counted.
    skipped = [line.split(" that ")[0] for line in logged if "skipped" in line]
    assert sorted(skipped) == [
        "t1: RandAffine skipped for the images of 1 training record(s)",
        "t1: RandFlip skipped for the images of 1 training record(s)",
        "t1: RandGaussianNoise skipped for the images of 1 training record(s)",
    ]
    dataset = AugmentedDataset(
        [_dataset(specs, [position, noiseless, free])], pipelines, seed=0, laterality={}
    )
    plain = _dataset(specs, [free])[0]["images"][0][1]
    noisy, moved, both = (dataset[(i, 0, 5)]["images"][0][1] for i in range(3))
    pipeline = pipelines["t1"]
    # Each skips exactly its forbidden steps; the other steps draw as they would anyway.
    assert torch.equal(noisy, pipeline.apply(plain, (0, 0, 5, 0), ("spatial",))[0])
    assert torch.equal(moved, pipeline.apply(plain, (0, 0, 5, 0), ("RandGaussianNoise",))[0])
    assert torch.equal(both, pipeline.apply(plain, (0, 0, 5, 0))[0])
    residual = noisy - plain  # noise alone: nothing moved
    assert 0 < float(residual.std()) < 0.2 and float((moved - plain).abs().max()) > 1.0
    assert not torch.equal(moved, both) and not torch.equal(noisy, both)
    # The swap a mirror needs is asked of the record only where the flip reached it.
    assert dataset[(0, 0, 5)]["input_ids"] == _dataset(specs, [position])[0]["input_ids"]


def test_the_demo_refuses_a_flip_before_any_model_is_built(pm, tmp_path, monkeypatch, capsys):
    from umbrella_core.commands import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    code = main(
        [
            "train",
            "--modalities",
            "t1",
            "--demo-subjects",
            "10",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
            "--set",
            "data.augment.t1=[{name: RandFlip, prob: 0.5, spatial_axis: 0}]",
        ]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "data.augment.t1[0]: RandFlip can mirror left and right" in err
    assert not (tmp_path / "run" / "final").exists()


def test_validate_refuses_a_bad_augmentation_before_reading_any_study(tmp_path, capsys):
    from umbrella_core.commands import main

    manifest = tmp_path / "cohort.jsonl"
    manifest.write_text("")  # never read: the setting is refused first
    setting = "data.augment.t1=[{name: RandAffine, rotate_rang: 0.1}]"
    assert main(["validate", str(manifest), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert "data.augment.t1[0]: RandAffine takes no argument 'rotate_rang'" in err
    assert "cohort.jsonl" not in err


def test_swap_sides_keeps_case_and_whole_words():
    assert swap_sides("Left lesion, right? LEFT. leftover, Wright") == (
        "Right lesion, left? RIGHT. leftover, Wright"
    )


@pytest.fixture
def anatomical(tmp_path):
    """nibabel's real T1 (anatomical.nii)."""
    return shutil.copy(os.path.join(data_path, "anatomical.nii"), str(tmp_path / "T1w.nii"))


def _dataset(specs, records):
    t1 = {"t1": specs["t1"]}
    return RecordDataset(records, t1, Tokenization.of(build_byte_tokenizer(), 4, t1, 4096))


def test_a_mirrored_sample_of_a_swap_study_has_its_sides_swapped(pm, specs, anatomical):
    dataset = _dataset(specs, [_record(0, "left", path=anatomical)])
    flip = _pipelines(pm, specs, "t1=[{name: RandFlip, prob: 1.0, spatial_axis: 0}]")
    plain = dataset[0]
    swapped = AugmentedDataset([dataset], flip, seed=0, laterality={"cohort": "swap"})[0]
    assert torch.equal(swapped["images"][0][1], plain["images"][0][1].flip(1))
    tokenizer = build_byte_tokenizer()

    def answer(item):
        return tokenizer.decode([t for t in item["labels"] if t >= 0]).strip()

    assert answer(plain).startswith("left") and answer(swapped).startswith("right")
    ignored = AugmentedDataset([dataset], flip, seed=0, laterality={"cohort": "ignore"})[0]
    assert answer(ignored).startswith("left")


def _as_list(items):
    return items


def _augmented_draws(dataset, sampler, *, workers=0, ranks=1, threads=None):
    """{position: image} of an epoch, as the Trainer's accelerator deals it to ``ranks``."""
    from accelerate.data_loader import BatchSamplerShard

    got = {}
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        for rank in range(ranks):
            shard = BatchSamplerShard(
                BatchSampler(sampler, 2, drop_last=False), num_processes=ranks, process_index=rank
            )
            draws = [d for b in shard for d in b]
            loader = DataLoader(
                dataset, batch_sampler=shard, num_workers=workers, collate_fn=_as_list
            )
            items = [item for batch in loader for item in batch]
            for (_, _, position), item in zip(draws, items, strict=True):
                got[position] = item["images"][0][1]
    finally:
        torch.set_num_threads(old)
    return got


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers, 2 cores
def test_augmentation_is_the_same_with_any_workers_ranks_and_threads(pm, specs, anatomical):
    records = [_record(i, f"{40 + i} years", path=anatomical) for i in range(8)]
    light = _pipelines(pm, specs, "t1=[light, {name: RandAffine, prob: 1.0, rotate_range: 0.2}]")
    dataset = AugmentedDataset([_dataset(specs, records)], light, seed=3)
    sampler = InterleavedSampler(Interleaving([8]), seed=3, global_batch=4, draws=True)
    sampler.set_epoch(1)
    alone = _augmented_draws(dataset, sampler)
    assert sorted(alone) == list(range(8))
    for other in (
        _augmented_draws(dataset, sampler, workers=4),
        _augmented_draws(dataset, sampler, ranks=2),
        _augmented_draws(dataset, sampler, threads=1),
    ):
        assert sorted(other) == list(range(8))
        for position, image in alone.items():
            assert torch.equal(other[position], image), position
    # Every draw differs from the others, and the next epoch draws anew.
    images = [alone[p] for p in range(8)]
    assert all(not torch.equal(images[0], im) for im in images[1:])
    sampler.set_epoch(2)
    again = _augmented_draws(dataset, sampler)
    assert all(not torch.equal(again[p], alone[p]) for p in range(8))


def test_rand_affine_is_monais_own_resampled_in_float32(pm, specs, anatomical):
    from monai.transforms import RandAffine

    image = _dataset(specs, [_record(0, "63 years", path=anatomical)])[0]["images"][0][1]
    arguments = {"prob": 1.0, "rotate_range": 0.2, "translate_range": 2, "scale_range": 0.1}
    shown = ", ".join(f"{k}: {v}" for k, v in arguments.items())
    (step,) = _pipelines(pm, specs, f"t1=[{{name: RandAffine, {shown}}}]")["t1"].steps
    assert step.transform.resampler.dtype == torch.float32  # MONAI's default is float64
    reference = RandAffine(**arguments)
    spread = float(image.max() - image.min())
    for seed in range(3):
        step.transform.set_random_state(seed)
        reference.set_random_state(seed)
        ours, theirs = step.transform(image), reference(image)
        assert ours.dtype == torch.float32 and not torch.allclose(ours, image, atol=0.1)
        assert float((ours - theirs).abs().max()) <= 1e-4 * spread


def test_a_sample_drawn_twice_in_an_epoch_is_augmented_twice_differently(pm, specs, anatomical):
    dataset = AugmentedDataset(
        [_dataset(specs, [_record(0, "63 years", path=anatomical)])],
        _pipelines(pm, specs, "t1=[{name: RandGaussianNoise, prob: 1.0}]"),
        seed=0,
    )
    first, second = dataset[(0, 0, 0)], dataset[(0, 0, 1)]
    assert not torch.equal(first["images"][0][1], second["images"][0][1])
    assert torch.equal(dataset[(0, 0, 1)]["images"][0][1], second["images"][0][1])
    assert first["input_ids"] == second["input_ids"]


def test_build_pipelines_takes_a_plugins_augmentation_over_monais(specs):
    calls = []

    def build(**arguments):
        calls.append(arguments)
        return lambda image: image * 2

    offered = {"RandAffine": Augmentation(name="RandAffine", build=build)}
    pipelines = build_pipelines({"t1": [{"name": "RandAffine", "gain": 2}]}, specs, offered)
    image = torch.ones(1, 24, 24, 24)
    assert calls == [{"gain": 2}]
    assert torch.equal(pipelines["t1"].apply(image, (0, 0, 0, 0))[0], image * 2)


class _Offers:
    def __init__(self, name):
        self.name = name

    @hookimpl
    def umbrella_augmentations(self):
        return [Augmentation(name=self.name, build=lambda: lambda image: image)]


def test_two_plugins_offering_one_name_are_refused_naming_both():
    pm = fresh_plugin_manager(_Offers("RandMotion"), _Offers("RandMotion"))
    with pytest.raises(
        DuplicateNameError,
        match=r"'RandMotion' is offered by plugin "
        r"'test-plugin-0' \(distribution test-dist-0 0.0\) and by plugin "
        r"'test-plugin-1'",
    ):
        pm.augmentations()
    with pytest.raises(PluginError, match="umbrella_augmentations must return a list"):
        fresh_plugin_manager(_Returns()).augmentations()


class _Returns:
    @hookimpl
    def umbrella_augmentations(self):
        return Augmentation(name="RandOne", build=dict)


def test_umbrella_plugins_lists_the_dmri_plugins_augmentation(capsys):
    from umbrella_core.commands import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    listing = out[out.index("plugins\n") :]
    dmri = listing[listing.index("  dmri ") :]
    assert "augmentations: RandFAScale" in dmri[: dmri.index("\n  embedder ")]
    # The presets a modality offers, in the modality table.
    assert "augment: light" in out[: out.index("plugins\n")].split("  t1 ")[1].split("\n")[0]


@pytest.mark.slow
def test_a_run_augments_training_samples_only_and_shows_them_in_tensorboard(tmp_path, monkeypatch):
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from umbrella_core.augmentation import Pipeline
    from umbrella_core.commands import main

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    seeds, sources = [], []
    apply, getitem = Pipeline.apply, AugmentedDataset.__getitem__

    def counted_apply(self, image, seed, forbid=()):
        seeds.append(seed)
        return apply(self, image, seed, forbid)

    def recorded_getitem(self, draw):
        item = getitem(self, draw)
        sources.append(item["source"])
        return item

    monkeypatch.setattr(Pipeline, "apply", counted_apply)
    monkeypatch.setattr(AugmentedDataset, "__getitem__", recorded_getitem)
    out = tmp_path / "run"
    assert main([
        "train", "--modalities", "t1", "--demo-subjects", "10", "--max-steps", "3",
        "--batch-size", "2", "--output-dir", str(out), "--no-progress",
        "--set", "data.augment.t1=light", "--set", "trainer.eval_strategy=steps",
        "--set", "trainer.eval_steps=2",
    ]) == 0  # fmt: skip
    (manifest,) = (tmp_path / "cache").glob("demo-t1-*/manifest.jsonl")
    split = {
        f"{manifest}:{n}": json.loads(line)["split"]
        for n, line in enumerate(manifest.read_text().splitlines(), 1)
    }
    # 3 steps of 2 (and the batch the loader fetches ahead), all of training records.
    assert len(sources) >= 3 * 2 and {split[s] for s in sources} == {"train"}
    # Evaluated during training and at the end, and none of it went through a pipeline:
    # the training draws and the 4 images shown in TensorBoard are every call.
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["held_out"] and "validation" in split.values()
    assert len(seeds) == len(sources) + 4
    (events,) = [
        e
        for f in (out / "tensorboard").iterdir()
        if "augment/t1"
        in (e := EventAccumulator(str(f), size_guidance={"images": 0})).Reload().Tags()["images"]
    ]
    (image,) = events.Images("augment/t1")
    assert (image.width, image.height) == (4 * 2 * 32, 32)  # 4 samples, as read | augmented


def test_the_kit_refuses_a_preset_that_mirrors_or_fails(specs):
    import attrs

    from umbrella_core.testing import ConformanceError, check_augment_presets

    class NoHooks:
        pass

    spec = specs["t1"]
    check_augment_presets(NoHooks(), spec)  # the t1 plugin's own presets pass
    flips = attrs.evolve(
        spec, augment_presets={"wild": ({"name": "RandFlip", "prob": 0.5, "spatial_axis": 0},)}
    )
    with pytest.raises(ConformanceError, match="preset 'wild' can mirror or turn left and right"):
        check_augment_presets(NoHooks(), flips)
    typo = attrs.evolve(spec, augment_presets={"light": ({"name": "RandAfine"},)})
    with pytest.raises(ConformanceError, match=r"preset 'light': data.augment.t1.*RandAfine"):
        check_augment_presets(NoHooks(), typo)
