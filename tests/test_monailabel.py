"""MONAI Label integration: studies, the app's tasks, and the real server over HTTP (issues 7, 15, 17, 21).

The server tests start ``python -m monailabel.main start_server`` with ``scripts/monailabel_app`` on a free
127.0.0.1 port, on studies made from the session's synthetic cases (3 labeled, 3 unlabeled) and the model of
the session's tiny training run, then: /info/, the infer tasks over HTTP, scoring, the most_uncertain
strategy, what a hostile request gets (path traversal, model_filename, CORS, upload cap, unknown names),
training with its progress in the server log; a second server without a model checks the default CORS
policy, the upload cap and saving labels.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PYTHON, REPO_ROOT, TINY_FILTERS, TINY_PATCH, run_cmd

from custom.core.errors import BraTSInputError
from custom.evaluation.self_assessment import predicted_dice, reporting_region

APP_DIR = REPO_ROOT / "scripts" / "monailabel_app"
# MONAI Label puts the app directory on sys.path; the unit tests below import its lib.* modules the same way
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

MODALITIES = ("t1c", "t1n", "t2f", "t2w")
UNLABELED = ("BraTS-GLI-00003-000", "BraTS-GLI-00004-000", "BraTS-GLI-00005-000")
SERVER_START_TIMEOUT_S = 120


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def studies(synthetic_dataset, tmp_path_factory) -> Path:
    """Studies folder: six 4-channel studies, labels/final for the first three."""
    out = tmp_path_factory.mktemp("ml_studies")
    run_cmd([PYTHON, "scripts/make_monailabel_studies.py", "--cases", synthetic_dataset, "--studies", out,
             "--unlabeled", "[" + ",".join(f"'{u}'" for u in UNLABELED) + "]"])
    return out


@pytest.fixture(scope="module")
def model_dir(tiny_training_run, tmp_path_factory) -> Path:
    """A copy of the tiny run's model.pt + plans.json (training from MONAI Label may overwrite it)."""
    out = tmp_path_factory.mktemp("ml_model")
    for name in ("model.pt", "plans.json"):
        shutil.copyfile(tiny_training_run / name, out / name)
    return out


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real MONAI Label server process (own process group, so its task subprocesses stop with it)."""

    def __init__(self, studies: Path, conf: dict, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [PYTHON, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
               "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in conf.items():
            cmd += ["--conf", k, str(v)]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   # scoring is run explicitly below; a background pass at start-up would race with it
                   MONAI_LABEL_AUTO_UPDATE_SCORING="false")
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout=SERVER_START_TIMEOUT_S) -> dict:
        import requests

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                r = requests.get(f"{self.url}/info/", timeout=5)
                if r.status_code == 200:
                    return r.json()
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server did not answer /info/ within {timeout} s:\n{self.log()}")

    def log(self, tail: int = 6000) -> str:
        self._log.flush()
        text = self.log_path.read_text()
        return text[-tail:] if tail else text

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self._log.close()


BAD_STUDY = "BraTS-GLI-00099-000"
#: the one web origin the main server's CORS policy allows (--conf cors_origins)
ALLOWED_ORIGIN = "http://viewer.example.org"
#: the names Slicer's MONAI Label module colours are necrosis and edema (MONAILabelLib/labelcolors.py)
TUMOUR_LABELS = {"necrosis": 1, "edema": 2, "enhancing tumor": 3}
REVIEW_LABELS = {**TUMOUR_LABELS, "uncertain": 4}


@pytest.fixture(scope="module")
def server(studies, model_dir, tmp_path_factory):
    """The server on a copy of the studies plus one broken (3-channel) unlabeled study."""
    root = tmp_path_factory.mktemp("ml_server") / "studies"
    shutil.copytree(studies, root, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    nib.save(nib.Nifti1Image(np.ones((64, 64, 48, 3), np.float32), np.eye(4)), str(root / f"{BAD_STUDY}.nii.gz"))
    conf = {"model_path": model_dir / "model.pt", "train_dir": tmp_path_factory.mktemp("ml_train"),
            "train_configs": "bundle/configs/tiny.json",
            "prepare_args": json.dumps({"patch_size": TINY_PATCH, "filters": TINY_FILTERS}),
            "cors_origins": ALLOWED_ORIGIN}
    srv = Server(root, conf, tmp_path_factory.mktemp("ml_log") / "server.log")
    srv.studies = root
    try:
        srv.info = srv.wait_ready()
        yield srv
    finally:
        srv.stop()
    assert srv.proc.poll() is not None, "server still running after stop()"


def _infer(server, model: str, image_id: str, params: dict | None = None):
    """POST /infer/<model>?image=<id>; returns (nibabel image, result JSON) from the multipart answer."""
    import requests
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    r = requests.post(f"{server.url}/infer/{model}", params={"image": image_id},
                      data={"params": json.dumps(params or {})}, timeout=300)
    assert r.status_code == 200, f"/infer/{model} failed: {r.status_code} {r.text[:2000]}\n{server.log()}"
    parts = MultipartDecoder(r.content, r.headers["content-type"]).parts
    params, image = None, None
    for part in parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            params = json.loads(part.content)
        elif 'name="image"' in disposition:
            image = nib.Nifti1Image.from_bytes(_gunzip(part.content))
    assert params is not None and image is not None, f"multipart answer lacks params/image: {disposition}"
    return image, params


def _gunzip(data: bytes) -> bytes:
    import gzip

    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


@pytest.fixture(scope="module")
def bare_server(studies, tmp_path_factory):
    """A second server, without a model, with the default CORS policy and a 1 MiB upload cap."""
    root = tmp_path_factory.mktemp("ml_bare") / "studies"
    shutil.copytree(studies, root, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    conf = {"model_path": root.parent / "no_model" / "model.pt", "max_upload_mb": 1}
    srv = Server(root, conf, root.parent / "server.log")
    srv.studies = root
    try:
        srv.info = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------ unit tests
def test_make_studies_channels_last_in_modality_order(synthetic_dataset, studies):
    from monai.transforms import EnsureChannelFirstd, LoadImaged

    case_id = "BraTS-GLI-00000-000"
    study = nib.load(str(studies / f"{case_id}.nii.gz"))
    assert study.shape == (64, 64, 48, 4)
    assert study.get_data_dtype() == np.float32
    ref = nib.load(str(synthetic_dataset / case_id / f"{case_id}-t1c.nii.gz"))
    np.testing.assert_allclose(study.affine, ref.affine)
    data = np.asarray(study.dataobj)
    for c, m in enumerate(MODALITIES):
        src = np.asarray(nib.load(str(synthetic_dataset / case_id / f"{case_id}-{m}.nii.gz")).dataobj, np.float32)
        np.testing.assert_array_equal(data[..., c], src, err_msg=f"channel {c} is not {m}")
    # what MONAI Label's LoadImaged + EnsureChannelFirstd make of it
    d = EnsureChannelFirstd(keys="image")(LoadImaged(keys="image", image_only=False)({"image": str(study.get_filename())}))
    assert tuple(d["image"].shape) == (4, 64, 64, 48)
    np.testing.assert_array_equal(d["image"][2].numpy(), data[..., 2])
    # labels: labeled cases under labels/final (uint8, same grid), unlabeled ones have none
    for i in range(6):
        cid = f"BraTS-GLI-{i:05d}-000"
        label = studies / "labels" / "final" / f"{cid}.nii.gz"
        assert label.exists() == (cid not in UNLABELED), cid
    seg = nib.load(str(studies / "labels" / "final" / f"{case_id}.nii.gz"))
    src_seg = np.asarray(nib.load(str(synthetic_dataset / case_id / f"{case_id}-seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(np.asarray(seg.dataobj), src_seg)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 1, 2, 3}


def test_make_studies_bad_case_named_and_not_written(synthetic_dataset, tmp_path):
    bad_root = tmp_path / "raw"
    case_id = "BraTS-GLI-00001-000"
    shutil.copytree(synthetic_dataset / case_id, bad_root / case_id)
    shutil.copytree(synthetic_dataset / "BraTS-GLI-00002-000", bad_root / "BraTS-GLI-00002-000")
    (bad_root / case_id / f"{case_id}-t2f.nii.gz").unlink()
    out = tmp_path / "studies"
    proc = run_cmd([PYTHON, "scripts/make_monailabel_studies.py", "--cases", bad_root, "--studies", out], check=False)
    assert proc.returncode == 1
    assert f"{case_id}-t2f.nii.gz" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (out / f"{case_id}.nii.gz").exists(), "no study may be written for a broken case"
    assert (out / "BraTS-GLI-00002-000.nii.gz").exists(), "the good case is still converted"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temporary files left behind"


def test_study_round_trip_and_bad_study(studies, tmp_path):
    from custom.core.errors import BraTSInputError
    from custom.data.nifti import load_case_arrays
    from custom.data.studies import load_study, study_to_case_folder

    case_id = "BraTS-GLI-00001-000"
    image, affine, spacing = load_study(studies / f"{case_id}.nii.gz")
    assert image.shape == (4, 64, 64, 48) and spacing == pytest.approx((1.0, 1.0, 1.0))
    case_dir = study_to_case_folder(studies / f"{case_id}.nii.gz", studies / "labels" / "final" / f"{case_id}.nii.gz",
                                    tmp_path / "raw", case_id)
    back, seg, back_affine, _ = load_case_arrays(
        [str(case_dir / f"{case_id}-{m}.nii.gz") for m in MODALITIES], str(case_dir / f"{case_id}-seg.nii.gz"))
    np.testing.assert_array_equal(back, image)
    np.testing.assert_allclose(back_affine, affine)
    assert seg.shape == (64, 64, 48)

    # a 3-channel study is refused with the file named
    bad = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), str(bad))
    with pytest.raises(BraTSInputError, match="bad.nii.gz.*4-modality"):
        load_study(bad)


@pytest.mark.parametrize("bad", ["../x", "..", "a/b", "a\\b", "/etc/passwd", "C:evil", "x\x00y", ".lock", "",
                                 " x", "a" * 129])
def test_check_study_id_refuses_what_would_leave_the_folder(bad):
    from custom.data.studies import StudyIdError, check_study_id

    with pytest.raises(StudyIdError):
        check_study_id(bad)


def test_check_study_id_keeps_plain_names():
    from custom.data.studies import check_study_id

    for ok in ("BraTS-GLI-00001-000", "MR Head (2)", "case_7.v2", "final"):
        assert check_study_id(ok) == ok


def test_study_datastore_refuses_traversal_and_bad_uploads(studies, tmp_path):
    """The second line behind the request guard: MONAI Label's own LocalDatastore with every id checked."""
    from lib.datastore import StudyDatastore

    from custom.core.errors import BraTSInputError
    from custom.data.studies import StudyIdError

    root = tmp_path / "studies"
    shutil.copytree(studies, root, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.nii.gz"
    shutil.copyfile(studies / f"{UNLABELED[0]}.nii.gz", victim)
    planted = tmp_path / "upload.py"
    planted.write_text("raise SystemExit('planted code ran')\n")
    ds = StudyDatastore(str(root))
    n_images = len(ds.list_images())

    with pytest.raises(StudyIdError):
        ds.add_image("../outside/planted", str(planted), {})
    with pytest.raises(BraTSInputError, match="not a NIfTI file"):
        ds.add_image("BraTS-GLI-00077-000", str(planted), {})
    with pytest.raises(StudyIdError):
        ds.remove_image("../outside/victim")
    with pytest.raises(StudyIdError):
        ds.remove_label(UNLABELED[0], "../../outside")
    with pytest.raises(StudyIdError):
        ds.get_image_uri("../outside/victim")
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64, 48), np.uint8), np.eye(4)), str(label))
    with pytest.raises(StudyIdError):
        ds.save_label(UNLABELED[0], str(label), "../../outside", {})
    # a 3-D volume is not a study (Slicer uploads its displayed volume): refused before it is stored
    one_channel = tmp_path / "BraTS-GLI-00078-000.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(one_channel))
    with pytest.raises(BraTSInputError, match="4-modality"):
        ds.add_image("", str(one_channel), {})
    assert victim.exists() and not (outside / "planted.py").exists() and not list(root.glob("*.py"))
    assert len(ds.list_images()) == n_images

    # labels: the study's shape and BraTS values only; the 'uncertain' value says what to do about it
    wrong_shape = tmp_path / "wrong.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), str(wrong_shape))
    with pytest.raises(BraTSInputError, match="label shape"):
        ds.save_label(UNLABELED[0], str(wrong_shape), "final", {})
    seg = np.zeros((64, 64, 48), np.uint8)
    seg[10:20, 10:20, 10:20] = 2
    seg[12:14, 12:14, 12:14] = 4
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(label))
    with pytest.raises(BraTSInputError, match="uncertain") as err:
        ds.save_label(UNLABELED[0], str(label), "final", {})
    assert "8 voxels" in str(err.value) and str(tmp_path) not in str(err.value)
    assert UNLABELED[0] in ds.get_unlabeled_images()
    seg[seg == 4] = 1
    nib.save(nib.Nifti1Image(seg, np.eye(4)), str(label))
    assert ds.save_label(UNLABELED[0], str(label), "final", {}) == UNLABELED[0]
    assert UNLABELED[0] not in ds.get_unlabeled_images()


