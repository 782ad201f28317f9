"""Triton deployment against a real tritonserver (the nvidia-pytriton wheel's binary, CPU).

The main server (``scripts/serve_triton.py``, one per module on free ports) serves a repository filled by
``export_model`` with a freshly initialised tiny network (seeded) and the plan of the prepared synthetic work dir:
the patch model runs the exported TorchScript. Two small servers (one volume instance each) cover the other
python-backend runtimes and the hardening: ONNX through onnxruntime behind the crash supervisor (an HTTP/JSON
request that aborts tritonserver 2.51), and eager PyTorch in gRPC-only mode. The tests check plumbing, parity and
limits, not accuracy, so they do not depend on training.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import PYTHON, REPO_ROOT, run_cmd

pytest.importorskip("tritonclient")
pytest.importorskip("pytriton")

import tritonclient.grpc as tgrpc  # noqa: E402
import tritonclient.http as thttp  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from custom.core.errors import BraTSInputError  # noqa: E402
from custom.deploy.triton_client import TritonClientError, VolumeClient, infer_case_folders  # noqa: E402
from custom.deploy.triton_protocol import MAX_VOLUME_EDGE, validate_volume_request  # noqa: E402
from custom.deploy.triton_repository import (PATCH_INPUT, PATCH_MODEL, PATCH_OUTPUT, VOLUME_MODEL,  # noqa: E402
                                             prepare_model_repository)
from custom.deploy.triton_server import free_port, locate_tritonserver, prepare_backend_dir  # noqa: E402

NUM_PARITY_CASES = 2


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0): it is gone when its state is Z or it has no /proc entry
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_checkpoint(prepared_work_dir, tmp_path_factory) -> Path:
    """A seeded, freshly initialised network from the prepared plan, saved as training saves it."""
    import shutil

    import torch

    from custom.model.networks import build_network
    from custom.planning.plans import load_plans

    out = tmp_path_factory.mktemp("triton_ckpt")
    torch.manual_seed(0)
    network = build_network(load_plans(str(prepared_work_dir / "plans.json")), with_uncertainty=True)
    torch.save({"model": network.state_dict()}, out / "model.pt")
    shutil.copyfile(prepared_work_dir / "plans.json", out / "plans.json")
    return out / "model.pt"


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, prepared_work_dir, tmp_path_factory):
    """``export_model`` of the tiny checkpoint: (out_dir with model.ts/model.onnx, Triton repository).

    The shipped configuration (4 volume instances = 4 volumes in flight, so that their patches meet in the
    patch model's queue; the patch model serves the exported TorchScript), only the weights are test ones.
    """
    from custom.deploy.export import export_model

    out = tmp_path_factory.mktemp("exported")
    report = export_model(tiny_checkpoint, work_dir=prepared_work_dir, out_dir=out / "models",
                          triton_repo=out / "repo", verify=False)
    return out / "models", Path(report["triton_repository"])


@pytest.fixture(scope="module")
def model_repository(exported) -> Path:
    return exported[1]


class ServedTriton:
    """``scripts/serve_triton.py`` running in a subprocess, its log in a file."""

    def __init__(self, repo: Path, log_path: Path, *extra_args):
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        self.http_url, self.grpc_url = f"127.0.0.1:{self.http_port}", f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [PYTHON, "scripts/serve_triton.py", "--model_repository", str(repo), "--http_port", str(self.http_port),
             "--grpc_port", str(self.grpc_port), "--metrics_port", str(self.metrics_port), "--threads", "1",
             *map(str, extra_args)],
            cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self.server_pid = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            match = re.search(r"\[serve_triton\] ready: .*\(pid (\d+);", self.log())
            if match:
                self.server_pid = int(match.group(1))
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve_triton exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise AssertionError(f"serve_triton not ready after {timeout_s} s:\n{self.log()[-4000:]}")

    def current_pid(self) -> int | None:
        """The pid of the tritonserver running now (the last one started, after a restart)."""
        pids = re.findall(r"\[serve_triton\] (?:ready: .*\(pid|ready again: pid) (\d+)", self.log())
        return int(pids[-1]) if pids else None

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout_s: float = 90) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pid = self.current_pid()
                if pid and not _pid_gone(pid):
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


def _served(repo, log_path, *extra_args):
    """Start serve_triton.py, yield it, stop it with SIGTERM and check that it stopped cleanly."""
    srv = ServedTriton(repo, log_path, *extra_args)
    try:
        srv.wait_ready(300)
        yield srv
    finally:
        rc = srv.terminate()
    log = srv.log()
    assert rc == 0, log[-4000:]
    assert "[serve_triton] stopped" in log and "Traceback" not in log, log[-4000:]
    pid = srv.current_pid()
    assert pid and _pid_gone(pid), "tritonserver still running after SIGTERM"
    with socket.socket() as s:  # the ports are free again
        assert s.connect_ex(("127.0.0.1", srv.grpc_port)) != 0


@pytest.fixture(scope="module")
def server(model_repository, tmp_path_factory):
    """The real server, started the way users start it: scripts/serve_triton.py; stopped with SIGTERM."""
    yield from _served(model_repository, tmp_path_factory.mktemp("triton_log") / "serve_triton.log")


@pytest.fixture(scope="module")
def cases(synthetic_dataset):
    """(case_id, image (4,X,Y,Z) float32, spacing (3,) float32, affine) of the first synthetic cases."""
    from custom.data.cases import find_case_files, list_case_folders
    from custom.data.nifti import load_case_arrays

    out = []
    for case_dir in list_case_folders(synthetic_dataset)[:NUM_PARITY_CASES]:
        case = find_case_files(case_dir)
        image, _, affine, spacing = load_case_arrays(case["image"], None)
        out.append((case["case_id"], image, np.asarray(spacing, np.float32), affine))
    return out


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, cases):
    """In-process bundle inference on the same checkpoint: {case_id: (labels, unc)}."""
    from custom.inference.segmenter import UncertaintySegmenter

    segmenter = UncertaintySegmenter.from_checkpoint(tiny_checkpoint)
    ref = {}
    for case_id, image, spacing, _ in cases:
        pred = segmenter.predict(image, spacing)
        ref[case_id] = (pred.labels, pred.unc)
    return ref


def assert_matches(seg, unc, ref, what="", label_agreement: float = 1.0, unc_tol: float = 1e-4):
    """The issue's bar for the exported artefact: labels identical, unc within 1e-4 of the bundle run."""
    labels, ref_unc = ref
    assert seg.dtype == np.uint8 and unc.dtype == np.float32, what
    assert seg.shape == labels.shape and unc.shape == ref_unc.shape, what
    agreement = float((seg == labels).mean())
    assert agreement >= label_agreement, f"{what}: labels agree on {agreement:.6f} of voxels"
    diff = float(np.abs(unc - ref_unc).max())
    assert diff <= unc_tol, f"{what}: unc max abs diff {diff}"
    assert 0.0 <= float(unc.min()) and float(unc.max()) <= 1.0, what


# -------------------------------------------------------------------------------------- no server needed
def test_validate_volume_request_names_each_problem():
    good = np.ones((4, 8, 8, 8), np.float32)
    image, spacing = validate_volume_request(good, [1, 1, 1])
    assert image.shape == (4, 8, 8, 8) and spacing.tolist() == [1.0, 1.0, 1.0]
    bad = {
        "float32": (good.astype(np.float64), [1, 1, 1]),
        "4 channels": (good[:3], [1, 1, 1]),
        "empty": (np.ones((4, 0, 8, 8), np.float32), [1, 1, 1]),
        "every voxel is 0": (np.zeros((4, 8, 8, 8), np.float32), [1, 1, 1]),
        "SPACING": (good, None),
        "exceeds the limit": (np.ones((4, MAX_VOLUME_EDGE + 1, 2, 2), np.float32), [1, 1, 1]),
        "NaN": (np.full((4, 8, 8, 8), np.nan, np.float32), [1, 1, 1]),
        "positive": (good, [1, 0, 1]),
    }
    for needle, (img, sp) in bad.items():
        with pytest.raises(BraTSInputError, match=needle) as info:
            validate_volume_request(img, sp, source="case-x")
        assert "case-x" in str(info.value)


def test_backend_dir_has_stub_beside_python_backend(tmp_path):
    dist = locate_tritonserver()
    assert dist.binary.exists()
    backend = prepare_backend_dir(dist, cache_dir=tmp_path)
    assert (backend / "python" / "libtriton_python.so").exists()
    assert os.access(backend / "python" / "triton_python_backend_stub", os.X_OK)
    assert prepare_backend_dir(dist, cache_dir=tmp_path) == backend  # reused, not copied again


def test_prepare_model_repository_rejects_missing_plan(tiny_checkpoint, tmp_path):
    lonely = tmp_path / "ckpt" / "model.pt"
    lonely.parent.mkdir()
    lonely.write_bytes(tiny_checkpoint.read_bytes())
    with pytest.raises(BraTSInputError, match="plans.json"):
        prepare_model_repository(lonely, repo_dir=tmp_path / "repo")
    assert not (tmp_path / "repo" / PATCH_MODEL / "1" / "model.pt").exists()


# ------------------------------------------------------------------------------------------ real server
def test_ready_and_metadata(server):
    log = server.log()
    assert f"Started HTTPService at 127.0.0.1:{server.http_port}" in log  # bound to loopback only
    assert f"Started GRPCInferenceService at 127.0.0.1:{server.grpc_port}" in log
    assert f"Started Metrics Service at 127.0.0.1:{server.metrics_port}" in log
    http = thttp.InferenceServerClient(server.http_url)
    grpc = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        assert http.is_server_live() and http.is_server_ready()
        assert grpc.is_server_ready()
        for name in (VOLUME_MODEL, PATCH_MODEL):
            assert http.is_model_ready(name) and grpc.is_model_ready(name)
        meta = http.get_model_metadata(VOLUME_MODEL)
        inputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]}
        outputs = {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]}
        assert inputs == {"IMAGE": ("FP32", [4, -1, -1, -1]), "SPACING": ("FP32", [3])}
        assert outputs == {"SEG": ("UINT8", [-1, -1, -1]), "UNC": ("FP32", [-1, -1, -1])}
        patch_cfg = grpc.get_model_config(PATCH_MODEL, as_json=True)["config"]
        assert int(patch_cfg["max_batch_size"]) >= 2
        assert "dynamic_batching" in patch_cfg
        assert patch_cfg["model_warmup"][0]["inputs"][PATCH_INPUT]["zero_data"]  # the first request pays no load
        meta = grpc.get_model_metadata(PATCH_MODEL, as_json=True)
        assert [i["name"] for i in meta["inputs"]] == [PATCH_INPUT]
        assert [o["name"] for o in meta["outputs"]] == [PATCH_OUTPUT]
    finally:
        http.close()
        grpc.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_parity_with_in_process_inference(server, cases, reference, protocol):
    url = server.http_url if protocol == "http" else server.grpc_url
    with VolumeClient(url, protocol, timeout_s=300) as client:
        client.check_ready()
        for case_id, image, spacing, _ in cases:
            seg, unc = client.infer(image, spacing, request_id=case_id)
            assert_matches(seg, unc, reference[case_id], f"{protocol} {case_id}")
            assert int((seg > 0).sum()) > 0 or int((reference[case_id][0] > 0).sum()) == 0


