"""The built-in reader of the original BrainVLM conversation files (v1 and v2)."""

from __future__ import annotations

import json

import pytest

from umbrella_core.data.brainvlm import BrainVLMStudy, find_brainvlm, read_brainvlm
from umbrella_core.errors import DataError
from umbrella_core.plugins import get_plugin_manager

V1 = {
    "id": "sub-01",
    "modality_paths": {"T1": "anat/sub-01_T1w.nii.gz", "fMRI": "func/sub-01_bold.nii.gz"},
    "conversations": [
        {"from": "human", "value": "Describe both scans."},
        {"from": "gpt", "value": "Two normal scans."},
    ],
}

V2 = {
    "task_id": "sex",
    "subject_ids": ["sub-01", "sub-02"],
    "images": [
        {"path": "anat/sub-01_T1w.nii.gz", "modality": "sMRI"},
        {"path": ["dwi/sub-01_FA.nii.gz", "dwi/sub-01_MD.nii.gz"], "modality": "DWI"},
    ],
    "conversations": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "First:"},
                {"type": "image"},
                {"type": "text", "text": "Second:"},
                {"type": "image"},
            ],
        },
        {"role": "assistant", "content": [{"type": "text", "text": "female"}]},
    ],
    "metadata": {"age": 63},
}


def write(path, records, *, jsonl):
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_v1_records_with_prepended_placeholders_and_relative_paths(tmp_path, suffix):
    path = write(tmp_path / f"train{suffix}", [V1, V1 | {"id": "sub-02"}], jsonl=suffix == ".jsonl")
    first, second = read_brainvlm(path)
    assert [first.subject, second.subject] == ["sub-01", "sub-02"]
    assert first.modalities == ("t1", "fmri")  # resolved to canonical names later, by the core
    assert first.images[0].paths == (str(tmp_path / "anat/sub-01_T1w.nii.gz"),)
    # Two images, no placeholder: both are prepended to the first human turn.
    assert first.turns[0].content == "<image>\n<image>\nDescribe both scans."
    assert [t.role for t in first.turns] == ["user", "assistant"]
    # No split in the file or the options: None, and the core makes one (I10).
    assert first.study == tmp_path.name and first.split is None
    assert first.family is None and first.site is None


def test_v1_placeholders_already_present_null_paths_and_subject_fallback(tmp_path):
    record = {
        "modality_paths": {"T1": "a.nii.gz", "dMRI": None},
        "conversations": [
            {"from": "human", "value": "Look: <image>"},
            {"from": "gpt", "value": "Fine."},
        ],
        "split": "test",
        "family": 4021,
        "site": "site06",
    }
    (got,) = read_brainvlm(write(tmp_path / "s.json", [record], jsonl=False))
    assert got.turns[0].content == "Look: <image>"  # nothing added
    assert got.modalities == ("t1",) and got.subject == "s-0" and got.split == "test"
    assert got.family == "4021" and got.site == "site06"


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_v2_records(tmp_path, suffix):
    path = write(tmp_path / f"v2{suffix}", [V2], jsonl=suffix == ".jsonl")
    (record,) = read_brainvlm(path)
    assert record.subject == "sub-01+sub-02"
    assert record.modalities == ("smri", "dwi")
    assert len(record.images[1].paths) == 2
    assert record.turns[0].content == "First:\n<image>\nSecond:\n<image>"
    assert record.turns[1].content == "female"
    assert record.phenotypes == {"age": 63, "task_id": "sex"}


def test_json_object_holding_the_record_list(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [V1]}))
    study = find_brainvlm(str(path))
    assert isinstance(study, BrainVLMStudy)
    assert [r.subject for r in study] == ["sub-01"]


