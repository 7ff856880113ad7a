"""Splits that leak neither subjects nor families (ARCHITECTURE I10): ``data/split.py``."""

from __future__ import annotations

import json
import random
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umbrella_core.config import SplitConfig, load_config
from umbrella_core.data.manifest import read_manifest
from umbrella_core.data.split import assign_splits, check_leaks
from umbrella_core.data.split_table import SplitTable, split_file_of_checkpoint
from umbrella_core.errors import ConfigError, DataError
from umbrella_core.types import StudyRecord, Turn

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
TURNS = [Turn(role="user", content="Sex?"), Turn(role="assistant", content="female")]


def record(subject, split=None, *, study="s", session=None, family=None, site=None, **phenotypes):
    return StudyRecord(
        subject=subject,
        images=[],
        turns=TURNS,
        study=study,
        session=session,
        split=split,
        family=family,
        site=site,
        phenotypes=phenotypes,
        source=f"{study}.jsonl:{subject}:{session}",
    )


def quiet(_: str) -> None:
    pass


def round_half_up(fraction: float, n: int) -> int:
    return int(Decimal(str(fraction)) * n + Decimal("0.5"))


@st.composite
def cohorts(draw):
    """Records of one study: subjects with 1-3 sessions, families of 1-3, a few sites, a sex."""
    n = draw(st.integers(1, 40))
    sizes = []
    while sum(sizes) < n:
        sizes.append(draw(st.integers(1, 3)))
    records, families = [], {}
    subject = 0
    for index, size in enumerate(sizes):
        site = draw(st.sampled_from(["A", "B", "C"]))
        for _ in range(size):
            name = f"sub-{subject:03d}"
            families[name] = f"F{index}"
            sex = draw(st.sampled_from(["male", "female"]))
            for session in range(draw(st.integers(1, 3))):
                records.append(
                    record(name, session=f"ses-{session}", family=f"F{index}", site=site, sex=sex)
                )
            subject += 1
    return records, families


def sides_of(records):
    return {(r.subject, r.session): r.split for r in records}


@SETTINGS
@given(
    cohorts(),
    st.integers(0, 2**32),
    st.sampled_from([0.0, 0.1, 0.2, 0.3]),
    st.sampled_from([0.0, 0.1, 0.25]),
    st.randoms(use_true_random=False),
)
def test_made_splits_keep_families_whole_and_are_reproducible(
    tmp_path_factory, cohort, seed, test, validation, shuffler
):
    records, families = cohort
    config = SplitConfig(seed=seed, test=test, validation=validation)
    assigned, table = assign_splits(records, config, log=quiet)
    assert [r.subject for r in assigned] == [r.subject for r in records]  # same order
    assert all(r.split in ("train", "validation", "test") for r in assigned)
    # No subject and no family on two sides.
    by_subject, by_family = {}, {}
    for r in assigned:
        by_subject.setdefault(r.subject, set()).add(r.split)
        by_family.setdefault(r.family, set()).add(r.split)
    assert all(len(s) == 1 for s in by_subject.values())
    assert all(len(s) == 1 for s in by_family.values())
    assert check_leaks(assigned) == []
    # The same seed gives the same split whatever the record order.
    shuffled = list(records)
    shuffler.shuffle(shuffled)
    assert sides_of(assign_splits(shuffled, config, log=quiet)[0]) == sides_of(assigned)
    # The written table, given back, reproduces every record's side.
    path = table.write(tmp_path_factory.mktemp("run") / "split.tsv")
    again, from_file = assign_splits(shuffled, SplitConfig(file=str(path)), log=quiet)
    assert sides_of(again) == sides_of(assigned)
    assert from_file.sides() == table.sides()
    assert all(row.made for row in table.rows)
    # Held-out sizes are the rounded fractions of the units (families), one train unit kept.
    units = len(set(families.values()))
    n_test, n_validation = round_half_up(test, units), round_half_up(validation, units)
    n_test = min(n_test, units)
    n_validation = min(n_validation, units - n_test)
    if n_test + n_validation == units:
        if n_validation:
            n_validation -= 1
        else:
            n_test -= 1
    sides = {family: next(iter(s)) for family, s in by_family.items()}
    assert sum(s == "test" for s in sides.values()) == n_test
    assert sum(s == "validation" for s in sides.values()) == n_validation