def test_patch_model_serves_the_exported_torchscript(server, exported, tiny_checkpoint, cases):
    """brats_unc_patch/1/model.pt is model.ts byte for byte, and what the server answers is that file's output."""
    import torch

    from custom.deploy.export import crop_patches
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.preprocessing.functional import preprocess_case

    out_dir, repo = exported
    assert (repo / PATCH_MODEL / "1" / "model.pt").read_bytes() == (out_dir / "model.ts").read_bytes()
    assert not (repo / PATCH_MODEL / "1" / "checkpoint.pt").exists()
    assert f"brats_unc_patch: torchscript {repo / PATCH_MODEL / '1' / 'model.pt'}" in server.log()
    segmenter = UncertaintySegmenter.from_checkpoint(tiny_checkpoint)
    _, image, spacing, _ = cases[0]
    image_pp, _, _ = preprocess_case(image, spacing, segmenter.plans)
    x = crop_patches(image_pp, segmenter.plans.patch_size, batch=2).numpy()
    client = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        inp = tgrpc.InferInput(PATCH_INPUT, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        served = client.infer(PATCH_MODEL, [inp]).as_numpy(PATCH_OUTPUT)
        # a patch of another shape is refused by the config's fixed dims, before the network
        odd = np.zeros((1, 4, 16, 16, 16), np.float32)
        bad = tgrpc.InferInput(PATCH_INPUT, list(odd.shape), "FP32")
        bad.set_data_from_numpy(odd)
        _expect_rejected(lambda: client.infer(PATCH_MODEL, [bad]), "shape")
    finally:
        client.close()
    ts = torch.jit.load(str(out_dir / "model.ts"))
    with torch.no_grad():
        np.testing.assert_array_equal(served, ts(torch.from_numpy(x)).numpy())


def test_pytriton_model_client_calls_the_volume_model(server, cases, reference):
    """nvidia-pytriton's ModelClient serves as a plain client of this repository (see VolumeClient's docstring)."""
    from pytriton.client import ModelClient

    case_id, image, spacing, _ = cases[0]
    with ModelClient(f"grpc://{server.grpc_url}", VOLUME_MODEL, init_timeout_s=60, inference_timeout_s=300) as client:
        result = client.infer_sample(IMAGE=image, SPACING=spacing)
    assert_matches(result["SEG"], result["UNC"], reference[case_id], "pytriton ModelClient")


def test_spacing_is_used_anisotropic_case(server, tiny_checkpoint, cases):
    """A non-1 mm spacing goes through resampling on the server exactly as in-process."""
    from custom.inference.segmenter import UncertaintySegmenter

    case_id, image, _, _ = cases[0]
    spacing = np.array([1.0, 1.0, 1.5], np.float32)
    pred = UncertaintySegmenter.from_checkpoint(tiny_checkpoint).predict(image, spacing)
    with VolumeClient(server.grpc_url, "grpc", timeout_s=300) as client:
        seg, unc = client.infer(image, spacing, request_id=f"{case_id}-aniso")
    assert_matches(seg, unc, (pred.labels, pred.unc), "anisotropic spacing")


def test_client_timeout_is_reported(server, cases):
    _, image, spacing, _ = cases[0]
    with VolumeClient(server.grpc_url, "grpc", timeout_s=0.001) as client:
        with pytest.raises(TritonClientError, match="timed out"):
            client.infer(image, spacing, request_id="too-slow")


def test_concurrent_requests_batched_and_correct(server, cases, reference):
    stats_client = thttp.InferenceServerClient(server.http_url)

    def patch_counts():
        stats = stats_client.get_inference_statistics(PATCH_MODEL)["model_stats"][0]
        return int(stats["inference_stats"]["success"]["count"]), int(stats["execution_count"])

    n = 8
    before = patch_counts()
    results, errors = [None] * n, []

    def worker(i):
        protocol = "grpc" if i % 2 else "http"
        case_id, image, spacing, _ = cases[i % len(cases)]
        try:
            with VolumeClient(server.grpc_url if protocol == "grpc" else server.http_url, protocol,
                              timeout_s=300) as client:
                results[i] = (case_id, protocol, *client.infer(image, spacing, request_id=f"{case_id}-{i}"))
        except Exception as err:  # collected so that the assertion shows every failure
            errors.append(f"request {i}: {err}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    after = patch_counts()
    stats_client.close()
    assert not errors, errors
    for case_id, protocol, seg, unc in results:
        assert_matches(seg, unc, reference[case_id], f"concurrent {protocol} {case_id}")
    bls_requests, executions = after[0] - before[0], after[1] - before[1]
    # fewer executions than BLS requests: patches of different volumes ran in one batch
    assert 0 < executions < bls_requests, (bls_requests, executions)


def _expect_rejected(call, needle):
    with pytest.raises(InferenceServerException) as info:
        call()
    assert needle.lower() in str(info.value).lower(), str(info.value)


def test_malformed_requests_rejected_server_stays_up(server, cases, reference):
    http = thttp.InferenceServerClient(server.http_url)
    case_id, image, spacing, _ = cases[0]

    def send(img, sp=None, img_dtype=None):
        inputs = [thttp.InferInput("IMAGE", list(img.shape), img_dtype or "FP32")]
        inputs[0].set_data_from_numpy(img)
        if sp is not None:
            inputs.append(thttp.InferInput("SPACING", [3], "FP32"))
            inputs[1].set_data_from_numpy(sp)
        return http.infer(VOLUME_MODEL, inputs)

    sp = np.ones(3, np.float32)
    try:
        _expect_rejected(lambda: send(image.astype(np.float64), sp, "FP64"), "data-type")  # wrong dtype
        _expect_rejected(lambda: send(image[:3].copy(), sp), "shape")  # wrong channel count
        _expect_rejected(lambda: send(np.zeros((4, 0, 4, 4), np.float32), sp), "empty")  # zero-size volume
        _expect_rejected(lambda: send(np.zeros((4, 16, 16, 16), np.float32), sp), "empty")  # all-zero volume
        _expect_rejected(lambda: send(image, None), "SPACING")  # spacing missing
        big = np.ones((4, MAX_VOLUME_EDGE + 1, 4, 4), np.float32)
        _expect_rejected(lambda: send(big, sp), "exceeds the limit")  # volume over the limit
        _expect_rejected(lambda: send(image, np.array([1, -1, 1], np.float32)), "SPACING")
        assert http.is_server_ready() and http.is_model_ready(VOLUME_MODEL)
        result = send(image, spacing)
        assert_matches(result.as_numpy("SEG"), result.as_numpy("UNC"), reference[case_id], "after errors")
    finally:
        http.close()
    assert server.is_alive()
    assert "Traceback" not in server.log()


def _rejected_counts(metrics_url) -> dict:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'brats_volume_rejected_total\{[^}]*reason="(\w+)"[^}]*\} (\S+)', text)}


