"""From fold models to a challenge submission (issue 21.6): the fold ensemble through the bundle, its disagreement
map, and the BraTS 2023 submission folder with every refusal the challenge's validator would make.

The folds' models are freshly initialised networks of the tiny plan with different seeds (what is tested is how
their outputs are combined and written, not what they learnt); `tests/test_real_data_path.py` walks the whole
path with trained models.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, run_cmd

from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError

ENSEMBLE = "['bundle/configs/inference.json','bundle/configs/ensemble.json']"


def _finished_run(work: Path, fold: int, seed: int, **settings) -> Path:
    """W/runs/unc/fold<k> as a finished run leaves it: model_final.pt, plans.json, train_config.json, FINISHED."""
    from custom.model.networks import build_network
    from custom.workflows.cross_validate import config_files, planned_run_config

    d = work / "runs" / "unc" / f"fold{fold}"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_network(work / "plans.json", with_uncertainty=True)
    torch.save({"model": net.state_dict()}, d / "model_final.pt")
    shutil.copy(work / "plans.json", d / "plans.json")
    config = planned_run_config(config_files("unc", "tiny"), work, fold)
    config.update(settings)
    (d / "train_config.json").write_text(json.dumps(config))
    (d / "FINISHED").write_text("epoch 2\n")
    return d


@pytest.fixture(scope="module")
def fold_work(prepared_work_dir, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ensemble_work")
    for name in ("datalist.json", "plans.json"):
        shutil.copy(prepared_work_dir / name, work / name)
    for fold in (0, 1):
        _finished_run(work, fold, seed=fold)
    return work


@pytest.fixture(scope="module")
def new_cases(synthetic_dataset, tmp_path_factory) -> Path:
    """Two labelled cases, the first one on a 2 mm grid (the outputs must come back on each case's own grid)."""
    root = tmp_path_factory.mktemp("new_cases")
    src = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[:2]
    shutil.copytree(src[1], root / src[1].name)
    coarse = root / src[0].name
    coarse.mkdir()
    for m in MODALITIES + ("seg",):
        img = nib.load(src[0] / f"{src[0].name}-{m}.nii.gz")
        data = np.asarray(img.dataobj)[::2, ::2, :]
        affine = img.affine @ np.diag([2.0, 2.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(data, affine), coarse / f"{src[0].name}-{m}.nii.gz")
    return root


@pytest.fixture(scope="module")
def ensemble_run(fold_work, new_cases, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ensemble_pred")
    run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file", ENSEMBLE,
             "--work_dir", fold_work, "--dataset_dir", new_cases, "--output_dir", out], timeout=600)
    return out


def test_ensemble_is_the_mean_of_the_folds_and_their_disagreement(fold_work, new_cases, ensemble_run):
    """Labels from the members' mean probabilities, unc = mean of their heads, ensvar = 4 var(p_WT), both masked
    by the ensemble's cancer mask, each on the case's own grid: recomputed here member by member."""
    from custom.data.nifti import load_case
    from custom.data.cases import find_case_files
    from custom.inference.postprocess import postprocess_probabilities
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.preprocessing.functional import preprocess_case

    summary = json.loads((ensemble_run / "summary.json").read_text())
    assert summary["ensemble_members"] == [str(fold_work / "runs" / "unc" / f"fold{f}" / "model_final.pt")
                                           for f in (0, 1)]
    members = [UncertaintySegmenter.from_checkpoint(p) for p in summary["ensemble_members"]]
    for case_dir in sorted(new_cases.iterdir()):
        cid = case_dir.name
        assert summary["cases"][cid]["ensvar"] == f"{cid}-ensvar.nii.gz"
        image, affine, spacing, _ = load_case(find_case_files(case_dir))
        image_pp, _, props = preprocess_case(image, spacing, members[0].plans)
        probs = np.stack([m.predict_preprocessed(image_pp) for m in members])      # (2, 4, X', Y', Z')
        assert np.abs(probs[0] - probs[1]).max() > 0.05                             # the members do differ
        mean = probs.mean(0)
        expected = postprocess_probabilities(mean, props)
        var = np.clip(4 * probs[:, 0].var(0), 0, 1)
        expected_var = postprocess_probabilities(np.concatenate([mean[:3], var[None]]), props).unc
        written = {k: nib.load(ensemble_run / f"{cid}{k}.nii.gz") for k in ("", "-unc", "-ensvar")}
        for img in written.values():
            assert img.shape == image.shape[1:] and np.allclose(img.affine, affine, atol=1e-4)
        labels = np.asarray(written[""].dataobj)
        unc, ensvar = (np.asarray(written[k].dataobj, dtype=np.float32) for k in ("-unc", "-ensvar"))
        assert np.array_equal(labels, expected.labels)
        np.testing.assert_allclose(unc, expected.unc, atol=1e-5)
        np.testing.assert_allclose(ensvar, expected_var, atol=1e-5)
        assert ensvar.max() > 0.01 and not np.allclose(ensvar, unc)
        assert (ensvar[unc == 0] == 0).all() or (expected.unc == 0).sum() == 0     # one cancer mask for both


def test_evaluation_reads_the_ensemble_folder(new_cases, ensemble_run, tmp_path):
    """The -ensvar maps beside the labels are not predictions of unknown cases."""
    proc = run_cmd([PYTHON, "scripts/evaluate.py", "--pred_dir", ensemble_run, "--gt_dir", new_cases,
                    "--unc_dir", ensemble_run, "--out_dir", tmp_path / "R"], timeout=300)
    assert "2 cases" in proc.stdout
    assert json.loads((tmp_path / "R" / "summary.json").read_text())["num_cases"] == 2


def test_members_must_be_one_cross_validation(fold_work, new_cases, tmp_path):
    from custom.inference.ensemble import EnsembleSegmenter, fold_checkpoints

    ckpts = fold_checkpoints(fold_work, "unc", None, "model_final.pt")
    # another setting than fold 0's, another plan, the same file twice, an unfinished fold
    other = tmp_path / "W"
    for name in ("datalist.json", "plans.json"):
        shutil.copy(fold_work / name, other / name) if other.exists() else (other.mkdir(), shutil.copy(
            fold_work / name, other / name))
    ring = _finished_run(other, 1, seed=1, unc_loss="ring")
    with pytest.raises(BraTSInputError, match=r'unc_loss: "ring" here, "paper_proper" expected'):
        EnsembleSegmenter.from_checkpoints([ckpts[0], ring / "model_final.pt"])
    plans = json.loads((ring / "plans.json").read_text())
    plans["patch_size"] = [16, 16, 16]
    (ring / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(BraTSInputError, match="trained with another plan"):
        EnsembleSegmenter.from_checkpoints([ckpts[0], ring / "model_final.pt"])
    with pytest.raises(BraTSInputError, match="listed more than once"):
        EnsembleSegmenter.from_checkpoints([ckpts[0], ckpts[0]])
    (ring / "FINISHED").unlink()
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file", ENSEMBLE,
                    "--work_dir", other, "--folds", "[1]", "--dataset_dir", new_cases,
                    "--output_dir", tmp_path / "out"], check=False, timeout=300)
    assert proc.returncode != 0 and f"{ring}: not finished (no FINISHED marker)" in proc.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.nii.gz"))