def test_prediction_summary_volumes_and_mean():
    from lib.transforms import prediction_summary

    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:2] = 2  # 200 voxels ED
    labels[2:3] = 3  # 100 voxels ET
    unc = np.zeros((10, 10, 10), np.float32)
    unc[:3] = 0.5
    unc[0] = 0.2
    s = prediction_summary(labels, unc, (2.0, 1.0, 1.0))  # 2 mm^3 per voxel
    assert s["volume_wt_ml"] == pytest.approx(300 * 2 / 1000)
    assert s["volume_et_ml"] == pytest.approx(100 * 2 / 1000)
    assert s["mean_uncertainty_in_tumour"] == pytest.approx((100 * 0.2 + 200 * 0.5) / 300)
    empty = prediction_summary(np.zeros_like(labels), unc, (1, 1, 1))
    assert empty["mean_uncertainty_in_tumour"] == 0.0 and empty["tumour_voxels"] == 0
    # predicted WT Dice from the raw map (uncalibrated): region = x 0..5 (the WT slabs x 0..2 dilated by 3);
    # E[TP] = 100 * 0.8 + 200 * 0.5 = 180, E[FP] = 100 * 0.2 + 200 * 0.5 = 120, E[FN] = 0 (the ring's unc is 0)
    assert s["predicted_wt_dice"] == pytest.approx(360 / 480) and s["predicted_dice_calibrated"] is False
    assert empty["predicted_wt_dice"] == 1.0  # nothing predicted: nothing the map can judge


