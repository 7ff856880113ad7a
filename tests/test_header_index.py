"""The header index: a relaunch opens only new or changed files, and never serves a stale check."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from nibabel.testing import data_path

import umbrella_core.imaging.header as header_module
from umbrella_core.config import load_config
from umbrella_core.data.conversation import Tokenization
from umbrella_core.data.header_index import MAX_SHARDS, HeaderIndex, _digest
from umbrella_core.data.studies import check_headers_once, read_studies, screen_records
from umbrella_core.plugins import get_plugin_manager

VERSIONS = {"t1": "umbrella-t1==test"}


def _aged(path: Path) -> Path:
    """Files (and folders) changed moments ago are checked but not indexed: age them as a
    cohort's are."""
    old = time.time() - 3600
    os.utime(path, (old, old))
    os.utime(path.parent, (old, old))
    return path


@pytest.fixture
def cohort(tmp_path):
    """Three subjects' real T1 (nibabel's anatomical.nii, gzipped) and a manifest."""
    real = gzip.compress((Path(data_path) / "anatomical.nii").read_bytes())
    lines = []
    for i in range(3):
        path = tmp_path / "study" / f"sub-{i}" / "anat" / f"sub-{i}_T1w.nii.gz"
        path.parent.mkdir(parents=True)
        path.write_bytes(real)
        _aged(path)
        for question, answer in (("How old?", f"{50 + i} years"), ("Sex?", "female")):
            lines.append(
                json.dumps(
                    {
                        "subject": f"sub-{i}",
                        "split": "test" if i == 2 else "train",
                        "images": [
                            {"modality": "t1", "path": str(path.relative_to(path.parents[2]))}
                        ],
                        "conversation": [
                            {"role": "user", "content": f"<image>\n{question}"},
                            {"role": "assistant", "content": answer},
                        ],
                    }
                )
            )
    manifest = tmp_path / "study" / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.fixture
def header_reads(monkeypatch):
    """The NIfTI header reads, by path."""
    reads: list[str] = []
    original = header_module.read_nifti_header

    def counting(path):
        reads.append(os.fspath(path))
        return original(path)

    monkeypatch.setattr(header_module, "read_nifti_header", counting)
    return reads


def _config(manifest: Path, index: Path, *extra: str):
    return load_config(
        None,
        [
            "data.studies=" + json.dumps([str(manifest)]),
            "data.modalities=t1",
            f"data.header_index={index}",
            "data.geometry.t1.shape=[16,16,16]",
            "data.geometry.t1.patch_size=[8,8,8]",
            *extra,
        ],
    )


def _launch(config, log=lambda _: None):
    """What a launch does before step 1: read the studies, check the headers, screen."""
    pm = get_plugin_manager()
    data = read_studies(config, pm, log=log)
    check_headers_once(data, config, log=log)
    kept, problems = screen_records(
        data.per_study,
        check="files",
        encode=Tokenization.for_run(config.model, data.specs).encode,
        pm=pm,
        specs=data.specs,
        index=data.header_index,
    )
    return kept, problems


def test_a_relaunch_reads_no_header_and_a_changed_file_is_read_again(
    cohort, tmp_path, header_reads
):
    config = _config(cohort, tmp_path / "index")
    kept, problems = _launch(config)
    assert not problems and sum(map(len, kept)) == 6
    assert len(header_reads) == 3  # one per file, shared by its two records
    assert list((tmp_path / "index").glob("*.json")), "the index is written beside the cache"

    header_reads.clear()
    kept, problems = _launch(config)
    assert not problems and sum(map(len, kept)) == 6
    assert header_reads == [], "a relaunch opens no file the index holds"

    # sub-1's file is replaced by one that is no NIfTI: found, not served from the index.
    changed = cohort.parent / "sub-1" / "anat" / "sub-1_T1w.nii.gz"
    changed.write_bytes(gzip.compress(b"not a NIfTI header" * 40))
    _aged(changed)
    kept, problems = _launch(config)
    assert header_reads == [str(changed)]
    assert {p.source.rsplit(":", 1)[-1] for p in problems} == {"3", "4"}, problems
    assert all(str(changed) in p.message for p in problems)