# ------------------------------------------------------------------------------------------------ submission
def test_submission_folder_holds_the_label_maps_as_the_challenge_checks_them(new_cases, ensemble_run, tmp_path):
    sub = tmp_path / "submission"
    proc = run_cmd([PYTHON, "scripts/make_submission.py", "--pred_dir", ensemble_run, "--input_dir", new_cases,
                    "--out_dir", sub], timeout=300)
    ids = sorted(p.name for p in new_cases.iterdir())
    assert sorted(p.name for p in sub.iterdir()) == [f"{c}.nii.gz" for c in ids]
    with zipfile.ZipFile(tmp_path / "submission.zip") as zf:
        assert sorted(zf.namelist()) == [f"{c}.nii.gz" for c in ids]     # flat: label maps only
    for c in ids:
        img, ref = nib.load(sub / f"{c}.nii.gz"), nib.load(new_cases / c / f"{c}-t1c.nii.gz")
        assert img.get_data_dtype() == np.uint8 and img.shape == ref.shape
        assert np.allclose(img.affine, ref.affine) and np.allclose(img.get_qform(), ref.get_qform())
        assert np.array_equal(np.asarray(img.dataobj), np.asarray(nib.load(ensemble_run / f"{c}.nii.gz").dataobj))
    # synthetic grids are right for their cases, but not the challenge's 240x240x155
    assert proc.stderr.count("is not the BraTS 2023 grid (240, 240, 155)") == 2


def _write(path: Path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), path)


