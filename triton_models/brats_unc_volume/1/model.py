"""Triton Python backend: a raw BraTS volume in, labels and uncertainty on the same grid out.

Inputs ``IMAGE`` float32 (4, X, Y, Z) (t1c, t1n, t2f, t2w; each edge <= ``max_volume_edge``) and
``SPACING`` float32 (3,) in mm. Outputs ``SEG`` uint8 (X, Y, Z) labels 0..3 and ``UNC`` float32 (X, Y, Z)
in [0, 1].

The work is ``custom.inference.segmenter.UncertaintySegmenter.predict`` (the bundle's inference path: plan-based
preprocessing, sliding window, regions to labels, cancer mask, paste-back) with a ``patch_fn`` that sends
each sliding-window batch by BLS to the patch model (the exported network), whose dynamic batcher merges the
patches of all volumes in flight (one per instance of this model; see config.pbtxt). ``execute`` is async so that
the sliding window runs in a worker thread while its BLS calls are awaited on the stub's event loop.

At load, the patch model's artefact must be the file export wrote (sha256 in ``model_info.json``), whatever
backend serves it. Bounded work per request: the request contract (``validate_volume_request``: shape, dtype, finite values, edge
limit), the preprocessed-size cap (``max_preprocessed_voxels``, checked before resampling), a time budget
(``max_case_seconds``) and the client's cancellation, both checked before every BLS call.
Rejections are ``INVALID_ARG`` errors (HTTP 400, gRPC INVALID_ARGUMENT) naming the problem, counted in the
``brats_volume_rejected_total`` metric by reason; the model keeps serving.
"""

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

#: reasons counted in brats_volume_rejected_total
REJECT_REASONS = ("invalid_input", "time_budget", "cancelled")


class CaseAborted(Exception):
    """The request ran out of its time budget or the client cancelled it: stop before the next BLS call."""

    def __init__(self, message: str, reason: str, code):
        super().__init__(message)
        self.reason, self.code = reason, code