def test_calibrated_error_probability_from_the_heldout_calibration_file(tmp_path):
    """Issue 13.4: with the app conf's calibration_path the uncertain region and the predicted Dice use the
    calibrated P(error) of evaluate_heldout's calibration.json (0 outside the reporting region)."""
    from lib.configs.brats_uncertainty import BraTSUncertainty
    from lib.transforms import ErrorProbability, prediction_summary, uncertain_region

    from custom.evaluation.calibration import IsotonicCalibrator
    from custom.evaluation.self_assessment import summarize_case

    # validation voxels: raw map 0.5 wrong 3 in 4, raw map 0.2 wrong 1 in 4
    values, errors = np.array([[[0.5] * 4 + [0.2] * 4]]), np.array([[[1, 1, 1, 0, 1, 0, 0, 0]]], bool)
    val = summarize_case("v", errors, np.zeros_like(errors), values, region=np.ones_like(errors))
    path = IsotonicCalibrator.fit([val]).save(tmp_path / "calibration.json", map="unc_output")
    labels = np.zeros((12, 12, 12), np.uint8)
    labels[:2] = 2  # 288 voxels: WT slabs x 0..1, reporting region x 0..4
    unc = np.zeros(labels.shape, np.float32)
    unc[:2] = 0.5
    unc[2] = 0.2
    unc[11] = 0.9  # far outside the region: the calibration claims nothing there
    calibrated = ErrorProbability.from_file(path)
    p = calibrated(unc, labels)
    assert p[0, 0, 0] == pytest.approx(0.75) and p[2, 0, 0] == pytest.approx(0.25) and p[11].max() == 0.0
    assert p[4, 0, 0] == pytest.approx(calibrated.calibrator.predict([0.0])[0])
    s = prediction_summary(labels, unc, (1, 1, 1), calibrated)
    assert s["predicted_dice_calibrated"] is True
    # by hand: E[TP] = 288 * 0.25, E[FP] = 288 * 0.75, E[FN] = 144 * 0.25 + 288 * P(0.0)
    p0 = float(calibrated.calibrator.predict([0.0])[0])
    tp, fp, fn = 288 * 0.25, 288 * 0.75, 144 * 0.25 + 288 * p0
    assert s["predicted_wt_dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), rel=1e-5)
    # the uncertain region at 0.5: the tumour (0.75) but neither the 0.2 slab (0.25) nor the far 0.9 voxels
    region = uncertain_region(labels, unc, 0.5, calibrated)
    assert set(np.unique(np.nonzero(region == 4)[0]).tolist()) == {0, 1}
    # the app reads the file from its conf; a bad file is named at start-up
    app_conf = {"model_path": str(tmp_path / "none" / "model.pt"), "calibration_path": str(path)}
    task = BraTSUncertainty()
    task.init("brats", str(tmp_path / "model"), app_conf, None)
    assert task.error_probability.calibrated and task.predictor.error_probability is task.error_probability
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(BraTSInputError, match="bad.json: not a usable calibration file"):
        BraTSUncertainty().init("brats", str(tmp_path / "model"), {**app_conf, "calibration_path":
                                                                   str(tmp_path / "bad.json")}, None)


def test_uncertain_region_threshold_and_calibrator_hook():
    from lib.labels import REVIEW_LABELS as APP_REVIEW_LABELS
    from lib.labels import TUMOUR_LABELS as APP_TUMOUR_LABELS
    from lib.transforms import select_output, uncertain_region

    from custom.core.errors import BraTSInputError

    assert APP_TUMOUR_LABELS == TUMOUR_LABELS and APP_REVIEW_LABELS == REVIEW_LABELS
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 2
    labels[2, 2, 2] = 3
    unc = np.zeros((4, 4, 4), np.float32)
    unc[1, 1, 1], unc[2, 2, 2], unc[0, 0, 0] = 0.5, 0.49, 0.9  # at, below, and far outside the tumour
    region = uncertain_region(labels, unc, 0.5)
    assert set(zip(*np.nonzero(region == 4))) == {(1, 1, 1), (0, 0, 0)}  # p >= threshold, background included
    np.testing.assert_array_equal(region[region != 4], labels[region != 4])
    # a calibrator is plugged in as a function (unc, labels) -> P(error)
    doubled = uncertain_region(labels, unc, 0.5, error_probability=lambda u, lab: np.clip(2 * u, 0, 1))
    assert int((doubled == 4).sum()) == 3
    out, result = select_output("uncertain_region", labels, unc, (2.0, 1.0, 1.0), 0.5)
    assert result["uncertain_voxels"] == 2 and result["uncertain_ml"] == pytest.approx(2 * 2 / 1000)
    for bad in (0, 1.5, "high", None):
        with pytest.raises(BraTSInputError, match="uncertain_threshold"):
            uncertain_region(labels, unc, bad)


def test_most_uncertain_strategy_on_local_datastore(studies, tmp_path):
    """The strategy reads the stored predicted Dice through MONAI Label's own LocalDatastore: worst first."""
    from lib.activelearning import MostUncertain
    from lib.scoring import PRED_DICE_KEY, UNC_SCORE_KEY
    from monailabel.datastore.local import LocalDatastore

    root = tmp_path / "studies"
    shutil.copytree(studies, root)
    ds = LocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)
    assert sorted(ds.get_unlabeled_images()) == list(UNLABELED)
    strategy = MostUncertain()
    # nothing scored yet: the first unlabeled study, never a labeled one
    assert strategy({"strategy": "most_uncertain"}, ds)["id"] == UNLABELED[0]
    # the study with the higher mean uncertainty is not the one predicted worst: the predicted Dice decides
    ds.update_image_info(UNLABELED[0], {PRED_DICE_KEY: 0.60, UNC_SCORE_KEY: 0.10})
    ds.update_image_info(UNLABELED[1], {PRED_DICE_KEY: 0.85, UNC_SCORE_KEY: 0.30})
    ds.update_image_info("BraTS-GLI-00000-000", {PRED_DICE_KEY: 0.01})  # labeled: must be ignored
    res = strategy({"strategy": "most_uncertain"}, ds)
    assert res["id"] == UNLABELED[0] and res[PRED_DICE_KEY] == pytest.approx(0.60)
    assert res["ranking"] == [UNLABELED[0], UNLABELED[1], UNLABELED[2]]
    ds.update_image_info(UNLABELED[1], {PRED_DICE_KEY: 0.40})
    assert strategy({"strategy": "most_uncertain"}, ds)["ranking"] == [UNLABELED[1], UNLABELED[0], UNLABELED[2]]
    # persisted in datastore.json: a new datastore object sees the same order
    ds2 = LocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)
    assert strategy({"strategy": "most_uncertain"}, ds2)["id"] == UNLABELED[1]


