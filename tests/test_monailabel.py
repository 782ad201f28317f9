"""MONAI Label integration (issue 7): studies helper, app tasks, and the real server over HTTP.

The server test starts ``python -m monailabel.main start_server`` with ``scripts/monailabel_app`` on a free
127.0.0.1 port, on studies made from the session's synthetic cases (3 labeled, 3 unlabeled) and the model of
the session's tiny training run, then: /info/, both infer tasks over HTTP, scoring, the most_uncertain
strategy, and stops the server.
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

APP_DIR = REPO_ROOT / "scripts" / "monailabel_app"
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

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-6000:]

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


@pytest.fixture(scope="module")
def server(studies, model_dir, tmp_path_factory):
    """The server on a copy of the studies plus one broken (3-channel) unlabeled study."""
    root = tmp_path_factory.mktemp("ml_server") / "studies"
    shutil.copytree(studies, root, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock"))
    nib.save(nib.Nifti1Image(np.ones((64, 64, 48, 3), np.float32), np.eye(4)), str(root / f"{BAD_STUDY}.nii.gz"))
    conf = {"model_path": model_dir / "model.pt", "train_dir": tmp_path_factory.mktemp("ml_train"),
            "train_configs": "bundle/configs/tiny.json",
            "prepare_args": json.dumps({"patch_size": TINY_PATCH, "filters": TINY_FILTERS})}
    srv = Server(root, conf, tmp_path_factory.mktemp("ml_log") / "server.log")
    srv.studies = root
    try:
        srv.info = srv.wait_ready()
        yield srv
    finally:
        srv.stop()
    assert srv.proc.poll() is not None, "server still running after stop()"


def _infer(server, model: str, image_id: str):
    """POST /infer/<model>?image=<id>; returns (nibabel image, result JSON) from the multipart answer."""
    import requests
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    r = requests.post(f"{server.url}/infer/{model}", params={"image": image_id}, timeout=300)
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
    from lib.studies import load_study, study_to_case_folder

    from custom.core.errors import BraTSInputError

    case_id = "BraTS-GLI-00001-000"
    image, affine, spacing = load_study(studies / f"{case_id}.nii.gz")
    assert image.shape == (4, 64, 64, 48) and spacing == pytest.approx((1.0, 1.0, 1.0))
    case_dir = study_to_case_folder(studies / f"{case_id}.nii.gz", studies / "labels" / "final" / f"{case_id}.nii.gz",
                                    tmp_path / "raw", case_id)
    from custom.data.nifti import load_case_arrays

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


def test_prediction_summary_volumes_and_mean():
    from lib.predictor import prediction_summary

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


def test_most_uncertain_strategy_on_local_datastore(studies, tmp_path):
    """The strategy reads the stored scores through MONAI Label's own LocalDatastore."""
    from lib.scoring import UNC_SCORE_KEY
    from lib.strategy import MostUncertain
    from monailabel.datastore.local import LocalDatastore

    root = tmp_path / "studies"
    shutil.copytree(studies, root)
    ds = LocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)
    assert sorted(ds.get_unlabeled_images()) == list(UNLABELED)
    strategy = MostUncertain()
    # nothing scored yet: the first unlabeled study, never a labeled one
    assert strategy({"strategy": "most_uncertain"}, ds)["id"] == UNLABELED[0]
    ds.update_image_info(UNLABELED[0], {UNC_SCORE_KEY: 0.10})
    ds.update_image_info(UNLABELED[1], {UNC_SCORE_KEY: 0.30})
    ds.update_image_info("BraTS-GLI-00000-000", {UNC_SCORE_KEY: 0.99})  # labeled: must be ignored
    res = strategy({"strategy": "most_uncertain"}, ds)
    assert res["id"] == UNLABELED[1] and res[UNC_SCORE_KEY] == pytest.approx(0.30)
    assert res["ranking"] == [UNLABELED[1], UNLABELED[0], UNLABELED[2]]
    # persisted in datastore.json: a new datastore object sees the same order
    ds2 = LocalDatastore(str(root), extensions=["*.nii.gz"], auto_reload=False)
    assert strategy({"strategy": "most_uncertain"}, ds2)["id"] == UNLABELED[1]