def _volume_successes(metrics_url) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    match = re.search(rf'nv_inference_request_success\{{model="{VOLUME_MODEL}",version="1"\}} (\S+)', text)
    assert match, text[:3000]
    return float(match.group(1))


def test_model_rejections_are_invalid_arg_and_counted(server, cases):
    """The volume model's own rejections (NaN, bad spacing, zero-size or too-large axis, too-large resampled
    volume) are client errors: HTTP 400 / gRPC INVALID_ARGUMENT, and counted in brats_volume_rejected_total."""
    _, image, _, _ = cases[0]
    ones = np.ones(3, np.float32)
    bad = {
        "NaN": (np.full((4, 8, 8, 8), np.nan, np.float32), ones),
        "SPACING must be positive": (image, np.array([1, -1, 1], np.float32)),
        "empty": (np.zeros((4, 0, 4, 4), np.float32), ones),
        "exceeds the limit": (np.ones((4, MAX_VOLUME_EDGE + 1, 4, 4), np.float32), ones),
        # 64^3 at 6 mm: 384^3 after resampling; before the cap, minutes of CPU after the client gave up
        "max_preprocessed_voxels": (np.ones((4, 64, 64, 64), np.float32), np.full(3, 6.0, np.float32)),
    }
    before, successes = _rejected_counts(server.metrics_url), _volume_successes(server.metrics_url)
    http = thttp.InferenceServerClient(server.http_url)
    grpc = tgrpc.InferenceServerClient(server.grpc_url)
    try:
        for needle, (img, sp) in bad.items():
            for lib, client, code in ((thttp, http, "400"), (tgrpc, grpc, "StatusCode.INVALID_ARGUMENT")):
                inputs = [lib.InferInput("IMAGE", list(img.shape), "FP32"), lib.InferInput("SPACING", [3], "FP32")]
                inputs[0].set_data_from_numpy(img)
                inputs[1].set_data_from_numpy(sp)
                kwargs = {"client_timeout": 60} if lib is tgrpc else {}
                with pytest.raises(InferenceServerException) as info:
                    client.infer(VOLUME_MODEL, inputs, **kwargs)
                assert info.value.status() == code and needle in str(info.value), (needle, str(info.value))
    finally:
        http.close()
        grpc.close()
    after = _rejected_counts(server.metrics_url)
    assert after["invalid_input"] - before.get("invalid_input", 0.0) == 2 * len(bad)
    # tritonserver 2.51's python backend counts an error response as a request success (measured: +1 per
    # rejection); bundle/docs/SECURITY.md says so and points at brats_volume_rejected_total instead
    assert _volume_successes(server.metrics_url) - successes == 2 * len(bad)