def test_bundle_and_shared_infer_tasks_agree(studies, model_dir, tmp_path):
    """BundleInferTask on inference.json and the direct UncertaintySegmenter task give the same maps."""
    from lib.infers import BraTSBundleInferTask, BraTSUncertaintyInfer, StudyPredictor

    from custom.core.errors import BraTSInputError

    predictor = StudyPredictor(model_dir / "model.pt")
    study = studies / f"{UNLABELED[2]}.nii.gz"
    ref = nib.load(str(study))
    dtypes = {"labels": np.uint8, "uncertain_region": np.uint8, "uncertainty": np.float32}
    for output, dtype in dtypes.items():
        bundle_task = BraTSBundleInferTask(REPO_ROOT / "bundle", model_dir / "model.pt", output=output,
                                           threshold=0.05)
        assert bundle_task.is_valid()
        assert "model_filename" not in bundle_task.config(), "a request must not choose the model file"
        shared_task = BraTSUncertaintyInfer(predictor, output=output, threshold=0.05)
        results = []
        for task in (bundle_task, shared_task):
            path, js = task({"image": str(study), "device": "cpu"})
            img = nib.load(path)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
            results.append((np.asarray(img.dataobj), js))
            os.remove(path)
        (a, ja), (b, jb) = results
        assert a.shape == ref.shape[:3] and a.dtype == b.dtype == dtype, (output, a.dtype, b.dtype)
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert ja["mean_uncertainty_in_tumour"] == pytest.approx(jb["mean_uncertainty_in_tumour"], abs=1e-6)
        if output == "uncertain_region":
            assert ja["uncertain_voxels"] == jb["uncertain_voxels"] == int((a == 4).sum())

    # a study that is not 4-channel is refused with its file named, by either task
    bad = tmp_path / "BraTS-GLI-00099-000.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 3), np.float32), np.eye(4)), str(bad))
    for task in (bundle_task, shared_task):
        with pytest.raises(BraTSInputError, match="BraTS-GLI-00099-000.nii.gz"):
            task({"image": str(bad), "device": "cpu"})


