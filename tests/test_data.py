"""Ingestion: scanning, every validation error named with its file, --skip_invalid, folds, datalist I/O."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import run_cmd

from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.data.cases import scan_dataset, validate_case
from custom.data.datalist import assign_folds, build_datalist, fold_split, load_datalist
from custom.data.nifti import load_case_arrays
from custom.data.synthetic import case_id_for, make_affine, write_dataset

SHAPE = (24, 24, 16)
SPACING = (1.0, 1.2, 2.0)
NUM_CASES = 5


@pytest.fixture(scope="module")
def base_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base_raw")
    write_dataset(root, num_cases=NUM_CASES, shape=SHAPE, spacing=SPACING, seed=11)
    return root


@pytest.fixture
def raw(base_dataset, tmp_path) -> Path:
    """A fresh, writable copy of the small valid data set."""
    dst = tmp_path / "raw"
    shutil.copytree(base_dataset, dst)
    return dst


def case_file(root: Path, index: int, role: str) -> Path:
    cid = case_id_for(index)
    return root / cid / f"{cid}-{role}.nii.gz"


def save(path: Path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), make_affine(SHAPE, SPACING) if affine is None else affine), str(path))


def read(path: Path):
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


# --- one crafted defect per validation check: (mutate(root) -> defective file, expected words) --------


def _missing(root):
    path = case_file(root, 1, "t2f")
    path.unlink()
    return path, "missing t2f"


def _extra(root):
    path = case_file(root, 1, "t1").with_name(f"{case_id_for(1)}-t1.nii.gz")
    shutil.copy(case_file(root, 1, "t1n"), path)
    return path, "unexpected NIfTI file"


def _truncated(root):
    path = case_file(root, 2, "t1n")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "corrupt"


def _garbage(root):
    path = case_file(root, 2, "t2w")
    path.write_bytes(gzip.compress(b"this is not a nifti header" * 20))
    return path, "unreadable or corrupt NIfTI file"


def _four_d(root):
    path = case_file(root, 3, "t1c")
    data, _ = read(path)
    save(path, np.stack([data, data], axis=-1))
    return path, "4D"


def _shape(root):
    path = case_file(root, 3, "t2w")
    data, _ = read(path)
    save(path, data[:, :, :-1])
    return path, "shape (24, 24, 15) differs from"


def _affine(root):
    path = case_file(root, 0, "seg")
    data, affine = read(path)
    affine = affine.copy()
    affine[0, 3] += 0.01
    save(path, data, affine)
    return path, "affine differs from"


def _nan(root):
    path = case_file(root, 4, "t2f")
    data, _ = read(path)
    data = data.astype(np.float32)
    data[3, 4, 5] = np.nan
    save(path, data)
    return path, "1 NaN values"


def _inf(root):
    path = case_file(root, 4, "t1c")
    data, _ = read(path)
    data = data.astype(np.float32)
    data[3, 4, 5] = np.inf
    data[5, 4, 3] = -np.inf
    save(path, data)
    return path, "2 infinite values"


def _all_zero(root):
    path = case_file(root, 0, "t1n")
    data, _ = read(path)
    save(path, np.zeros_like(data))
    return path, "image is all zero"


def _label_five(root):
    path = case_file(root, 1, "seg")
    data, _ = read(path)
    data = data.copy()
    data[data == 2] = 5
    save(path, data)
    return path, "labels outside {0, 1, 2, 3}: values [5]"


def _label_fraction(root):
    path = case_file(root, 2, "seg")
    data, _ = read(path)
    data = data.astype(np.float32)
    data[data == 2] = 1.5
    save(path, data)
    return path, "values [1.5]"


DEFECTS = {f.__name__.strip("_"): f for f in (_missing, _extra, _truncated, _garbage, _four_d, _shape, _affine,
                                               _nan, _inf, _all_zero, _label_five, _label_fraction)}


@pytest.mark.parametrize("name", sorted(DEFECTS))
def test_each_validation_error_names_its_file(raw, name):
    path, words = DEFECTS[name](raw)
    cases = {c.case_id: c for c in scan_dataset(raw)}
    bad_id = path.parent.name
    problems = validate_case(cases[bad_id])
    assert problems, f"{name} not detected"
    assert any(p.startswith(f"{path}:") and words in p for p in problems), problems
    for cid, case in cases.items():
        if cid != bad_id:
            assert validate_case(case) == []
    with pytest.raises(BraTSInputError) as err:
        build_datalist(raw, num_folds=2, seed=0, progress=False)
    assert str(path) in str(err.value) and words in str(err.value)
    assert "Traceback" not in str(err.value)


def test_load_case_arrays_reports_the_same_problems(raw):
    path, words = _nan(raw)
    cid = case_id_for(4)
    images = [case_file(raw, 4, m) for m in MODALITIES]
    with pytest.raises(BraTSInputError) as err:
        load_case_arrays(images, case_file(raw, 4, "seg"))
    assert f"{path}: contains 1 NaN values" in str(err.value)
    missing = raw / cid / "nope-t1c.nii.gz"
    with pytest.raises(BraTSInputError, match=f"{missing}: file not found"):
        load_case_arrays([missing] + images[1:])
    with pytest.raises(BraTSInputError, match="expected 4 image paths"):
        load_case_arrays(images[:3])


def test_affine_within_tolerance_is_accepted(raw):
    path = case_file(raw, 0, "t2w")
    data, affine = read(path)
    affine = affine.copy()
    affine[:3, 3] += 4e-4
    save(path, data, affine)
    case = next(c for c in scan_dataset(raw) if c.case_id == case_id_for(0))
    assert validate_case(case) == []


def test_load_case_arrays(raw):
    images = [case_file(raw, 3, m) for m in MODALITIES]
    image, label, affine, spacing = load_case_arrays(images, case_file(raw, 3, "seg"))
    assert image.shape == (4,) + SHAPE and image.dtype == np.float32
    assert label.shape == SHAPE and label.dtype == np.uint8
    np.testing.assert_allclose(spacing, SPACING)
    np.testing.assert_allclose(affine, make_affine(SHAPE, SPACING))
    for c, p in enumerate(images):  # channel order t1c, t1n, t2f, t2w
        np.testing.assert_array_equal(image[c], read(p)[0])
    by_name = dict(zip(MODALITIES, images))
    image2, label2, _, _ = load_case_arrays(by_name)
    np.testing.assert_array_equal(image2, image)
    assert label2 is None


def run_prepare(raw, work, *extra):
    return run_cmd([sys.executable, "scripts/prepare_data.py", "--dataset_dir", raw, "--work_dir", work,
                    "--num_folds", 2, "--seed", 0, "--plan", "false", *extra], check=False)


def test_cli_reports_every_problem_of_every_case_and_writes_nothing(raw, tmp_path):
    defects = [_missing(raw), _four_d(raw), _label_five(raw), _truncated(raw)]
    work = tmp_path / "work"
    proc = run_prepare(raw, work)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "3 of 5 cases" in proc.stderr  # case 1 has two problems, both reported
    for path, words in defects:
        assert f"{path}: " in proc.stderr and words in proc.stderr
    # nothing half-written: no datalist, no temporary file
    assert not work.exists() or not any(work.iterdir())


def test_cli_skip_invalid_lists_bad_cases_and_writes_datalist(raw, tmp_path):
    bad_path, _ = _label_five(raw)
    (case_file(raw, 4, "seg")).unlink()  # case 4 becomes inference-only
    work = tmp_path / "work"
    proc = run_prepare(raw, work, "--skip_invalid", "true")
    assert proc.returncode == 0, proc.stderr
    assert "1 inference-only" in proc.stdout and "1 invalid" in proc.stdout
    assert f"skipped invalid case {case_id_for(1)}" in proc.stderr and str(bad_path) in proc.stderr
    datalist = load_datalist(work / "datalist.json")
    train_ids = [e["case_id"] for e in datalist["training"]]
    assert train_ids == [case_id_for(i) for i in (0, 2, 3)]
    assert [e["case_id"] for e in datalist["inference"]] == [case_id_for(4)]
    assert datalist["inference"][0]["image"] == [str(case_file(raw, 4, m)) for m in MODALITIES]
    assert len(datalist["invalid"]) == 1 and datalist["invalid"][0]["case_id"] == case_id_for(1)
    assert any(p.startswith(f"{bad_path}:") for p in datalist["invalid"][0]["problems"])
    assert sorted(e["fold"] for e in datalist["training"]) in ([0, 0, 1], [0, 1, 1])


def test_cli_datalist_format(raw, tmp_path):
    work = tmp_path / "work"
    proc = run_prepare(raw, work)
    assert proc.returncode == 0, proc.stderr
    assert "5 training cases in 2 folds" in proc.stdout
    text = (work / "datalist.json").read_text()
    datalist = json.loads(text)
    assert datalist["modalities"] == list(MODALITIES)
    assert datalist["num_folds"] == 2 and datalist["seed"] == 0
    assert datalist["dataset_dir"] == str(raw.resolve())
    assert datalist["inference"] == [] and datalist["invalid"] == []
    for i, entry in enumerate(datalist["training"]):
        assert set(entry) == {"case_id", "image", "label", "fold"}
        assert entry["case_id"] == case_id_for(i)
        assert entry["image"] == [str(case_file(raw.resolve(), i, m)) for m in MODALITIES]
        assert entry["label"] == str(case_file(raw.resolve(), i, "seg"))
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in entry["image"] + [entry["label"]])
    assert load_datalist(work) == datalist == load_datalist(work / "datalist.json")
    # same command, same datalist
    proc = run_prepare(raw, work)
    assert proc.returncode == 0 and (work / "datalist.json").read_text() == text


def test_failing_run_does_not_touch_an_existing_datalist(raw, tmp_path):
    work = tmp_path / "work"
    assert run_prepare(raw, work).returncode == 0
    before = (work / "datalist.json").read_bytes()
    _all_zero(raw)
    assert run_prepare(raw, work).returncode == 1
    assert (work / "datalist.json").read_bytes() == before
    assert sorted(p.name for p in work.iterdir()) == ["datalist.json"]


def test_scan_finds_nested_cases_and_flags_duplicates_and_misnamed_folders(raw, tmp_path):
    nested = tmp_path / "download" / "TrainingData"
    shutil.copytree(raw, nested)
    shutil.copytree(raw / case_id_for(0), tmp_path / "download" / "copy" / case_id_for(0))
    (tmp_path / "download" / "notes.txt").write_text("not data")
    stray = tmp_path / "download" / "misc"
    stray.mkdir()
    shutil.copy(case_file(raw, 1, "t1c"), stray / "image.nii.gz")
    shutil.copytree(raw / case_id_for(1), stray / "BraTS-GLI-00099-000")  # below a stray folder: still found
    cases = scan_dataset(tmp_path / "download")
    ids = [c.case_id for c in cases]
    assert ids == sorted(ids)
    assert ids.count(case_id_for(0)) == 2
    assert set(ids) == {case_id_for(i) for i in range(NUM_CASES)} | {"misc", "BraTS-GLI-00099-000"}
    dup = [c for c in cases if c.case_id == case_id_for(0)]
    assert all(any("duplicate case id" in p for p in validate_case(c)) for c in dup)
    misc = next(c for c in cases if c.case_id == "misc")
    assert any("not a BraTS case id" in p for p in validate_case(misc))
    assert validate_case(next(c for c in cases if c.case_id == case_id_for(2))) == []


def test_scan_and_build_errors(tmp_path):
    with pytest.raises(BraTSInputError, match="does not exist"):
        scan_dataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BraTSInputError, match="no BraTS case folders"):
        build_datalist(tmp_path / "empty", num_folds=2, progress=False)


def test_too_few_training_cases_for_the_folds(raw):
    with pytest.raises(BraTSInputError, match="fewer than num_folds=6"):
        build_datalist(raw, num_folds=6, progress=False)


def test_parallel_validation_gives_the_same_datalist(raw):
    _label_five(raw)
    serial = build_datalist(raw, num_folds=2, seed=3, skip_invalid=True, progress=False)
    parallel = build_datalist(raw, num_folds=2, seed=3, skip_invalid=True, num_workers=2, progress=False)
    assert serial == parallel and len(serial["invalid"]) == 1


# --- folds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, k", [(5, 5), (7, 5), (13, 5), (10, 3), (1248, 5)])
def test_fold_properties(n, k):
    ids = [case_id_for(i) for i in range(n)]
    previous = None
    for seed in range(4):
        folds = assign_folds(ids, k, seed)
        assert set(folds) == set(ids)  # covers every case, each in exactly one fold
        sizes = np.bincount(list(folds.values()), minlength=k)
        assert len(sizes) == k and sizes.max() - sizes.min() <= 1
        shuffled = ids[:]
        random.Random(seed).shuffle(shuffled)
        assert assign_folds(shuffled, k, seed) == folds  # independent of listing order
        assert assign_folds(list(reversed(ids)), k, seed) == folds
        if previous is not None and n > k:
            assert folds != previous  # the seed matters
        previous = folds


def test_fold_split(raw):
    datalist = build_datalist(raw, num_folds=2, seed=0, progress=False)
    seen = []
    for fold in range(2):
        train, val = fold_split(datalist, fold)
        assert val and train
        assert all(e["fold"] == fold for e in val) and all(e["fold"] != fold for e in train)
        assert not {e["case_id"] for e in train} & {e["case_id"] for e in val}
        seen += [e["case_id"] for e in val]
    assert sorted(seen) == [case_id_for(i) for i in range(NUM_CASES)]
    for bad in (2, -1, "0", 1.0):
        with pytest.raises(ValueError, match="fold must be"):
            fold_split(datalist, bad)


def test_load_datalist_errors(tmp_path):
    with pytest.raises(BraTSInputError, match="datalist not found"):
        load_datalist(tmp_path / "datalist.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BraTSInputError, match=f"{bad}: unreadable datalist"):
        load_datalist(bad)
    bad.write_text(json.dumps({"modalities": list(MODALITIES), "num_folds": 2,
                               "training": [{"case_id": "x", "image": ["a"] * 4, "label": "l", "fold": 2}]}))
    with pytest.raises(BraTSInputError, match="outside"):
        load_datalist(bad)


def test_datalist_folds_do_not_depend_on_folder_creation_order(base_dataset, tmp_path):
    forward, backward = tmp_path / "forward", tmp_path / "backward"
    for root, order in ((forward, range(NUM_CASES)), (backward, reversed(range(NUM_CASES)))):
        for i in order:
            shutil.copytree(base_dataset / case_id_for(i), root / case_id_for(i))
    folds = [{e["case_id"]: e["fold"] for e in build_datalist(r, 2, seed=5, progress=False)["training"]}
             for r in (forward, backward)]
    assert folds[0] == folds[1] == assign_folds([case_id_for(i) for i in range(NUM_CASES)], 2, 5)


def test_one_case_folder_parser_serves_inference_and_ground_truth(raw, tmp_path):
    """find_case_files (inference) and find_label_files (evaluation) read folders through read_case_folder:
    the same names, the same missing-file message as ingestion, the spacing from the affine."""
    from custom.data.cases import find_case_files, find_label_files, read_case_folder
    from custom.data.nifti import spacing_from_affine

    cid = case_id_for(1)
    case = find_case_files(raw / cid)
    assert case["case_id"] == cid and [Path(p).name for p in case["image"]] == [f"{cid}-{m}.nii.gz" for m in MODALITIES]
    assert case["label"] == str(case_file(raw, 1, "seg"))
    # an uncompressed duplicate is an ingestion problem; the .nii.gz file is the one used
    shutil.copy(case_file(raw, 1, "t1c"), raw / cid / f"{cid}-t1c.nii")
    assert find_case_files(raw / cid)["image"][0] == str(case_file(raw, 1, "t1c"))
    assert any("duplicate t1c file" in p for p in read_case_folder(raw / cid).scan_problems)
    # ground truth: case folders at any depth and loose <id>-seg.nii.gz files
    nested = raw / "nested"
    nested.mkdir()
    shutil.move(str(raw / case_id_for(2)), nested / case_id_for(2))
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(case_file(raw, 3, "seg"), loose / f"{case_id_for(3)}-seg.nii.gz")
    labels = find_label_files(raw)
    assert sorted(labels) == sorted(case_id_for(i) for i in range(NUM_CASES))
    assert labels[case_id_for(2)] == (nested / case_id_for(2) / f"{case_id_for(2)}-seg.nii.gz").resolve()
    assert find_label_files(loose) == {case_id_for(3): loose / f"{case_id_for(3)}-seg.nii.gz"}
    # a missing image names itself exactly as ingestion does
    case_file(raw, 4, "t2w").unlink()
    with pytest.raises(BraTSInputError, match=f"{case_id_for(4)}-t2w.nii.gz: missing t2w image"):
        find_case_files(raw / case_id_for(4))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BraTSInputError, match="no '<case_id>-seg.nii.gz'"):
        find_label_files(tmp_path / "empty")
    np.testing.assert_allclose(spacing_from_affine(make_affine(SHAPE, SPACING)), SPACING)
