"""``umbrella validate``: every problem of a study in one run."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from umbrella_core.commands import main
from umbrella_core.data.checks import Problem, validate_records
from umbrella_core.data.demo import write_demo
from umbrella_core.imaging import save_nifti
from umbrella_core.plugins import get_plugin_manager
from umbrella_core.types import ImageRef, StudyRecord, Turn
from umbrella_core.validate import validate_locations


@pytest.fixture(scope="module")
def pm():
    return get_plugin_manager()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, pm):
    """A clean demo study with two t1 and two fmri subjects (demo geometry)."""
    specs = {n: pm.resolve_modality(n).item.for_demo() for n in ("t1", "fmri")}
    return write_demo(tmp_path_factory.mktemp("demo"), specs, subjects=2)


def record(modality, path, *, user="<image>\nWhich side?", assistant="left"):
    turns = [{"role": "user", "content": user}]
    if assistant is not None:
        turns.append({"role": "assistant", "content": assistant})
    return {
        "subject": "sub-x",
        "images": [{"modality": modality, "path": path}],
        "conversation": turns,
    }


def test_the_clean_demo_passes_at_its_geometry(demo, capsys):
    assert main(["validate", "--config", str(demo.parent / "run.yaml")]) == 0
    # 2 t1 subjects asked two questions (hemisphere, x coordinate), 2 fmri subjects one.
    assert capsys.readouterr().out.strip() == "checked 6 records, 6 images: 0 problems in 0 records"


def test_validate_judges_the_study_as_train_would(demo, tmp_path, capsys):
    # The plugins' own geometry: 24-frame fMRI windows, longer than the demo's 16-frame series.
    assert main(["validate", str(demo)]) == 1
    said = capsys.readouterr().out
    assert said.count("16 frames, fewer than the 24 of one fmri window") == 2, said
    out = tmp_path / "run"
    assert main(["train", "--study", str(demo), "--output-dir", str(out)]) == 2
    trained = capsys.readouterr().err
    assert trained.count("16 frames, fewer than the 24 of one fmri window") == 2, trained
    # data.modalities: the fMRI records are left out, as training leaves them out.
    assert main(["validate", str(demo), "--set", "data.modalities=t1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        "checked 6 records, 4 images: 0 problems in 0 records; left out as training leaves "
        "them out (2 fmri): modalities not in data.modalities"
    )
    assert main(["validate", str(demo), "--set", "data.modalities=dmri"]) == 1
    assert "no record of the run's modalities (dmri)" in capsys.readouterr().out


def test_validate_refuses_a_mirror_of_side_answers_as_train_does(demo, capsys):
    """validate --config built the run's augmentation but judged it on no record; train
    then refused RandFlip across x for the demo's hemisphere questions."""
    flip = "data.augment.t1=[{name: RandFlip, prob: 0.5, spatial_axis: 0}]"
    config = ["--config", str(demo.parent / "run.yaml")]
    assert main(["validate", *config, "--set", flip]) == 1
    said = capsys.readouterr().out
    assert "data.augment.t1[0]: RandFlip can mirror left and right" in said
    assert said.splitlines()[-1].endswith("1 problem in 0 records")
    along_y = flip.replace("spatial_axis: 0", "spatial_axis: 1")
    assert main(["validate", *config, "--set", along_y]) == 0  # the sides are kept


