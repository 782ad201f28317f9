"""The Triton model repository: the patch model's configuration per backend, and filling the repository.

Layout (``repo/``)::

    brats_unc_volume/config.pbtxt, 1/model.py    committed: pre/post-processing, BLS calls to the patch model
    brats_unc_volume/1/plans.json, model_info.json   written by export
    brats_unc_patch/config.pbtxt                 written by export for the chosen backend (python,
                                                 pytorch_libtorch or onnxruntime); the committed one is the
                                                 python/TorchScript configuration for the BraTS plan
    brats_unc_patch/1/model.pt                   the exported TorchScript (python/torchscript, pytorch_libtorch)
    brats_unc_patch/1/model.onnx                 the exported ONNX (python/onnxruntime, onnxruntime)
    brats_unc_patch/1/checkpoint.pt, plans.json  eager PyTorch (python/eager: the benchmark's reference only)
    brats_unc_patch/1/model.py                   committed: the python backend's runner (unused by the others)

The patch model's tensors are ``IMAGE__0`` (B, 4, P, P, P) -> ``PROBS__0`` (B, C, P, P, P): the ``<name>__<index>``
form is what Triton's PyTorch (libtorch) backend maps to the TorchScript ``forward`` arguments and outputs, and the
same names are the ONNX graph's, so one contract holds for all three backends.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from custom.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json, file_sha256
from custom.core.errors import BraTSInputError
from custom.core.layout import MODEL_REPOSITORY
from custom.model.checkpoints import checkpoint_out_channels, load_state_dict, resolve_plans_path

VOLUME_MODEL = "brats_unc_volume"

PATCH_MODEL = "brats_unc_patch"

MODEL_NAMES = (VOLUME_MODEL, PATCH_MODEL)

#: the patch model's input and output (and the exported ONNX graph's); see the module docstring
PATCH_INPUT = "IMAGE__0"

PATCH_OUTPUT = "PROBS__0"

#: patches per execution of the patch model (the dynamic batcher's ceiling)
PATCH_MAX_BATCH_SIZE = 8

#: ``export.py --triton_backend``: Triton backends the patch model can be served with
TRITON_BACKENDS = ("python", "pytorch_libtorch", "onnxruntime")

#: ``export.py --patch_runtime``: what the python backend runs (torchscript and onnxruntime serve the exported
#: artefact; eager rebuilds the network from this repository's code and is kept as the benchmark's reference)
PYTHON_RUNTIMES = ("torchscript", "onnxruntime", "eager")

#: files a patch model version folder can hold besides model.py (stale ones are removed when the backend changes)
PATCH_ARTEFACTS = ("model.pt", "model.onnx", "checkpoint.pt", "plans.json")

MODEL_INFO = "model_info.json"


# ------------------------------------------------------------------------------------------ patch model config
def patch_artefacts(backend: str, runtime: str = "torchscript") -> tuple[str, ...]:
    """The files ``brats_unc_patch/1/`` needs for ``backend`` (and ``runtime`` for the python backend)."""
    _check_backend(backend, runtime)
    if backend == "pytorch_libtorch" or (backend == "python" and runtime == "torchscript"):
        return ("model.pt",)  # libtorch's default file name; the python backend reads the same file
    if backend == "onnxruntime" or runtime == "onnxruntime":
        return ("model.onnx",)
    return ("checkpoint.pt", "plans.json")


def _check_backend(backend: str, runtime: str) -> None:
    if backend not in TRITON_BACKENDS:
        raise ValueError(f"triton_backend must be one of {TRITON_BACKENDS}, got {backend!r}")
    if backend == "python" and runtime not in PYTHON_RUNTIMES:
        raise ValueError(f"patch_runtime must be one of {PYTHON_RUNTIMES}, got {runtime!r}")


def patch_model_config(backend: str, patch_size, out_channels: int, runtime: str = "torchscript",
                       max_batch_size: int = PATCH_MAX_BATCH_SIZE, tensorrt: bool = False) -> str:
    """``config.pbtxt`` text of the patch model for a Triton backend, every choice commented.

    Args:
        backend: ``python`` (the wheel's only backend), ``pytorch_libtorch`` or ``onnxruntime`` (NVIDIA's container).
        patch_size: the plan's patch ``(P1, P2, P3)``: the sliding window sends exactly this shape.
        out_channels: 4 (regions + uncertainty) or 3 (baseline checkpoint).
        runtime: for the python backend, what runs the network (:data:`PYTHON_RUNTIMES`).
        max_batch_size: patches per execution.
        tensorrt: onnxruntime only: the TensorRT execution accelerator (FP32, engine cache), for GPUs.
    """
    _check_backend(backend, runtime)
    if tensorrt and backend != "onnxruntime":
        raise ValueError("tensorrt applies to the onnxruntime backend only")
    p = [int(s) for s in patch_size]
    if len(p) != 3 or min(p) < 1:
        raise ValueError(f"patch_size must be 3 positive ints, got {patch_size}")
    if int(out_channels) not in (3, 4):
        raise ValueError(f"out_channels must be 3 or 4, got {out_channels}")
    if int(max_batch_size) < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    dims = ", ".join(str(s) for s in p)
    served = {"python": f"backend: \"python\"\n# 1/model.py runs the exported artefact: {patch_artefacts(backend, runtime)[0]} "
                        f"({runtime})",
              "pytorch_libtorch": "platform: \"pytorch_libtorch\"\n# 1/model.pt: the exported TorchScript, run by "
                                  "Triton's libtorch backend (no Python)",
              "onnxruntime": "platform: \"onnxruntime_onnx\"\n# 1/model.onnx: the exported ONNX, run by Triton's "
                             "onnxruntime backend (no Python)"}[backend]
    lines = [
        "# brats_unc_patch: INTERNAL. Clients call brats_unc_volume; this model is its BLS target. It takes",
        "# preprocessed sliding-window patches (cropped, z-scored, resampled; see custom/preprocessing), so a",
        "# direct call with raw intensities gives meaningless output. Triton has no per-model access control:",
        "# expose only brats_unc_volume (e.g. a proxy that allows /v2/models/brats_unc_volume/* and the",
        "# inference.GRPCInferenceService/ModelInfer calls for that model name).",
        "# Generated by scripts/export.py (custom.deploy.triton_repository.patch_model_config).",
        f'name: "{PATCH_MODEL}"',
        served,
        "# patches per execution; the dynamic batcher merges the BLS calls of all volumes in flight up to this",
        "# size. Lower it (and brats_unc_volume's sw_batch_size <= it) if a GPU runs out of memory",
        f"max_batch_size: {int(max_batch_size)}",
        "input [",
        "  {",
        f'    name: "{PATCH_INPUT}"',
        "    data_type: TYPE_FP32",
        "    # (4, P1, P2, P3): t1c, t1n, t2f, t2w preprocessed; exactly the plan's patch (the sliding window pads",
        "    # smaller volumes), so any other shape is refused before it reaches the network",
        f"    dims: [ 4, {dims} ]",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{PATCH_OUTPUT}"',
        "    data_type: TYPE_FP32",
        "    # sigmoid probabilities: p_WT, p_TC, p_ET"
        + (", unc_output before the cancer mask (applied on the whole volume)" if int(out_channels) == 4 else
           " (a checkpoint without the uncertainty channel)"),
        f"    dims: [ {int(out_channels)}, {dims} ]",
        "  }",
        "]",
        "# no preferred_batch_size: the batcher sends whatever is queued, up to max_batch_size, at once; no",
        "# max_queue_delay_microseconds (0): while one batch runs, the other volumes' calls queue and go together",
        "# next, and a delay would only add latency for a lone volume (measured: c1 ratio 0.84 with 1000 us)",
        "dynamic_batching { }",
        "# no instance_group: Triton's default, one instance on each visible GPU, one CPU instance without GPUs",
    ]
    if backend == "pytorch_libtorch":
        lines += [
            "# the TorchScript profiling executor specialises on the first calls; Triton's default (enabled) is kept",
            "# and the warm-up below pays for it. INFERENCE_MODE is libtorch's default (true) and not repeated here",
        ]
    if backend == "python":
        lines += [
            "# what 1/model.py runs: torchscript (1/model.pt) or onnxruntime (1/model.onnx) serve the exported",
            "# artefact without this repository's code; eager (1/checkpoint.pt + plans.json) rebuilds the network",
            "# from custom/ and is the benchmark's reference only",
            f'parameters {{ key: "runtime" value: {{ string_value: "{runtime}" }} }}',
        ]
    if tensorrt:
        def profile(batch: int) -> str:
            return f"{PATCH_INPUT}:{batch}x4x{'x'.join(str(s) for s in p)}"

        mins, opts, maxs = profile(1), profile(min(4, int(max_batch_size))), profile(int(max_batch_size))
        lines += [
            "# TensorRT through onnxruntime on GPUs: FP32 keeps the export's parity tolerance (FP16 is faster but",
            "# must be re-validated: scripts/export.py checks only FP32); engines are cached so that a restart does not",
            "# rebuild them; the profile covers every batch size the batcher can form for the plan's patch",
            "optimization { execution_accelerators {",
            "  gpu_execution_accelerator : [ {",
            '    name : "tensorrt"',
            '    parameters { key: "precision_mode" value: "FP32" }',
            '    parameters { key: "max_workspace_size_bytes" value: "4294967296" }',
            '    parameters { key: "trt_engine_cache_enable" value: "1" }',
            '    parameters { key: "trt_engine_cache_path" value: "/tmp/brats_unc_patch_trt" }',
            f'    parameters {{ key: "trt_profile_min_shapes" value: "{mins}" }}',
            f'    parameters {{ key: "trt_profile_opt_shapes" value: "{opts}" }}',
            f'    parameters {{ key: "trt_profile_max_shapes" value: "{maxs}" }}',
            "  } ]",
            "} }",
        ]
    lines += [
        "# warm-up at load: two zero batches (the TorchScript profiling run and the optimised one; cuDNN/TensorRT",
        "# tactic selection on GPUs), so that the first user request does not pay for them",
        "model_warmup [",
        "  {",
        '    name: "zero_patch"',
        "    batch_size: 1",
        "    count: 2",
        "    inputs {",
        f'      key: "{PATCH_INPUT}"',
        f"      value: {{ data_type: TYPE_FP32, dims: [ 4, {dims} ], zero_data: true }}",
        "    }",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def parse_model_config(text: str, source: str = "config.pbtxt"):
    """Parse ``config.pbtxt`` text with Triton's ModelConfig protobuf schema (``tritonclient.grpc.model_config_pb2``).

    Raises:
        ValueError: the text does not parse (the message names ``source`` and the protobuf error).
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(text, model_config_pb2.ModelConfig())
    except text_format.ParseError as err:
        raise ValueError(f"{source}: not a valid Triton model configuration: {err}") from None


