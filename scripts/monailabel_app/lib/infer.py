"""MONAI Label infer tasks: the label map ("segmentation") and the uncertainty map ("uncertainty").

Both run the project's shared inference path through ``lib.predictor.StudyPredictor`` (preprocessing from
the plan, sliding window, regions -> labels, masked ``unc_output``, restore to the original grid), so the
results are already in the study's grid: no ``Restored`` post-transform (it would resize the float map
with nearest neighbour) and no ``result_dtype`` (a single-channel float32 map is returned intact).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from monai.transforms import EnsureChannelFirstd, LoadImaged, MapTransform

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask

from lib.predictor import StudyPredictor
from lib.studies import check_study_array, voxel_spacing

logger = logging.getLogger(__name__)

#: what each task returns
OUTPUTS = ("labels", "uncertainty")


class CheckStudyd(MapTransform):
    """Check that ``data[key]`` is a 4-modality study ``(4, X, Y, Z)`` with finite values.

    Raises ``BraTSInputError`` naming the study file (``data["image_path"]``) otherwise.
    """

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            arr = d[key]
            values = arr.detach().cpu().numpy() if hasattr(arr, "detach") else np.asarray(arr)
            check_study_array(values, d.get("image_path", key), channel_dim=0)
        return d


class BraTSUncertaintyInfer(BasicInferTask):
    """Infer task over 4-channel BraTS studies.

    Args:
        predictor: the app's shared ``StudyPredictor``.
        output: ``"labels"`` -> uint8 label map (NCR=1, ED=2, ET=3); ``"uncertainty"`` -> float32 map in [0, 1].
        labels: label name -> value, from the bundle's metadata ``channel_def``.
        description: shown in the client.
    """

    def __init__(
        self,
        predictor: StudyPredictor,
        output: str = "labels",
        labels: Optional[Dict[str, int]] = None,
        description: str = "",
        **kwargs,
    ):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.predictor = predictor
        self.output = output
        super().__init__(
            path=str(predictor.model_path),
            network=None,
            # the uncertainty map is an overlay, not a segmentation a client should edit
            type=InferType.SEGMENTATION if output == "labels" else InferType.OTHERS,
            labels=labels if output == "labels" else None,
            dimension=3,
            description=description,
            **kwargs,
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
        affine = np.asarray(affine.detach().cpu().numpy() if hasattr(affine, "detach") else affine, dtype=np.float64)
        values = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        path = data.get("image_path") or meta.get("filename_or_obj")

        pred = self.predictor.predict(path, values, affine, voxel_spacing(affine))
        data[self.output_label_key] = pred.labels if self.output == "labels" else pred.unc
        # the writer takes the output affine from "<label>_meta_dict"
        data[f"{self.output_label_key}_meta_dict"] = {"affine": affine}
        result = dict(data.get(self.output_json_key) or {})
        result.update(pred.summary)
        result["output"] = self.output
        result["model_ts"] = self.predictor.model_ts()
        data[self.output_json_key] = result
        return data

    def writer(self, data, extension=None, dtype=None):
        # never send a result_dtype: labels stay uint8, the uncertainty stays float32
        data.pop("result_dtype", None)
        data["result_extension"] = data.get("result_extension") or ".nii.gz"
        return super().writer(data, extension=None, dtype=None)
