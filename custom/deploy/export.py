"""Export a trained checkpoint: ONE TorchScript (MONAI ``ckpt_export``, metadata embedded), its ONNX twin, and the
Triton repository that serves it.

The exported module is ``PatchProbabilityNetwork`` (the bundle's ``network_export``): ``(B,4,X,Y,Z) ->
sigmoid(network) (B,C,X,Y,Z)`` float32, all channels, no masking: probabilities, not logits, and the TorchScript's
embedded metadata says so (``exported_output_metadata``). It is what the sliding window runs on every patch and
what Triton's patch model serves (``model.pt`` there is this TorchScript, byte for byte; or ``model.onnx``); the
cancer mask needs the whole volume's WT, so it is applied after the sliding window
(``custom.inference.postprocess.postprocess_probabilities``), not inside the exported graph.

Parity is checked on a real preprocessed patch: PyTorch vs TorchScript vs onnxruntime, max |diff| of the
probabilities <= ``tolerance`` (default 1e-4), every output finite; anything else raises ``ExportParityError``.
Non-finite weights are refused before anything is written (by the one checkpoint loader,
:func:`custom.model.checkpoints.load_state_dict`). Files of another export (a different checkpoint or
plan) are not overwritten unless ``overwrite=True``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from custom.core.atomic import atomic_path, atomic_torch_save, atomic_write_json, file_sha256
from custom.core.errors import BraTSInputError
from custom.data.synthetic import make_case
from custom.deploy.triton_repository import (MODEL_INFO, PATCH_ARTEFACTS, PATCH_INPUT, PATCH_MAX_BATCH_SIZE,
                                             PATCH_MODEL, PATCH_OUTPUT, VOLUME_MODEL, prepare_model_repository)
from custom.model.checkpoints import (checkpoint_out_channels, load_state_dict, load_weights, release_state_dict,
                                      resolve_plans_path, same_weights, save_release_weights)
from custom.planning.plans import load_plans
from custom.preprocessing.functional import preprocess_case

logger = logging.getLogger(__name__)

EXPORT_NET_ID = "network_export"

#: the ONNX graph's tensor names: the Triton patch model's, so that the file is served as it is
ONNX_INPUT = PATCH_INPUT

ONNX_OUTPUT = PATCH_OUTPUT

ONNX_OPSET = 17

#: metadata spatial shape of a patch without a metadata.json to read it from: multiples of 32 from 64 (a 6-stage plan
#: divides by 32 and instance norm needs at least 2 voxels per axis at the bottleneck)
DEFAULT_SPATIAL_SHAPE = ("32*(n+1)",) * 3


class ExportParityError(RuntimeError):
    """An exported model disagrees with PyTorch by more than the tolerance, or an output is not finite."""


class ExportOverwriteError(BraTSInputError):
    """Export would replace files written from another checkpoint or plan (``overwrite=False``)."""


def exported_output_metadata(out_channels: int, spatial_shape=DEFAULT_SPATIAL_SHAPE) -> dict:
    """What the exported network outputs, embedded in the TorchScript as ``network_data_format.outputs.pred``
    (``spatial_shape``: the input's, from metadata.json: the network keeps the patch size)."""
    channels = {
        "0": "p_WT: sigmoid probability of the whole tumour (labels 1, 2, 3)",
        "1": "p_TC: sigmoid probability of the tumour core (labels 1, 3)",
        "2": "p_ET: sigmoid probability of the enhancing tumour (label 3)",
    }
    if int(out_channels) == 4:
        channels["3"] = ("unc_output before the cancer mask: sigmoid of the uncertainty channel; inference multiplies "
                         "it by the predicted WT dilated by mask_dilation voxels on the whole volume")
    return {
        "type": "image",
        "format": "probabilities",
        "num_channels": int(out_channels),
        "spatial_shape": list(spatial_shape),
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": True,
        "channel_def": channels,
        "activation": "sigmoid, inside the exported network: outputs are probabilities, not logits",
        "description": f"{EXPORT_NET_ID} = custom.model.networks.PatchProbabilityNetwork(network_def): "
                       f"(B, 4, X, Y, Z) float32 -> (B, {int(out_channels)}, X, Y, Z) float32 probabilities, no mask",
    }


def _input_spatial_shape(meta_file) -> tuple:
    """``network_data_format.inputs.image.spatial_shape`` of metadata.json (the default when there is none)."""
    if meta_file is None or not Path(meta_file).is_file():
        return DEFAULT_SPATIAL_SHAPE
    return tuple(json.loads(Path(meta_file).read_text())["network_data_format"]["inputs"]["image"]["spatial_shape"])


def _parser(config_file, bundle_root, checkpoint, work_dir, meta_file=None):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    if meta_file is not None and Path(meta_file).is_file():
        parser.read_meta(meta_file)
    parser["bundle_root"] = str(bundle_root)
    parser["checkpoint"] = str(checkpoint)
    parser["work_dir"] = None if work_dir is None else str(work_dir)
    return parser


def build_export_module(config_file, bundle_root, checkpoint, work_dir=None) -> torch.nn.Module:
    """``network_export`` of the bundle config with the checkpoint's weights (eval mode, CPU)."""

    parser = _parser(config_file, bundle_root, checkpoint, work_dir)
    # network_export wraps the very network_def instance the parser caches, so loading it loads the export
    load_weights(parser.get_parsed_content("network_def"), checkpoint, "cpu")
    module = parser.get_parsed_content(EXPORT_NET_ID)
    return module.eval()


def real_volume(plans, work_dir=None, seed: int = 0) -> np.ndarray:
    """A real preprocessed case ``(4, X', Y', Z')``: the first cached case of ``work_dir`` if there is one, else a
    synthetic case run through ``preprocess_case`` (the same preprocessing as inference)."""

    if work_dir is not None:
        cached = sorted(Path(work_dir, "preprocessed").glob("*_image.npy"))
        if cached:
            return np.load(cached[0])

    shape = tuple(max(int(p) + 16, 48) for p in plans.patch_size)
    image, _ = make_case(np.random.default_rng(seed), shape, tuple(plans.target_spacing), 0.0)
    image_pp, _, _ = preprocess_case(image, plans.target_spacing, plans)
    return image_pp


def crop_patches(volume: np.ndarray, size, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """``(batch, 4, *size)`` crops of ``volume`` (zero-padded only where the volume is smaller): the first is
    centred on the case (brain and tumour), the others are random."""
    pad = [(0, 0)] + [(0, max(0, p - s)) for p, s in zip(size, volume.shape[1:])]
    volume = np.pad(volume, pad)
    rng = np.random.default_rng(seed)
    out = []
    for b in range(batch):
        if b == 0:
            starts = [(s - p) // 2 for s, p in zip(volume.shape[1:], size)]
        else:
            starts = [int(rng.integers(0, s - p + 1)) for s, p in zip(volume.shape[1:], size)]
        out.append(volume[(slice(None),) + tuple(slice(st, st + p) for st, p in zip(starts, size))])
    return torch.from_numpy(np.ascontiguousarray(np.stack(out), dtype=np.float32))


def parity_inputs(plans, work_dir=None) -> list[torch.Tensor]:
    """Real inputs for the parity check: 2 plan-size patches, and one crop of another size (the largest multiple
    of the network's total stride that fits in the case, up to 1.5x the patch) to exercise the dynamic axes."""
    volume = real_volume(plans, work_dir)
    inputs = [crop_patches(volume, plans.patch_size, batch=2)]
    total_stride = np.prod(np.asarray(plans.strides), axis=0).astype(int)
    other = [int(max(st, min(n, int(p * 1.5)) // st * st))
             for n, p, st in zip(volume.shape[1:], plans.patch_size, total_stride)]
    if tuple(other) != tuple(plans.patch_size):
        inputs.append(crop_patches(volume, other, batch=1))
    return inputs


def export_torchscript(config_file, bundle_root, checkpoint, filepath, work_dir=None, meta_file=None,
                       input_shape=None, out_channels: int = 4) -> Path:
    """TorchScript of ``network_export`` through ``monai.bundle.ckpt_export`` (metadata + config embedded).

    ``ckpt_export`` loads ``{"model": state_dict}`` into the exported module itself; the checkpoint has the bare
    DynUNet's keys, so the wrapped module's state dict is written to a temporary checkpoint first. The embedded
    metadata's ``outputs.pred`` is :func:`exported_output_metadata` (probabilities, this checkpoint's channels).
    """
    from monai.bundle import ckpt_export

    filepath = Path(filepath)
    filepath.parent.mkdir(parents=True, exist_ok=True)
    module = build_export_module(config_file, bundle_root, checkpoint, work_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".export-", dir=filepath.parent))
    try:
        wrapped_ckpt = tmp_dir / "model_export.pt"
        atomic_torch_save({"model": module.state_dict()}, wrapped_ckpt)
        kwargs = dict(net_id=EXPORT_NET_ID, ckpt_file=str(wrapped_ckpt), config_file=str(config_file),
                      key_in_ckpt="model", bundle_root=str(bundle_root), checkpoint=str(checkpoint),
                      work_dir=None if work_dir is None else str(work_dir),
                      **{"_meta_#network_data_format#outputs#pred": exported_output_metadata(
                          out_channels, _input_spatial_shape(meta_file))})
        if meta_file is not None and Path(meta_file).is_file():
            kwargs["meta_file"] = str(meta_file)
        tmp_ts = tmp_dir / filepath.name
        try:
            ckpt_export(filepath=str(tmp_ts), use_trace=False, **kwargs)
        except Exception as exc:  # scripting can fail on unscriptable wrappers: tracing is exact for this net
            logger.warning("torch.jit.script failed (%s); exporting with torch.jit.trace", exc)
            ckpt_export(filepath=str(tmp_ts), use_trace=True, input_shape=list(input_shape), **kwargs)
        os.replace(tmp_ts, filepath)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return filepath


def _instance_norm_symbolic():
    """ONNX symbolic for ``aten::instance_norm`` with two-pass statistics reduced one axis at a time.

    onnxruntime's InstanceNormalization (and a single ReduceMean over X*Y*Z) sums in float32 naively: over a
    128^3 feature map with a large constant (zero-padded / background) region the mean is off by ~1e-4
    relative, enough to move probabilities by ~1e-2 through a 6-stage U-Net. Reducing Z, then Y, then X
    (each <= a few hundred terms) keeps the error at float32 rounding, matching PyTorch to ~1e-6.
    """
    from torch.onnx import symbolic_helper as sh

    @sh.parse_args("v", "v", "v", "v", "v", "b", "f", "f", "b")
    def instance_norm(g, x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn):
        rank = sh._get_tensor_rank(x)
        if rank is None:
            raise RuntimeError("instance_norm export needs a known input rank")

        def mean(t):
            for axis in range(rank - 1, 1, -1):
                t = g.op("ReduceMean", t, axes_i=[axis], keepdims_i=1)
            return t

        centred = g.op("Sub", x, mean(x))
        var = mean(g.op("Mul", centred, centred))
        eps_c = g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))
        y = g.op("Div", centred, g.op("Sqrt", g.op("Add", var, eps_c)))
        shape = g.op("Constant", value_t=torch.tensor([1, -1] + [1] * (rank - 2), dtype=torch.long))
        if not sh._is_none(weight):
            y = g.op("Mul", y, g.op("Reshape", weight, shape))
        if not sh._is_none(bias):
            y = g.op("Add", y, g.op("Reshape", bias, shape))
        return y

    return instance_norm


def export_onnx(module: torch.nn.Module, example: torch.Tensor, filepath) -> Path:
    """ONNX with dynamic batch and spatial axes (TorchScript-based exporter: the graph is static conv/norm);
    instance norm is exported with accurate statistics (``_instance_norm_symbolic``)."""
    import warnings

    filepath = Path(filepath)
    dynamic = {0: "batch", 2: "x", 3: "y", 4: "z"}
    torch.onnx.register_custom_op_symbolic("aten::instance_norm", _instance_norm_symbolic(), ONNX_OPSET)
    try:
        with atomic_path(filepath) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, input_names=[ONNX_INPUT],
                              output_names=[ONNX_OUTPUT], dynamic_axes={ONNX_INPUT: dynamic, ONNX_OUTPUT: dynamic},
                              opset_version=ONNX_OPSET, do_constant_folding=True)
    finally:
        torch.onnx.unregister_custom_op_symbolic("aten::instance_norm", ONNX_OPSET)
    return filepath


def check_parity(module, ts_path, onnx_path, inputs: list[torch.Tensor], tolerance: float = 1e-4) -> dict:
    """Max |diff| of probabilities: PyTorch vs TorchScript and vs onnxruntime on each input.

    Raises:
        ExportParityError: any output not finite, or any difference above ``tolerance`` (the numbers are in
            the message). A NaN difference is a failure, never a 0.
    """
    import onnxruntime as ort

    ts = torch.jit.load(str(ts_path), map_location="cpu").eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    report = {"tolerance": tolerance, "inputs": []}
    problems = []
    with torch.no_grad():
        for x in inputs:
            outputs = {"pytorch": module(x).float().numpy(), "torchscript": ts(x).float().numpy(),
                       "onnx": sess.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0]}
            for name, out in outputs.items():
                if not np.isfinite(out).all():
                    problems.append(f"{name} output on input {list(x.shape)} has {int((~np.isfinite(out)).sum())} "
                                    f"NaN/inf values")
            entry = {"shape": list(x.shape)}
            for name in ("torchscript", "onnx"):
                entry[name] = float(np.abs(outputs[name] - outputs["pytorch"]).max())
            report["inputs"].append(entry)
    for name in ("torchscript", "onnx"):
        diffs = [i[name] for i in report["inputs"]]
        # NaN propagates: max() of floats would drop it (max(0.0, nan) == 0.0)
        report[f"max_abs_diff_{name}"] = float(np.max(diffs))
    worst = (report["max_abs_diff_torchscript"], report["max_abs_diff_onnx"])
    if problems or not all(np.isfinite(d) and d <= tolerance for d in worst):
        raise ExportParityError(
            f"export parity FAILED: max |p_torch - p_torchscript| = {report['max_abs_diff_torchscript']:.3g}, "
            f"max |p_torch - p_onnx| = {report['max_abs_diff_onnx']:.3g} (tolerance {tolerance:g}) on inputs "
            f"{[i['shape'] for i in report['inputs']]}" + "".join(f"; {p}" for p in problems))
    return report


