"""Triton Python backend: the exported network on batches of sliding-window patches.

IMAGE__0 float32 (B, 4, P1, P2, P3) -> PROBS__0 float32 (B, C, P1, P2, P3): sigmoid probabilities of every
network channel (C = 4 with the uncertainty channel, 3 for a baseline), exactly what the exported artefact
outputs. The ``runtime`` parameter of config.pbtxt (written by ``scripts/export.py --patch_runtime``) says what runs:

- ``torchscript``: ``1/model.pt``, the exported TorchScript (``torch.jit.load``);
- ``onnxruntime``: ``1/model.onnx``, the exported ONNX (onnxruntime, CUDA provider on a GPU instance);
- ``eager``: ``1/checkpoint.pt`` + ``1/plans.json`` rebuilt with this repository's network code: the
  benchmark's reference for what the export buys, not the served artefact.

The first two import nothing from this repository; they refuse a file whose weights hold NaN or inf (the eager one
goes through the repository's checkpoint loader, which does the same), so that Triton does not load, and with
``--exit-on-error`` (serve_triton) does not start on, a network that answers "no tumour" everywhere. Runs on ``cuda:<device_id>`` when Triton gives the instance a
GPU (the default instance group on a GPU machine), on CPU otherwise.
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

INPUT, OUTPUT = "IMAGE__0", "PROBS__0"


def _onnx_initializers(path: Path):
    """``(name, array)`` of every initializer (the weights) of an ONNX file."""
    import onnx
    from onnx import numpy_helper

    for tensor in onnx.load(str(path)).graph.initializer:
        yield tensor.name, numpy_helper.to_array(tensor)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.runtime = config.get("parameters", {}).get("runtime", {}).get("string_value", "")
        version_dir = Path(args["model_repository"]) / args["model_version"]
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(args['model_instance_device_id'])}")
        else:
            self.device = torch.device("cpu")
        if self.runtime == "torchscript":
            path = self._require(version_dir / "model.pt")
            self.network = torch.jit.load(str(path), map_location=self.device).eval()
            self._refuse_non_finite(path, ((k, v.detach().cpu().numpy()) for k, v in
                                           (*self.network.named_parameters(), *self.network.named_buffers())))
            self.run = self._run_torch
        elif self.runtime == "onnxruntime":
            import onnxruntime as ort

            path = self._require(version_dir / "model.onnx")
            self._refuse_non_finite(path, _onnx_initializers(path))
            options = ort.SessionOptions()
            # the stub's thread budget (OMP_NUM_THREADS, set by serve_triton --threads) applies to onnxruntime too
            options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda":
                providers = [("CUDAExecutionProvider", {"device_id": self.device.index}), "CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(path), options, providers=providers)
            self.run = self._run_onnx
        elif self.runtime == "eager":
            from custom.model.checkpoints import load_network
            from custom.model.networks import PatchProbabilityNetwork
            from custom.planning.plans import load_plans

            path = self._require(version_dir / "checkpoint.pt")
            network, _ = load_network(str(path), load_plans(str(self._require(version_dir / "plans.json"))),
                                      device=self.device)
            self.network = PatchProbabilityNetwork(network).eval()
            self.run = self._run_torch
        else:
            raise pb_utils.TritonModelException(
                f"config.pbtxt parameter 'runtime' must be torchscript, onnxruntime or eager, got {self.runtime!r}")
        pb_utils.Logger.log_info(f"brats_unc_patch: {self.runtime} {path} on {self.device}")

    @staticmethod
    def _refuse_non_finite(path: Path, named_arrays) -> None:
        """Raise naming the file and the first weight tensor that holds NaN or inf (floating tensors only)."""
        for name, array in named_arrays:
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise pb_utils.TritonModelException(
                    f"{path}: non-finite weights: tensor '{name}' holds {int(np.isnan(array).sum())} NaN and "
                    f"{int(np.isinf(array).sum())} inf of {array.size} values; export a finite checkpoint with "
                    f"scripts/export.py")

    @staticmethod
    def _require(path: Path) -> Path:
        if not path.exists():
            raise pb_utils.TritonModelException(f"{path}: missing; run scripts/export.py")
        return path

    def _run_torch(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.network(torch.from_numpy(batch).to(self.device)).float().cpu().numpy()

    def _run_onnx(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: batch})[0]

    def execute(self, requests):
        # the dynamic batcher hands over several requests (Triton checked dtype and dims against config.pbtxt):
        # one forward pass for all of them
        arrays = [pb_utils.get_input_tensor_by_name(r, INPUT).as_numpy() for r in requests]
        probs = self.run(np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32))
        responses, start = [], 0
        for array in arrays:
            out = np.ascontiguousarray(probs[start:start + len(array)], dtype=np.float32)
            start += len(array)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, out)]))
        return responses

    def finalize(self):
        self.network = self.session = None