def test_submission_refuses_what_the_challenge_would_refuse_or_misread(new_cases, ensemble_run, tmp_path):
    from custom.data.submission import make_submission

    pred = tmp_path / "pred"
    shutil.copytree(ensemble_run, pred)
    ids = sorted(p.name for p in new_cases.iterdir())
    first = nib.load(pred / f"{ids[0]}.nii.gz")
    labels = np.asarray(first.dataobj).astype(np.uint8)
    _write(pred / f"{ids[0]}.nii.gz", np.where(labels == 3, 4, labels).astype(np.uint8), first.affine)
    (pred / f"{ids[1]}.nii.gz").unlink()
    _write(pred / "BraTS-GLI-77777-000.nii.gz", labels, first.affine)
    stale = tmp_path / "sub"
    stale.mkdir()
    (stale / "BraTS-GLI-55555-000.nii.gz").write_bytes(b"old")
    with pytest.raises(BraTSInputError) as err:
        make_submission(pred, new_cases, stale)
    text = str(err.value)
    assert f"{ids[0]}.nii.gz: holds label 4" in text                                # BraTS 2021 ET
    assert f"{ids[1]}.nii.gz: label map missing for case {ids[1]}" in text
    assert "BraTS-GLI-77777-000.nii.gz: no case folder BraTS-GLI-77777-000" in text
    assert "holds other files (BraTS-GLI-55555-000.nii.gz)" in text
    assert sorted(p.name for p in stale.iterdir()) == ["BraTS-GLI-55555-000.nii.gz"]  # nothing written
    assert not (tmp_path / "sub.zip").exists()
    # another grid than the case's images; labels that are no labels
    (pred / "BraTS-GLI-77777-000.nii.gz").unlink()
    shutil.copy(ensemble_run / f"{ids[1]}.nii.gz", pred / f"{ids[1]}.nii.gz")
    _write(pred / f"{ids[0]}.nii.gz", labels[:, :, :-1], first.affine)
    _write(pred / f"{ids[1]}.nii.gz", np.full(nib.load(pred / f"{ids[1]}.nii.gz").shape, 1.5, np.float32),
           nib.load(pred / f"{ids[1]}.nii.gz").affine)
    with pytest.raises(BraTSInputError) as err:
        make_submission(pred, new_cases, tmp_path / "sub2")
    assert "differs from its case's images" in str(err.value) and "found [1.5]" in str(err.value)
    assert not (tmp_path / "sub2").exists()


def test_submission_of_a_brats_grid_case_has_no_warning(tmp_path):
    """A case on the BraTS 2023 grid (240x240x155, the validator's qform) passes without a word."""
    from custom.data.submission import BRATS_QFORM, BRATS_SHAPE, make_submission

    cid = "BraTS-GLI-00042-000"
    case = tmp_path / "cases" / cid
    case.mkdir(parents=True)
    for m in MODALITIES:
        _write(case / f"{cid}-{m}.nii.gz", np.zeros(BRATS_SHAPE, np.uint8), BRATS_QFORM)
    pred = tmp_path / "pred"
    pred.mkdir()
    labels = np.zeros(BRATS_SHAPE, np.int16)
    labels[100:110, 100:110, 70:80] = 2
    _write(pred / f"{cid}.nii.gz", labels, BRATS_QFORM)
    _write(pred / f"{cid}-unc.nii.gz", labels.astype(np.float32) / 4, BRATS_QFORM)
    res = make_submission(pred, tmp_path / "cases", tmp_path / "sub")
    assert res["warnings"] == [] and res["num_cases"] == 1
    img = nib.load(tmp_path / "sub" / f"{cid}.nii.gz")
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(img.dataobj), labels)
    assert np.allclose(img.get_qform(), BRATS_QFORM)


def test_an_ensemble_case_is_written_as_one_unit(tmp_path):
    """save_prediction writes the -ensvar map with the label and -unc maps, the label map last; a map left without
    its label map (a killed write) is removed by the next inference run, a complete case is kept."""
    from custom.core.layout import remove_unfinished_predictions
    from custom.data.nifti import save_prediction

    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1, 1, 1] = 3
    save_prediction(labels, labels / 6.0, np.eye(4), None, tmp_path, "BraTS-GLI-00001-000",
                    maps={"ensvar": labels / 12.0})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "BraTS-GLI-00001-000-ensvar.nii.gz", "BraTS-GLI-00001-000-unc.nii.gz", "BraTS-GLI-00001-000.nii.gz"]
    assert nib.load(tmp_path / "BraTS-GLI-00001-000-ensvar.nii.gz").get_fdata()[1, 1, 1] == pytest.approx(0.25)
    for suffix in ("unc", "ensvar"):  # the remainder of a killed write of case 2
        nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)),
                 tmp_path / f"BraTS-GLI-00002-000-{suffix}.nii.gz")
    removed = remove_unfinished_predictions(tmp_path)
    assert sorted(p.name for p in removed) == ["BraTS-GLI-00002-000-ensvar.nii.gz", "BraTS-GLI-00002-000-unc.nii.gz"]
    assert len(list(tmp_path.iterdir())) == 3