def test_same_size_and_restored_mtime_is_still_a_change(cohort, tmp_path, header_reads):
    config = _config(cohort, tmp_path / "index")
    _launch(config)
    path = cohort.parent / "sub-0" / "anat" / "sub-0_T1w.nii.gz"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-10:] = b"\0" * 10
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # rsync -t, touch -r
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    header_reads.clear()
    _launch(config)
    assert header_reads == [str(path)]


def test_another_geometry_or_plugin_version_is_a_miss(cohort, tmp_path):
    pm = get_plugin_manager()
    spec = pm.resolve_modality("t1").item
    images = [(("t1", (str(p),))) for p in sorted(cohort.parent.glob("sub-*/anat/*.nii.gz"))]
    index = HeaderIndex(tmp_path / "index", VERSIONS)
    index.check_images(images, {"t1": spec}, decode=False)
    index.save()
    again = HeaderIndex(tmp_path / "index", VERSIONS)
    again.check_images(images, {"t1": spec}, decode=False)
    assert (again.hits, again.misses) == (3, 0)
    other = HeaderIndex(tmp_path / "index", {"t1": "umbrella-t1==next"})
    other.check_images(images, {"t1": spec}, decode=False)
    assert (other.hits, other.misses) == (0, 3)
    smaller = HeaderIndex(tmp_path / "index", VERSIONS)
    smaller.check_images(images, {"t1": spec.with_geometry((32, 32, 32))}, decode=False)
    assert (smaller.hits, smaller.misses) == (0, 3)


def test_files_written_moments_ago_and_missing_files_are_not_indexed(tmp_path):
    spec = get_plugin_manager().resolve_modality("t1").item
    fresh = tmp_path / "fresh_T1w.nii"
    shutil.copyfile(Path(data_path) / "anatomical.nii", fresh)
    index = HeaderIndex(tmp_path / "index", VERSIONS)
    images = [("t1", (str(fresh),)), ("t1", (str(tmp_path / "gone_T1w.nii"),))]
    found = index.check_images(images, {"t1": spec}, decode=False)
    assert found[images[0]] == [] and "gone_T1w.nii" in found[images[1]][0]
    assert index.save() is None, "nothing old enough to keep"


def test_processes_find_what_threads_find_and_the_decoded_check_is_kept(cohort, tmp_path):
    spec = get_plugin_manager().resolve_modality("t1").item.with_geometry((16, 16, 16), (8, 8, 8))
    paths = sorted(cohort.parent.glob("sub-*/anat/*.nii.gz"))
    broken = _aged_copy(paths[0], tmp_path / "images" / "broken_T1w.nii.gz", truncate=True)
    images = [("t1", (str(p),)) for p in [*paths, broken]] * 30  # repeats: checked once
    threads = HeaderIndex(None, VERSIONS).check_images(images, {"t1": spec}, decode=True)
    index = HeaderIndex(tmp_path / "index", VERSIONS)
    processes = index.check_images(images, {"t1": spec}, decode=True, workers=2)
    assert processes == threads
    assert threads[images[3]] and "broken_T1w.nii.gz" in threads[images[3]][0]
    index.save()
    again = HeaderIndex(tmp_path / "index", VERSIONS)
    assert again.check_images(images, {"t1": spec}, decode=True) == threads
    assert (again.hits, again.misses) == (4, 0)


def _aged_copy(source: Path, target: Path, *, truncate: bool = False) -> Path:
    target.parent.mkdir(exist_ok=True)
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2] if truncate else data)
    return _aged(target)