def _model_parameters(config) -> dict:
    return {k: v.string_value for k, v in config.parameters.items()}


def read_model_parameters(model_config: dict) -> dict:
    """``parameters { key: ... value { string_value: ... } }`` of a Triton model config (as the python backend
    gets it, JSON), parsed as JSON values."""
    out = {}
    for key, value in (model_config.get("parameters") or {}).items():
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def patch_backend_of(config) -> tuple[str, str]:
    """``(backend, runtime)`` of a parsed patch model config (runtime is ``""`` for the native backends)."""
    if config.backend == "python":
        return "python", _model_parameters(config).get("runtime", "")
    if config.platform == "pytorch_libtorch" or config.backend == "pytorch":
        return "pytorch_libtorch", ""
    if config.platform == "onnxruntime_onnx" or config.backend == "onnxruntime":
        return "onnxruntime", ""
    raise ValueError(f"unknown patch model backend (backend {config.backend!r}, platform {config.platform!r})")


# ---------------------------------------------------------------------------------------- model repository
def _read_plans(plans_path) -> dict:
    with open(plans_path) as fh:
        plans = json.load(fh)
    if "patch_size" not in plans:
        raise BraTSInputError([f"{plans_path}: not a plans.json (no 'patch_size')"], header="invalid plans")
    return plans