def _verify_multiplier(meta_file, plans) -> int:
    """``n`` for metadata spatial shapes like ``"32*n"``: the smallest input whose bottleneck keeps >= 2 voxels
    per axis (instance norm needs more than one spatial element; a 6-stage plan divides by 32)."""
    shape = json.loads(Path(meta_file).read_text())["network_data_format"]["inputs"]["image"].get("spatial_shape", [])
    total_stride = int(np.prod(np.asarray(plans.strides), axis=0).max())
    base = None
    if shape and isinstance(shape[0], str) and shape[0].replace(" ", "").endswith("*n"):
        base = int(shape[0].replace(" ", "")[:-2])
    return max(1, int(np.ceil(2 * total_stride / base))) if base else 1


def verify_exported_net(config_file, meta_file, bundle_root, checkpoint, work_dir, out_channels: int,
                        plans) -> None:
    """``monai.bundle.verify_net_in_out`` on ``network_export`` (channels and dtype against metadata.json)."""
    from monai.bundle import verify_net_in_out

    if meta_file is None or not Path(meta_file).is_file():
        raise BraTSInputError(f"{meta_file}: metadata.json not found (needed by verify_net_in_out)",
                              header="cannot verify the exported network")
    verify_net_in_out(net_id=EXPORT_NET_ID, meta_file=str(meta_file), config_file=str(config_file), device="cpu",
                      n=_verify_multiplier(meta_file, plans), bundle_root=str(bundle_root),
                      checkpoint=str(checkpoint), work_dir=None if work_dir is None else str(work_dir),
                      **{"_meta_#network_data_format#outputs#pred#num_channels": int(out_channels)})


