"""The cohort readers (ABCD, UK Biobank, HCP, HBN, ABIDE) on miniature copies of their layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from umbrella_core.errors import DataError


def answers(records, question_word):
    return {
        (r.subject, r.session, r.modalities): r.turns[1].content
        for r in records
        if question_word in r.turns[0].content
    }


def test_abcd(pm, tmp_path, nifti, text):
    root = tmp_path / "abcd"
    sub = "sub-NDARINV0A4P0LWM"
    nifti(root / f"{sub}/ses-baselineYear1Arm1/anat/{sub}_ses-baselineYear1Arm1_run-01_T1w.nii.gz")
    nifti(root / f"{sub}/ses-2YearFollowUpYArm1/anat/{sub}_ses-2YearFollowUpYArm1_T1w.nii.gz")
    text(
        root / "abcd_p_demo.tsv",
        "src_subject_id\teventname\tinterview_age\tsex\n"
        "The NDAR Global Unique Identifier (GUID)\tThe event name\tAge in months\tSex\n"
        "NDAR_INV0A4P0LWM\tbaseline_year_1_arm_1\t119\tF\n"
        "NDAR_INV0A4P0LWM\t2_year_follow_up_y_arm_1\t143\tF\n",
    )
    records = list(pm.read_study("abcd:" + str(root), {"tasks": ["sex", "age"]}))
    assert answers(records, "old") == {
        (sub, "ses-baselineYear1Arm1", ("t1",)): "10 years",  # 119 months
        (sub, "ses-2YearFollowUpYArm1", ("t1",)): "12 years",  # 143 months
    }
    assert set(answers(records, "sex").values()) == {"female"}
    assert {r.study for r in records} == {"abcd"}
    baseline = [r for r in records if r.session == "ses-baselineYear1Arm1"]
    assert baseline[0].phenotypes["interview_age"] == 119


def test_ukb(pm, tmp_path, nifti, text):
    root = tmp_path / "ukb"
    nifti(root / "1000001/T1/T1.nii.gz")
    nifti(root / "1000001/T1/T1_brain.nii.gz")
    nifti(root / "1000001/fMRI/rfMRI.nii.gz", (4, 4, 4, 3))
    nifti(root / "1000001/dMRI/dMRI/dti_FA.nii.gz")
    nifti(root / "1000001/dMRI/dMRI/dti_MD.nii.gz")
    # Bulk-download folders of one eid and instance merge into one session.
    nifti(root / "1000002_20252_2_0/T1/T1.nii.gz")
    nifti(root / "1000002_20250_2_0/dMRI/TBSS/FA/dti_FA_to_MNI.nii.gz")
    nifti(root / "1000002_20250_2_0/dMRI/TBSS/MD/dti_MD_to_MNI.nii.gz")
    text(
        root / "ukb_phenotypes.csv",
        "eid,31-0.0,21003-2.0,21003-3.0,54-2.0\n1000001,0,63.6,66,11025\n1000002,1,55,,\n",
    )
    records = list(pm.read_study("ukb:" + str(root), {"tasks": ["sex", "age"]}))
    paths = {(r.subject, r.modalities): [Path(p).name for p in r.images[0].paths] for r in records}
    assert paths[("1000001", ("t1",))] == ["T1_brain.nii.gz"]
    assert paths[("1000001", ("fmri",))] == ["rfMRI.nii.gz"]
    assert paths[("1000001", ("dmri",))] == ["dti_FA.nii.gz", "dti_MD.nii.gz"]
    assert paths[("1000002", ("dmri",))] == ["dti_FA_to_MNI.nii.gz", "dti_MD_to_MNI.nii.gz"]
    assert {r.session for r in records} == {"2_0"}
    sexes = answers(records, "sex")
    assert sexes[("1000001", "2_0", ("t1",))] == "female"
    assert sexes[("1000002", "2_0", ("t1",))] == "male"
    assert answers(records, "old")[("1000001", "2_0", ("t1",))] == "64 years"
    # The assessment centre of the imaging visit is the site; no split is given.
    assert {r.subject: r.site for r in records} == {"1000001": "11025", "1000002": None}
    assert {r.split for r in records} == {None}


def test_hcp(pm, tmp_path, nifti, text):
    root = tmp_path / "hcp"
    nifti(root / "100307/T1w/T1w_acpc_dc_restore_brain.nii.gz")
    for run in ("rfMRI_REST1_LR", "rfMRI_REST2_RL"):
        nifti(root / f"100307/MNINonLinear/Results/{run}/{run}.nii.gz", (4, 4, 4, 3))
    nifti(root / "100307/MNINonLinear/Results/tfMRI_WM_LR/tfMRI_WM_LR.nii.gz", (4, 4, 4, 3))
    nifti(root / "100307/T1w/Diffusion/data.nii.gz", (4, 4, 4, 5))
    text(root / "100307/T1w/Diffusion/bvals", "0 1000 1000 1000 1000\n")
    nifti(root / "100408/MNINonLinear/T1w.nii.gz")
    text(
        root / "unrestricted_hcp.csv",
        "Subject,Release,Gender,Age\n100307,Q1,F,26-30\n100408,Q1,M,36+\n",
    )
    records = list(pm.read_study("hcp:" + str(root), {"tasks": ["age"]}))
    got = answers(records, "old")
    assert got[("100307", None, ("t1",))] == "28 years"  # the band's midpoint
    assert got[("100408", None, ("t1",))] == "36 years"
    fmri = [Path(r.images[0].paths[0]).name for r in records if r.modalities == ("fmri",)]
    assert fmri == ["rfMRI_REST1_LR.nii.gz", "rfMRI_REST2_RL.nii.gz"]
    (dmri,) = [r for r in records if r.modalities == ("dmri",)]
    assert dmri.images[0].paths == (str(root / "100307/T1w/Diffusion/data.nii.gz"),)
    assert not [
        r
        for r in pm.read_study("hcp:" + str(root), {"dmri_raw": False})
        if r.modalities == ("dmri",)
    ]


def test_hbn_sites(pm, tmp_path, nifti, text):
    root = tmp_path / "hbn"
    nifti(root / "RU/sub-NDARAA075AMK/anat/sub-NDARAA075AMK_acq-HCP_T1w.nii.gz")
    nifti(root / "CBIC/sub-NDARAA112DMH/anat/sub-NDARAA112DMH_T1w.nii.gz")
    nifti(root / "CBIC/sub-NDARAA112DMH/func/sub-NDARAA112DMH_task-rest_bold.nii.gz", (4, 4, 4, 3))
    text(
        root / "HBN_R1_Pheno.csv",
        "EID,Sex,Age,Study Site\nNDARAA075AMK,0,8.1,1\nNDARAA112DMH,1,11.7,3\n",
    )
    records = list(pm.read_study("hbn:" + str(root), {"tasks": ["sex"]}))
    # One dataset per site: the site folder is the site.
    assert {r.subject: r.site for r in records} == {
        "sub-NDARAA075AMK": "RU",
        "sub-NDARAA112DMH": "CBIC",
    }
    assert answers(records, "sex") == {
        ("sub-NDARAA075AMK", None, ("t1",)): "male",
        ("sub-NDARAA112DMH", None, ("t1",)): "female",
        ("sub-NDARAA112DMH", None, ("fmri",)): "female",
    }
    # Without the release CSV, each site's participants.tsv is used.
    (root / "HBN_R1_Pheno.csv").unlink()
    text(root / "RU/participants.tsv", "participant_id\tSex\tAge\nsub-NDARAA075AMK\t1\t8\n")
    records = list(pm.read_study("hbn:" + str(root), {"tasks": ["sex"]}))
    assert answers(records, "sex") == {("sub-NDARAA075AMK", None, ("t1",)): "female"}


def test_abide_layouts(pm, tmp_path, nifti, text):
    root = tmp_path / "abide"
    nifti(
        root / "Outputs/cpac/filt_global/func_preproc/Pitt_0050003_func_preproc.nii.gz",
        (4, 4, 4, 3),
    )
    nifti(root / "NYU/sub-0051036/ses-1/anat/sub-0051036_ses-1_run-1_T1w.nii.gz")
    nifti(root / "Pitt/0050004/session_1/anat_1/mprage.nii.gz")
    nifti(root / "Pitt/0050004/session_1/rest_1/rest.nii.gz", (4, 4, 4, 3))
    text(
        root / "Phenotypic_V1_0b_preprocessed1.csv",
        "SUB_ID,SITE_ID,FILE_ID,SEX,AGE_AT_SCAN,DX_GROUP\n"
        "50003,PITT,Pitt_0050003,1,24.45,1\n"
        "50004,PITT,Pitt_0050004,2,19.09,2\n"
        "51036,NYU,NYU_0051036,1,-9999,1\n",
    )
    records = list(pm.read_study("abide:" + str(root), {"tasks": ["diagnosis", "sex", "age"]}))
    assert answers(records, "diagnosis") == {
        ("0050003", None, ("fmri",)): "autism",
        ("sub-0051036", "ses-1", ("t1",)): "autism",
        ("0050004", "session_1", ("t1",)): "control",
        ("0050004", "session_1", ("fmri",)): "control",
    }
    assert answers(records, "sex")[("0050004", "session_1", ("t1",))] == "female"
    assert ("sub-0051036", "ses-1", ("t1",)) not in answers(records, "old")  # -9999 is missing
    assert {r.subject: r.site for r in records if "+" not in r.subject} == {
        "0050003": "PITT",
        "0050004": "PITT",
        "sub-0051036": "NYU",
    }


def test_cohort_bad_rows_name_file_and_line(pm, tmp_path, nifti, text):
    root = tmp_path / "abide"
    nifti(root / "Pitt/0050004/session_1/anat_1/mprage.nii.gz")
    path = text(root / "Phenotypic_V1_0b_preprocessed1.csv", 'SUB_ID,SEX\n50004,2\n"50005,1\n')
    with pytest.raises(DataError, match=f"{path}:"):
        list(pm.read_study("abide:" + str(root), {}))
    text(root / "Phenotypic_V1_0b_preprocessed1.csv", "SUB_ID,SEX\n50004,2,3\n")
    with pytest.raises(
        DataError, match=r"Phenotypic_V1_0b_preprocessed1\.csv:2: expected 2 fields"
    ):
        list(pm.read_study("abide:" + str(root), {}))


def test_abcd_families_and_sites_reach_the_records(pm, tmp_path, nifti, text):
    from umbrella_core.config import SplitConfig
    from umbrella_core.data.split import assign_splits

    root = tmp_path / "abcd"
    subjects = ["NDARINVAAAAAAAA", "NDARINVBBBBBBBB", "NDARINVCCCCCCCC"]
    for sub in subjects:
        for ses in ("baselineYear1Arm1", "2YearFollowUpYArm1"):
            nifti(root / f"sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}_T1w.nii.gz")
    text(
        root / "abcd_p_demo.tsv",
        "src_subject_id\teventname\tinterview_age\tsex\n"
        + "".join(
            f"NDAR_{s[4:]}\t{event}\t{age}\tF\n"
            for s in subjects
            for event, age in (("baseline_year_1_arm_1", 119), ("2_year_follow_up_y_arm_1", 143))
        ),
    )
    # ABCD 5.x: family ids in the longitudinal tracking table, at baseline only.
    text(
        root / "abcd_y_lt.csv",
        "src_subject_id,eventname,site_id_l,rel_family_id\n"
        "NDAR_INVAAAAAAAA,baseline_year_1_arm_1,site06,4021\n"
        "NDAR_INVAAAAAAAA,2_year_follow_up_y_arm_1,site06,\n"
        "NDAR_INVBBBBBBBB,baseline_year_1_arm_1,site06,4021\n"
        "NDAR_INVCCCCCCCC,baseline_year_1_arm_1,site14,9000\n",
    )
    records = list(pm.read_study("abcd:" + str(root), {"tasks": ["sex", "age"]}))
    baseline = {r.subject: r for r in records if r.session == "ses-baselineYear1Arm1"}
    assert {s: (r.family, r.site) for s, r in baseline.items()} == {
        "sub-NDARINVAAAAAAAA": ("4021", "site06"),
        "sub-NDARINVBBBBBBBB": ("4021", "site06"),
        "sub-NDARINVCCCCCCCC": ("9000", "site14"),
    }
    assert (
        answers(records, "old")[("sub-NDARINVAAAAAAAA", "ses-baselineYear1Arm1", ("t1",))]
        == "10 years"
    )  # the demographics table still gives the age
    assert {r.split for r in records} == {None}
    # The two siblings land on one side, every session of them.
    for seed in range(8):
        assigned, _ = assign_splits(
            records, SplitConfig(test=0.5, validation=0, seed=seed), log=str
        )
        sides = {r.split for r in assigned if r.family == "4021" or "AAAA" in r.subject}
        assert len(sides) == 1
    # The family id may sit in the demographics table itself, or in a column named by option.
    (root / "abcd_y_lt.csv").unlink()
    text(
        root / "abcd_p_demo.tsv",
        "src_subject_id\tinterview_age\tsex\tfam\nNDAR_INVAAAAAAAA\t119\tF\t77\n",
    )
    records = list(pm.read_study("abcd:" + str(root), {"tasks": ["sex"], "family_column": "fam"}))
    assert {r.family for r in records} == {"77"}


def test_hcp_family_id_from_the_restricted_table(pm, tmp_path, nifti, text):
    root = tmp_path / "hcp"
    for subject in ("100307", "100408", "101006"):
        nifti(root / f"{subject}/T1w/T1w_acpc_dc_restore_brain.nii.gz")
    text(
        root / "unrestricted_hcp.csv",
        "Subject,Release,Gender,Age\n100307,Q1,F,26-30\n100408,Q1,M,36+\n101006,Q1,F,31-35\n",
    )
    text(
        root / "RESTRICTED_hcp.csv",
        "Subject,Age_in_Yrs,Family_ID,ZygosityGT\n"
        "100307,27,51488_81352,MZ\n100408,33,51488_81352,MZ\n101006,34,52813_81352,\n",
    )
    records = list(pm.read_study("hcp:" + str(root), {"tasks": ["sex", "age"]}))
    families = {r.subject: r.family for r in records}
    # Twins share a family; the id is kept as text, save that tables.parse_value
    # reads 51488_81352 as the number 5148881352 (int() takes underscores).
    assert families["100307"] == families["100408"] != families["101006"]
    assert families["101006"].replace("_", "") == "5281381352"
    # Both tables are read: sex from the unrestricted one, age in years from the restricted one.
    assert answers(records, "sex")[("100408", None, ("t1",))] == "male"
    assert answers(records, "old")[("100307", None, ("t1",))] == "27 years"
    # Without the restricted table: no family.
    (root / "RESTRICTED_hcp.csv").unlink()
    records = list(pm.read_study("hcp:" + str(root), {"tasks": ["sex"]}))
    assert {r.family for r in records} == {None}