@SETTINGS
@given(cohorts(), st.integers(0, 2**32))
def test_stratification_keeps_each_strata_share(cohort, seed):
    records, families = cohort
    config = SplitConfig(seed=seed, stratify="sex", test=0.2, validation=0.2)
    assigned, _ = assign_splits(records, config, log=quiet)
    # A family's stratum is the sex of its first subject (its first record).
    first = {}
    for r in sorted(assigned, key=lambda r: (r.subject, r.session)):
        first.setdefault(r.family, r)
    for sex in ("male", "female"):
        members = [r for r in first.values() if r.phenotypes["sex"] == sex]
        for side, fraction in (("test", 0.2), ("validation", 0.2)):
            count = sum(r.split == side for r in members)
            assert abs(count - fraction * len(members)) <= 1


def test_split_by_subject_and_by_site():
    records = [
        record(f"sub-{i}", family=f"F{i // 2}", site=f"S{i % 3}", sex="female") for i in range(30)
    ]
    by_site, table = assign_splits(records, SplitConfig(by="site", test=0.34), log=quiet)
    sites = {}
    for r in by_site:
        sites.setdefault(r.site, set()).add(r.split)
    assert all(len(s) == 1 for s in sites.values())
    assert "by site" in table.describe()
    by_subject, _ = assign_splits(records, SplitConfig(by="subject", test=0.5), log=quiet)
    assert sum(r.split == "test" for r in by_subject) == 15  # units are subjects now


def test_a_subject_on_two_sides_names_both_records_or_warns():
    records = [
        record("sub-1", "train", session="ses-1"),
        record("sub-1", "test", session="ses-2"),
        record("sub-2", "test"),
    ]
    with pytest.raises(DataError) as caught:
        assign_splits(records, SplitConfig(), log=quiet)
    message = str(caught.value)
    assert "s.jsonl:sub-1:ses-1" in message and "s.jsonl:sub-1:ses-2" in message
    assert "train" in message and "test" in message and "data.split.leak=warn" in message
    logged = []
    kept, table = assign_splits(records, SplitConfig(leak="warn"), log=logged.append)
    assert [r.split for r in kept] == ["train", "test", "test"]
    assert any("warning: 1 split leak" in line and "sub-1" in line for line in logged)
    assert not any(row.made for row in table.rows)


def test_a_family_on_two_sides_is_a_leak():
    records = [record("a", "train", family="F1"), record("b", "test", family="F1")]
    with pytest.raises(DataError, match="family F1"):
        assign_splits(records, SplitConfig(), log=quiet)
    with pytest.raises(DataError, match="family F1"):
        check_leaks(records)
    assert check_leaks(records, leak="warn", log=quiet) != []
    # Splitting by subject asks for no family check.
    assign_splits(records, SplitConfig(by="subject"), log=quiet)


def test_a_study_that_gives_some_splits_has_the_others_train():
    records = [record("a", "test"), record("b"), record("c"), record("x", study="other")]
    assigned, table = assign_splits(records, SplitConfig(test=0.5), log=quiet)
    assert [r.split for r in assigned[:3]] == ["test", "train", "train"]
    made = {row.subject: row.made for row in table.rows}
    assert made == {"a": False, "b": False, "c": False, "x": True}
    assert assigned[3].split == "train"  # one unit: training keeps it
    # A subject given test in one record and nothing (train) in another leaks.
    with pytest.raises(DataError, match="no split given"):
        assign_splits([record("a", "test"), record("a", session="2")], log=quiet)


def test_a_pair_record_keeps_both_subjects_on_one_side():
    records = [record(f"s{i}") for i in range(20)] + [record("s3+s17")]
    for seed in range(20):
        assigned, table = assign_splits(records, SplitConfig(seed=seed, test=0.3), log=quiet)
        sides = table.sides()
        assert sides[("s", "s3")] == sides[("s", "s17")] == assigned[-1].split
    assert record("a+b").subjects == ("a", "b")
    # Given splits that pull a pair apart are a leak naming the group.
    with pytest.raises(DataError, match="split leak"):
        assign_splits([record("a", "train"), record("b", "test"), record("a+b", "train")])