def test_triton_infer_cli_writes_bundle_outputs(server, synthetic_dataset, cases, reference, tmp_path):
    import nibabel as nib

    inputs = tmp_path / "cases"
    inputs.mkdir()
    for case_id, *_ in cases:
        (inputs / case_id).symlink_to(synthetic_dataset / case_id, target_is_directory=True)
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        out = tmp_path / f"out_{protocol}"
        if protocol == "grpc":  # the command line once; the same function in-process for HTTP
            proc = run_cmd([PYTHON, "scripts/triton_infer.py", "--url", url, "--protocol", protocol,
                            "--input_dir", inputs, "--output_dir", out, "--concurrency", 2, "--timeout", 300])
            assert f"{len(cases)} cases" in proc.stdout
        else:
            summary = infer_case_folders(inputs, out, url=url, protocol=protocol, concurrency=2, progress=False)
            assert sorted(summary["cases"]) == sorted(c[0] for c in cases) and not summary["failures"]
        for case_id, image, _, affine in cases:
            seg_img = nib.load(str(out / f"{case_id}.nii.gz"))
            unc_img = nib.load(str(out / f"{case_id}-unc.nii.gz"))
            assert seg_img.shape == unc_img.shape == image.shape[1:]
            np.testing.assert_allclose(seg_img.affine, affine, atol=1e-5)
            np.testing.assert_allclose(unc_img.affine, affine, atol=1e-5)
            seg = np.asarray(seg_img.dataobj)
            unc = np.asarray(unc_img.dataobj)
            assert seg.dtype == np.uint8 and unc.dtype == np.float32
            assert_matches(seg, unc, reference[case_id], f"cli {protocol} {case_id}")
        assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_triton_infer_cli_bad_case_rejected_before_sending(server, synthetic_dataset, cases, tmp_path):
    import shutil

    inputs = tmp_path / "cases"
    good_id = cases[0][0]
    shutil.copytree(synthetic_dataset / good_id, inputs / good_id)
    bad_id = "BraTS-GLI-99999-000"
    (inputs / bad_id).mkdir()
    for f in (synthetic_dataset / good_id).iterdir():
        dst = inputs / bad_id / f.name.replace(good_id, bad_id)
        shutil.copyfile(f, dst)
    (inputs / bad_id / f"{bad_id}-t2f.nii.gz").write_bytes(b"not a nifti file")
    http = thttp.InferenceServerClient(server.http_url)
    before = int(http.get_inference_statistics(VOLUME_MODEL)["model_stats"][0]["inference_count"])
    out = tmp_path / "out"
    proc = run_cmd([PYTHON, "scripts/triton_infer.py", "--url", server.grpc_url, "--protocol", "grpc",
                    "--input_dir", inputs, "--output_dir", out, "--concurrency", 2, "--progress", "false"],
                   check=False)
    after = int(http.get_inference_statistics(VOLUME_MODEL)["model_stats"][0]["inference_count"])
    http.close()
    assert proc.returncode != 0
    assert bad_id in proc.stderr and "t2f" in proc.stderr and "Traceback" not in proc.stderr
    assert after - before == 1, "the corrupt case must not be sent"
    assert (out / f"{good_id}.nii.gz").exists() and (out / f"{good_id}-unc.nii.gz").exists()
    assert not list(out.glob(f"{bad_id}*"))