def _nan_copy(model_path: Path, out: Path) -> tuple[Path, str]:
    """A copy of ``model_path`` (+ plans.json) with one NaN in one weight tensor: (path, tensor name)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(str(model_path), map_location="cpu", weights_only=True)["model"]
    name = [k for k, v in state.items() if k.endswith("conv.weight")][3]
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    torch.save({"model": state}, out / "model.pt")
    shutil.copyfile(model_path.with_name("plans.json"), out / "plans.json")
    return out / "model.pt", name


def test_infer_tasks_refuse_a_nan_model(studies, model_dir, tmp_path):
    """Issue 15.7: both engines load the model through the project's loader, which refuses non-finite weights
    (MONAI Label's own loader would torch.load it and answer "no tumour"): a model replaced by a NaN one after
    start-up, and a NaN model already there at start-up (the app still starts; its tasks refuse it)."""
    from lib.configs.brats_uncertainty import BraTSUncertainty
    from lib.infers import BraTSBundleInferTask, BraTSUncertaintyInfer, StudyPredictor

    from custom.core.errors import CheckpointError

    study = str(studies / f"{UNLABELED[0]}.nii.gz")
    replaced = tmp_path / "replaced"
    replaced.mkdir()
    for name in ("model.pt", "plans.json"):
        shutil.copyfile(model_dir / name, replaced / name)
    tasks = [BraTSBundleInferTask(REPO_ROOT / "bundle", replaced / "model.pt"),
             BraTSUncertaintyInfer(StudyPredictor(replaced / "model.pt"))]
    bad, tensor = _nan_copy(model_dir / "model.pt", tmp_path / "nan")
    shutil.copyfile(bad, replaced / "model.pt")
    for task in tasks:
        with pytest.raises(CheckpointError, match=rf"replaced/model.pt: non-finite weights: tensor '{tensor}' holds 1 NaN"):
            task({"image": study, "device": "cpu"})

    config = BraTSUncertainty()
    config.init("brats_uncertainty", str(tmp_path / "app_model"), {"model_path": str(bad)}, None)
    for name, task in config.infer().items():
        with pytest.raises(CheckpointError, match=rf"{bad}: non-finite weights: tensor '{tensor}'"):
            task({"image": study, "device": "cpu"})


def test_publish_replaces_a_stale_checksum_with_the_runs(prepared_work_dir, tmp_path):
    """The loader checks a ``model.pt.sha256`` beside a model: publishing a trained model next to an old
    checksum file (e.g. copied in by hand with an earlier model) must not leave the new model refused."""
    import torch
    from lib.trainers import BraTSBundleTrainTask

    from custom.core.atomic import atomic_torch_save
    from custom.model.checkpoints import load_state_dict
    from custom.model.networks import build_network

    plans = prepared_work_dir / "plans.json"
    app_model = tmp_path / "app" / "model.pt"
    app_model.parent.mkdir()
    for seed, folder in ((0, tmp_path / "app"), (1, tmp_path / "run")):
        torch.manual_seed(seed)
        atomic_torch_save({"model": build_network(plans, with_uncertainty=True).state_dict()}, folder / "model.pt")
        shutil.copyfile(plans, folder / "plans.json")
    assert (tmp_path / "app" / "model.pt.sha256").is_file()  # the old model's checksum, at the model path
    task = BraTSBundleTrainTask(str(REPO_ROOT / "bundle"), {}, str(app_model), str(tmp_path / "work"))
    task.publish(tmp_path / "run")
    published = load_state_dict(app_model)
    expected = load_state_dict(tmp_path / "run" / "model.pt")
    assert all(torch.equal(published[k], expected[k]) for k in expected)
    assert (tmp_path / "app" / "model.pt.sha256").read_text() == (tmp_path / "run" / "model.pt.sha256").read_text()


def test_entry_points_do_not_edit_sys_path():
    """MONAI Label puts the app directory on sys.path and ``custom`` is installed: no script edits it."""
    import ast

    for path in [APP_DIR / "main.py", REPO_ROOT / "scripts" / "make_monailabel_studies.py", *APP_DIR.rglob("lib/**/*.py")]:
        tree = ast.parse(path.read_text())
        uses = [n.lineno for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and n.attr == "path" and getattr(n.value, "id", None) == "sys"]
        assert not uses, f"{path}: sys.path used at lines {uses}"


# ------------------------------------------------------------------------------------------ real server
def test_server_infer_scoring_strategy(server, model_dir):
    import requests

    studies = server.studies
    info = server.info
    assert list(info["models"]) == ["segmentation", "uncertainty", "uncertainty_map"], info["models"]
    # served by MONAI Label's BundleInferTask on the bundle (its info carries the bundle version)
    version = json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())["version"]
    assert info["models"]["segmentation"].get("version") == version, info["models"]["segmentation"]
    # what Slicer lists (segmentation-type tasks) and the names it colours
    assert info["models"]["segmentation"]["type"] == info["models"]["uncertainty"]["type"] == "segmentation"
    assert info["models"]["uncertainty_map"]["type"] == "others"
    assert info["models"]["segmentation"]["labels"] == TUMOUR_LABELS
    assert info["models"]["uncertainty"]["labels"] == REVIEW_LABELS == info["labels"]
    assert info["models"]["uncertainty"]["config"]["uncertain_threshold"] == 0.5
    assert not any("model_filename" in m["config"] for m in info["models"].values())
    assert "uncertainty" in info["scoring"] and "most_uncertain" in info["strategies"]
    assert info["datastore"]["total"] == 7 and info["datastore"]["completed"] == 3

    # a broken study: a clear error naming it, not a bare 500
    r = requests.post(f"{server.url}/infer/segmentation", params={"image": BAD_STUDY}, timeout=120)
    assert r.status_code == 422, (r.status_code, r.text[:500])
    assert f"{BAD_STUDY}.nii.gz" in r.json()["detail"] and "4-modality" in r.json()["detail"]

    image_id = UNLABELED[0]
    study = nib.load(str(studies / f"{image_id}.nii.gz"))
    seg_img, seg_json = _infer(server, "segmentation", image_id)
    labels = np.asarray(seg_img.dataobj)
    assert labels.shape == study.shape[:3]
    assert np.issubdtype(labels.dtype, np.integer)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_allclose(seg_img.affine, study.affine, atol=1e-4)

    unc_img, unc_json = _infer(server, "uncertainty_map", image_id)
    unc = np.asarray(unc_img.dataobj)
    assert unc.shape == study.shape[:3] and unc.dtype == np.float32, (unc.shape, unc.dtype)
    assert unc.min() >= 0.0 and unc.max() <= 1.0
    np.testing.assert_allclose(unc_img.affine, study.affine, atol=1e-4)
    # the map is not nearest-resized or cast: it keeps fractional values where it is nonzero
    if unc.max() > 0:
        inner = unc[(unc > 0) & (unc < 1)]
        assert inner.size and not np.allclose(inner, np.round(inner)), "uncertainty map was quantised"

    # summary numbers agree with the returned maps
    for js in (seg_json, unc_json):
        assert js["volume_wt_ml"] == pytest.approx(float((labels > 0).sum()) / 1000.0, abs=1e-4)
        assert js["volume_et_ml"] == pytest.approx(float((labels == 3).sum()) / 1000.0, abs=1e-4)
        expected = float(unc[labels > 0].mean()) if (labels > 0).any() else 0.0
        assert js["mean_uncertainty_in_tumour"] == pytest.approx(expected, abs=1e-5)
        # no calibration_path on this server: the raw map read as P(error), said so
        seg_wt = labels > 0
        assert js["predicted_dice_calibrated"] is False
        assert js["predicted_wt_dice"] == pytest.approx(
            predicted_dice(unc, seg_wt, reporting_region(seg_wt)), abs=1e-5)
    # uncertainty is masked to the dilated predicted tumour: zero far away from it
    if not (labels > 0).any():
        assert unc.max() == 0.0

    # the Slicer-usable task: the label map, with 'uncertain' (4) exactly where unc >= the threshold
    assert 0 < (unc > 0).sum(), "the tiny model gives no uncertainty on this study: the region test is void"
    # half the nonzero voxels, and a value the map takes: 'at least the threshold' is checked at the boundary
    threshold = float(np.quantile(unc[unc > 0], 0.5, method="lower"))
    for params, expected_threshold in (({}, 0.5), ({"uncertain_threshold": threshold}, threshold)):
        reg_img, reg_json = _infer(server, "uncertainty", image_id, params)
        region = np.asarray(reg_img.dataobj)
        uncertain = unc >= expected_threshold
        np.testing.assert_array_equal(region == 4, uncertain)
        np.testing.assert_array_equal(region[~uncertain], labels[~uncertain])
        assert reg_json["uncertain_threshold"] == pytest.approx(expected_threshold)
        assert reg_json["uncertain_voxels"] == int(uncertain.sum())
    assert 0 < reg_json["uncertain_voxels"] < (unc > 0).sum()
    r = requests.post(f"{server.url}/infer/uncertainty", params={"image": image_id},
                      data={"params": json.dumps({"uncertain_threshold": 7})}, timeout=120)
    assert r.status_code == 422 and "uncertain_threshold" in r.json()["detail"], r.text[:500]

    # scoring: every valid unlabeled study gets a stored score; labeled ones are untouched;
    # the broken one is reported by name and does not stop the others
    r = requests.post(f"{server.url}/scoring/uncertainty", params={"run_sync": "true"}, timeout=600)
    assert r.status_code == 200, r.text
    result = r.json()
    assert result["total"] == 4 and result["executed"] + result["skipped"] == 3, result
    assert list(result["failed"]) == [BAD_STUDY] and f"{BAD_STUDY}.nii.gz" in result["failed"][BAD_STUDY]
    stored = {}
    ds = json.loads((studies / "datastore_v2.json").read_text())
    objects = ds["objects"]
    for image, obj in objects.items():
        score = obj["image"]["info"].get("predicted_wt_dice")
        if image in UNLABELED:
            assert score is not None, image
            stored[image] = score
        elif image == BAD_STUDY:
            assert score is None
        else:
            assert score is None, f"labeled study {image} was scored"
    assert stored[image_id] == pytest.approx(unc_json["predicted_wt_dice"], abs=1e-6)

    # a second pass with the same model skips every study
    again = requests.post(f"{server.url}/scoring/uncertainty", params={"run_sync": "true"}, timeout=600).json()
    assert again["skipped"] == 3 and again["executed"] == 0

    # strategy: the unlabeled study with the lowest predicted Dice (the unscored broken one ranks last)

    r = requests.post(f"{server.url}/activelearning/most_uncertain", json={}, timeout=60)
    assert r.status_code == 200, r.text
    worst = min(sorted(stored), key=lambda k: stored[k])
    assert r.json()["id"] == worst, (r.json(), stored)
    assert r.json()["predicted_wt_dice"] == pytest.approx(stored[worst])
    assert r.json()["ranking"][-1] == BAD_STUDY


def test_server_unknown_names_answer_4xx_with_the_reason(server):
    """Issue 17.11: an unknown image, model or strategy is a 404 naming it, not a 500."""
    import requests

    r = requests.post(f"{server.url}/infer/segmentation", params={"image": "BraTS-GLI-99999-000"}, timeout=60)
    assert r.status_code == 404 and "BraTS-GLI-99999-000" in r.json()["detail"], r.text[:500]
    r = requests.post(f"{server.url}/infer/no_such_model", params={"image": UNLABELED[0]}, timeout=60)
    assert r.status_code == 404 and "no_such_model" in r.json()["detail"] and "segmentation" in r.json()["detail"]
    r = requests.post(f"{server.url}/activelearning/no_such_strategy", json={}, timeout=60)
    assert r.status_code == 404 and "no_such_strategy" in r.json()["detail"], r.text[:500]


def test_server_refuses_paths_in_ids(server, tmp_path):
    """Issue 15.1: ids are plain names on every datastore route and on /infer; nothing outside the studies moves."""
    import requests

    outside = server.studies.parent / "outside"
    outside.mkdir(exist_ok=True)
    victim = outside / "victim.nii.gz"
    shutil.copyfile(server.studies / f"{UNLABELED[0]}.nii.gz", victim)
    planted = tmp_path / "__init__.py"
    planted.write_text("raise SystemExit('planted code ran')\n")
    before = sorted(p.name for p in server.studies.iterdir())

    def put(route, **params):
        with open(planted, "rb") as fh:
            return requests.put(f"{server.url}{route}", params=params, files={"file": ("__init__.py", fh)},
                                timeout=60)

    # upload a .py file under an id that climbs out of the studies folder (deprecated route and current one)
    for route in ("/datastore/", "/datastore/image"):
        r = put(route, image="../outside/planted")
        assert r.status_code == 400 and "path separator" in r.json()["detail"], (route, r.status_code, r.text[:300])
    # a plain id, but not a NIfTI study
    r = put("/datastore/image", image="BraTS-GLI-00077-000")
    assert r.status_code == 422 and "not a NIfTI file" in r.json()["detail"], r.text[:300]
    with open(planted, "rb") as fh:
        r = requests.put(f"{server.url}/datastore/label", params={"image": UNLABELED[0], "tag": "../../outside"},
                         files={"label": ("x.nii.gz", fh)}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    for route, params in (("/datastore/", {"id": "../outside/victim"}), ("/datastore/image", {"id": "../outside/victim"}),
                          ("/datastore/label", {"id": "../outside/victim", "tag": "final"}),
                          ("/datastore/label", {"id": UNLABELED[0], "tag": "../../outside"})):
        r = requests.delete(f"{server.url}{route}", params=params, timeout=60)
        assert r.status_code == 400, (route, params, r.status_code, r.text[:300])
    for route, params in (("/datastore/image", {"image": str(victim)}), ("/datastore/image/info", {"image": "../x"}),
                          ("/datastore/label", {"label": "../outside/victim", "tag": "final"})):
        r = requests.get(f"{server.url}{route}", params=params, timeout=60)
        assert r.status_code == 400, (route, params, r.status_code, r.text[:300])
    # /infer reads no file of the server's disk: not by a path as the image, nor by a path in the params
    r = requests.post(f"{server.url}/infer/segmentation", params={"image": str(victim)}, timeout=60)
    assert r.status_code == 400, r.text[:300]
    r = requests.post(f"{server.url}/infer/segmentation", params={"image": UNLABELED[0]},
                      data={"params": json.dumps({"image": str(victim)})}, timeout=60)
    assert r.status_code == 400 and "datastore" in r.json()["detail"], r.text[:300]
    # sessions (arbitrary uploads, unpacked archives) and model uploads are off
    with open(planted, "rb") as fh:
        r = requests.put(f"{server.url}/session/", files={"files": ("a.nii.gz", fh)}, timeout=60)
    assert r.status_code == 403, r.text[:300]
    with open(planted, "rb") as fh:
        r = requests.put(f"{server.url}/model/segmentation", files={"file": ("model.pt", fh)}, timeout=60)
    assert r.status_code == 403, r.text[:300]

    assert victim.exists() and not list(outside.glob("planted*"))
    assert sorted(p.name for p in server.studies.iterdir()) == before
    assert not list(REPO_ROOT.glob("outside*")) and not (REPO_ROOT / "custom" / "__init__.py").read_text().startswith(
        "raise SystemExit")


def test_server_ignores_model_filename(server, model_dir, tmp_path):
    """Issue 15.2: a request cannot choose the file loaded as the model (MONAI Label torch.loads it)."""
    import pickle

    marker = tmp_path / "pickle_ran"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = server.studies.parent / "evil.pt"  # where MONAI Label's os.path.join(models dir, name) can reach
    evil.write_bytes(pickle.dumps(Planted()))
    plain_img, plain_json = _infer(server, "segmentation", UNLABELED[1])
    # absolute, relative to the model's folder (what MONAI Label joins it to), and a bare name
    for name in (str(evil), os.path.relpath(evil, model_dir), "evil.pt"):
        img, js = _infer(server, "segmentation", UNLABELED[1], {"model_filename": name})
        np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(plain_img.dataobj))
        assert js["model_ts"] == plain_json["model_ts"]
    assert not marker.exists(), "the planted pickle was loaded"


def test_server_batch_infer_saves_checked_labels(server):
    """MONAI Label's batch inference still saves its results as labels (through the checked datastore)."""
    import requests

    # (the broken unlabeled study is left out: MONAI Label's sequential batch stops at the first failure)
    r = requests.post(f"{server.url}/batch/infer/segmentation", params={"run_sync": "true"},
                      json={"images": list(UNLABELED), "device": "cpu", "multi_gpu": False, "max_workers": 1,
                            "save_label": True, "label_tag": "original"}, timeout=900)
    assert r.status_code == 200, f"{r.status_code} {r.text[:2000]}\n{server.log()}"
    plain, _ = _infer(server, "segmentation", UNLABELED[0])
    for image_id in UNLABELED:
        saved = server.studies / "labels" / "original" / f"{image_id}.nii.gz"
        assert saved.exists(), f"batch inference saved no label for {image_id}:\n{server.log()}"
        if image_id == UNLABELED[0]:
            np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj), np.asarray(plain.dataobj))
    assert not (server.studies / "labels" / "original" / f"{BAD_STUDY}.nii.gz").exists()
    # 'original' labels do not take a study out of the review pool (only final ones do)
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert info["datastore"]["completed"] == 3