@pytest.fixture
def broken(tmp_path, demo):
    """A manifest whose lines 2-11 each hold one problem; line 1 is fine."""
    t1 = demo.parent / "t1" / "sub-t10000_T1w.nii.gz"
    shutil.copy(t1, tmp_path / "good.nii.gz")
    raw = t1.read_bytes()
    (tmp_path / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.nii.gz").write_text("not an image\n")
    volume = np.ones((8, 8, 8), dtype=np.float32)
    volume[2, 3, 4] = np.nan
    save_nifti(tmp_path / "nan.nii.gz", volume, np.eye(4))
    noise = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)  # not constant
    save_nifti(tmp_path / "huge.nii.gz", noise, np.diag([30, 30, 30, 1]))
    lines = [
        json.dumps(record("t1", "good.nii.gz")),  # 1
        json.dumps(record("t1", "missing.nii.gz")),  # 2
        json.dumps(record("t1", "truncated.nii.gz")),  # 3
        json.dumps(record("t1", "text.nii.gz")),  # 4
        json.dumps(record("t1", "nan.nii.gz")),  # 5
        json.dumps(record("fmri", "good.nii.gz")),  # 6: a 3D volume given as fMRI
        json.dumps(record("t1", "good.nii.gz", assistant=None)),  # 7
        json.dumps(record("t1", "good.nii.gz", user="<image><image>")),  # 8
        '{"subject": "sub-x", "images": [',  # 9
        json.dumps(record("pet", "good.nii.gz")),  # 10
        json.dumps(record("T1w", "huge.nii.gz")),  # 11
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


EXPECTED = {
    2: ("images[0].path", "missing.nii.gz: file not found"),
    3: ("images[0].path", "truncated.nii.gz"),
    4: ("images[0].path", "text.nii.gz: not a readable NIfTI file"),
    5: ("images[0].path", "nan.nii.gz: 1 of 512 voxels are NaN or infinite"),
    6: ("images[0].path", "good.nii.gz: expected a 4D series"),
    7: ("conversation", "no assistant turn"),
    8: ("conversation", "2 <image> placeholder(s) but the record lists 1 image(s)"),
    9: ("json", "invalid JSON"),
    10: ("images[0].modality", "unknown modality 'pet'"),
    11: ("images[0].path", "huge.nii.gz: voxel size 30 x 30 x 30 mm is outside"),
}


def test_every_problem_is_reported_with_file_line_and_field(broken, capsys):
    assert main(["validate", str(broken)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    problems, summary = lines[:-1], lines[-1]
    assert len(problems) == len(EXPECTED), "\n".join(problems)
    for problem, (lineno, (field, message)) in zip(problems, sorted(EXPECTED.items()), strict=True):
        assert problem.startswith(f"{broken}:{lineno}: {field}: "), problem
        assert message in problem, problem
    # Lines 7-9 are refused by the reader; the other 8 records list one image each.
    assert summary == "checked 11 records, 8 images: 10 problems in 10 records"


def test_json_output(broken, capsys):
    assert main(["validate", "--json", str(broken)]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["ok"] is False and payload["records"] == 11 and payload["problem_records"] == 10
    first = payload["problems"][0]
    assert first["source"] == f"{broken}:2" and first["field"] == "images[0].path"


def test_several_studies_and_unreadable_ones(tmp_path, demo, pm):
    missing = tmp_path / "nowhere.jsonl"
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"records": [{"images": []}, {"subject": 1}]}))
    specs = {n: pm.resolve_modality(n).item.for_demo() for n in ("t1", "fmri")}
    report = validate_locations([str(demo), str(missing), str(listed)], specs=specs)
    fields = [(p.source, p.field) for p in report.problems]
    assert (str(missing), "study") in fields
    assert (f"{listed}: records[0]", "subject") in fields
    assert (f"{listed}: records[1]", "conversation") in fields
    assert report.records == 8 and report.bad_records == 2  # the demo's 6 and the listed 2


def test_brainvlm_files_are_checked_record_by_record(tmp_path, demo):
    t1 = tmp_path / "sub-t10000_T1w.nii.gz"  # absolute, inside the file's folder
    shutil.copy(demo.parent / "t1" / t1.name, t1)
    good = {
        "modality_paths": {"T1": str(t1)},
        "conversations": [{"from": "human", "value": "Side?"}, {"from": "gpt", "value": "left"}],
    }
    path = tmp_path / "bvlm.jsonl"
    path.write_text(
        "\n".join(
            [
                json.dumps(good),
                json.dumps(good | {"modality_paths": {"T1": "gone.nii.gz"}}),
                json.dumps(good | {"conversations": []}),
            ]
        )
    )
    report = validate_locations([str(path)])
    assert [(p.source, p.field) for p in report.problems] == [
        (f"{path}:2", "images[0].path"),
        (f"{path}:3", "conversation"),
    ]


def test_validate_records_for_callers_with_records(pm, demo):
    t1 = str(demo.parent / "t1" / "sub-t10000_T1w.nii.gz")
    records = [
        StudyRecord(
            subject="a",
            images=[ImageRef(modality="t1", paths=[t1])],
            turns=[Turn(role="user", content="<image>"), Turn(role="assistant", content="x")],
            source="mine:1",
        ),
        StudyRecord(
            subject="b",
            images=[ImageRef(modality="t1", paths=[t1, t1, t1])],
            turns=[Turn(role="user", content="no image"), Turn(role="assistant", content="x")],
        ),
    ]
    problems = validate_records(records, pm, workers=2)
    assert [(p.source, p.field) for p in problems] == [
        ("subject b", "conversation"),
        ("subject b", "images[0].path"),
    ]
    assert all(isinstance(p, Problem) for p in problems)
    assert "optionally followed by a brain mask; got 3" in problems[1].message


def test_an_image_with_several_files_is_judged_by_its_loader(pm, demo, tmp_path):
    # A T1 with its brain mask is one valid image of two files.
    t1 = str(demo.parent / "t1" / "sub-t10000_T1w.nii.gz")
    img = nib.load(t1)
    mask = np.asarray(img.dataobj) > np.percentile(np.asarray(img.dataobj), 60)
    mask_path = str(tmp_path / "sub-t10000_desc-brain_mask.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), img.affine), mask_path)
    record = StudyRecord(
        subject="a",
        images=[ImageRef(modality="t1", paths=[t1, mask_path])],
        turns=[Turn(role="user", content="<image>"), Turn(role="assistant", content="x")],
    )
    assert validate_records([record], pm, workers=1) == []


def test_skip_removes_every_bad_record_of_a_shared_source(pm, demo, tmp_path):
    # The BIDS reader gives one record per scan and task, so a scan's sex and age
    # records share one source; a bad scan must take all of them out of the run,
    # not one (which then failed at step 0 with data.on_bad=skip).
    from umbrella_core.config import RunConfig, structure
    from umbrella_core.data.studies import read_studies, screen_records

    t1 = demo.parent / "t1" / "sub-t10000_T1w.nii.gz"
    root = tmp_path / "ds"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "shared", "BIDSVersion": "1.8.0"}')
    rows = ["participant_id\tage\tsex"]
    for i, sub in enumerate(("01", "02", "03", "04")):
        (root / f"sub-{sub}" / "anat").mkdir(parents=True)
        path = root / f"sub-{sub}" / "anat" / f"sub-{sub}_T1w.nii.gz"
        shutil.copy(t1, path)
        rows.append(f"sub-{sub}\t{40 + i}\t{'MF'[i % 2]}")
    rows[0] += "\tsplit"
    rows[1:] = [f"{row}\ttrain" for row in rows[1:]]
    (root / "participants.tsv").write_text("\n".join(rows) + "\n")
    for sub in ("02", "03"):  # decodes to nothing: only the full check sees it
        img = nib.load(t1)
        zero = np.zeros(img.shape, dtype=np.float32)
        nib.save(nib.Nifti1Image(zero, img.affine), root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
    config = structure(
        RunConfig,
        {
            "data": {
                "modalities": ["t1"],
                "studies": [{"location": f"bids:{root}", "tasks": ["sex", "age"]}],
                "split": {"leak": "warn"},
            }
        },
    )
    data = read_studies(config, pm, log=lambda _: None)
    assert len(data.records) == 8 and len({r.source for r in data.records}) == 4
    kept, problems = screen_records(
        data.per_study, check="full", encode=lambda record: None, pm=pm, specs=data.specs
    )
    assert sorted(r.subject for r in kept[0]) == ["sub-01", "sub-01", "sub-04", "sub-04"]
    assert len(problems) == 4
    assert {p.source.split(" ")[0] for p in problems} == {
        str(root / f"sub-{s}/anat/sub-{s}_T1w.nii.gz") for s in ("02", "03")
    }
    # `umbrella validate` counts them as the 4 records they are, not 2 sources.
    report = validate_locations([(f"bids:{root}", {"tasks": ["sex", "age"]})])
    assert report.summary() == "checked 8 records, 8 images: 4 problems in 4 records"


def test_a_problem_many_records_share_is_listed_once_with_its_count():
    from umbrella_core.validate import distinct_problems

    truncated = Problem("scan.nii.gz (participants.tsv:3)", "images[0]", "scan.nii.gz: truncated")
    missing = Problem("manifest.jsonl:4", "images[0].path", "gone.nii.gz: not found")
    # The sex and the age questions of one scan share its source: one line, not two.
    assert distinct_problems([truncated, missing, truncated]) == [(truncated, 2), (missing, 1)]
