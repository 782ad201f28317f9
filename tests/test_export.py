"""Export (scripts/export.py, custom/deploy/export.py): TorchScript + ONNX parity, metadata, verify_net_in_out, the Triton
repository for each backend (python, pytorch_libtorch, onnxruntime: configs checked against Triton's ModelConfig
schema and against the exported files), refusals (non-finite weights, overwriting another export)."""

from __future__ import annotations

import json
import re
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
    # the released weights: a plain state dict (what MONAI's ckpt_export / CheckpointLoader load by default) with
    # the checkpoint's tensors; the training checkpoint keeps its {"model": ...} dict
    released = torch.load(str(out / "model.pt"), weights_only=True)
    trained = torch.load(str(ckpt), weights_only=True)
    assert set(trained) == {"model"} and set(released) == set(trained["model"])
    assert all(torch.equal(released[k], trained["model"][k]) for k in released)
    report = json.loads((out / "export.json").read_text())
    parity = report["parity"]
    assert parity["max_abs_diff_torchscript"] <= 1e-4 and parity["max_abs_diff_onnx"] <= 1e-4
    shapes = [tuple(i["shape"]) for i in parity["inputs"]]
    assert shapes[0] == (2, 4, 32, 32, 32) and len(shapes) == 2 and shapes[1][2:] != (32, 32, 32)
    assert report["verify_net_in_out"] is True and report["out_channels"] == 4
    assert "export ok" in proc.stdout and "verify_net_in_out passed" in proc.stdout
    assert not list(out.glob(".*tmp*")) and not list(out.glob(".export-*"))
    from custom.core.atomic import file_sha256

    assert report["checkpoint_sha256"] == file_sha256(ckpt) and report["torchscript_sha256"] == file_sha256(
        out / "model.ts")


def test_torchscript_has_metadata_and_matches_pytorch(exported, ckpt, prepared_work_dir):
    from custom.deploy.export import build_export_module, read_torchscript_metadata

    _, out, _ = exported
    embedded = read_torchscript_metadata(out / "model.ts")
    fmt = embedded["metadata"]["network_data_format"]
    assert fmt["inputs"]["image"]["num_channels"] == 4 and fmt["outputs"]["pred"]["num_channels"] == 4
    # the metadata says what the file outputs: sigmoid probabilities in [0, 1], not logits
    pred = fmt["outputs"]["pred"]
    assert pred["value_range"] == [0, 1] and pred["dtype"] == "float32" and "sigmoid" in pred["activation"]
    assert "logit" not in json.dumps(pred["channel_def"]) and "probability" in pred["channel_def"]["0"]
    assert "unc_output before the cancer mask" in pred["channel_def"]["3"]
    # the exported network keeps the patch size: the output shape is the input's, as metadata.json states it
    assert pred["spatial_shape"] == fmt["inputs"]["image"]["spatial_shape"] == ["32*(n+1)"] * 3
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

    from custom.deploy.export import ONNX_INPUT, ONNX_OUTPUT, build_export_module, crop_patches, real_volume
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
    got = sess.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]
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


def test_triton_repository_serves_the_exported_torchscript(exported, ckpt):
    from custom.deploy.triton_repository import check_model_repository, parse_model_config

    _, out, repo = exported
    # the one exported artefact, byte for byte, under the name Triton's backends load
    assert (repo / "brats_unc_patch" / "1" / "model.pt").read_bytes() == (out / "model.ts").read_bytes()
    assert not (repo / "brats_unc_patch" / "1" / "checkpoint.pt").exists()
    config = parse_model_config((repo / "brats_unc_patch" / "config.pbtxt").read_text())
    assert config.backend == "python" and config.parameters["runtime"].string_value == "torchscript"
    for model in ("brats_unc_patch", "brats_unc_volume"):
        assert (repo / model / "config.pbtxt").is_file() and (repo / model / "1" / "model.py").is_file()
    assert json.loads((repo / "brats_unc_volume" / "1" / "plans.json").read_text())["patch_size"] == [32, 32, 32]
    info = json.loads((repo / "brats_unc_volume" / "1" / "model_info.json").read_text())
    assert info["with_uncertainty"] is True and info["out_channels"] == 4
    assert info["patch_artefact"] == "model.pt" and info["patch_backend"] == "python"
    assert check_model_repository(repo) == repo.resolve()
    # the python runner of the exported artefact imports nothing of this repository at module level or on the
    # torchscript/onnxruntime path (only the eager reference does)
    runner = (repo / "brats_unc_patch" / "1" / "model.py").read_text()
    eager = runner[runner.index('elif self.runtime == "eager"'):runner.index("        else:\n            raise")]
    assert "custom" not in runner.replace(eager, "")