def test_triton_infer_cli_server_down_and_model_missing(server, synthetic_dataset, tmp_path):
    proc = run_cmd([PYTHON, "scripts/triton_infer.py", "--url", f"127.0.0.1:{free_port()}", "--protocol", "grpc",
                    "--input_dir", synthetic_dataset, "--output_dir", tmp_path / "a", "--timeout", 5], check=False)
    assert proc.returncode != 0 and "not reachable" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(TritonClientError, match="not reachable"):
        infer_case_folders(synthetic_dataset, tmp_path / "c", url=f"127.0.0.1:{free_port()}", protocol="http",
                           timeout_s=5, progress=False)
    with pytest.raises(TritonClientError, match="not ready"):
        infer_case_folders(synthetic_dataset, tmp_path / "b", url=server.http_url, protocol="http",
                           model="no_such_model", progress=False)
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))


def test_client_reports_rejected_request(server):
    with VolumeClient(server.grpc_url, "grpc", timeout_s=60) as client:
        with pytest.raises(TritonClientError, match="(?s)rejected.*empty"):
            client.infer(np.zeros((4, 8, 8, 8), np.float32), [1, 1, 1])


def test_serve_triton_cli_refuses_empty_repository(tmp_path):
    proc = run_cmd([PYTHON, "scripts/serve_triton.py", "--model_repository", tmp_path], check=False, timeout=60)
    assert proc.returncode != 0 and "export.py" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ the other runtimes, supervision, gRPC only
