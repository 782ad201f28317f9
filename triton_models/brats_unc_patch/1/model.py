"""Triton Python backend: the network on batches of sliding-window patches.

IMAGE float32 (B, 4, P, P, P) -> PROBS float32 (B, C, P, P, P) = sigmoid of every network channel
(``custom.model.networks.PatchProbabilityNetwork``; C = 4 with the uncertainty channel, 3 for a baseline).
Needs ``model.pt`` (``{"model": state_dict}``) and ``plans.json`` beside this file (put there by
``scripts/export.py`` / ``custom.deploy.triton_repository.prepare_model_repository``).

Runs on ``cuda:<device_id>`` when Triton gives this instance a GPU (``KIND_GPU``/``KIND_AUTO`` with GPUs),
on CPU otherwise.
"""

import json
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from custom.model.checkpoints import load_network
        from custom.model.networks import PatchProbabilityNetwork
        from custom.planning.plans import load_plans

        self.model_config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        checkpoint, plans_path = version_dir / "model.pt", version_dir / "plans.json"
        for path in (checkpoint, plans_path):
            if not path.exists():
                raise pb_utils.TritonModelException(
                    f"{path}: missing; run scripts/export.py (or custom.deploy.triton_repository.prepare_model_repository)"
                )
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{int(args['model_instance_device_id'])}")
        else:
            self.device = torch.device("cpu")
        # the same loader as bundle inference: weights_only=True, output channels read from the checkpoint
        network, with_uncertainty = load_network(str(checkpoint), load_plans(str(plans_path)), device=self.device)
        self.network = PatchProbabilityNetwork(network).eval()
        pb_utils.Logger.log_info(
            f"brats_unc_patch: {checkpoint} on {self.device} ({'with' if with_uncertainty else 'without'} uncertainty)"
        )

    def execute(self, requests):
        # the dynamic batcher hands over several requests at once: one forward pass for all of them
        arrays, responses = [], [None] * len(requests)
        for i, request in enumerate(requests):
            array = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            if array.ndim != 5 or array.shape[1] != 4 or min(array.shape) < 1:
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"IMAGE must be (B, 4, P, P, P) with P >= 1, got {array.shape}")
                )
            else:
                arrays.append((i, array))
        # group by patch shape: requests of different shapes cannot share a batch
        groups = {}
        for i, array in arrays:
            groups.setdefault(array.shape[1:], []).append((i, array))
        for items in groups.values():
            batch = torch.from_numpy(np.concatenate([a for _, a in items])).to(self.device)
            with torch.inference_mode():
                probs = self.network(batch).float().cpu().numpy()
            start = 0
            for i, array in items:
                out = np.ascontiguousarray(probs[start:start + array.shape[0]])
                start += array.shape[0]
                responses[i] = pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PROBS", out)])
        return responses

    def finalize(self):
        self.network = None