def test_server_cors_answers_only_configured_origins(server, bare_server):
    """Issue 15.3: MONAI Label alone answers every origin with credentials; here only listed origins."""
    import requests

    for srv, allowed in ((server, ALLOWED_ORIGIN), (bare_server, None)):
        for origin in ("http://evil.example.com", ALLOWED_ORIGIN):
            r = requests.get(f"{srv.url}/info/", headers={"Origin": origin}, timeout=30)
            assert r.status_code == 200
            granted = r.headers.get("access-control-allow-origin")
            if origin == allowed:
                assert granted == origin and r.headers.get("access-control-allow-credentials") == "true"
            else:  # a browser lets a page read the answer only when this header names the page's origin
                assert granted is None, dict(r.headers)
            pre = requests.options(f"{srv.url}/datastore/image", timeout=30, headers={
                "Origin": origin, "Access-Control-Request-Method": "DELETE"})
            assert (pre.headers.get("access-control-allow-origin") == origin) == (origin == allowed), dict(pre.headers)


def test_server_upload_cap_and_labels(bare_server, tmp_path):
    """Issue 15.3: bodies over --conf max_upload_mb get 413 (declared or streamed); labels are checked on save."""
    import requests

    assert bare_server.info["models"] == {}  # no model yet: MONAI Label hides the infer tasks
    big = tmp_path / "BraTS-GLI-00088-000.nii.gz"
    big.write_bytes(os.urandom(2 * 2**20))
    with open(big, "rb") as fh:
        r = requests.put(f"{bare_server.url}/datastore/image", files={"file": (big.name, fh)}, timeout=60)
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"], (r.status_code, r.text[:300])

    # the same multipart upload sent without Content-Length (chunked): counted while the form is read
    from requests_toolbelt import MultipartEncoder

    form = MultipartEncoder(fields={"file": (big.name, big.read_bytes(), "application/octet-stream")})
    body = form.to_string()

    def chunks():
        for i in range(0, len(body), 2**16):
            yield body[i:i + 2**16]

    r = requests.put(f"{bare_server.url}/datastore/image", params={"image": "BraTS-GLI-00088-000"}, data=chunks(),
                     headers={"Content-Type": form.content_type}, timeout=60)
    assert r.status_code == 413 and "max_upload_mb" in r.json()["detail"], (r.status_code, r.text[:300])
    assert not (bare_server.studies / big.name).exists()

    # a label with the 'uncertain' value is refused with what to do; a BraTS label map is saved
    seg = np.zeros((64, 64, 48), np.uint8)
    seg[20:30, 20:30, 20:30] = 2
    seg[22:24, 22:24, 22:24] = 4
    label = tmp_path / "label.nii.gz"
    for values, status in ((seg, 422), (np.where(seg == 4, 1, seg).astype(np.uint8), 200)):
        nib.save(nib.Nifti1Image(values, np.eye(4)), str(label))
        with open(label, "rb") as fh:
            r = requests.put(f"{bare_server.url}/datastore/label", params={"image": UNLABELED[2], "tag": "final"},
                             files={"label": ("label.nii.gz", fh)}, timeout=60)
        assert r.status_code == status, (r.status_code, r.text[:500])
        if status == 422:
            assert "'uncertain'" in r.json()["detail"] and "8 voxels" in r.json()["detail"]
    saved = bare_server.studies / "labels" / "final" / f"{UNLABELED[2]}.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(str(saved)).dataobj), np.where(seg == 4, 1, seg))


