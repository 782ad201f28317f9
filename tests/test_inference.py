"""Inference (custom/inference/, bundle/configs/inference.json): files in, BraTS-ready files out.

Plumbing is tested with a freshly initialised network of the tiny plan (weights do not matter for grids,
masks, label/probability consistency and failure isolation); one slow test runs the tiny trained checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PYTHON, run_cmd

from custom.core.atomic import atomic_torch_save
from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.model.masks import get_cancer_mask
from custom.model.networks import build_network
from custom.transforms.array import regions_to_labels

ANISO_ZOOMS = (1.25, 1.0, 0.8)


def _checkpoint_dir(root: Path, plans_path: Path, seed: int = 0, with_uncertainty: bool = True, dropout=None) -> Path:
    """A checkpoint folder as training leaves it: model.pt ({"model": state_dict}) + plans.json."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    net = build_network(plans_path, with_uncertainty=with_uncertainty, dropout=dropout)
    atomic_torch_save({"model": net.state_dict()}, root / "model.pt")
    shutil.copyfile(plans_path, root / "plans.json")
    return root


def _case_files(case_dir: Path) -> list[Path]:
    return [case_dir / f"{case_dir.name}-{m}.nii.gz" for m in MODALITIES]


def _make_anisotropic(src: Path, dst_root: Path, case_id: str) -> Path:
    """Rewrite a synthetic case on a non-cubic, non-1 mm, rotated and shifted grid (same voxels)."""
    dst = dst_root / case_id
    dst.mkdir(parents=True)
    theta = np.deg2rad(10)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(ANISO_ZOOMS)
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    for m in MODALITIES + ("seg",):
        img = nib.load(src / f"{src.name}-{m}.nii.gz")
        data = np.asarray(img.dataobj)[:, 4:60, :]  # 64x56x48: non-cubic
        nib.save(nib.Nifti1Image(data, affine), dst / f"{case_id}-{m}.nii.gz")
    return dst


@pytest.fixture(scope="module")
def fresh_ckpt(prepared_work_dir, tmp_path_factory) -> Path:
    return _checkpoint_dir(tmp_path_factory.mktemp("ckpt"), prepared_work_dir / "plans.json") / "model.pt"


@pytest.fixture(scope="module")
def cases_dir(synthetic_dataset, tmp_path_factory) -> Path:
    """Two normal cases, one anisotropic case and one corrupt case (truncated t2f)."""
    root = tmp_path_factory.mktemp("cases")
    src = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())
    for case in src[:2]:
        shutil.copytree(case, root / case.name)
    _make_anisotropic(src[2], root, "BraTS-GLI-90000-000")
    bad = root / "BraTS-GLI-90001-000"
    shutil.copytree(src[3], bad)
    for f in bad.iterdir():
        f.rename(bad / f.name.replace(src[3].name, bad.name))
    t2f = bad / f"{bad.name}-t2f.nii.gz"
    t2f.write_bytes(t2f.read_bytes()[: t2f.stat().st_size // 2])
    return root


@pytest.fixture(scope="module")
def bundle_run(cases_dir, fresh_ckpt, tmp_path_factory):
    """One real `python -m monai.bundle run` over the four cases (one of them corrupt)."""
    out = tmp_path_factory.mktemp("pred")
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle",
                    "--config_file", "bundle/configs/inference.json", "--dataset_dir", cases_dir,
                    "--output_dir", out, "--checkpoint", fresh_ckpt], check=False, timeout=600)
    return proc, out


@pytest.fixture(scope="module")
def segmenter(fresh_ckpt):
    from custom.inference.segmenter import UncertaintySegmenter

    return UncertaintySegmenter.from_checkpoint(fresh_ckpt)


GOOD = ("BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-90000-000")


def test_bundle_run_writes_both_files_on_the_input_grid(bundle_run, cases_dir):
    proc, out = bundle_run
    for case_id in GOOD:
        ref = nib.load(_case_files(cases_dir / case_id)[0])
        lab = nib.load(out / f"{case_id}.nii.gz")
        unc = nib.load(out / f"{case_id}-unc.nii.gz")
        for img in (lab, unc):
            assert img.shape == ref.shape
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-5)
        labels, u = np.asarray(lab.dataobj), np.asarray(unc.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3}
        assert u.dtype == np.float32 and np.isfinite(u).all() and u.min() >= 0 and u.max() <= 1
        assert (labels > 0).any(), "an untrained net still predicts some WT on a real case"
        # zero outside the cancer mask (predicted WT dilated by 3 voxels), nonzero somewhere inside
        mask = get_cancer_mask(torch.from_numpy(labels)[None, None], dilation=3)[0, 0].numpy()
        assert (u[~mask] == 0).all() and (u[mask] > 0).any()