class TritonPythonModel:
    def initialize(self, args):
        from custom.deploy.triton_protocol import MAX_VOLUME_EDGE
        from custom.core.errors import BraTSInputError
        from custom.deploy.triton_repository import MODEL_INFO, check_served_artefact, read_model_parameters
        from custom.inference.segmenter import UncertaintySegmenter
        from custom.planning.plans import load_plans
        from custom.preprocessing.functional import MAX_PREPROCESSED_VOXELS

        self.model_config = json.loads(args["model_config"])
        params = read_model_parameters(self.model_config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        plans_path, info_path = version_dir / "plans.json", version_dir / MODEL_INFO
        for path in (plans_path, info_path):
            if not path.exists():
                raise pb_utils.TritonModelException(f"{path}: missing; run scripts/export.py")
        try:  # the patch model serves the file export checked (a native backend would load anything)
            check_served_artefact(Path(args["model_repository"]).parent)
        except BraTSInputError as err:
            raise pb_utils.TritonModelException(str(err)) from None
        # written by export from the checkpoint: 4 output channels or 3 (baseline)
        model_info = json.loads(info_path.read_text())
        self.max_edge = int(params.get("max_volume_edge", MAX_VOLUME_EDGE))
        self.max_case_seconds = float(params.get("max_case_seconds", 600))
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
            max_preprocessed_voxels=int(params.get("max_preprocessed_voxels", MAX_PREPROCESSED_VOXELS)),
        )
        self.channels = int(model_info["out_channels"])
        # requests reach an instance one at a time; the pool only moves the CPU work off the event loop
        self.executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="brats-volume")
        self.logger = pb_utils.Logger
        # kept referenced: a MetricFamily that is garbage-collected deletes its metrics
        self.metric_family = family = pb_utils.MetricFamily(
            name="brats_volume_rejected_total",
            description="brats_unc_volume requests refused (invalid input, time budget, cancelled by the client)",
            kind=pb_utils.MetricFamily.COUNTER,
        )
        labels = {"model": args["model_name"], "version": args["model_version"]}
        self.rejected = {r: family.Metric(labels={**labels, "reason": r}) for r in REJECT_REASONS}
        self._warm_up()

    def _warm_up(self):
        """The CPU path once on a small synthetic volume (lazy imports, scipy/MONAI first calls), with a local
        zero patch function: config.pbtxt's model_warmup cannot be used here, because its requests would call
        the patch model by BLS while the models are still loading."""
        image = np.zeros((4, 24, 24, 24), np.float32)
        image[:, 6:18, 6:18, 6:18] = 1.0

        def zeros(batch):
            return torch.zeros((batch.shape[0], self.channels, *batch.shape[2:]), dtype=batch.dtype)

        self.segmenter.predict(image, [1.0, 1.0, 1.0], patch_fn=zeros, name="warm-up")

    # -------------------------------------------------------------------------------------------- BLS
    async def _infer_patches(self, array: np.ndarray, request, deadline: float) -> np.ndarray:
        from custom.deploy.triton_repository import PATCH_INPUT, PATCH_MODEL, PATCH_OUTPUT

        if request.is_cancelled():
            raise CaseAborted("cancelled by the client", "cancelled", pb_utils.TritonError.CANCELLED)
        if time.monotonic() > deadline:
            raise CaseAborted(f"exceeded the time budget of {self.max_case_seconds:g} s per case (max_case_seconds)",
                              "time_budget", pb_utils.TritonError.UNAVAILABLE)
        bls = pb_utils.InferenceRequest(
            model_name=PATCH_MODEL,
            requested_output_names=[PATCH_OUTPUT],
            inputs=[pb_utils.Tensor(PATCH_INPUT, array)],
        )
        response = await bls.async_exec()
        if response.has_error():
            raise RuntimeError(f"{PATCH_MODEL}: {response.error().message()}")
        tensor = pb_utils.get_output_tensor_by_name(response, PATCH_OUTPUT)
        if tensor.is_cpu():
            return np.array(tensor.as_numpy(), copy=True)
        return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()  # a GPU output: copy to host

    def _patch_fn(self, loop, request, deadline: float):
        def patch_fn(batch):
            """(B, 4, p, p, p) torch -> (B, C, p, p, p) probabilities; called from a worker thread. B is at most
            sw_batch_size, which export checked against the patch model's max_batch_size."""
            array = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
            probs = asyncio.run_coroutine_threadsafe(self._infer_patches(array, request, deadline), loop).result()
            return torch.from_numpy(probs).to(batch.device)

        return patch_fn

    # ------------------------------------------------------------------------------------------ execute
    def _predict(self, image, spacing, patch_fn, name):
        prediction = self.segmenter.predict(image, spacing, patch_fn=patch_fn, name=name)
        seg = np.ascontiguousarray(np.asarray(prediction.labels), dtype=np.uint8)
        unc = np.ascontiguousarray(np.asarray(prediction.unc), dtype=np.float32)
        return seg, unc

    def _reject(self, message: str, reason: str, code):
        self.rejected[reason].increment(1)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    async def _handle(self, request, loop):
        from custom.core.errors import BraTSInputError
        from custom.deploy.triton_protocol import validate_volume_request

        deadline = time.monotonic() + self.max_case_seconds
        source = request.request_id() or "request"
        try:
            image = pb_utils.get_input_tensor_by_name(request, "IMAGE")
            spacing = pb_utils.get_input_tensor_by_name(request, "SPACING")
            image, spacing = validate_volume_request(
                None if image is None else image.as_numpy(),
                None if spacing is None else spacing.as_numpy(),
                max_edge=self.max_edge,
                source=source,
            )
            seg, unc = await loop.run_in_executor(
                self.executor, self._predict, image, spacing.tolist(), self._patch_fn(loop, request, deadline), source
            )
        except BraTSInputError as err:
            return self._reject(str(err), "invalid_input", pb_utils.TritonError.INVALID_ARG)
        except CaseAborted as err:
            self.logger.log_warn(f"brats_unc_volume: {source}: {err}")
            return self._reject(f"{source}: {err}", err.reason, err.code)
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