def test_server_routes_monailabel_adds_on_our_behalf(bare_server):
    """The routes MONAI Label serves beside the app's (bundle/docs/SECURITY.md lists them): the dataset archive,
    which would leave a zip of every study in the server's temporary folder per request, is refused; ids and
    dot segments are refused on the WSI, OHIF and proxy routes too; the server log is readable by any client
    (without authentication every client is admin: hence --host 127.0.0.1); /proxy/dicom reaches no server
    when the studies are a folder; and the guard survives /reload, which builds the app again."""
    import http.client

    import requests

    url = bare_server.url

    def refused_dataset_archive():
        r = requests.get(f"{url}/datastore/dataset", timeout=60)
        assert r.status_code == 403 and "dataset archive is disabled" in r.json()["detail"], (r.status_code, r.text[:300])

    refused_dataset_archive()
    r = requests.post(f"{url}/wsi/infer/segmentation", params={"image": "../outside/victim"}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text[:300])
    conn = http.client.HTTPConnection("127.0.0.1", bare_server.port, timeout=60)
    for raw in ("/ohif/../../custom/__init__.py", "/proxy/dicom/wado/..%2F..%2Fetc"):
        conn.request("GET", raw)
        answer = conn.getresponse()
        body = answer.read()
        assert answer.status in (400, 404), (raw, answer.status, body[:300])
    conn.close()
    r = requests.get(f"{url}/proxy/dicom/qido/studies", timeout=60)
    assert r.status_code >= 400, (r.status_code, r.text[:300])
    r = requests.get(f"{url}/logs/", params={"text": "true", "lines": 20}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain") and r.text, r.text[:300]
    r = requests.post(f"{url}/reload", timeout=60)
    assert r.status_code == 200, r.text[:300]
    refused_dataset_archive()
    r = requests.get(f"{url}/datastore/image", params={"image": "../outside/victim"}, timeout=60)
    assert r.status_code == 400, (r.status_code, r.text[:300])


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of a process so far (MB, the kernel's VmHWM)."""
    import re

    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def test_server_refuses_a_header_that_declares_more_than_the_file_holds(bare_server, tmp_path):
    """Issue 15.11: a study of a few dozen bytes whose header declares 512^3 x 4 float32 (2 GiB) drove the
    server's validation to 1 GB; now it is a 422 naming the file, answered from the header and the file size,
    and the server's peak memory does not move by the declared size."""
    import gzip

    import requests

    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, 512, 4))
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    study = tmp_path / "BraTS-GLI-00055-000.nii.gz"
    study.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    assert study.stat().st_size < 200
    before = _peak_rss_mb(bare_server.proc.pid)
    with open(study, "rb") as fh:
        r = requests.put(f"{bare_server.url}/datastore/image", params={"image": "BraTS-GLI-00055-000"},
                         files={"file": (study.name, fh)}, timeout=120)
    assert r.status_code == 422 and "declares" in r.json()["detail"], (r.status_code, r.text[:500])
    assert _peak_rss_mb(bare_server.proc.pid) - before < 256, "the declared 2 GiB were allocated"
    assert not (bare_server.studies / study.name).exists()