def test_corrupt_case_fails_alone_with_a_clear_message(bundle_run):
    proc, out = bundle_run
    assert proc.returncode != 0, "a failed case must make the run exit non-zero"
    err = proc.stdout + proc.stderr
    assert "BraTS-GLI-90001-000" in err and "1 of 4 cases failed" in err
    assert "t2f" in err  # the file is named
    assert not list(out.glob("BraTS-GLI-90001-000*")), "no partial output for the failed case"
    assert not list(out.glob(".tmp-*")) and not list(out.glob("*.tmp-*")), "temporary files left behind"
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["failures"]) == {"BraTS-GLI-90001-000"}
    assert set(summary["cases"]) == set(GOOD)


def test_summary_volumes_and_uncertainty_statistics(bundle_run, cases_dir):
    _, out = bundle_run
    summary = json.loads((out / "summary.json").read_text())
    for case_id in GOOD:
        entry = summary["cases"][case_id]
        lab = nib.load(out / f"{case_id}.nii.gz")
        labels = np.asarray(lab.dataobj)
        u = np.asarray(nib.load(out / f"{case_id}-unc.nii.gz").dataobj)
        voxel_ml = float(np.prod(lab.header.get_zooms()[:3])) / 1000
        assert entry["volume_wt_ml"] == pytest.approx((labels > 0).sum() * voxel_ml, rel=1e-3)
        assert entry["volume_tc_ml"] == pytest.approx(np.isin(labels, (1, 3)).sum() * voxel_ml, rel=1e-3)
        assert entry["volume_et_ml"] == pytest.approx((labels == 3).sum() * voxel_ml, rel=1e-3)
        assert entry["unc_mean_wt"] == pytest.approx(float(u[labels > 0].mean()), rel=1e-5)
        assert entry["unc_p95_wt"] == pytest.approx(float(np.percentile(u[labels > 0], 95)), rel=1e-5)
        assert entry["time_s"] > 0 and entry["unc_source"] == "unc_output"
    aniso = summary["cases"]["BraTS-GLI-90000-000"]
    assert aniso["spacing_mm"] == pytest.approx(list(ANISO_ZOOMS), rel=1e-5)


def test_anisotropic_case_round_trips_and_matches_in_process(bundle_run, cases_dir, segmenter):
    """The non-1 mm, non-cubic, rotated case is resampled to the plan and pasted back on its own grid; the
    bundle run and the in-process segmenter (Triton's and MONAI Label's path) give the same answer."""
    from custom.data.nifti import load_case_arrays
    from custom.preprocessing.functional import preprocess_case

    _, out = bundle_run
    case_id = "BraTS-GLI-90000-000"
    image, _, affine, spacing = load_case_arrays([str(p) for p in _case_files(cases_dir / case_id)])
    _, _, props = preprocess_case(image, spacing, segmenter.plans)
    assert props["resampled"] and props["preprocessed_shape"] != props["cropped_shape"]
    pred = segmenter.predict(image, spacing)
    labels = np.asarray(nib.load(out / f"{case_id}.nii.gz").dataobj)
    unc = np.asarray(nib.load(out / f"{case_id}-unc.nii.gz").dataobj)
    assert pred.labels.shape == labels.shape == image.shape[1:]
    assert (pred.labels == labels).mean() >= 0.999
    assert np.abs(pred.unc - unc).max() <= 1e-3
    # outside the nonzero crop box nothing is predicted
    (x0, x1), (y0, y1), (z0, z1) = props["bbox"]
    outside = np.ones(labels.shape, bool)
    outside[x0:x1, y0:y1, z0:z1] = False
    assert not labels[outside].any() and not unc[outside].any()