def _same_bytes(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and file_sha256(a) == file_sha256(b)


def _holds_weights_of(path: Path, checkpoint: Path) -> bool:
    try:
        return same_weights(load_state_dict(path), release_state_dict(checkpoint))
    except BraTSInputError:
        return False


def find_overwrites(checkpoint, plans_path, out_dir, triton_repo=None) -> list[str]:
    """Files an export of ``checkpoint`` would replace that hold something else: a ``model.pt`` in ``out_dir``
    with other weights, a different ``plans.json``, exported files there (``model.ts``, ``model.onnx``) whose
    ``export.json`` names another checkpoint or plan (or is missing), and a Triton repository filled from another
    checkpoint."""
    checkpoint, plans_path, out_dir = Path(checkpoint), Path(plans_path), Path(out_dir)
    ckpt_sha, plans_sha = file_sha256(checkpoint), file_sha256(plans_path)
    found = []
    weights = out_dir / "model.pt"
    if weights.is_file() and weights.resolve() != checkpoint.resolve() and not _holds_weights_of(weights, checkpoint):
        found.append(f"{weights}: other weights (not those of {checkpoint})")
    plans_dst = out_dir / "plans.json"
    if plans_dst.is_file() and plans_dst.resolve() != plans_path.resolve() and not _same_bytes(plans_path, plans_dst):
        found.append(f"{plans_dst}: a different plans.json (not {plans_path})")
    exported = [out_dir / n for n in ("model.ts", "model.onnx") if (out_dir / n).is_file()]
    if exported:
        try:
            previous = json.loads((out_dir / "export.json").read_text())
        except (OSError, ValueError):
            previous = {}
        if (previous.get("checkpoint_sha256"), previous.get("plans_sha256")) != (ckpt_sha, plans_sha):
            found += [f"{p}: exported from another checkpoint or plan" + ("" if previous else
                      " (no export.json beside it says which)") for p in exported]
    if triton_repo:
        repo = Path(triton_repo)
        info_path = repo / VOLUME_MODEL / "1" / MODEL_INFO
        served = [repo / PATCH_MODEL / "1" / n for n in PATCH_ARTEFACTS if (repo / PATCH_MODEL / "1" / n).is_file()]
        try:
            info = json.loads(info_path.read_text())
        except (OSError, ValueError):
            info = None
        if info is not None and info.get("checkpoint_sha256") != ckpt_sha:
            found.append(f"{info_path}: the Triton repository serves another checkpoint ({info.get('checkpoint')})")
        elif info is None and served:
            found += [f"{p}: a served model of unknown origin (no {info_path})" for p in served]
    return found


def export_model(checkpoint, work_dir=None, out_dir="bundle/models", triton_repo="triton_models",
                 bundle_root="bundle", config_file=None, meta_file=None, tolerance: float = 1e-4,
                 verify: bool = True, triton_backend: str = "python", patch_runtime: str = "torchscript",
                 tensorrt: bool = False, max_batch_size: int = PATCH_MAX_BATCH_SIZE,
                 volume_instances: int | None = None, overwrite: bool = False) -> dict:
    """Export ``checkpoint`` (see module docstring). Returns the report also written to ``out_dir/export.json``.

    Writes ``out_dir/model.ts`` (the one exported artefact), ``out_dir/model.onnx`` (its ONNX twin), the released
    weights ``out_dir/model.pt`` (a bare state dict: ``custom.model.checkpoints.save_release_weights``) and
    ``plans.json`` (so the bundle's default ``checkpoint``, MONAI's tools and MONAI Label find them)
    and fills the Triton repository ``triton_repo`` for ``triton_backend`` (``python`` with ``patch_runtime``
    torchscript, onnxruntime or eager; ``pytorch_libtorch``; ``onnxruntime`` [+ ``tensorrt``]):
    :func:`custom.deploy.triton_repository.prepare_model_repository`.

    Raises:
        ExportOverwriteError: before writing anything, when files of another export would be replaced
            (:func:`find_overwrites`) and ``overwrite`` is False.
        CheckpointError: checkpoint or plan missing or unreadable, or non-finite weights.
        ExportParityError: see :func:`check_parity`.
    """

    bundle_root = Path(bundle_root)
    config_file = Path(config_file) if config_file else bundle_root / "configs" / "inference.json"
    meta_file = Path(meta_file) if meta_file else bundle_root / "configs" / "metadata.json"
    checkpoint = Path(checkpoint)
    out_dir = Path(out_dir)
    state = load_state_dict(checkpoint)  # the one loader refuses non-finite weights, before anything is written
    out_channels = checkpoint_out_channels(state)
    plans_path = resolve_plans_path(checkpoint, work_dir)
    plans = load_plans(plans_path)
    overwrites = find_overwrites(checkpoint, plans_path, out_dir, triton_repo)
    if overwrites and not overwrite:
        raise ExportOverwriteError(overwrites, header=f"refusing to overwrite files that do not come from {checkpoint} "
                                                      f"(pass --overwrite true to replace them)")
    out_dir.mkdir(parents=True, exist_ok=True)

    module = build_export_module(config_file, bundle_root, checkpoint, work_dir)
    inputs = parity_inputs(plans, work_dir)
    ts_path = export_torchscript(config_file, bundle_root, checkpoint, out_dir / "model.ts", work_dir, meta_file,
                                 input_shape=[1, 4, *plans.patch_size], out_channels=out_channels)
    onnx_path = export_onnx(module, inputs[0][:1], out_dir / "model.onnx")
    parity = check_parity(module, ts_path, onnx_path, inputs, tolerance)

    if verify:
        verify_exported_net(config_file, meta_file, bundle_root, checkpoint, work_dir, out_channels, plans)
    # the released weights (a bare state dict, what MONAI's tools load by default) and the plan beside them
    copied = [str(save_release_weights(checkpoint, out_dir / "model.pt"))]
    plans_dst = out_dir / "plans.json"
    if Path(plans_path).resolve() != plans_dst.resolve():
        with atomic_path(plans_dst) as tmp:
            shutil.copyfile(plans_path, tmp)
    copied.append(str(plans_dst))
    triton_dir = None
    if triton_repo:
        triton_dir = str(prepare_model_repository(
            checkpoint, plans_path=plans_path, repo_dir=triton_repo, torchscript=ts_path, onnx=onnx_path,
            backend=triton_backend, runtime=patch_runtime, tensorrt=tensorrt, max_batch_size=max_batch_size,
            volume_instances=volume_instances))
    report = {"checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
              "plans": str(Path(plans_path).resolve()), "plans_sha256": file_sha256(plans_path),
              "exported_module": f"{EXPORT_NET_ID}: PatchProbabilityNetwork (sigmoid of every channel, no mask)",
              "exported_output": exported_output_metadata(out_channels, _input_spatial_shape(meta_file)),
              "out_channels": out_channels, "torchscript": str(ts_path), "torchscript_sha256": file_sha256(ts_path),
              "onnx": str(onnx_path), "onnx_input": ONNX_INPUT, "onnx_output": ONNX_OUTPUT, "onnx_opset": ONNX_OPSET,
              "copied": copied, "overwritten": overwrites, "triton_repository": triton_dir,
              "triton_backend": triton_backend if triton_repo else None,
              "patch_runtime": patch_runtime if triton_repo and triton_backend == "python" else None,
              "verify_net_in_out": bool(verify), "parity": parity}
    atomic_write_json(out_dir / "export.json", report)
    return report


def read_torchscript_metadata(ts_path) -> dict:
    """The metadata and config JSON files ``ckpt_export`` embedded in a TorchScript file."""
    from monai.data import load_net_with_metadata

    _, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=("inference.json",))
    return {"metadata": meta, "inference.json": json.loads(extra["inference.json"])}
