"""Infer task calling the project's shared inference path directly (``UncertaintySegmenter`` via ``StudyPredictor``).

The same computation as ``lib.infers.bundle`` (which runs ``inference.json``); used with ``--conf infer_engine
shared`` and when no model exists at start-up (it also serves a model that appears later, e.g. after training).
The predictor keeps the last few predictions, so asking for several outputs of one study runs the network once.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from monai.transforms import EnsureChannelFirstd, LoadImaged
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from custom.data.nifti import spacing_from_affine
from lib.infers.predictor import StudyPredictor
from lib.infers.writer import write_intact
from lib.transforms import (
    DEFAULT_UNCERTAIN_THRESHOLD,
    OUTPUTS,
    CheckStudyd,
    check_threshold,
    IDENTITY,
    ErrorProbability,
    select_output,
)

logger = logging.getLogger(__name__)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class BraTSUncertaintyInfer(BasicInferTask):
    """Infer task over 4-channel BraTS studies through the shared ``StudyPredictor``.

    Args:
        predictor: the app's shared ``StudyPredictor``.
        output: one of ``lib.transforms.OUTPUTS``.
        labels: label name -> value of the returned label map (None for the float map).
        description: shown in the client.
        threshold: default ``uncertain_threshold`` (``uncertain_region`` output; a request may set its own).
        error_probability: ``ErrorProbability`` (calibrated from the app conf's ``calibration_path``, else the
            identity).
    """

    def __init__(self, predictor: StudyPredictor, output: str = "labels", labels: Optional[Dict[str, int]] = None,
                 description: str = "", threshold: float = DEFAULT_UNCERTAIN_THRESHOLD,
                 error_probability: ErrorProbability = IDENTITY):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.predictor = predictor
        self.output = output
        self.threshold = check_threshold(threshold)
        self.error_probability = error_probability
        super().__init__(
            path=str(predictor.model_path),
            network=None,
            # the float map is an overlay, not a segmentation a client should edit
            type=InferType.OTHERS if output == "uncertainty" else InferType.SEGMENTATION,
            labels=None if output == "uncertainty" else labels,
            dimension=3,
            description=description,
            config={"uncertain_threshold": self.threshold} if output == "uncertain_region" else None,
        )

    def is_valid(self) -> bool:
        return self.predictor.is_ready()

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        return [
            LoadImaged(keys="image", image_only=False),
            # (X, Y, Z, 4) on disk -> (4, X, Y, Z)
            EnsureChannelFirstd(keys="image"),
            CheckStudyd(keys="image"),
        ]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return []

    def run_inferer(self, data, convert_to_batch=True, device="cpu"):
        image = data[self.input_key]
        meta = data.get(f"{self.input_key}_meta_dict") or getattr(image, "meta", {}) or {}
        affine = meta.get("original_affine", meta.get("affine"))
        if affine is None and hasattr(image, "affine"):
            affine = image.affine
        affine = _numpy(affine).astype(np.float64)
        path = data.get("image_path") or meta.get("filename_or_obj")

        pred = self.predictor.predict(path, _numpy(image), affine, spacing_from_affine(affine))
        threshold = check_threshold(data.get("uncertain_threshold", self.threshold))
        out, result = select_output(self.output, pred.labels, pred.unc, pred.spacing, threshold,
                                    self.error_probability)
        data[self.output_label_key] = out
        # the writer takes the output affine from "<label>_meta_dict"
        data[f"{self.output_label_key}_meta_dict"] = {"affine": affine}
        result = {**(data.get(self.output_json_key) or {}), **result, "model_ts": self.predictor.model_ts()}
        data[self.output_json_key] = result
        return data

    def writer(self, data, extension=None, dtype=None):
        return write_intact(super().writer, data)