def test_listen_host_is_monailabels_all_interfaces_without_host():
    """The app warns when the server listens beyond loopback without authentication; MONAI Label binds
    0.0.0.0 when --host is left out."""
    from lib.security import listen_host

    assert listen_host(["monailabel", "start_server", "--app", "a", "--studies", "s"]) == "0.0.0.0"
    assert listen_host(["start_server", "--host", "127.0.0.1", "--port", "8010"]) == "127.0.0.1"
    assert listen_host(["start_server", "-i", "::1"]) == "::1"
    assert listen_host(["start_server", "--host=10.0.0.5"]) == "10.0.0.5"


def test_server_refuses_a_study_whose_spacing_would_blow_up(server, tmp_path):
    """Issue 15.5: a study whose spacing resamples to an enormous grid is a 4xx naming the problem."""
    import requests

    huge = tmp_path / "BraTS-GLI-00066-000.nii.gz"
    affine = np.diag([50.0, 50.0, 50.0, 1.0])  # 64 x 64 x 48 voxels of 5 cm: ~3200 x 3200 x 2400 at 1 mm
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 48, 4), np.float32) + 1, affine), str(huge))
    with open(huge, "rb") as fh:
        r = requests.put(f"{server.url}/datastore/image", files={"file": (huge.name, fh)}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    r = requests.post(f"{server.url}/infer/segmentation", params={"image": "BraTS-GLI-00066-000"}, timeout=300)
    assert 400 <= r.status_code < 500 and "voxel" in r.json()["detail"], (r.status_code, r.text[:500])


def test_server_answers_a_nan_model_with_503_naming_it(server, model_dir, tmp_path):
    """Issue 15.7: with a NaN model in place, /infer is a 503 naming the file and tensor, never a 200 "no
    tumour"; with the model restored, it answers as before."""
    import requests

    model = model_dir / "model.pt"
    backup = tmp_path / "model.pt"
    shutil.copyfile(model, backup)
    bad, tensor = _nan_copy(model, tmp_path / "nan")
    try:
        shutil.copyfile(bad, model)
        for task in ("segmentation", "uncertainty_map"):
            r = requests.post(f"{server.url}/infer/{task}", params={"image": UNLABELED[1]}, timeout=300)
            assert r.status_code == 503, (task, r.status_code, r.text[:500])
            assert f"{model}: non-finite weights: tensor '{tensor}'" in r.json()["detail"], r.text[:500]
    finally:
        shutil.copyfile(backup, model)
        later = model.stat().st_mtime + 2  # a new modification time: the tasks reload it
        os.utime(model, (later, later))
    img, _ = _infer(server, "segmentation", UNLABELED[1])
    assert np.asarray(img.dataobj).shape == (64, 64, 48)


def test_server_train_task_publishes_new_model(server, model_dir):
    """Training from MONAI Label through the bundle's train.json (+ tiny.json), then inference uses the new model."""
    import requests

    info = requests.get(f"{server.url}/info/", timeout=30).json()
    assert "segmentation" in info["trainers"], info["trainers"]
    # tiny.json merged after train.json: its epoch count is what the client is offered
    assert info["trainers"]["segmentation"]["config"]["max_epochs"] == 2

    before = (model_dir / "model.pt").stat().st_mtime_ns
    _, js_before = _infer(server, "segmentation", UNLABELED[1])
    r = requests.post(f"{server.url}/train/segmentation", params={"run_sync": "true"},
                      json={"max_epochs": 1}, timeout=900)
    assert r.status_code == 200, f"{r.status_code} {r.text[:3000]}\n{server.log()}"
    stats = r.json()
    # the three labeled studies, and only those, were trained on
    assert sorted(stats["cases"]) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    assert (model_dir / "model.pt").stat().st_mtime_ns > before, "training did not publish a new model.pt"
    run_dir = Path(stats["run_dir"])
    assert (run_dir / "FINISHED").exists()
    metrics = (run_dir / "metrics.csv").read_text().strip().splitlines()
    assert len(metrics) == 2, f"expected one epoch (max_epochs=1) in metrics.csv, got {metrics}"

    # issue 21.7: the steps and the training's own progress lines reach the server log as they come
    log = server.log(tail=0)
    for step in range(1, 5):
        assert f"TRAIN:: step {step}/4" in log, f"step {step} not logged"
    progress = [line for line in log.splitlines() if "[training]" in line and "Epoch" in line]
    assert progress, f"no training progress in the server log:\n{server.log()}"
    assert not [line for line in progress if "%|" in line], "a terminal progress bar was written into the log"

    # the infer task reloads the published model on its next request
    seg_img, js_after = _infer(server, "segmentation", UNLABELED[1])
    assert js_after["model_ts"] >= js_before["model_ts"] and js_after["model_ts"] == int(
        (model_dir / "model.pt").stat().st_mtime)
    assert np.asarray(seg_img.dataobj).shape == (64, 64, 48)
