"""Export (scripts/export.py, custom/deploy/export.py): TorchScript + ONNX parity, metadata, verify_net_in_out, Triton files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYTHON, run_cmd

from custom.core.atomic import atomic_torch_save
from custom.model.networks import build_network


@pytest.fixture(scope="module")
def ckpt(prepared_work_dir, tmp_path_factory) -> Path:
    """A checkpoint folder as training leaves it (fresh weights: parity does not depend on training)."""
    root = tmp_path_factory.mktemp("export_ckpt")
    torch.manual_seed(1)
    net = build_network(prepared_work_dir / "plans.json")
    atomic_torch_save({"model": net.state_dict()}, root / "model.pt")
    shutil.copyfile(prepared_work_dir / "plans.json", root / "plans.json")
    return root / "model.pt"


@pytest.fixture(scope="module")
def exported(ckpt, prepared_work_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("models")
    repo = tmp_path_factory.mktemp("triton") / "repo"
    proc = run_cmd([PYTHON, "scripts/export.py", "--checkpoint", ckpt, "--work_dir", prepared_work_dir,
                    "--out_dir", out, "--triton_repo", repo], timeout=600)
    return proc, out, repo


def test_export_writes_models_and_reports_parity(exported, ckpt):
    proc, out, _ = exported
    for name in ("model.ts", "model.onnx", "model.pt", "plans.json", "export.json"):
        assert (out / name).is_file(), name
    assert (out / "model.pt").read_bytes() == ckpt.read_bytes()
    report = json.loads((out / "export.json").read_text())
    parity = report["parity"]
    assert parity["max_abs_diff_torchscript"] <= 1e-4 and parity["max_abs_diff_onnx"] <= 1e-4
    shapes = [tuple(i["shape"]) for i in parity["inputs"]]
    assert shapes[0] == (2, 4, 32, 32, 32) and len(shapes) == 2 and shapes[1][2:] != (32, 32, 32)
    assert report["verify_net_in_out"] is True and report["out_channels"] == 4
    assert "export ok" in proc.stdout and "verify_net_in_out passed" in proc.stdout
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".export-*"))


def test_torchscript_has_metadata_and_matches_pytorch(exported, ckpt, prepared_work_dir):
    from custom.deploy.export import build_export_module, read_torchscript_metadata

    _, out, _ = exported
    embedded = read_torchscript_metadata(out / "model.ts")
    fmt = embedded["metadata"]["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 4 and fmt["outputs"]["pred"]["num_channels"] == 4
    assert "network_export" in embedded["inference.json"]
    ts = torch.jit.load(str(out / "model.ts"))
    module = build_export_module("bundle/configs/inference.json", "bundle", ckpt, prepared_work_dir)
    x = torch.from_numpy(np.load(sorted((prepared_work_dir / "preprocessed").glob("*_image.npy"))[0]))
    x = x[None, :, :32, :32, :32].contiguous()
    with torch.no_grad():
        ref = module(x)
        assert ref.min() >= 0 and ref.max() <= 1, "the exported module outputs probabilities"
        assert (ts(x) - ref).abs().max() <= 1e-4


def test_onnx_has_dynamic_batch_and_spatial_axes(exported, ckpt, prepared_work_dir):
    import onnxruntime as ort

    from custom.deploy.export import build_export_module, crop_patches, real_volume
    from custom.planning.plans import load_plans

    _, out, _ = exported
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    dims = sess.get_inputs()[0].shape
    assert dims[1] == 4 and all(isinstance(d, str) for d in (dims[0], *dims[2:])), dims
    module = build_export_module("bundle/configs/inference.json", "bundle", ckpt, prepared_work_dir)
    volume = real_volume(load_plans(prepared_work_dir / "plans.json"), prepared_work_dir)
    x = crop_patches(volume, (40, 32, 24), batch=3, seed=5)
    with torch.no_grad():
        ref = module(x).numpy()
    got = sess.run(["probs"], {"image": x.numpy()})[0]
    assert got.shape == (3, 4, 40, 32, 24)
    assert np.abs(got - ref).max() <= 1e-4


def test_parity_failure_is_loud(exported, ckpt, prepared_work_dir, tmp_path):
    """A TorchScript file that disagrees with PyTorch makes the check raise with the numbers."""
    from custom.deploy.export import ExportParityError, build_export_module, check_parity, crop_patches, real_volume
    from custom.planning.plans import load_plans

    _, out, _ = exported
    ts = torch.jit.load(str(out / "model.ts"))
    with torch.no_grad():
        next(iter(ts.parameters())).add_(0.05)
    ts.save(str(tmp_path / "bad.ts"))
    module = build_export_module("bundle/configs/inference.json", "bundle", ckpt, prepared_work_dir)
    x = crop_patches(real_volume(load_plans(prepared_work_dir / "plans.json"), prepared_work_dir), (32, 32, 32))
    with pytest.raises(ExportParityError, match=r"export parity FAILED: max \|p_torch - p_torchscript\| = "):
        check_parity(module, tmp_path / "bad.ts", out / "model.onnx", [x], tolerance=1e-4)
    # and the good files pass the same check
    report = check_parity(module, out / "model.ts", out / "model.onnx", [x], tolerance=1e-4)
    assert report["max_abs_diff_torchscript"] <= 1e-4


def test_verify_net_in_out_on_the_exported_network(ckpt, caplog):
    """What `python -m monai.bundle verify_net_in_out network_export ...` runs, against metadata.json."""
    import logging

    from monai.bundle import verify_net_in_out

    with caplog.at_level(logging.INFO):
        verify_net_in_out(net_id="network_export", meta_file="bundle/configs/metadata.json",
                          config_file="bundle/configs/inference.json", device="cpu", bundle_root="bundle",
                          checkpoint=str(ckpt))
    # and a wrong expectation is caught (the check is real)
    with pytest.raises(ValueError, match="output channel number"):
        verify_net_in_out(net_id="network_export", meta_file="bundle/configs/metadata.json",
                          config_file="bundle/configs/inference.json", device="cpu", bundle_root="bundle",
                          checkpoint=str(ckpt), **{"_meta_#network_data_format#outputs#pred#num_channels": 3})


def test_triton_repository_gets_the_model(exported, ckpt):
    _, _, repo = exported
    assert (repo / "brats_unc_patch" / "1" / "model.pt").read_bytes() == ckpt.read_bytes()
    for model in ("brats_unc_patch", "brats_unc_volume"):
        assert (repo / model / "config.pbtxt").is_file() and (repo / model / "1" / "model.py").is_file()
        assert json.loads((repo / model / "1" / "plans.json").read_text())["patch_size"] == [32, 32, 32]
    info = json.loads((repo / "brats_unc_volume" / "1" / "model_info.json").read_text())
    assert info["with_uncertainty"] is True and info["out_channels"] == 4


def test_export_without_plans_fails_with_a_message(tmp_path, ckpt):
    from custom.core.errors import BraTSInputError
    from custom.deploy.export import export_model

    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copyfile(ckpt, lone / "model.pt")
    with pytest.raises(BraTSInputError, match="no plans.json found") as e:
        export_model(lone / "model.pt", out_dir=tmp_path / "m", triton_repo=None)
    assert str(lone / "plans.json") in str(e.value)
    assert not (tmp_path / "m" / "model.ts").exists()


def test_onnx_instance_norm_is_accurate_on_large_constant_regions(tmp_path):
    """Regression: onnxruntime's naive float32 sums put instance-norm statistics ~1e-4 off on feature maps with
    a large background region (enough to break parity at 128^3); the export reduces axis by axis."""
    import onnxruntime as ort

    from custom.deploy.export import export_onnx

    torch.manual_seed(0)
    x = torch.full((1, 8, 48, 48, 48), 3.0)
    x[..., :20, :20, :20] += torch.randn(1, 8, 20, 20, 20) * 0.1 + 5.0
    norm = torch.nn.InstanceNorm3d(8, affine=True).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
        ref = torch.nn.functional.instance_norm(x.double(), weight=norm.weight.double(), bias=norm.bias.double())
    export_onnx(norm, x, tmp_path / "norm.onnx")
    sess = ort.InferenceSession(str(tmp_path / "norm.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-5
    # dynamic axes hold for the norm too
    y = x[:, :, :40, :24, :16].contiguous()
    with torch.no_grad():
        ref_y = norm(y).numpy()
    assert np.abs(sess.run(None, {"image": y.numpy()})[0] - ref_y).max() <= 1e-5
