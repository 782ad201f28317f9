"""One shared predictor for the app: the project's inference path, loaded once, reloaded when the model changes.

Both infer tasks and the scoring method call ``StudyPredictor.predict``; it runs
``custom.inference.segmenter.UncertaintySegmenter.predict`` (the same computation as bundle inference and Triton)
and keeps the last few results, so that asking for the label map and then the uncertainty map of the same
study costs one forward pass, not two.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from custom.core.errors import BraTSInputError
from custom.data.nifti import spacing_from_affine
from custom.data.studies import load_study
from custom.inference.segmenter import UncertaintySegmenter
from lib.transforms import IDENTITY, ErrorProbability, prediction_summary

logger = logging.getLogger(__name__)


@dataclass
class StudyPrediction:
    """The model's answer for one study, in the study's own grid.

    Attributes:
        labels: uint8 ``(X, Y, Z)``, 0 background, 1 NCR, 2 ED, 3 ET.
        unc: float32 ``(X, Y, Z)`` in [0, 1], ``unc_output`` masked by the dilated predicted tumour.
        affine: ``(4, 4)`` affine of the study.
        spacing: voxel size in mm ``(sx, sy, sz)``.
        summary: JSON-ready numbers (see ``prediction_summary``).
    """

    labels: np.ndarray
    unc: np.ndarray
    affine: np.ndarray
    spacing: tuple
    summary: dict


class StudyPredictor:
    """Loads ``UncertaintySegmenter`` from ``model_path`` (plans.json beside it) and predicts studies.

    Args:
        model_path: checkpoint (``{"model": state_dict}`` or a plain state dict); ``plans.json`` must lie beside it
            (or be given as ``plans_path``).
        plans_path: optional explicit plans.json.
        device: torch device name.
        cache_size: how many recent study predictions to keep in memory.
        error_probability: gives each summary's predicted Dice (calibrated when the app has a calibration file).
        segmenter_kwargs: passed to ``UncertaintySegmenter.from_checkpoint`` (e.g. ``tta``, ``overlap``).
    """

    def __init__(self, model_path, plans_path=None, device: str = "cpu", cache_size: int = 2,
                 error_probability: ErrorProbability = IDENTITY, **segmenter_kwargs):
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        self.model_path = Path(model_path)
        self.plans_path = Path(plans_path) if plans_path else None
        self.device = device
        self.cache_size = cache_size
        self.segmenter_kwargs = segmenter_kwargs
        self.error_probability = error_probability
        self._segmenter = None
        self._segmenter_ts: Optional[float] = None
        self._cache: "OrderedDict[tuple, StudyPrediction]" = OrderedDict()
        self._lock = threading.RLock()

    def model_ts(self) -> int:
        """Modification time of the checkpoint (0 when missing): scores are stamped with it."""
        return int(os.stat(self.model_path).st_mtime) if self.model_path.exists() else 0

    def is_ready(self) -> bool:
        return self.model_path.exists()

    def segmenter(self):
        """The loaded ``UncertaintySegmenter``, reloaded when the checkpoint file changed (e.g. after training)."""
        with self._lock:
            if not self.model_path.exists():
                raise BraTSInputError(
                    [f"{self.model_path}: model checkpoint not found (train the bundle, then copy model.pt and "
                     f"plans.json there, or start the server with --conf model_path PATH)"],
                    "no model for MONAI Label",
                )
            ts = os.stat(self.model_path).st_mtime
            if self._segmenter is None or ts != self._segmenter_ts:
                logger.info(f"Loading {self.model_path} (plans: {self.plans_path or 'beside the checkpoint'})")
                kwargs = dict(self.segmenter_kwargs)
                if self.plans_path is not None:
                    kwargs["plans"] = str(self.plans_path)
                self._segmenter = UncertaintySegmenter.from_checkpoint(
                    str(self.model_path), device=self.device, **kwargs
                )
                self._segmenter_ts = ts
                self._cache.clear()
            return self._segmenter

    def predict(self, image_path, image: np.ndarray, affine, spacing=None) -> StudyPrediction:
        """Predict one study.

        Args:
            image_path: the study file (cache key, named in errors).
            image: ``(4, X, Y, Z)`` float32 in MODALITIES order.
            affine: ``(4, 4)`` affine of the study.
            spacing: voxel size in mm; derived from ``affine`` when None.
        """
        image = np.asarray(image, dtype=np.float32)
        affine = np.asarray(affine, dtype=np.float64)
        spacing = tuple(float(s) for s in (spacing if spacing is not None else spacing_from_affine(affine)))
        with self._lock:
            segmenter = self.segmenter()
            path = Path(image_path)
            key = (str(path.resolve()), path.stat().st_mtime if path.exists() else 0.0, self._segmenter_ts,
                   tuple(image.shape))
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
            pred = segmenter.predict(image, spacing)
            labels = np.asarray(pred.labels, dtype=np.uint8)
            unc = np.clip(np.asarray(pred.unc, dtype=np.float32), 0.0, 1.0)
            if labels.shape != image.shape[1:] or unc.shape != image.shape[1:]:
                raise RuntimeError(
                    f"{image_path}: inference returned labels {labels.shape} / unc {unc.shape} for a study of "
                    f"spatial shape {image.shape[1:]}"
                )
            result = StudyPrediction(labels, unc, affine, spacing, prediction_summary(labels, unc, spacing,
                                                                                self.error_probability))
            if self.cache_size:
                self._cache[key] = result
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
            return result

    def predict_file(self, image_path) -> StudyPrediction:
        """Read a study file (``custom.data.studies.load_study``) and predict it."""
        image, affine, spacing = load_study(image_path)
        return self.predict(image_path, image, affine, spacing)

    def clear(self) -> None:
        with self._lock:
            self._segmenter = None
            self._segmenter_ts = None
            self._cache.clear()