def prepare_model_repository(checkpoint, plans_path=None, repo_dir=MODEL_REPOSITORY, torchscript=None, onnx=None,
                             backend: str = "python", runtime: str = "torchscript", template_dir=None,
                             volume_instances: int | None = None, max_batch_size: int = PATCH_MAX_BATCH_SIZE,
                             tensorrt: bool = False) -> Path:
    """Put an exported model into a Triton model repository (what ``scripts/export.py`` calls).

    Writes, each atomically:

    - ``brats_unc_patch/config.pbtxt`` for ``backend`` (:func:`patch_model_config`) and the artefact it serves
      (:func:`patch_artefacts`): ``torchscript`` copied to ``1/model.pt``, ``onnx`` to ``1/model.onnx``, or for
      the python/eager reference the checkpoint to ``1/checkpoint.pt`` with the plan; artefacts of another
      backend left in ``1/`` are removed, so the folder says what is served;
    - ``brats_unc_volume/1/plans.json`` and ``1/model_info.json`` (output channels, sha256 of the checkpoint
      and of the served artefact).

    When ``repo_dir`` differs from ``template_dir`` (default: the project's ``triton_models/``), the volume
    model's ``config.pbtxt`` and both ``model.py`` files are copied there first, so any folder becomes a servable
    repository. ``volume_instances`` sets the volume model's instance count there (= volumes in flight).

    Raises:
        BraTSInputError: checkpoint, plan or artefact missing or unreadable (the file is named).
        ValueError: unknown backend, or the volume model's ``sw_batch_size`` above ``max_batch_size``.
    """
    _check_backend(backend, runtime)
    template_dir = Path(template_dir or MODEL_REPOSITORY).resolve()
    repo_dir = Path(repo_dir).resolve()
    checkpoint = Path(checkpoint)
    out_channels = checkpoint_out_channels(load_state_dict(checkpoint))
    plans_path = Path(plans_path) if plans_path else resolve_plans_path(checkpoint)
    if not plans_path.is_file():
        raise BraTSInputError([f"{plans_path}: plans.json not found"], header="cannot export to Triton")
    plans = _read_plans(plans_path)
    sources = {"model.pt": torchscript, "model.onnx": onnx, "checkpoint.pt": checkpoint, "plans.json": plans_path}
    needed = patch_artefacts(backend, runtime)
    missing = [f"{name}: pass {'torchscript' if name == 'model.pt' else 'onnx'}=<exported file>"
               for name in needed if sources[name] is None or not Path(sources[name]).is_file()]
    if missing:
        raise BraTSInputError(missing, header=f"cannot fill the Triton repository for {backend} {runtime}".rstrip())
    if volume_instances is not None and int(volume_instances) < 1:
        raise ValueError(f"volume_instances must be >= 1, got {volume_instances}")
    if volume_instances is not None and repo_dir == template_dir:
        raise ValueError(f"volume_instances would edit the shipped template {template_dir}; pass another repo_dir")
    config_text = patch_model_config(backend, plans["patch_size"], out_channels, runtime, max_batch_size, tensorrt)
    volume_src = template_dir / VOLUME_MODEL / "config.pbtxt"
    sw_batch = _model_parameters(parse_model_config(volume_src.read_text(), str(volume_src))).get("sw_batch_size")
    if sw_batch is not None and int(sw_batch) > int(max_batch_size):
        raise ValueError(f"{volume_src}: sw_batch_size {sw_batch} exceeds the patch model's max_batch_size "
                         f"{max_batch_size}; a BLS call would be refused")

    copies = [(VOLUME_MODEL, "config.pbtxt"), (VOLUME_MODEL, "1/model.py"), (PATCH_MODEL, "1/model.py")]
    for name, rel in copies:
        src, dst = template_dir / name / rel, repo_dir / name / rel
        if not src.exists():
            raise FileNotFoundError(f"{src}: model template not found")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src != dst:
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
    if volume_instances is not None:
        set_instance_count(repo_dir / VOLUME_MODEL / "config.pbtxt", int(volume_instances))
    patch_dir = repo_dir / PATCH_MODEL / "1"
    for name in needed:
        with atomic_path(patch_dir / name) as tmp:
            shutil.copyfile(sources[name], tmp)
    for name in set(PATCH_ARTEFACTS) - set(needed):
        (patch_dir / name).unlink(missing_ok=True)
    atomic_write_bytes(repo_dir / PATCH_MODEL / "config.pbtxt", config_text.encode())
    with atomic_path(repo_dir / VOLUME_MODEL / "1" / "plans.json") as tmp:
        shutil.copyfile(plans_path, tmp)
    atomic_write_json(repo_dir / VOLUME_MODEL / "1" / MODEL_INFO, {
        "with_uncertainty": out_channels == 4, "out_channels": out_channels,
        "checkpoint": str(checkpoint.resolve()), "checkpoint_sha256": file_sha256(checkpoint),
        "patch_backend": backend, "patch_runtime": runtime if backend == "python" else "",
        "patch_artefact": needed[0], "patch_artefact_sha256": file_sha256(patch_dir / needed[0]),
    })
    return repo_dir