def _small_repository(exported, tiny_checkpoint, tmp_path_factory, runtime: str) -> Path:
    """One volume instance (a light server), the patch model on ``runtime``."""
    out_dir, _ = exported
    return prepare_model_repository(tiny_checkpoint, repo_dir=tmp_path_factory.mktemp(f"repo_{runtime}"),
                                    torchscript=out_dir / "model.ts", onnx=out_dir / "model.onnx",
                                    runtime=runtime, volume_instances=1)


@pytest.fixture(scope="module")
def onnx_server(exported, tiny_checkpoint, tmp_path_factory):
    """The patch model on the exported ONNX through onnxruntime, behind the crash supervisor."""
    repo = _small_repository(exported, tiny_checkpoint, tmp_path_factory, "onnxruntime")
    yield from _served(repo, tmp_path_factory.mktemp("onnx_log") / "serve_triton.log", "--max_restarts", 2)


#: the gRPC-only server's time budget per case: far above a 64x64x48 case, far below a 256^3 one on this CPU
SHORT_CASE_SECONDS = 20


@pytest.fixture(scope="module")
def grpc_only_server(exported, tiny_checkpoint, tmp_path_factory):
    """The eager reference patch model, gRPC only (``--http false``), with a short time budget per case."""
    repo = _small_repository(exported, tiny_checkpoint, tmp_path_factory, "eager")
    config = repo / VOLUME_MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "max_case_seconds" value: \{ string_value: )"\d+"', rf'\1"{SHORT_CASE_SECONDS}"',
                      config.read_text())
    assert n == 1
    config.write_text(text)
    yield from _served(repo, tmp_path_factory.mktemp("grpc_log") / "serve_triton.log", "--http", "false")


#: 176 bytes of HTTP/JSON that abort tritonserver 2.51 (std::bad_alloc: the declared IMAGE shape is allocated
#: before the three data values are read); binary HTTP and gRPC reject the same request cleanly
CRASHING_JSON = json.dumps({"inputs": [
    {"name": "IMAGE", "shape": [4, 4096, 4096, 4096], "datatype": "FP32", "data": [1, 2, 3]},
    {"name": "SPACING", "shape": [3], "datatype": "FP32", "data": [1, 1, 1]}]}).encode()