def test_labels_consistent_with_region_probabilities(synthetic_dataset, segmenter):
    from custom.data.nifti import load_case_arrays

    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    image, _, _, spacing = load_case_arrays([str(p) for p in _case_files(case)])
    pred = segmenter.predict(image, spacing)
    p_wt, p_tc, p_et = pred.probs
    assert pred.probs.shape == (3, *image.shape[1:]) and pred.probs.min() >= 0 and pred.probs.max() <= 1
    np.testing.assert_array_equal(pred.labels, regions_to_labels(pred.probs))
    # order (2, 1, 3): later regions overwrite earlier ones
    np.testing.assert_array_equal(pred.labels == 3, p_et > 0.5)
    np.testing.assert_array_equal(pred.labels == 1, (p_tc > 0.5) & ~(p_et > 0.5))
    np.testing.assert_array_equal(pred.labels == 2, (p_wt > 0.5) & ~(p_tc > 0.5) & ~(p_et > 0.5))
    np.testing.assert_array_equal(pred.labels == 0, ~(p_wt > 0.5) & ~(p_tc > 0.5) & ~(p_et > 0.5))


def test_sliding_window_averages_patch_probabilities(segmenter):
    """A patch_fn (Triton's BLS hook) returning constant probabilities gives exactly those probabilities
    everywhere: Gaussian-weighted averaging of probabilities, not of logits, over overlapping windows."""
    image_pp = np.random.default_rng(0).normal(size=(4, 45, 50, 37)).astype(np.float32)
    const = torch.tensor([0.9, 0.6, 0.2, 0.3]).view(1, 4, 1, 1, 1)
    seen = []

    def patch_fn(batch):
        seen.append(tuple(batch.shape))
        return const.expand(batch.shape[0], 4, *batch.shape[2:]).clone()

    probs = segmenter.predict_preprocessed(image_pp, patch_fn=patch_fn)
    assert probs.shape == (4, 45, 50, 37) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, const[0].numpy() * np.ones_like(probs), atol=1e-5)
    assert all(s[1:] == (4, 32, 32, 32) and s[0] <= 2 for s in seen)  # plan patch, sw_batch_size 2
    # the default patch_fn is the local network: the same numbers as passing it explicitly
    from custom.uncertainty.baselines import probability_patch_fn

    a = segmenter.predict_preprocessed(image_pp)
    b = segmenter.predict_preprocessed(image_pp, patch_fn=probability_patch_fn(segmenter.network))
    np.testing.assert_array_equal(a, b)


def test_mirroring_tta_is_the_mean_of_the_eight_flips(segmenter):
    from custom.inference.inferer import UncertaintyInferer
    from custom.uncertainty.baselines import mirror_axes_combinations, probability_patch_fn

    x = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 4, 34, 33, 32)).astype(np.float32))
    combos = mirror_axes_combinations(True)
    assert len(combos) == 8 and len(set(combos)) == 8
    fn = probability_patch_fn(segmenter.network)
    plain = UncertaintyInferer(segmenter.plans.patch_size, tta=False)
    manual = sum(torch.flip(plain.predict_probabilities(torch.flip(x, a), fn), a) if a else
                 plain.predict_probabilities(x, fn) for a in combos) / 8
    tta = UncertaintyInferer(segmenter.plans.patch_size, tta="true")  # as --tta true reaches the config
    assert tta.passes_per_volume == 8
    torch.testing.assert_close(tta.predict_probabilities(x, fn), manual, atol=1e-6, rtol=0)
    assert not torch.allclose(tta.predict_probabilities(x, fn), plain.predict_probabilities(x, fn))