def test_bundle_and_shared_infer_tasks_agree(studies, model_dir, tmp_path):
    """BundleInferTask on inference.json and the direct UncertaintySegmenter task give the same maps."""
    from lib.infer import BraTSBundleInferTask, BraTSUncertaintyInfer
    from lib.predictor import StudyPredictor

    from custom.core.errors import BraTSInputError

    predictor = StudyPredictor(model_dir / "model.pt")
    study = studies / f"{UNLABELED[2]}.nii.gz"
    ref = nib.load(str(study))
    for output in ("labels", "uncertainty"):
        bundle_task = BraTSBundleInferTask(REPO_ROOT / "bundle", model_dir / "model.pt", output=output)
        assert bundle_task.is_valid()
        shared_task = BraTSUncertaintyInfer(predictor, output=output)
        results = []
        for task in (bundle_task, shared_task):
            path, js = task({"image": str(study), "device": "cpu"})
            img = nib.load(path)
            np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
            results.append((np.asarray(img.dataobj), js))
            os.remove(path)
        (a, ja), (b, jb) = results
        assert a.shape == ref.shape[:3] and a.dtype == b.dtype == (np.uint8 if output == "labels" else np.float32)
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert ja["mean_uncertainty_in_tumour"] == pytest.approx(jb["mean_uncertainty_in_tumour"], abs=1e-6)

    # a study that is not 4-channel is refused with its file named, by either task
    bad = tmp_path / "BraTS-GLI-00099-000.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16, 3), np.float32), np.eye(4)), str(bad))
    for task in (bundle_task, shared_task):
        with pytest.raises(BraTSInputError, match="BraTS-GLI-00099-000.nii.gz"):
            task({"image": str(bad), "device": "cpu"})


# ------------------------------------------------------------------------------------------ real server
def test_server_infer_scoring_strategy(server, model_dir):
    import requests

    studies = server.studies
    info = server.info
    assert set(info["models"]) >= {"segmentation", "uncertainty"}, info["models"]
    # served by MONAI Label's BundleInferTask on the bundle (its info carries the bundle version)
    version = json.loads((REPO_ROOT / "bundle" / "configs" / "metadata.json").read_text())["version"]
    assert info["models"]["segmentation"].get("version") == version, info["models"]["segmentation"]
    assert info["models"]["uncertainty"]["type"] == "others"
    assert info["models"]["segmentation"]["labels"] == {"NCR": 1, "ED": 2, "ET": 3}
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

    unc_img, unc_json = _infer(server, "uncertainty", image_id)
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
    # uncertainty is masked to the dilated predicted tumour: zero far away from it
    if not (labels > 0).any():
        assert unc.max() == 0.0

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
        score = obj["image"]["info"].get("unc_mean_in_tumour")
        if image in UNLABELED:
            assert score is not None, image
            stored[image] = score
        elif image == BAD_STUDY:
            assert score is None
        else:
            assert score is None, f"labeled study {image} was scored"
    assert stored[image_id] == pytest.approx(unc_json["mean_uncertainty_in_tumour"], abs=1e-6)

    # a second pass with the same model skips every study
    again = requests.post(f"{server.url}/scoring/uncertainty", params={"run_sync": "true"}, timeout=600).json()
    assert again["skipped"] == 3 and again["executed"] == 0

    # strategy: the unlabeled study with the highest stored uncertainty (the unscored broken one ranks last)

    r = requests.post(f"{server.url}/activelearning/most_uncertain", json={}, timeout=60)
    assert r.status_code == 200, r.text
    best = max(sorted(stored), key=lambda k: stored[k])
    assert r.json()["id"] == best, (r.json(), stored)
    assert r.json()["unc_mean_in_tumour"] == pytest.approx(stored[best])
    assert r.json()["ranking"][-1] == BAD_STUDY


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

    # the infer task reloads the published model on its next request
    seg_img, js_after = _infer(server, "segmentation", UNLABELED[1])
    assert js_after["model_ts"] >= js_before["model_ts"] and js_after["model_ts"] == int(
        (model_dir / "model.pt").stat().st_mtime)
    assert np.asarray(seg_img.dataobj).shape == (64, 64, 48)