def test_supervisor_restarts_tritonserver_after_the_json_crash(onnx_server, cases, reference):
    """The upstream crash is contained: serve_triton logs why tritonserver died, starts it again, and it answers
    (from the exported ONNX) as before; the served ONNX agrees with the bundle run."""
    case_id, image, spacing, _ = cases[0]
    with VolumeClient(onnx_server.grpc_url, "grpc", timeout_s=300) as client:
        seg, unc = client.infer(image, spacing, request_id=case_id)
    # onnxruntime's float32 sums differ from PyTorch's by ~1e-6: a voxel at p = 0.5 may flip
    assert_matches(seg, unc, reference[case_id], "onnxruntime", label_agreement=0.9999)
    first_pid = onnx_server.current_pid()
    conn = http.client.HTTPConnection("127.0.0.1", onnx_server.http_port, timeout=30)
    try:
        conn.request("POST", f"/v2/models/{VOLUME_MODEL}/infer", body=CRASHING_JSON,
                     headers={"Content-Type": "application/json"})
        conn.getresponse().read()
    except (ConnectionError, http.client.HTTPException, OSError):
        pass  # the server dies mid-request
    finally:
        conn.close()
    deadline = time.monotonic() + 300
    while "[serve_triton] ready again" not in onnx_server.log() and time.monotonic() < deadline:
        assert onnx_server.is_alive(), onnx_server.log()[-4000:]
        time.sleep(1)
    log = onnx_server.log()
    assert re.search(r"\[serve_triton\] tritonserver exited on its own with signal SIGABRT .*bad_alloc.*restarting", log), \
        log[-4000:]
    assert _pid_gone(first_pid) and onnx_server.current_pid() != first_pid
    for protocol, url in (("http", onnx_server.http_url), ("grpc", onnx_server.grpc_url)):
        with VolumeClient(url, protocol, timeout_s=300) as client:
            client.check_ready()
            seg, unc = client.infer(image, spacing, request_id=f"{case_id}-after-restart")
        assert_matches(seg, unc, reference[case_id], f"after restart {protocol}", label_agreement=0.9999)


def test_grpc_only_mode_closes_http(grpc_only_server, cases, reference):
    """``--http false``: nothing listens on the HTTP port (so the JSON path is gone); gRPC serves as usual."""
    log = grpc_only_server.log()
    assert "HTTP off" in log and "Started HTTPService" not in log
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", grpc_only_server.http_port)) != 0
    case_id, image, spacing, _ = cases[0]
    with VolumeClient(grpc_only_server.grpc_url, "grpc", timeout_s=300) as client:
        client.check_ready()
        seg, unc = client.infer(image, spacing, request_id=case_id)
    assert_matches(seg, unc, reference[case_id], "eager, gRPC only")
    assert "brats_unc_patch: eager" in log


def test_time_budget_stops_a_long_case(grpc_only_server):
    """A case still running after max_case_seconds stops before its next patch-model call: UNAVAILABLE, counted."""
    rng = np.random.default_rng(0)
    image = rng.random((4, MAX_VOLUME_EDGE, MAX_VOLUME_EDGE, MAX_VOLUME_EDGE), dtype=np.float32) + 0.1
    before = _rejected_counts(grpc_only_server.metrics_url)
    with VolumeClient(grpc_only_server.grpc_url, "grpc", timeout_s=600) as client:
        with pytest.raises(TritonClientError, match=rf"StatusCode.UNAVAILABLE.*time budget of {SHORT_CASE_SECONDS} s"):
            client.infer(image, np.ones(3, np.float32), request_id="too-long")
    after = _rejected_counts(grpc_only_server.metrics_url)
    assert after["time_budget"] - before.get("time_budget", 0.0) == 1


def test_cancelled_request_stops_its_work(server):
    """When the client gives up (gRPC deadline), the server stops that case at its next patch-model call instead of
    computing it to the end: counted as cancelled."""
    rng = np.random.default_rng(1)
    image = rng.random((4, 160, 160, 160), dtype=np.float32) + 0.1
    before = _rejected_counts(server.metrics_url).get("cancelled", 0.0)
    with VolumeClient(server.grpc_url, "grpc", timeout_s=1.0) as client:
        with pytest.raises(TritonClientError, match="timed out"):
            client.infer(image, np.ones(3, np.float32), request_id="given-up")
    deadline = time.monotonic() + 120
    while _rejected_counts(server.metrics_url).get("cancelled", 0.0) == before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _rejected_counts(server.metrics_url)["cancelled"] == before + 1
    assert "given-up: cancelled by the client" in server.log()