def _onnx_dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("backend", ["pytorch_libtorch", "onnxruntime", "onnxruntime+tensorrt"])
def test_native_backend_configs_match_the_exported_files(exported, ckpt, prepared_work_dir, tmp_path, backend):
    """What cannot run here (no libtorch/onnxruntime backend in the wheel) is checked without the server: the
    config parses with Triton's ModelConfig schema, names the platform, and its tensor names and dims are those of
    the exported file, which loads and answers with the config's output shape."""
    import onnx
    import onnxruntime as ort

    from custom.deploy.triton_repository import (PATCH_INPUT, PATCH_OUTPUT, check_model_repository,
                                                 parse_model_config, prepare_model_repository)

    _, out, _ = exported
    backend, _, accelerator = backend.partition("+")
    repo = prepare_model_repository(ckpt, repo_dir=tmp_path / "repo", torchscript=out / "model.ts",
                                    onnx=out / "model.onnx", backend=backend, tensorrt=accelerator == "tensorrt")
    config = parse_model_config((repo / "brats_unc_patch" / "config.pbtxt").read_text())
    version = repo / "brats_unc_patch" / "1"
    inp, outp = config.input[0], config.output[0]
    assert (inp.name, outp.name) == (PATCH_INPUT, PATCH_OUTPUT) and config.max_batch_size == 8
    assert list(inp.dims) == [4, 32, 32, 32] and list(outp.dims) == [4, 32, 32, 32]
    warm = config.model_warmup[0]
    assert list(warm.inputs[PATCH_INPUT].dims) == list(inp.dims) and warm.inputs[PATCH_INPUT].zero_data
    x = torch.zeros(1, *inp.dims)
    if backend == "pytorch_libtorch":
        assert config.platform == "pytorch_libtorch" and not config.backend
        assert sorted(p.name for p in version.iterdir()) == ["model.pt", "model.py"]  # model.py: unused template
        # libtorch maps <name>__<index> to the forward arguments and outputs by position
        assert re.fullmatch(r"\w+__0", inp.name) and re.fullmatch(r"\w+__0", outp.name)
        ts = torch.jit.load(str(version / "model.pt"))
        args = [a for a in ts.forward.schema.arguments if a.name != "self"]
        assert len(args) == 1 and str(args[0].type) == "Tensor"
        with torch.no_grad():
            y = ts(x)
        assert list(y.shape) == [1, *outp.dims] and y.dtype == torch.float32
    else:
        assert config.platform == "onnxruntime_onnx"
        assert (version / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
        graph = onnx.load(str(version / "model.onnx")).graph
        assert [i.name for i in graph.input] == [inp.name] and [o.name for o in graph.output] == [outp.name]
        for value_info, dims in ((graph.input[0], inp.dims), (graph.output[0], outp.dims)):
            model_dims = _onnx_dims(value_info)
            assert model_dims[0] == -1  # the batch axis Triton adds (max_batch_size > 0)
            assert all(m in (-1, c) for m, c in zip(model_dims[1:], dims)) and len(model_dims) == len(dims) + 1
        y = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"]).run(
            [outp.name], {inp.name: x.numpy()})[0]
        assert list(y.shape) == [1, *outp.dims]
        accelerators = config.optimization.execution_accelerators.gpu_execution_accelerator
        if accelerator:
            params = dict(accelerators[0].parameters)
            assert accelerators[0].name == "tensorrt" and params["precision_mode"] == "FP32"
            assert params["trt_profile_max_shapes"] == f"{PATCH_INPUT}:8x4x32x32x32"
        else:
            assert not accelerators
    assert check_model_repository(repo) == repo.resolve()


def test_committed_patch_config_is_the_generated_one():
    """triton_models/brats_unc_patch/config.pbtxt is what export writes for the BraTS plan (128^3, 4 channels,
    python backend, TorchScript): the two cannot drift apart."""
    from custom.core.layout import MODEL_REPOSITORY
    from custom.deploy.triton_repository import parse_model_config, patch_model_config

    committed = (MODEL_REPOSITORY / "brats_unc_patch" / "config.pbtxt").read_text()
    assert committed == patch_model_config("python", [128, 128, 128], 4)
    for name in ("brats_unc_patch", "brats_unc_volume"):
        parse_model_config((MODEL_REPOSITORY / name / "config.pbtxt").read_text())
    with pytest.raises(ValueError, match="not a valid Triton model configuration"):
        parse_model_config("max_batch_size: eight")


def test_volume_batch_above_patch_batch_is_refused(exported, ckpt, tmp_path):
    from custom.deploy.triton_repository import prepare_model_repository

    _, out, _ = exported
    with pytest.raises(ValueError, match="sw_batch_size 4 exceeds the patch model's max_batch_size 2"):
        prepare_model_repository(ckpt, repo_dir=tmp_path / "repo", torchscript=out / "model.ts", max_batch_size=2)


