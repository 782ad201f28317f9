"""Triton Python backend: a raw BraTS volume in, labels and uncertainty on the same grid out.

Inputs ``IMAGE`` float32 (4, X, Y, Z) (t1c, t1n, t2f, t2w; each edge <= ``max_volume_edge``) and
``SPACING`` float32 (3,) in mm. Outputs ``SEG`` uint8 (X, Y, Z) labels 0..3 and ``UNC`` float32 (X, Y, Z)
in [0, 1].

The work is ``custom.inference.segmenter.UncertaintySegmenter.predict`` (the bundle's inference path: plan-based
preprocessing, sliding window, regions to labels, cancer mask, paste-back) with a ``patch_fn`` that sends
each sliding-window batch by BLS to the patch model, whose dynamic batcher merges the patches of all
volumes in flight (one per instance of this model; see config.pbtxt). ``execute`` is async so that the
sliding window runs in a worker thread while its BLS calls are awaited on the stub's event loop (a batch
larger than the patch model's ``max_batch_size`` goes out as several concurrent BLS requests).
Bad requests get a ``TritonError`` response naming the problem; the model keeps serving.
"""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from custom.deploy.triton_protocol import MAX_VOLUME_EDGE
        from custom.deploy.triton_repository import PATCH_MODEL, read_model_parameters
        from custom.inference.segmenter import UncertaintySegmenter
        from custom.planning.plans import load_plans

        self.model_config = json.loads(args["model_config"])
        params = read_model_parameters(self.model_config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        plans_path, info_path = version_dir / "plans.json", version_dir / "model_info.json"
        for path in (plans_path, info_path):
            if not path.exists():
                raise pb_utils.TritonModelException(
                    f"{path}: missing; run scripts/export.py (or custom.deploy.triton_repository.prepare_model_repository)"
                )
        # written by prepare_model_repository from the checkpoint: 4 output channels or 3 (baseline)
        model_info = json.loads(info_path.read_text())
        self.patch_model = str(params.get("patch_model", PATCH_MODEL))
        self.patch_max_batch_size = int(params.get("patch_max_batch_size", 8))
        self.max_edge = int(params.get("max_volume_edge", MAX_VOLUME_EDGE))
        # no local network: every forward pass goes to the patch model
        self.segmenter = UncertaintySegmenter(
            None,
            load_plans(str(plans_path)),
            device="cpu",
            with_uncertainty=bool(model_info["with_uncertainty"]),
            mask_dilation=int(params.get("mask_dilation", 3)),
            overlap=float(params.get("overlap", 0.5)),
            sw_batch_size=int(params.get("sw_batch_size", 2)),
            tta=bool(params.get("tta", False)),
        )
        # requests reach an instance one at a time; the pool only moves the CPU work off the event loop
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="brats-volume")
        self.logger = pb_utils.Logger

    # -------------------------------------------------------------------------------------------- BLS
    async def _infer_patches(self, array: np.ndarray) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.patch_model,
            requested_output_names=["PROBS"],
            inputs=[pb_utils.Tensor("IMAGE", array)],
        )
        response = await request.async_exec()
        if response.has_error():
            raise RuntimeError(f"{self.patch_model}: {response.error().message()}")
        tensor = pb_utils.get_output_tensor_by_name(response, "PROBS")
        if tensor.is_cpu():
            return np.array(tensor.as_numpy(), copy=True)
        return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()  # a GPU output: copy to host

    def _patch_fn(self, loop):
        def patch_fn(batch):
            """(B, 4, p, p, p) torch -> (B, C, p, p, p) probabilities; called from a worker thread."""
            array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
            chunks = [array[i:i + self.patch_max_batch_size] for i in range(0, len(array), self.patch_max_batch_size)]
            futures = [asyncio.run_coroutine_threadsafe(self._infer_patches(c), loop) for c in chunks]
            probs = np.concatenate([f.result() for f in futures])
            return torch.from_numpy(probs).to(batch.device)

        return patch_fn

    # ------------------------------------------------------------------------------------------ execute
    def _predict(self, image, spacing, patch_fn):
        prediction = self.segmenter.predict(image, spacing, patch_fn=patch_fn)
        seg = np.ascontiguousarray(np.asarray(prediction.labels), dtype=np.uint8)
        unc = np.ascontiguousarray(np.asarray(prediction.unc), dtype=np.float32)
        return seg, unc

    async def _handle(self, request, loop):
        from custom.core.errors import BraTSInputError
        from custom.deploy.triton_protocol import validate_volume_request

        try:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            spacing = pb_utils.get_input_tensor_by_name(request, "SPACING")
            image, spacing = validate_volume_request(
                None if image is None else image.as_numpy(),
                None if spacing is None else spacing.as_numpy(),
                max_edge=self.max_edge,
                source=f"{request.request_id() or 'request'}",
            )
            seg, unc = await loop.run_in_executor(
                self.executor, self._predict, image, spacing.tolist(), self._patch_fn(loop)
            )
        except BraTSInputError as err:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
        except Exception as err:  # the server must keep serving: report, do not crash the stub
            self.logger.log_error(f"brats_unc_volume: {type(err).__name__}: {err}")
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(f"inference failed: {type(err).__name__}: {err}")
            )
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SEG", seg), pb_utils.Tensor("UNC", unc)])

    async def execute(self, requests):
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(self._handle(r, loop) for r in requests)))

    def finalize(self):
        self.executor.shutdown(wait=False, cancel_futures=True)
