"""MONAI Label infer tasks: the label map ("segmentation") and the uncertainty map ("uncertainty").

Two implementations of the same computation (the project's shared inference path: preprocessing from the
plan, sliding window, regions -> labels, masked ``unc_output``, restore to the original grid):

- ``BraTSBundleInferTask``: MONAI Label's ``BundleInferTask`` on the local bundle, running
  ``bundle/configs/inference.json``'s ``preprocessing``, ``inferer`` and ``postprocessing`` as they are;
  ``BundleOutputd`` then picks the label map or the uncertainty map and puts the study's affine on it.
  Used when a model exists when the server starts.
- ``BraTSUncertaintyInfer``: a ``BasicInferTask`` calling ``UncertaintySegmenter`` through the app's
  ``StudyPredictor`` (which scoring uses too); it also serves a model that appears after start-up.

The results are already in the study's grid: no ``Restored`` post-transform (it would resize the float map
with nearest neighbour) and no ``result_dtype`` (a single-channel float32 map is returned intact).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
from monai.transforms import EnsureChannelFirstd, LoadImaged, MapTransform
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.tasks.infer.bundle import BundleConstants, BundleInferTask

from lib.predictor import StudyPredictor, prediction_summary
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
        return _write_intact(super(), data)


def _write_intact(task_super, data):
    # never send a result_dtype: labels stay uint8, the uncertainty stays float32
    data.pop("result_dtype", None)
    data["result_extension"] = data.get("result_extension") or ".nii.gz"
    return task_super.writer(data, extension=None, dtype=None)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class BundleOutputd:
    """After the bundle's ``postprocessing``: choose the output, restore the study affine, add the summary.

    Reads ``data["pred"]`` (labels ``(1, X, Y, Z)`` uint8) and ``data["unc"]`` (``(1, X, Y, Z)`` float32) as
    ``UncertaintyPostprocessd`` leaves them, and the study affine from ``data["image_meta_dict"]`` (the
    bundle's ``BraTSPreprocessd`` replaces the image's own meta with the preprocessed grid's). Writes
    ``data["pred"]`` = labels or uncertainty ``(X, Y, Z)``, ``data["pred_meta_dict"]["affine"]`` and the
    ``prediction_summary`` numbers into ``data["result"]``.
    """

    def __init__(self, output: str = "labels", pred_key: str = "pred", unc_key: str = "unc",
                 image_key: str = "image", result_key: str = "result", model_path=None):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output, self.pred_key, self.unc_key = output, pred_key, unc_key
        self.image_key, self.result_key = image_key, result_key
        self.model_path = Path(model_path) if model_path else None

    def __call__(self, data):
        d = dict(data)
        for key in (self.pred_key, self.unc_key, f"{self.image_key}_meta_dict"):
            if key not in d:
                raise KeyError(f"BundleOutputd needs '{key}' (from the bundle's postprocessing / LoadImaged)")
        labels = _as_numpy(d[self.pred_key]).astype(np.uint8).reshape(_as_numpy(d[self.pred_key]).shape[-3:])
        unc = _as_numpy(d[self.unc_key]).astype(np.float32).reshape(labels.shape)
        meta = d[f"{self.image_key}_meta_dict"]
        affine = meta.get("original_affine")
        affine = meta.get("affine") if affine is None else affine
        affine = _as_numpy(affine).astype(np.float64)
        d[self.pred_key] = labels if self.output == "labels" else np.clip(unc, 0.0, 1.0)
        d[f"{self.pred_key}_meta_dict"] = {"affine": affine}
        result = dict(d.get(self.result_key) or {})
        result.update(prediction_summary(labels, unc, voxel_spacing(affine)))
        result["output"] = self.output
        if self.model_path is not None and self.model_path.exists():
            # BasicInferTask reloads the network when this file time changes
            result["model_ts"] = int(self.model_path.stat().st_mtime)
        d[self.result_key] = result
        return d


class _ModelPathConstants(BundleConstants):
    """Bundle constants whose model file is an absolute path (``os.path.join(bundle, "models", abs)`` is ``abs``)."""

    def __init__(self, model_path):
        self.model_path = str(Path(model_path).resolve())

    def model_pytorch(self) -> str:
        return self.model_path


class BraTSBundleInferTask(BundleInferTask):
    """``BundleInferTask`` on the local bundle's ``inference.json`` with the app's model path.

    Args:
        bundle_path: the bundle directory.
        model_path: checkpoint (``plans.json`` beside it); replaces the config's ``checkpoint``.
        output: ``"labels"`` or ``"uncertainty"`` (see ``BundleOutputd``).
        labels: label name -> value (the metadata's ``channel_def`` describes the network's logit channels).
        conf: the app conf.
        description: shown in the client.
    """

    def __init__(self, bundle_path, model_path, output: str = "labels", labels: Optional[Dict[str, int]] = None,
                 conf: Optional[dict] = None, description: str = ""):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.model_file = str(Path(model_path).resolve())
        self.output = output
        super().__init__(
            str(bundle_path), dict(conf or {}), const=_ModelPathConstants(model_path),
            type=InferType.SEGMENTATION if output == "labels" else InferType.OTHERS,
            add_post_restore=False, load_strict=True,
        )
        if not self.valid:
            return
        self.labels = labels if output == "labels" else None
        self.description = description or self.description
        self._config["model_filename"] = [Path(self.model_file).name]

    def _load_bundle_config(self, path, config):
        bundle_config = super()._load_bundle_config(path, config)
        bundle_config.config["checkpoint"] = self.model_file  # type: ignore
        return bundle_config

    def pre_transforms(self, data=None) -> Sequence[Callable]:
        pre = list(super().pre_transforms(data))
        at = next((i + 1 for i, t in enumerate(pre) if isinstance(t, EnsureChannelFirstd)), None)
        if at is None:
            raise RuntimeError(f"{self.bundle_config_path}: preprocessing has no EnsureChannelFirstd")
        # a wrong study must fail with its file named, before the bundle's preprocessing sees it
        return pre[:at] + [CheckStudyd(keys="image")] + pre[at:]

    def post_transforms(self, data=None) -> Sequence[Callable]:
        return list(super().post_transforms(data)) + [BundleOutputd(self.output, model_path=self.model_file)]

    def writer(self, data, extension=None, dtype=None):
        return _write_intact(super(), data)
