"""The BIDS reader, the task templates, recognition and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from umbrella_studies import last_stats

from umbrella_core.errors import ConfigError, DataError, PluginError

PARTICIPANTS = (
    "participant_id\tage\tsex\tdx\tsite\n"
    "sub-01\t63.4\tM\tcontrol\tA\n"
    "sub-02\t41\tF\tpatient\tB\n"
    "sub-03\tn/a\t2\tn/a\tA\n"
    "sub-04\t70\tF\tcontrol\tn/a\n"
)


@pytest.fixture
def bids(tmp_path, nifti, text, jsonfile) -> Path:
    root = tmp_path / "ds"
    jsonfile(root / "dataset_description.json", {"Name": "Tiny BIDS", "BIDSVersion": "1.8.0"})
    text(root / "participants.tsv", PARTICIPANTS)
    jsonfile(root / "task-rest_bold.json", {"RepetitionTime": 2.0, "TaskName": "rest"})
    for sub in ("01", "02", "03", "04"):
        nifti(root / f"sub-{sub}/anat/sub-{sub}_T1w.nii.gz")
    nifti(root / "sub-01/func/sub-01_task-rest_bold.nii.gz", (4, 4, 4, 3))
    jsonfile(root / "sub-01/func/sub-01_task-rest_bold.json", {"EchoTime": 0.03})
    # sub-01 has FA/MD maps in derivatives; sub-02 only raw DWI.
    nifti(root / "sub-01/dwi/sub-01_dwi.nii.gz", (4, 4, 4, 5))
    nifti(root / "derivatives/dtifit/sub-01/dwi/sub-01_desc-FA_dwimap.nii.gz")
    nifti(root / "derivatives/dtifit/sub-01/dwi/sub-01_desc-MD_dwimap.nii.gz")
    nifti(root / "sub-02/dwi/sub-02_dwi.nii.gz", (4, 4, 4, 5))
    return root


def test_sex_task_records(pm, bids):
    records = list(pm.read_study("bids:" + str(bids), {"tasks": ["sex"]}))
    by_key = {(r.subject, r.modalities): r for r in records}
    assert sorted({r.subject for r in records}) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    t1 = by_key[("sub-01", ("t1",))]
    assert t1.study == "Tiny BIDS"
    assert t1.split is None  # no split column or option: the core makes the split
    assert t1.images[0].paths == (str(bids / "sub-01/anat/sub-01_T1w.nii.gz"),)
    assert t1.turns[0].content == "<image>\nWhat is the sex of this subject?"
    assert t1.turns[1].content == "male"
    assert t1.phenotypes["age"] == 63.4 and t1.phenotypes["site"] == "A"
    assert t1.source.startswith(str(bids / "sub-01/anat/sub-01_T1w.nii.gz"))
    assert "participants.tsv:2" in t1.source
    # "2" codes female in the default mapping.
    assert by_key[("sub-03", ("t1",))].turns[1].content == "female"
    dmri = by_key[("sub-01", ("dmri",))]
    assert [Path(p).name for p in dmri.images[0].paths] == [
        "sub-01_desc-FA_dwimap.nii.gz",
        "sub-01_desc-MD_dwimap.nii.gz",
    ]
    assert by_key[("sub-02", ("dmri",))].images[0].paths[0].endswith("sub-02_dwi.nii.gz")
    bold = by_key[("sub-01", ("fmri",))]
    # The top-level sidecar is inherited, the file's own is merged over it.
    assert bold.phenotypes["_sidecar"] == {
        "RepetitionTime": 2.0,
        "TaskName": "rest",
        "EchoTime": 0.03,
    }


def test_unprefixed_bids_folder_and_default_tasks(pm, bids):
    records = list(pm.read_study(str(bids)))
    tasks = {r.turns[0].content.split("\n", 1)[1] for r in records}
    assert tasks == {
        "What is the sex of this subject?",
        "How old is the subject?",
        "What is the diagnosis of this subject?",
        "Are these two subjects of the same sex?",
    }
    stats = last_stats(str(bids))[str(bids)]
    # sub-03's age and diagnosis are n/a: its one T1 is skipped for both.
    assert stats.skipped["age"] == 1 and stats.skipped["diagnosis"] == 1
    assert stats.made["sex"] == 7
    ages = {r.subject: r.turns[1].content for r in records if "old" in r.turns[0].content}
    assert ages["sub-01"] == "63 years" and ages["sub-02"] == "41 years"


def test_sex_comparison_pairs(pm, bids):
    options = {"tasks": ["sex_comparison"], "modalities": ["t1"], "seed": 3}
    records = list(pm.read_study("bids:" + str(bids), options))
    # Four T1 subjects (1 male, 3 female): two pairs, one same-sex, one not.
    assert len(records) == 2
    assert sorted(r.turns[1].content for r in records) == ["no", "yes"]
    for record in records:
        assert record.turns[0].content == "<image> <image>\nAre these two subjects of the same sex?"
        assert len(record.images) == 2 and record.modalities == ("t1", "t1")
        a, b = record.phenotypes["subjects"]
        assert a != b and record.subject == f"{a}+{b}"
        same = record.phenotypes["sex"][0] == record.phenotypes["sex"][1]
        assert record.turns[1].content == ("yes" if same else "no")
    again = list(pm.read_study("bids:" + str(bids), options))
    assert [r.subject for r in again] == [r.subject for r in records]


def test_sex_comparison_pairs_each_subject_once_in_every_shared_modality(pm, bids, text):
    # sub-01 has t1, fmri and dmri; sub-02 t1 and dmri; sub-03 and sub-04 t1 only.
    modalities = {"sub-01": {"t1", "fmri", "dmri"}, "sub-02": {"t1", "dmri"}}
    for seed in range(6):
        records = list(
            pm.read_study("bids:" + str(bids), {"tasks": ["sex_comparison"], "seed": seed})
        )
        pairs: dict[frozenset, list[str]] = {}
        for record in records:
            a, b = record.phenotypes["subjects"]
            assert record.modalities[0] == record.modalities[1]
            pairs.setdefault(frozenset((a, b)), []).append(record.modalities[0])
        # Two pairs of four subjects: nobody is in two pairs, so no chain of subjects.
        assert len(pairs) == 2 and len(set().union(*pairs)) == 4
        for pair, done in pairs.items():
            shared = set.intersection(*(modalities.get(s, {"t1"}) for s in pair))
            assert sorted(done) == sorted(shared)  # the same two in every shared modality
    # Given splits: pairs stay within one; the record carries it.
    text(
        bids / "participants.tsv",
        "participant_id\tsex\tsplit\nsub-01\tM\ttrain\nsub-02\tF\ttrain\n"
        "sub-03\tF\ttest\nsub-04\tF\ttest\n",
    )
    records = list(pm.read_study("bids:" + str(bids), {"tasks": ["sex_comparison"]}))
    got = {(frozenset(r.subjects), r.modalities[0], r.split, r.turns[1].content) for r in records}
    assert got == {
        (frozenset({"sub-01", "sub-02"}), "t1", "train", "no"),
        (frozenset({"sub-01", "sub-02"}), "dmri", "train", "no"),
        (frozenset({"sub-03", "sub-04"}), "t1", "test", "yes"),
    }


def test_sex_comparison_pairs_keep_families_in_small_groups(pm, tmp_path, nifti, text, jsonfile):
    from umbrella_core.data.split import assign_splits

    folder = tmp_path / "families"
    jsonfile(folder / "dataset_description.json", {"Name": "families"})
    rows = ["participant_id\tsex\tfam\tscanner"]
    for i in range(30):
        nifti(folder / f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz")
        # Families of 1 to 3 members, two scanners (a family at one).
        family = i // 3 if i < 18 else i
        rows.append(f"sub-{i:02d}\t{'MF'[i * 7 % 3 % 2]}\tF{family}\tS{family % 2}")
    text(folder / "participants.tsv", "\n".join(rows) + "\n")
    options = {
        "tasks": ["sex_comparison"],
        "family_column": "fam",
        "site_column": "scanner",
    }
    records = list(pm.read_study(str(folder), options))
    assert records and all(r.family and r.site for r in records)
    for record in records:
        first, second = record.site.split("+")
        assert first == second  # pairs within one site
    # Groups the split keeps together: subjects joined by a pair or a family.
    family = {row.subject: row.family for row in assign_splits(records, log=str)[1].rows}
    parent = {subject: subject for subject in family}

    def root(subject):
        while parent[subject] != subject:
            subject = parent[subject]
        return subject

    for record in records:
        a, b = record.subjects
        parent[root(a)] = root(b)
    for a in family:
        for b in family:
            if family[a] == family[b]:
                parent[root(a)] = root(b)
    groups: dict[str, set[str]] = {}
    for subject in family:
        groups.setdefault(root(subject), set()).add(family[subject])
    # Each group holds at most two families: pairs do not chain the cohort together.
    assert max(len(families) for families in groups.values()) <= 2
    assert len(groups) > 5


def test_column_task_split_and_overrides(pm, bids, text):
    records = list(
        pm.read_study(
            "bids:" + str(bids), {"tasks": ["column:site"], "modalities": "t1", "split": "test"}
        )
    )
    assert {r.subject: r.turns[1].content for r in records} == {
        "sub-01": "A",
        "sub-02": "B",
        "sub-03": "A",
    }
    assert records[0].turns[0].content == "<image>\nWhat is the site of this subject?"
    assert {r.split for r in records} == {"test"}
    assert last_stats(str(bids))[str(bids)].skipped["column:site"] == 1
    text(
        bids / "participants.tsv",
        "participant_id\tgender\tsplit\nsub-01\t0\tvalidation\nsub-02\t1\ttrain\n",
    )
    options = {"tasks": ["sex"], "sex_column": "gender", "sex_map": {0: "female", 1: "male"}}
    records = [r for r in pm.read_study("bids:" + str(bids), options) if r.modalities == ("t1",)]
    assert {r.subject: (r.turns[1].content, r.split) for r in records} == {
        "sub-01": ("female", "validation"),
        "sub-02": ("male", "train"),
    }


@pytest.mark.parametrize("prefix", ["bids:", ""])
def test_passes_the_study_reader_conformance_checks(umbrella_conformance, bids, prefix, tmp_path):
    # Foreign folders, files and missing paths give None; the sample gives valid records
    # (existing absolute paths, placeholders matching images, an answer, a known split,
    # a source to open); a participant row with a bad split is reported and reading goes on.
    import umbrella_studies.plugin as plugin

    broken = shutil.copytree(bids, tmp_path / "broken")
    rows = PARTICIPANTS.splitlines()
    splits = ["split", "train", "holdout", "test", "train"]  # sub-02's is not a split
    (broken / "participants.tsv").write_text(
        "".join(f"{row}\t{split}\n" for row, split in zip(rows, splits, strict=True))
    )
    umbrella_conformance.registration(plugin, entry_point="studies")
    # No split given: the records leave it None, and UMBRELLA makes one (I10).
    records = umbrella_conformance.study_reader(
        plugin,
        prefix + str(bids),
        options={"tasks": ["sex"]},
        modalities=("t1", "fmri", "dmri"),
        min_records=4,
        bad_location=prefix + str(broken),
    )
    assert {r.subject for r in records} == {"sub-01", "sub-02", "sub-03", "sub-04"}


def test_a_bids_folder_that_also_holds_a_manifest_is_not_ours(pm, tmp_path, text, jsonfile):
    import umbrella_studies.plugin as plugin

    jsonfile(tmp_path / "dataset_description.json", {"Name": "x"})
    text(
        tmp_path / "manifest.jsonl",
        '{"subject": "s", "images": [], "conversation": '
        '[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
    )
    assert plugin.umbrella_study_reader(str(tmp_path), {}, print) is None
    assert [r.subject for r in pm.read_study(str(tmp_path))] == ["s"]
    with pytest.raises(PluginError):
        pm.read_study(str(tmp_path / "nothing"))
    with pytest.raises(DataError, match="no such folder"):
        pm.read_study("bids:" + str(tmp_path / "nothing"))


def test_malformed_participants_names_file_and_line(pm, bids, text):
    text(bids / "participants.tsv", "participant_id\tsex\nsub-01\tM\nsub-02\tF\textra\n")
    with pytest.raises(DataError, match=r"participants\.tsv:3: expected 2 fields"):
        list(pm.read_study("bids:" + str(bids), {"tasks": ["sex"]}))
    text(bids / "participants.tsv", "participant_id\tsex\nsub-01\tM\nsub-01\tF\n")
    with pytest.raises(DataError, match=r"participants\.tsv:3: .*twice.*participants\.tsv:2"):
        list(pm.read_study("bids:" + str(bids), {}))
    text(bids / "participants.tsv", "participant_id\tsplit\nsub-01\tholdout\n")
    with pytest.raises(DataError, match=r"participants\.tsv:2: column 'split'"):
        list(pm.read_study("bids:" + str(bids), {"tasks": ["column:split"]}))


def test_missing_phenotypes_is_a_clear_error(pm, bids):
    (bids / "participants.tsv").unlink()
    with pytest.raises(
        DataError, match=f"no conversation could be made: {bids}: no phenotype file"
    ):
        list(pm.read_study("bids:" + str(bids), {}))
    with pytest.raises(DataError, match=f"no conversation could be made: {bids}: sex: 7 no sex"):
        list(pm.read_study("bids:" + str(bids), {"tasks": ["sex"]}))
    with pytest.raises(ConfigError, match="unknown task 'height'"):
        list(pm.read_study("bids:" + str(bids), {"tasks": ["height"]}))


def test_bad_sidecar_names_file_and_line(pm, bids, text):
    text(bids / "task-rest_bold.json", '{"RepetitionTime": 2.0,\n oops}')
    with pytest.raises(DataError, match=r"task-rest_bold\.json:2: invalid JSON"):
        list(pm.read_study("bids:" + str(bids), {"tasks": ["sex"]}))


def test_real_images_load_with_modality_plugins(tmp_path, pm, text, jsonfile):
    nibabel_testing = pytest.importorskip("nibabel.testing")
    from umbrella_core.plugins import get_plugin_manager

    data = Path(nibabel_testing.data_path)
    root = tmp_path / "real"
    (root / "sub-01/anat").mkdir(parents=True)
    (root / "sub-01/func").mkdir(parents=True)
    shutil.copy(data / "anatomical.nii", root / "sub-01/anat/sub-01_T1w.nii")
    shutil.copy(data / "functional.nii", root / "sub-01/func/sub-01_task-rest_bold.nii")
    jsonfile(root / "sub-01/func/sub-01_task-rest_bold.json", {"RepetitionTime": 2.0})
    jsonfile(root / "dataset_description.json", {"Name": "real"})
    text(root / "participants.tsv", "participant_id\tsex\tage\nsub-01\tF\t30\n")
    records = list(pm.read_study(str(root), {"tasks": ["sex"]}))
    assert [r.modalities for r in records] == [("t1",), ("fmri",)]
    assert records[1].phenotypes["_sidecar"]["RepetitionTime"] == 2.0
    installed = get_plugin_manager()
    geometry = {"t1": ((32, 32, 32), (8, 8, 8)), "fmri": ((16, 16, 8, 8), (8, 8, 4, 4))}
    for record in records:
        (image,) = record.images
        spec = installed.resolve_modality(image.modality).item.with_geometry(
            *geometry[image.modality]
        )
        array = spec.load(spec, image.paths)
        assert array.shape == spec.input_shape


def test_validate_reads_the_studies_of_a_config_with_their_options(bids, tmp_path, capsys):
    import json

    from umbrella_core.commands import main

    config = tmp_path / "run.yaml"
    config.write_text(
        "data:\n  studies:\n"
        f"    - location: bids:{bids}\n"
        "      options: {tasks: [sex], modalities: [t1]}\n"
    )
    main(["validate", "--config", str(config), "--json"])
    narrow = json.loads(capsys.readouterr().out)
    main(["validate", f"bids:{bids}", "--json"])
    everything = json.loads(capsys.readouterr().out)
    # One sex question per T1 (4 subjects) with the options; every task and modality without.
    assert narrow["records"] == 4
    assert everything["records"] > narrow["records"]
    assert main(["validate"]) == 2
    assert "nothing to validate" in capsys.readouterr().err


def test_a_misspelt_option_is_refused_naming_it(pm, bids):
    with pytest.raises(ConfigError, match="unknown study option 'task'.*tasks"):
        list(pm.read_study("bids:" + str(bids), {"task": ["sex"]}))


def test_a_table_that_is_not_utf8_names_its_file_and_line(pm, bids):
    (bids / "participants.tsv").write_bytes(
        PARTICIPANTS.replace("patient", "patiënt").encode("latin-1")
    )
    with pytest.raises(DataError, match=r"participants\.tsv:3: not UTF-8 \(byte 0xeb.*iconv"):
        list(pm.read_study("bids:" + str(bids), {"tasks": ["sex"]}))


def test_an_unreadable_subject_folder_is_reported_and_the_others_read(pm, bids, monkeypatch):
    import os

    locked = bids / "sub-02"
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        # As a user without permission sees `chmod 000 sub-02` (root ignores it).
        return os.fspath(path) != str(locked) and real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    reported = []
    records = list(pm.read_study("bids:" + str(bids), {"tasks": ["sex"]}, reported.append))
    assert "sub-02" not in {r.subject for r in records} and {"sub-01", "sub-03"} <= {
        r.subject for r in records
    }
    (error,) = reported
    assert (error.source, error.field) == (str(locked), "folder")
    assert "cannot read the subject's folder: Permission denied" in str(error)