def test_bundle_components_are_the_same_path(synthetic_dataset, fresh_ckpt, segmenter, tmp_path):
    """What MONAI Label runs (preprocessing -> inferer(network_def) -> postprocessing) and the bundle's
    evaluator (what `run` runs: the segmenter per case folder) give what UncertaintySegmenter.predict gives."""
    from monai.bundle import ConfigParser

    from custom.data.nifti import load_case_arrays
    from custom.model.checkpoints import load_weights

    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[1]
    files = [str(p) for p in _case_files(case)]
    parser = ConfigParser()
    parser.read_config("bundle/configs/inference.json")
    parser["bundle_root"] = "bundle"
    parser["checkpoint"] = str(fresh_ckpt)
    parser["dataset_dir"] = str(case)
    parser["output_dir"] = str(tmp_path / "out")
    parser["device"] = "$torch.device('cpu')"
    net = load_weights(parser.get_parsed_content("network_def"), fresh_ckpt)
    data = parser.get_parsed_content("preprocessing")({"image": files})
    data["pred"] = parser.get_parsed_content("inferer")(data["image"][None], net)[0]
    data = parser.get_parsed_content("postprocessing")(data)

    image, _, _, spacing = load_case_arrays(files)
    pred = segmenter.predict(image, spacing)
    assert tuple(data["pred"].shape) == (1, *image.shape[1:]) and data["unc"].shape == data["pred"].shape
    assert (data["pred"][0].numpy() == pred.labels).mean() >= 0.999
    assert np.abs(data["unc"][0].numpy() - pred.unc).max() <= 1e-4

    evaluator = parser.get_parsed_content("evaluator")
    # the config's inferer is the one the evaluator's segmenter slides (MONAI Label and the run share it)
    assert evaluator.segmenter.inferer is parser.get_parsed_content("inferer")
    summary = evaluator.run()
    assert set(summary["cases"]) == {case.name} and not summary["failures"]
    labels = np.asarray(nib.load(tmp_path / "out" / f"{case.name}.nii.gz").dataobj)
    unc = np.asarray(nib.load(tmp_path / "out" / f"{case.name}-unc.nii.gz").dataobj)
    assert (labels == pred.labels).mean() >= 0.999 and (labels == data["pred"][0].numpy()).mean() >= 0.999
    assert np.abs(unc - pred.unc).max() <= 1e-4


def test_plan_and_checkpoint_errors_are_clear(tmp_path, prepared_work_dir, fresh_ckpt):
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.model.checkpoints import load_state_dict, resolve_plans_path

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(fresh_ckpt, lone / "model.pt")
    with pytest.raises(BraTSInputError, match="no plans.json found") as e:
        resolve_plans_path(lone / "model.pt", tmp_path / "nowhere")
    assert str(lone / "plans.json") in str(e.value) and str(tmp_path / "nowhere" / "plans.json") in str(e.value)
    # a checkpoint alone is enough when --work_dir gives the plan
    assert resolve_plans_path(lone / "model.pt", prepared_work_dir) == prepared_work_dir / "plans.json"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BraTSInputError, match="bad.pt: not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "bad.pt")
    with pytest.raises(BraTSInputError, match="missing.pt: checkpoint file not found"):
        UncertaintySegmenter.from_checkpoint(tmp_path / "missing.pt", work_dir=prepared_work_dir)
    seg = UncertaintySegmenter.from_checkpoint(lone / "model.pt", work_dir=prepared_work_dir)
    with pytest.raises(BraTSInputError, match="NaN"):
        seg.predict(np.full((4, 40, 40, 40), np.nan, np.float32), (1, 1, 1))
    with pytest.raises(BraTSInputError, match=r"\(4, X, Y, Z\)"):
        seg.predict(np.zeros((3, 40, 40, 40), np.float32), (1, 1, 1))


def test_missing_modality_names_the_file(tmp_path, synthetic_dataset, segmenter):
    from custom.inference.engine import infer_folder

    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    dst = tmp_path / "in" / case.name
    shutil.copytree(case, dst)
    (dst / f"{case.name}-t1n.nii.gz").unlink()
    with pytest.raises(BraTSInputError) as e:
        infer_folder(segmenter, tmp_path / "in", tmp_path / "out")
    assert f"{case.name}-t1n.nii.gz: missing t1n image" in str(e.value)
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_baseline_checkpoint_and_mc_dropout(tmp_path, prepared_work_dir, synthetic_dataset):
    """A 3-output (segmentation-only) checkpoint is detected from its weights; MC dropout is stochastic."""
    from custom.data.nifti import load_case_arrays
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.uncertainty.baselines import enable_mc_dropout, mc_dropout_patch_fn

    ckpt = _checkpoint_dir(tmp_path / "base", prepared_work_dir / "plans.json", with_uncertainty=False) / "model.pt"
    seg = UncertaintySegmenter.from_checkpoint(ckpt)
    assert seg.with_uncertainty is False
    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    image, _, _, spacing = load_case_arrays([str(p) for p in _case_files(case)])
    pred = seg.predict(image, spacing)
    assert pred.unc_source == "var1shot" and pred.unc.max() <= 1 and pred.unc.min() >= 0
    np.testing.assert_allclose(pred.unc[pred.labels > 0], (4 * pred.probs[0] * (1 - pred.probs[0]))[pred.labels > 0],
                               atol=1e-5)

    with pytest.raises(ValueError, match="dropout layers"):
        enable_mc_dropout(build_network(prepared_work_dir / "plans.json"))
    torch.manual_seed(0)
    net = build_network(prepared_work_dir / "plans.json", dropout=0.2)
    fn = mc_dropout_patch_fn(net, num_samples=3)
    x = torch.randn(1, 4, 32, 32, 32)
    with torch.no_grad():
        a, b = fn(x), fn(x)
    assert a.shape == (1, 4, 32, 32, 32) and not torch.equal(a, b)