def test_the_split_file_reproduces_and_checks(tmp_path):
    records = [record(f"sub-{i}", family=f"F{i // 2}") for i in range(20)]
    assigned, table = assign_splits(records, SplitConfig(seed=5), log=quiet)
    path = table.write(tmp_path / "run" / "split.tsv")
    header = path.read_text().splitlines()[0]
    assert header == "study\tsubject\tfamily\tsite\tsplit\tmade"
    assert SplitTable.read(path).rows == table.rows
    logged = []
    again, _ = assign_splits(records, SplitConfig(file=str(path)), log=logged.append)
    assert [r.split for r in again] == [r.split for r in assigned]
    assert logged == [f"split (from {path}): " + table.describe().split(": ", 1)[1]]
    # A subject the file does not hold.
    with pytest.raises(DataError, match=rf"s.jsonl:new:None: .*'new'.*{path}"):
        assign_splits([*records, record("new")], SplitConfig(file=str(path)), log=quiet)
    # A given split that disagrees with the file is a leak.
    moved = [
        record(r.subject, "test" if r.split == "train" else "train", family=r.family)
        for r in assigned[:1]
    ]
    with pytest.raises(DataError, match=r"split\.tsv:\d+"):
        assign_splits(moved + records[1:], SplitConfig(file=str(path)), log=quiet)
    # The split of a checkpoint's run.
    (tmp_path / "run" / "final").mkdir()
    assert split_file_of_checkpoint(tmp_path / "run" / "final") == path.resolve()
    assert split_file_of_checkpoint(tmp_path / "elsewhere" / "final") is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r":1: expected a header"),
        ("study\tsubject\n", r":1: the header has no 'split' column"),
        ("study\tsubject\tsplit\ns\ta\ttrain\ns\tb\n", r":3: expected 3 tab-separated fields"),
        ("study\tsubject\tsplit\ns\ta\tholdout\n", r":2: split must be train, validation or test"),
        ("study\tsubject\tsplit\ns\ta\ttrain\ns\ta\ttest\n", r":3: .*twice \(also line 2\)"),
    ],
)
def test_a_malformed_split_file_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "split.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=rf"split\.tsv{message}"):
        SplitTable.read(path)
    with pytest.raises(DataError, match="cannot read the split file"):
        SplitTable.read(tmp_path / "missing.tsv")


def test_the_table_counts_sides_in_one_line():
    records = [record(f"sub-{i:02d}", family=f"F{i}") for i in range(20)]
    _, table = assign_splits(records, SplitConfig(), log=quiet)
    assert table.counts() == {"train": 16, "validation": 2, "test": 2}
    assert table.describe() == (
        "split (made, by family, seed 0): 16 train / 2 validation / 2 test subjects"
    )
    _, given = assign_splits([record("a", "train")], log=quiet)
    assert given.describe() == (
        "split (given by the studies): 1 train / 0 validation / 0 test subjects"
    )


def test_config_section_and_overrides(tmp_path):
    config = load_config(None, ["data.split.test=0.3", "data.split.stratify=sex"])
    assert config.data.split == SplitConfig(test=0.3, stratify="sex")
    assert load_config().data.split == SplitConfig()
    yaml = tmp_path / "run.yaml"
    yaml.write_text("data:\n  split:\n    by: family\n    seed: 7\n    stratify: null\n")
    assert load_config(yaml, ["data.split.validation=0"]).data.split == SplitConfig(
        by="family", seed=7, validation=0.0
    )
    bad = {
        "data.split.tset=0.3": "data.split.tset",
        "data.split.test=1.2": "data.split.test",
        "data.split.by=household": "data.split.by",
        "data.split.leak=ignore": "data.split.leak",
        "data.split.seed=many": "data.split.seed",
        "data.split.test=0.6": "data.split.validation",  # with validation 0.5
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override, "data.split.validation=0.5"])