def test_non_finite_network_is_not_exported(ckpt, prepared_work_dir, tmp_path):
    """An all-NaN checkpoint used to pass ("max|diff| 0.00e+00": max(0.0, nan) is 0.0); now it is refused, and
    a NaN coming out of an exported file fails the parity check."""
    from custom.deploy.export import (ExportParityError, build_export_module, check_parity, crop_patches,
                                      export_onnx, real_volume)
    from custom.planning.plans import load_plans

    state = torch.load(ckpt, weights_only=True)["model"]
    nan_dir = tmp_path / "nan"
    nan_dir.mkdir()
    atomic_torch_save({"model": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                                 for k, v in state.items()}}, nan_dir / "model.pt")
    shutil.copyfile(prepared_work_dir / "plans.json", nan_dir / "plans.json")
    proc = run_cmd([PYTHON, "scripts/export.py", "--checkpoint", nan_dir / "model.pt", "--out_dir", tmp_path / "m",
                    "--triton_repo", tmp_path / "r"], check=False, timeout=300)
    assert proc.returncode != 0 and "NaN or inf" in proc.stderr and str(nan_dir / "model.pt") in proc.stderr
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()

    module = build_export_module("bundle/configs/inference.json", "bundle", ckpt, prepared_work_dir)
    x = crop_patches(real_volume(load_plans(prepared_work_dir / "plans.json"), prepared_work_dir), (32, 32, 32))
    scripted = torch.jit.script(module)
    with torch.no_grad():
        for p in scripted.parameters():
            p.fill_(float("nan"))
    scripted.save(str(tmp_path / "nan.ts"))
    export_onnx(module, x, tmp_path / "good.onnx")
    with pytest.raises(ExportParityError, match=r"p_torchscript\| = nan.*torchscript output .* NaN/inf"):
        check_parity(module, tmp_path / "nan.ts", tmp_path / "good.onnx", [x])


def test_export_refuses_to_overwrite_another_export(exported, ckpt, prepared_work_dir, tmp_path):
    """Export does not silently replace a different model.pt / plans.json / exported files / served model."""
    from custom.deploy.export import ExportOverwriteError, export_model, find_overwrites

    _, out, repo = exported
    other = tmp_path / "other"
    other.mkdir()
    torch.manual_seed(2)
    atomic_torch_save({"model": build_network(prepared_work_dir / "plans.json").state_dict()}, other / "model.pt")
    shutil.copyfile(prepared_work_dir / "plans.json", other / "plans.json")
    # the same checkpoint again: nothing to refuse
    assert find_overwrites(ckpt, prepared_work_dir / "plans.json", out, repo) == []
    conflicts = find_overwrites(other / "model.pt", other / "plans.json", out, repo)
    assert any(c.startswith(f"{out / 'model.pt'}: other weights") for c in conflicts)
    assert any(c.startswith(str(out / "model.ts")) for c in conflicts)
    assert any("serves another checkpoint" in c for c in conflicts)
    before = {p: p.read_bytes() for p in (out / "model.pt", out / "model.ts", repo / "brats_unc_patch/1/model.pt")}
    proc = run_cmd([PYTHON, "scripts/export.py", "--checkpoint", other / "model.pt", "--out_dir", out,
                    "--triton_repo", repo], check=False, timeout=300)
    assert proc.returncode != 0 and "--overwrite true" in proc.stderr and str(out / "model.pt") in proc.stderr
    assert all(p.read_bytes() == b for p, b in before.items()), "a refused export must not write anything"
    # with overwrite: replaced, and the report lists what was overwritten
    target = tmp_path / "copy"
    shutil.copytree(out, target)
    with pytest.raises(ExportOverwriteError):
        export_model(other / "model.pt", out_dir=target, triton_repo=None, verify=False)
    report = export_model(other / "model.pt", out_dir=target, triton_repo=None, verify=False, overwrite=True)
    from custom.model.checkpoints import load_state_dict, same_weights

    assert same_weights(load_state_dict(target / "model.pt"), load_state_dict(other / "model.pt"))
    assert str(target / "model.pt") in " ".join(report["overwritten"])


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

    from custom.deploy.export import ONNX_INPUT, export_onnx

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
    got = sess.run(None, {ONNX_INPUT: x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-5
    # dynamic axes hold for the norm too
    y = x[:, :, :40, :24, :16].contiguous()
    with torch.no_grad():
        ref_y = norm(y).numpy()
    assert np.abs(sess.run(None, {ONNX_INPUT: y.numpy()})[0] - ref_y).max() <= 1e-5