@pytest.mark.slow
def test_bundle_run_with_the_trained_tiny_checkpoint(tiny_training_run, prepared_work_dir, tmp_path):
    """The checkpoint training writes is enough (plans.json beside it); --tta true runs the 8 flips."""
    datalist = json.loads((prepared_work_dir / "datalist.json").read_text())
    entry = datalist["training"][0]
    case_dir = Path(entry["image"][0]).parent
    out = tmp_path / "out"
    run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file",
             "bundle/configs/inference.json", "--dataset_dir", case_dir, "--output_dir", out,
             "--checkpoint", tiny_training_run / "model.pt", "--tta", "true"], timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"] is True and set(summary["cases"]) == {entry["case_id"]}
    labels = np.asarray(nib.load(out / f"{entry['case_id']}.nii.gz").dataobj)
    gt = np.asarray(nib.load(entry["label"]).dataobj)
    assert labels.shape == gt.shape and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_benchmark_counts_forward_passes_side_by_side(tmp_path, capsys):
    """scripts/benchmark_inference.py: one JSON with every method, pass counts and ratios (no timing asserted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_inference", "scripts/benchmark_inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    bench.main(out=str(out), num_cases=1, shape=(40, 40, 32), repeats=1, mc_samples=3)
    res = json.loads(out.read_text())
    m = res["tiny"]["methods"]
    assert set(m) == {"seg_only", "unc_head", "tta", "mc_dropout"}
    base = m["unc_head"]["patch_forwards_per_case"]
    assert base > 0 and m["seg_only"]["patch_forwards_per_case"] == base
    assert m["tta"]["patch_forwards_per_case"] == 8 * base
    assert m["mc_dropout"]["patch_forwards_per_case"] == 3 * base
    for key in ("b_over_a_ratio", "c_over_b_ratio", "d_over_b_ratio"):
        assert res["tiny"][key] > 0
    line = capsys.readouterr().out
    assert "b/a=" in line and "GPU: .venv/bin/python scripts/benchmark_inference.py --device cuda" in line


def test_case_folder_discovery(tmp_path, synthetic_dataset):
    from custom.data.cases import case_datalist, list_case_folders

    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    shutil.copytree(case, tmp_path / "in" / case.name)
    (tmp_path / "in" / "notes").mkdir()  # not a case: no NIfTI inside
    (tmp_path / "in" / "README.txt").write_text("x")
    assert list_case_folders(tmp_path / "in") == [tmp_path / "in" / case.name]
    # a single case folder is accepted as the input folder too
    assert list_case_folders(tmp_path / "in" / case.name) == [tmp_path / "in" / case.name]
    # the engine's items: one folder each; its files are found when the case runs (an incomplete case fails alone)
    assert case_datalist(tmp_path / "in") == [{"case_id": case.name, "case_dir": str(tmp_path / "in" / case.name)}]
    assert case_datalist(None) == []
    with pytest.raises(BraTSInputError, match="no case folders"):
        list_case_folders(tmp_path / "in" / "notes")


def test_monailabel_bundle_infer_task_runs_inference_json(tmp_path, synthetic_dataset, fresh_ckpt, segmenter):
    """MONAI Label's own BundleInferTask on this bundle (network_def, preprocessing, inferer, postprocessing):
    a 4-channel study (channels last, as MONAI Label stores it) gives the labels of the shared path."""
    from custom.data.nifti import load_case_arrays

    pytest.importorskip("monailabel")
    from monailabel.tasks.infer.bundle import BundleInferTask

    bundle = tmp_path / "bundle"
    shutil.copytree("bundle/configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copyfile(fresh_ckpt, bundle / "models" / "model.pt")
    shutil.copyfile(fresh_ckpt.parent / "plans.json", bundle / "models" / "plans.json")
    case = sorted(p for p in synthetic_dataset.iterdir() if p.is_dir())[0]
    files = [str(p) for p in _case_files(case)]
    image, _, affine, spacing = load_case_arrays(files)
    study = tmp_path / "study.nii.gz"
    nib.save(nib.Nifti1Image(np.moveaxis(image, 0, -1), affine), study)

    task = BundleInferTask(str(bundle), {})
    assert task.is_valid()
    result_file, _ = task({"image": str(study), "device": "cpu", "result_extension": ".nii.gz"})
    labels = np.asarray(nib.load(result_file).dataobj).squeeze()
    Path(result_file).unlink()  # MONAI Label writes results to a temporary file
    assert labels.shape == image.shape[1:]
    assert (labels == segmenter.predict(image, spacing).labels).mean() >= 0.999


def test_calibrated_error_map_and_predicted_dice(tmp_path, cases_dir, fresh_ckpt, prepared_work_dir):
    """Issue 13.4: with --calibration_file (evaluate_heldout's calibration.json) the bundle also writes
    <case_id>-perror.nii.gz, calibrated P(error) inside the reporting region and 0 outside, and summary.json
    carries the predicted WT Dice of those probabilities; a model without the uncertainty channel is refused."""
    from custom.evaluation.calibration import IsotonicCalibrator
    from custom.evaluation.self_assessment import predicted_dice, reporting_region, summarize_case

    # a calibrator far from the identity: map < 0.5 -> 1 error in 4, map >= 0.5 -> 3 in 4
    values = np.array([[[0.1] * 4 + [0.9] * 4]])
    errors = np.array([[[1, 0, 0, 0, 1, 1, 1, 0]]], bool)
    cal = IsotonicCalibrator.fit([summarize_case("v", errors, np.zeros_like(errors), values,
                                                 region=np.ones_like(errors))])
    cal_file = cal.save(tmp_path / "calibration.json", map="unc_output")
    one = tmp_path / "cases"
    shutil.copytree(cases_dir / GOOD[0], one / GOOD[0])
    out = tmp_path / "out"
    run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file",
             "bundle/configs/inference.json", "--dataset_dir", one, "--output_dir", out, "--checkpoint", fresh_ckpt,
             "--calibration_file", cal_file, "--progress", "false"], timeout=600)
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["cases"][GOOD[0]]
    assert summary["calibrated"] is True and entry["perror"] == f"{GOOD[0]}-perror.nii.gz"
    labels = np.asarray(nib.load(out / f"{GOOD[0]}.nii.gz").dataobj)
    unc = np.asarray(nib.load(out / f"{GOOD[0]}-unc.nii.gz").dataobj)
    p = np.asarray(nib.load(out / entry["perror"]).dataobj)
    seg = labels > 0
    region = reporting_region(seg)
    assert seg.any() and p.shape == labels.shape and p.dtype == np.float32
    np.testing.assert_array_equal(p[~region], 0.0)
    np.testing.assert_allclose(p[region], cal.predict(unc[region]), atol=1e-6)
    # the fit's range (bins between its two values interpolate), not the raw map's
    assert 0.25 - 1e-6 <= p[region].min() and p[region].max() <= 0.75 + 1e-6
    assert not np.allclose(p[region], unc[region], atol=0.05)
    assert entry["predicted_wt_dice"] == pytest.approx(predicted_dice(p, seg, region), abs=1e-4)
    # without the file: no P(error) map, no predicted Dice
    plain = tmp_path / "plain"
    run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file",
             "bundle/configs/inference.json", "--dataset_dir", one, "--output_dir", plain, "--checkpoint", fresh_ckpt,
             "--progress", "false"], timeout=600)
    plain_summary = json.loads((plain / "summary.json").read_text())
    assert plain_summary["calibrated"] is False and "predicted_wt_dice" not in plain_summary["cases"][GOOD[0]]
    assert not list(plain.glob("*-perror.nii.gz"))
    # a segmentation-only model: its map is var1shot, not what the calibration was fitted on
    base = _checkpoint_dir(tmp_path / "base", prepared_work_dir / "plans.json", with_uncertainty=False) / "model.pt"
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file",
                    "bundle/configs/inference.json", "--dataset_dir", one, "--output_dir", tmp_path / "base_out",
                    "--checkpoint", base, "--calibration_file", cal_file], check=False, timeout=600)
    assert proc.returncode != 0 and "has no uncertainty channel" in proc.stderr
    assert not list((tmp_path / "base_out").glob("*.nii.gz")) if (tmp_path / "base_out").exists() else True