def set_instance_count(config_path, count: int) -> None:
    """Rewrite the ``count`` of the (single) ``instance_group`` of a ``config.pbtxt`` in place (atomically)."""
    text = Path(config_path).read_text()
    new, n = re.subn(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{int(count)}", text)
    if n != 1:
        raise ValueError(f"{config_path}: expected one instance_group starting with 'count:', found {n}")
    if new != text:
        atomic_write_bytes(config_path, new.encode())


def check_model_repository(repo_dir=MODEL_REPOSITORY) -> Path:
    """Fail early, naming each missing file, when the repository has no exported model in it."""
    repo_dir = Path(repo_dir).resolve()
    needed = [repo_dir / VOLUME_MODEL / rel for rel in ("config.pbtxt", "1/model.py", "1/plans.json", f"1/{MODEL_INFO}")]
    patch_config = repo_dir / PATCH_MODEL / "config.pbtxt"
    needed.append(patch_config)
    if patch_config.exists():
        backend, runtime = patch_backend_of(parse_model_config(patch_config.read_text(), str(patch_config)))
        needed += [repo_dir / PATCH_MODEL / "1" / name for name in patch_artefacts(backend, runtime or "torchscript")]
        if backend == "python":
            needed.append(repo_dir / PATCH_MODEL / "1" / "model.py")
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise FileNotFoundError(
            "model repository incomplete (run scripts/export.py --checkpoint CKPT first):\n"
            + "\n".join(f"  - {p}: missing" for p in missing)
        )
    check_served_artefact(repo_dir)
    return repo_dir


def check_served_artefact(repo_dir=MODEL_REPOSITORY) -> None:
    """The patch model's artefact is the file :func:`prepare_model_repository` wrote (sha256 in ``model_info.json``).

    Export checked that file (finite weights, parity); a native backend (libtorch, onnxruntime) loads whatever lies
    there without a check of its own, so a replaced or bit-flipped file is refused here: by serve_triton before
    it starts tritonserver, and by the volume model when Triton loads it.

    Raises:
        BraTSInputError: ``model_info.json`` unreadable, or the artefact missing or with another sha256.
    """
    repo_dir = Path(repo_dir)
    info_path = repo_dir / VOLUME_MODEL / "1" / MODEL_INFO
    header = "the Triton repository does not serve what export wrote"
    try:
        info = json.loads(info_path.read_text())
        artefact = repo_dir / PATCH_MODEL / "1" / Path(info["patch_artefact"]).name
        expected = str(info["patch_artefact_sha256"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BraTSInputError(f"{info_path}: unreadable ({type(exc).__name__}: {exc}); run scripts/export.py",
                              header=header) from None
    if not artefact.is_file():
        raise BraTSInputError(f"{artefact}: missing; run scripts/export.py", header=header)
    found = file_sha256(artefact)
    if found != expected:
        raise BraTSInputError(f"{artefact}: sha256 {found[:16]}... differs from {expected[:16]}... recorded in "
                              f"{info_path} (the file was replaced or damaged after export); run scripts/export.py",
                              header=header)