def test_manifest_fields_and_read_studies(tmp_path, toy_pm):
    from umbrella_core.data.demo import write_demo
    from umbrella_core.data.studies import read_studies

    spec = toy_pm.resolve_modality("t1").item
    demo = write_demo(tmp_path / "demo", {"t1": spec}, subjects=12)
    lines = demo.read_text().splitlines()
    # The same study without its splits, with families of two.
    bare = tmp_path / "bare"
    bare.mkdir()
    rows, subjects = [], {}
    for line in lines:
        obj = json.loads(line)
        obj.pop("split")
        obj["family"] = f"F{subjects.setdefault(obj['subject'], len(subjects)) // 2}"
        obj["site"] = "NYU"
        obj["images"][0]["path"] = str(demo.parent / obj["images"][0]["path"])
        rows.append(json.dumps(obj))
    (bare / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    read = list(read_manifest(bare / "manifest.jsonl"))
    assert {(r.split, r.site) for r in read} == {(None, "NYU")}
    assert read[0].family == "F0" and len(subjects) == 12
    logged = []
    config = load_config(
        None,
        [
            f"data.studies=[{bare}]",
            "data.modalities=t1",
            "data.allow_outside_root=true",
            "data.split.test=0.34",
        ],
    )
    data = read_studies(config, toy_pm, log=logged.append)
    assert all(r.split in ("train", "validation", "test") for r in data.records)
    assert data.split is not None and len(data.split) == 12
    # What train() writes into the run folder, and evaluate finds from a checkpoint.
    written = data.split.table.write(tmp_path / "run" / "split.tsv")
    assert SplitTable.read(written).sides() == data.split.sides()
    assert data.split.counts()["test"] == 4  # 2 of 6 families (a third), 4 subjects
    assert any(line.startswith("split (made, by family, seed 0)") for line in logged)
    assert check_leaks(data.records) == []
    # The demo names its own splits: nothing is made, nothing changes.
    config = load_config(None, [f"data.studies=[{demo}]", "data.modalities=t1"])
    data = read_studies(config, toy_pm, log=quiet)
    assert not any(row.made for row in data.split.rows)
    given = {json.loads(line)["subject"]: json.loads(line)["split"] for line in lines}
    assert {r.subject: r.split for r in data.records} == given


def test_shuffled_order_is_irrelevant_with_stratification():
    records = [
        record(f"sub-{i:02d}", session=f"ses-{j}", age=20 + i, sex=random.Random(i).choice("MF"))
        for i in range(40)
        for j in range(2)
    ]
    config = SplitConfig(stratify="age", test=0.2, validation=0.2, seed=3)
    first = sides_of(assign_splits(records, config, log=quiet)[0])
    shuffled = list(records)
    random.Random(1).shuffle(shuffled)
    assert sides_of(assign_splits(shuffled, config, log=quiet)[0]) == first
    # Quintiles of age: each of the five bins gives test and validation subjects.
    tested = {int(s.split("-")[1]) for (s, _), side in first.items() if side == "test"}
    assert len(tested) == 5 * 2  # round-half-up(0.2 * 8) of each bin of 8
    assert sorted(sum(i // 8 == b for i in tested) for b in range(5)) == [2] * 5


def test_record_fields():
    r = record("x", "TEST", family="F", site="S")
    assert r.split == "test" and r.family == "F" and r.site == "S" and r.subjects == ("x",)
    assert record("x").split is None


def _one_subject_on_both_sides(folder):
    """A manifest whose line 1 puts sub-01 in train and line 2 in test."""
    nib = pytest.importorskip("nibabel")
    import numpy as np

    image = folder / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(image))
    line = {
        "subject": "sub-01",
        "images": [{"modality": "t1", "path": image.name}],
        "conversation": [
            {"role": "user", "content": "<image>\nWhich side?"},
            {"role": "assistant", "content": "left"},
        ],
    }
    manifest = folder / "manifest.jsonl"
    sides = [json.dumps({**line, "split": split}) for split in ("train", "test")]
    manifest.write_text("\n".join(sides) + "\n")
    return manifest


def test_umbrella_train_refuses_a_manifest_with_a_subject_on_both_sides(tmp_path, capsys):
    from umbrella_core.commands import main

    manifest = _one_subject_on_both_sides(tmp_path)
    out = tmp_path / "run"
    code = main(["train", "--study", str(manifest), "--modalities", "t1", "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    # One line naming both records, their sides and the way to allow it; nothing trained.
    assert f"{manifest}:1" in err and f"{manifest}:2" in err and "data.split.leak=warn" in err
    assert not (out / "final").exists()


def test_umbrella_validate_reports_a_subject_on_both_sides(tmp_path, capsys):
    from umbrella_core.commands import main

    manifest = _one_subject_on_both_sides(tmp_path)
    assert main(["validate", str(manifest)]) == 1
    out = capsys.readouterr().out
    (leak,) = [line for line in out.splitlines() if line.startswith(f"{manifest}: split:")]
    assert f"{manifest}:1" in leak and f"{manifest}:2" in leak