def test_recognition_and_precedence_over_the_manifest_reader(tmp_path):
    v1 = write(tmp_path / "v1.json", [V1], jsonl=False)
    v2 = write(tmp_path / "v2.jsonl", [V2], jsonl=True)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        json.dumps(
            {
                "subject": "s",
                "images": [{"modality": "t1", "path": "a.nii.gz"}],
                "conversation": [
                    {"role": "user", "content": "<image>"},
                    {"role": "assistant", "content": "x"},
                ],
            }
        )
        + "\n"
    )
    pm = get_plugin_manager()
    # The BrainVLM reader answers for them (the manifest reader would refuse their fields).
    expected = [r.subject for r in find_brainvlm(str(v1))]
    assert [r.subject for r in pm.read_study(str(v1), {})] == expected
    assert [r.subject for r in pm.read_study("brainvlm:" + str(v1), {})] == expected
    assert [r.subject for r in pm.read_study(str(v2), {})] == [
        r.subject for r in find_brainvlm(str(v2))
    ]
    # UMBRELLA manifests stay with the manifest reader, file or folder.
    assert find_brainvlm(str(manifest)) is None and find_brainvlm(str(tmp_path)) is None
    assert [r.subject for r in pm.read_study(str(manifest), {})] == ["s"]
    # Options reach the reader.
    (record,) = pm.read_study(str(v1), {"split": "validation", "study": "ukb"})
    assert record.split == "validation" and record.study == "ukb"
    # Aliases BrainVLM uses resolve to the installed modalities.
    assert [pm.resolve_modality(n).item.name for n in ("T1", "fMRI", "DWI", "sMRI")] == [
        "t1",
        "fmri",
        "dmri",
        "t1",
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"modality_paths": {"T1": "a.nii.gz"}}, r"s.jsonl:2: field 'conversations' is missing"),
        (
            V1 | {"modality_paths": {"T1": 3}},
            r"s.jsonl:2: field 'modality_paths.T1' must be a path",
        ),
        (
            V1 | {"conversations": [{"from": "robot", "value": "x"}]},
            r"s.jsonl:2: field 'conversations\[0\].from'",
        ),
        (
            V1 | {"conversations": [{"from": "human", "value": "x"}]},
            r"s.jsonl:2: the conversation has no assistant turn",
        ),
        (
            V1
            | {
                "conversations": [
                    {"from": "human", "value": "<image><image><image>"},
                    {"from": "gpt", "value": "x"},
                ]
            },
            r"s.jsonl:2: the conversation has 3 <image> placeholder\(s\) but the record lists 2",
        ),
        (
            V2 | {"conversations": [{"role": "user", "content": [{"type": "video"}]}]},
            r"s.jsonl:2: field 'conversations\[0\].content\[0\].type'",
        ),
        (V2 | {"images": [{"path": "a.nii.gz"}]}, r"s.jsonl:2: images\[0\]: field 'modality'"),
        (V2 | {"subject_ids": []}, r"s.jsonl:2: field 'subject_ids'"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, record, message):
    path = write(tmp_path / "s.jsonl", [V1, record], jsonl=True)
    with pytest.raises(DataError, match=message):
        list(read_brainvlm(path))


def test_json_errors_name_the_record_index_and_missing_files(tmp_path):
    path = write(tmp_path / "s.json", [V1, V1 | {"conversations": "hi"}], jsonl=False)
    with pytest.raises(DataError, match=r"s.json: records\[1\]: field 'conversations' must be"):
        list(read_brainvlm(path))
    with pytest.raises(DataError, match=r"nothing.json: cannot read"):
        list(get_plugin_manager().read_study("brainvlm:" + str(tmp_path / "nothing.json")))


def test_tolerant_reading_reports_each_bad_record(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text(
        json.dumps(V1) + "\n{oops\n" + json.dumps({"modality_paths": {}}) + "\n" + json.dumps(V2)
    )
    errors = []
    records = list(BrainVLMStudy(path=path).records(errors.append))
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"]
    assert [str(e).split(": ")[0] for e in errors] == [f"{path}:2", f"{path}:3"]


@pytest.mark.slow
def test_a_brainvlm_v1_file_trains(tmp_path, monkeypatch):
    from umbrella_core.commands import main
    from umbrella_core.data.demo import write_demo

    monkeypatch.setenv("UMBRELLA_CACHE", str(tmp_path / "cache"))
    pm = get_plugin_manager()
    specs = {"t1": pm.resolve_modality("t1").item.for_demo()}
    manifest = write_demo(tmp_path / "study", specs, subjects=4)
    records = []
    for line in manifest.read_text().splitlines():
        item = json.loads(line)
        question = item["conversation"][0]["content"].replace("<image>\n", "")
        records.append(
            {
                "subject_id": item["subject"],
                "split": item["split"],
                "modality_paths": {"T1w": item["images"][0]["path"]},
                "conversations": [
                    {"from": "human", "value": question},
                    {"from": "gpt", "value": item["conversation"][1]["content"]},
                ],
            }
        )
    path = write(tmp_path / "study" / "brainvlm_train.json", records, jsonl=False)
    status = main(
        [
            "train",
            "--study",
            "brainvlm:" + str(path),
            "--modalities",
            "t1",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--no-progress",
            "--output-dir",
            str(tmp_path / "out"),
        ]
    )
    assert status == 0
    assert (tmp_path / "out" / "final").is_dir()