def test_shards_are_merged_and_an_unreadable_one_is_skipped(tmp_path):
    spec = get_plugin_manager().resolve_modality("t1").item
    root = tmp_path / "index"
    for i in range(MAX_SHARDS + 1):
        path = _aged_copy(Path(data_path) / "anatomical.nii", tmp_path / "images" / f"s{i}_T1w.nii")
        index = HeaderIndex(root, VERSIONS)
        index.check_images([("t1", (str(path),))], {"t1": spec}, decode=False)
        index.save()
    assert len(list(root.glob("*.json"))) == 1, "merged into one shard"
    (root / "0-garbage.json").write_text("{not json")
    said = []
    index = HeaderIndex(root, VERSIONS, log=said.append)
    assert len(index.entries) == MAX_SHARDS + 1
    assert said and "0-garbage.json" in said[0] and "ignored" in said[0]


def _one_shard(tmp_path):
    spec = get_plugin_manager().resolve_modality("t1").item
    root = tmp_path / "index"
    path = _aged_copy(Path(data_path) / "anatomical.nii", tmp_path / "images" / "s_T1w.nii")
    index = HeaderIndex(root, VERSIONS)
    index.check_images([("t1", (str(path),))], {"t1": spec}, decode=False)
    (shard,) = [index.save()]
    return root, shard


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        # Someone (or a damaged disk) lets a refused image through: the checksum says so.
        (lambda d: [e.update(headers=[]) for e in d["entries"].values()], "checksum does not"),
        (lambda d: d.update(entries=[1, 2]), "its entries are a list, not an object"),
        (lambda d: d["entries"].update(x="no entry"), "entry 'x' has a wrong shape"),
        (lambda d: d["entries"].update(y={"headers": "ok"}), "entry 'y' has a wrong shape"),
        (lambda d: d["entries"].update(z={"frames": "8"}), "entry 'z' has a wrong shape"),
    ],
)
def test_an_edited_or_misshapen_shard_is_ignored_with_a_warning_not_a_crash(tmp_path, edit, why):
    root, shard = _one_shard(tmp_path)
    data = json.loads(shard.read_text())
    assert HeaderIndex(root, VERSIONS).entries  # as written, it is used
    for entry in data["entries"].values():
        entry["headers"] = ["a refusal"]
    data["sha256"] = _digest(data["entries"])  # a refusal, recorded as the index would
    edit(data)
    shard.write_text(json.dumps(data))
    said = []
    index = HeaderIndex(root, VERSIONS, log=said.append)
    assert index.entries == {}
    assert len(said) == 1 and str(shard) in said[0] and why in said[0] and "ignored" in said[0]


def test_outcomes_are_keyed_on_the_cores_rules(tmp_path, monkeypatch):
    """A tightened check (CHECKS_VERSION raised) sees every image again."""
    import umbrella_core.data.header_index as header_index

    spec = get_plugin_manager().resolve_modality("t1").item
    before = HeaderIndex(None, VERSIONS).key(spec, (str(Path(data_path) / "anatomical.nii"),))
    monkeypatch.setattr(header_index, "CHECKS_VERSION", 2)
    after = HeaderIndex(None, VERSIONS).key(spec, (str(Path(data_path) / "anatomical.nii"),))
    assert before != after


@pytest.mark.parametrize("off", ["off", "false", "none"])
def test_header_index_off_writes_nothing(cohort, tmp_path, monkeypatch, off):
    monkeypatch.chdir(tmp_path)
    config = _config(cohort, tmp_path / "index", f"data.header_index={off}")
    _launch(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study"]


def test_a_brain_mask_added_or_edited_beside_a_t1_is_a_change(cohort, tmp_path, header_reads):
    config = _config(cohort, tmp_path / "index")
    _launch(config)
    t1 = cohort.parent / "sub-0" / "anat" / "sub-0_T1w.nii.gz"
    mask = t1.with_name("sub-0_desc-brain_mask.nii.gz")
    shutil.copyfile(t1, mask)  # the loader would now use it
    header_reads.clear()
    _launch(config)
    assert header_reads == [str(t1)]
    _aged(mask)
    _launch(config)  # indexed with its mask now
    header_reads.clear()
    _launch(config)
    assert header_reads == []
    mask.write_bytes(mask.read_bytes())  # rewritten in place: the folder does not change
    _aged(mask)
    header_reads.clear()
    _launch(config)
    assert header_reads == [str(t1)]