# ---------------------------------------------------------------------------- a non-finite model (15.7)
def _nan_artefact(exported, runtime: str, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the exported TorchScript or ONNX with one NaN in one weight tensor: (file, tensor name).
    Export refuses such a network; this is a served file replaced or bit-flipped afterwards."""
    import torch

    out_dir, _ = exported
    if runtime == "torchscript":
        module = torch.jit.load(str(out_dir / "model.ts"))
        name, param = [(n, p) for n, p in module.named_parameters() if n.endswith("conv.weight")][2]
        with torch.no_grad():
            param.view(-1)[0] = float("nan")
        path = tmp_path / "model.ts"
        module.save(str(path))
        return path, name
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(out_dir / "model.onnx"))
    index, tensor = [(i, t) for i, t in enumerate(model.graph.initializer) if len(t.dims) == 5][2]
    array = numpy_helper.to_array(tensor).copy()
    array.reshape(-1)[0] = np.nan
    model.graph.initializer[index].CopyFrom(numpy_helper.from_array(array, tensor.name))
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path, tensor.name


def test_a_non_finite_served_model_is_refused_at_load(exported, tiny_checkpoint, tmp_path):
    """Issue 15.7: a NaN network used to be served, answering "no tumour" everywhere. The python patch model
    refuses it when Triton loads it, naming the file and the tensor; tritonserver (--exit-on-error) does not start
    and serve_triton exits non-zero with that reason. One start covers both runners: the repository's patch model
    runs a NaN TorchScript, and a second copy of the runner (loaded by Triton like any model folder, called by
    nobody) a NaN ONNX through onnxruntime."""
    ts, ts_tensor = _nan_artefact(exported, "torchscript", tmp_path)
    onnx_file, onnx_tensor = _nan_artefact(exported, "onnxruntime", tmp_path)
    repo = prepare_model_repository(tiny_checkpoint, repo_dir=tmp_path / "repo", torchscript=ts, volume_instances=1)
    onnx_repo = prepare_model_repository(tiny_checkpoint, repo_dir=tmp_path / "onnx_repo", onnx=onnx_file,
                                         runtime="onnxruntime")
    twin = repo / f"{PATCH_MODEL}_onnx"
    shutil.copytree(onnx_repo / PATCH_MODEL, twin)
    config = twin / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{PATCH_MODEL}"', f'name: "{twin.name}"'))
    proc = run_cmd([PYTHON, "scripts/serve_triton.py", "--model_repository", repo, "--http_port", free_port(),
                    "--grpc_port", free_port(), "--metrics_port", free_port(), "--threads", 1,
                    "--startup_timeout_s", 300], check=False, timeout=400)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "before becoming ready" in text, text[-4000:]
    for served, tensor in ((repo / PATCH_MODEL / "1" / "model.pt", ts_tensor),
                           (twin / "1" / "model.onnx", onnx_tensor)):
        assert f"{served}: non-finite weights: tensor '{tensor}' holds 1 NaN" in text, text[-4000:]


def test_a_replaced_served_file_is_refused_before_start(exported, tiny_checkpoint, tmp_path):
    """A native backend (libtorch, onnxruntime) loads whatever file lies in the repository: the served file must be
    the one export wrote (sha256 in model_info.json), checked by serve_triton before it starts tritonserver (and by
    the volume model when Triton loads it)."""
    from custom.deploy.triton_repository import check_model_repository

    out_dir, _ = exported
    repo = prepare_model_repository(tiny_checkpoint, repo_dir=tmp_path / "repo", torchscript=out_dir / "model.ts",
                                    backend="pytorch_libtorch")
    assert check_model_repository(repo) == repo.resolve()
    served = repo / PATCH_MODEL / "1" / "model.pt"
    data = bytearray(served.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    served.write_bytes(bytes(data))
    with pytest.raises(BraTSInputError, match=r"model\.pt: sha256 .* differs from .*model_info\.json"):
        check_model_repository(repo)
    proc = run_cmd([PYTHON, "scripts/serve_triton.py", "--model_repository", repo], check=False, timeout=120)
    assert proc.returncode != 0 and f"{served}: sha256" in proc.stderr and "Traceback" not in proc.stderr, \
        proc.stderr[-3000:]


# -------------------------------------------------------------- the same size cap on the bundle's path
def test_bundle_inference_refuses_a_volume_that_would_resample_too_large(tiny_checkpoint, tmp_path):
    """The preprocessed-size cap holds on bundle inference too (``python -m monai.bundle run``): a 64^3 case
    whose header says 6 mm would become 384^3 voxels; it is refused at once, naming the case and the numbers."""
    raw = tmp_path / "raw"
    run_cmd([PYTHON, "scripts/make_synthetic.py", "--out_dir", raw, "--num_cases", 1, "--shape", "[64,64,64]",
             "--spacing", "[6,6,6]", "--seed", 3])
    case_id = next(raw.iterdir()).name
    out = tmp_path / "out"
    proc = run_cmd([PYTHON, "-m", "monai.bundle", "run", "--bundle_root", "bundle", "--config_file",
                    "bundle/configs/inference.json", "--dataset_dir", raw, "--output_dir", out,
                    "--checkpoint", tiny_checkpoint, "--progress", "false"], check=False, timeout=300)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert case_id in text and "resamples to [384, 384, 384]" in text and "max_preprocessed_voxels" in text, text[-3000:]
    assert not list(out.glob("*.nii.gz"))
