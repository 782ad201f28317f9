"""Export a trained checkpoint for deployment: one TorchScript (+ its ONNX twin) with parity checks, and the Triton
model repository that serves it.

    .venv/bin/python scripts/export.py --checkpoint W/runs/unc/fold0/model.pt [--work_dir W] [--out_dir bundle/models]
        [--triton_repo triton_models] [--triton_backend python|pytorch_libtorch|onnxruntime]
        [--patch_runtime torchscript|onnxruntime|eager] [--tensorrt false] [--tolerance 1e-4] [--overwrite false]

``--triton_backend python`` (default; the only backend of the nvidia-pytriton wheel) serves the TorchScript
(``--patch_runtime torchscript``) or the ONNX through onnxruntime (``onnxruntime``) from a small Python runner;
``pytorch_libtorch`` and ``onnxruntime`` write the configuration for NVIDIA's Triton container, where those
backends run the same files without Python (``--tensorrt true``: TensorRT accelerator for onnxruntime on GPUs).
Exits non-zero (with the numbers) when TorchScript or ONNX disagree with PyTorch by more than the tolerance, and
(naming the files) when it would overwrite files exported from another checkpoint unless ``--overwrite true``.
Logic: custom/deploy/export.py.
"""

import json
import logging
import sys

import fire


def main(checkpoint: str, work_dir: str = None, out_dir: str = "bundle/models", triton_repo: str = "triton_models",
         bundle_root: str = "bundle", config_file: str = None, meta_file: str = None, tolerance: float = 1e-4,
         verify: bool = True, triton_backend: str = "python", patch_runtime: str = "torchscript",
         tensorrt: bool = False, overwrite: bool = False) -> None:
    """Export CHECKPOINT (plans.json beside it, else WORK_DIR/plans.json); "--triton_repo ''" skips Triton."""
    import torch

    from custom.core.cli import as_bool
    from custom.core.errors import BraTSInputError
    from custom.deploy.export import ExportParityError, export_model

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        report = export_model(checkpoint, work_dir=work_dir, out_dir=out_dir, triton_repo=triton_repo or None,
                              bundle_root=bundle_root, config_file=config_file, meta_file=meta_file,
                              tolerance=float(tolerance), verify=as_bool(verify, "verify"),
                              triton_backend=str(triton_backend), patch_runtime=str(patch_runtime),
                              tensorrt=as_bool(tensorrt, "tensorrt"), overwrite=as_bool(overwrite, "overwrite"))
    except (ExportParityError, BraTSInputError, ValueError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        sys.exit(1)
    p = report["parity"]
    print(json.dumps({"torchscript": report["torchscript"], "onnx": report["onnx"],
                      "triton_repository": report["triton_repository"], "triton_backend": report["triton_backend"],
                      "patch_runtime": report["patch_runtime"]}))
    for path in report["overwritten"]:
        print(f"overwrote {path}", file=sys.stderr)
    print(f"export ok: {report['out_channels']} channels (sigmoid probabilities); max|diff| torchscript "
          f"{p['max_abs_diff_torchscript']:.2e}, onnx {p['max_abs_diff_onnx']:.2e} (tolerance {p['tolerance']:g}); "
          f"verify_net_in_out {'passed' if report['verify_net_in_out'] else 'skipped'}")


if __name__ == "__main__":
    fire.Fire(main)
