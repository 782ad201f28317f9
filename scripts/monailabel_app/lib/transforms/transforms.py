"""What the infer tasks return, as transforms: study checks, the output picked from (labels, unc), the uncertain region.

Outputs (``OUTPUTS``), each in the study's grid:

- ``"labels"``: uint8 label map, 0 background, 1 NCR, 2 ED, 3 ET.
- ``"uncertain_region"``: the same label map with ``UNCERTAIN_VALUE`` (4) wherever the error probability
  the error probability (``ErrorProbability``) is at least the threshold: the voxels an annotator should decide, as a
  segment Slicer shows.
- ``"uncertainty"``: the float32 uncertainty map ``unc_output`` in [0, 1] (zero away from the dilated
  predicted tumour), a volume to overlay.

``ErrorProbability`` turns the raw ``unc_output`` into P(the segmentation is wrong here) and a study's
predicted whole-tumour Dice. With a calibration file (``scripts/evaluate_heldout.py`` writes
``calibration.json``: isotonic regression fitted on out-of-fold cases; app conf ``calibration_path``) it is the
calibrated map of ``custom.evaluation.self_assessment.error_probability_map``; without one it is the identity
(``unc_output`` is trained to regress the smoothed whole-tumour error rate, so it is on that scale, uncalibrated),
and the summary says ``predicted_dice_calibrated: false``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np
from monai.transforms import MapTransform

from custom.core.errors import BraTSInputError
from custom.data.nifti import spacing_from_affine
from custom.evaluation.calibration import IsotonicCalibrator
from custom.evaluation.self_assessment import error_probability_map, predicted_dice, reporting_region
from custom.data.studies import check_study_array
from custom.inference.folders import case_summary
from lib.labels import UNCERTAIN_VALUE

#: what an infer task returns (see module docstring)
OUTPUTS = ("labels", "uncertain_region", "uncertainty")
#: default threshold on the error probability above which a voxel is "uncertain"
DEFAULT_UNCERTAIN_THRESHOLD = 0.5


class ErrorProbability:
    """P(error) per voxel of a study and its predicted WT Dice, from the raw ``unc_output`` and the labels.

    Args:
        calibrator: an ``IsotonicCalibrator`` fitted on held-out cases (``ErrorProbability.from_file``), or None for
            the identity (the raw map read as a probability, uncalibrated).
    """

    def __init__(self, calibrator: Optional[IsotonicCalibrator] = None):
        self.calibrator = calibrator

    @classmethod
    def from_file(cls, path=None) -> "ErrorProbability":
        """The calibrated version from a ``calibration.json`` (``BraTSInputError`` naming a bad file); the
        identity when ``path`` is empty."""
        return cls(IsotonicCalibrator.load(path) if path else None)

    @property
    def calibrated(self) -> bool:
        return self.calibrator is not None

    def map_and_dice(self, unc: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
        """``(p_error float32 (X, Y, Z), predicted WT Dice)`` of ``unc`` and uint8 ``labels`` of one study.

        Calibrated: P(error) inside the reporting region (predicted WT dilated by 3 voxels), 0 outside. Identity:
        the clipped raw map everywhere; its predicted Dice is read in the same region.
        """
        unc = np.clip(np.asarray(unc, dtype=np.float32), 0.0, 1.0)
        seg_wt = np.asarray(labels) > 0
        if unc.shape != seg_wt.shape:
            raise RuntimeError(f"uncertainty map of shape {unc.shape} for labels of shape {seg_wt.shape}")
        if self.calibrator is not None:
            return error_probability_map(unc, seg_wt, self.calibrator)
        return unc, predicted_dice(unc, seg_wt, reporting_region(seg_wt))

    def __call__(self, unc: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.map_and_dice(unc, labels)[0]


#: the identity (uncalibrated) error probability, the default of every task
IDENTITY = ErrorProbability()


def check_threshold(value) -> float:
    """The uncertain-region threshold as a float in (0, 1]; ``BraTSInputError`` naming the value otherwise."""
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise BraTSInputError([f"uncertain_threshold must be a number in (0, 1], got {value!r}"],
                              "invalid infer request") from None
    if not (0.0 < threshold <= 1.0):
        raise BraTSInputError([f"uncertain_threshold must be in (0, 1], got {threshold}"], "invalid infer request")
    return threshold


def uncertain_region(labels: np.ndarray, unc: np.ndarray, threshold: float,
                     error_probability: Callable[[np.ndarray, np.ndarray], np.ndarray] = IDENTITY) -> np.ndarray:
    """``labels`` (uint8 ``(X, Y, Z)``) with ``UNCERTAIN_VALUE`` where ``error_probability(unc, labels) >= threshold``."""
    p = np.asarray(error_probability(unc, labels))
    if p.shape != labels.shape:
        raise RuntimeError(f"error_probability returned shape {p.shape} for an uncertainty map of shape {labels.shape}")
    out = np.asarray(labels, dtype=np.uint8).copy()
    out[p >= check_threshold(threshold)] = UNCERTAIN_VALUE
    return out


def prediction_summary(labels: np.ndarray, unc: np.ndarray, spacing,
                       error_probability: ErrorProbability = IDENTITY) -> dict:
    """Numbers an annotator reads next to the maps (the bundle's ``summary.json`` entry, plus the review score).

    Args:
        labels: uint8 ``(X, Y, Z)`` label map (0..3).
        unc: float32 ``(X, Y, Z)`` uncertainty in [0, 1].
        spacing: voxel size in mm.
        error_probability: gives the predicted Dice (calibrated or not).

    Returns:
        ``custom.inference.folders.case_summary`` (``volume_{wt,tc,et}_ml``, ``unc_mean_wt``, ``unc_p95_wt``; None
        without predicted tumour) plus ``mean_uncertainty_in_tumour`` (``unc_mean_wt``, 0.0 without predicted
        tumour), ``max_uncertainty``, ``tumour_voxels``, ``predicted_wt_dice`` (the review order: worst first;
        1.0 without predicted tumour, which the map cannot judge) and ``predicted_dice_calibrated``.
    """
    summary = case_summary(labels, unc, spacing)
    mean = summary.get("unc_mean_wt")
    summary["mean_uncertainty_in_tumour"] = float(mean) if mean is not None else 0.0
    summary["max_uncertainty"] = float(unc.max()) if unc.size else 0.0
    summary["tumour_voxels"] = int((labels > 0).sum())
    summary["predicted_wt_dice"] = float(error_probability.map_and_dice(unc, labels)[1])
    summary["predicted_dice_calibrated"] = bool(error_probability.calibrated)
    return summary


def select_output(output: str, labels: np.ndarray, unc: np.ndarray, spacing, threshold: float,
                  error_probability: ErrorProbability = IDENTITY) -> tuple[np.ndarray, dict]:
    """The array an infer task returns for ``output`` and its result JSON (``prediction_summary`` + extras).

    Args:
        output: one of ``OUTPUTS``.
        labels: uint8 ``(X, Y, Z)``; unc: float32 ``(X, Y, Z)`` in [0, 1]; spacing: mm.
        threshold, error_probability: the uncertain region (``uncertain_region`` output only).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    unc = np.clip(np.asarray(unc, dtype=np.float32), 0.0, 1.0)
    result = prediction_summary(labels, unc, spacing, error_probability)
    result["output"] = output
    if output == "labels":
        return np.asarray(labels, dtype=np.uint8), result
    if output == "uncertainty":
        return unc, result
    region = uncertain_region(labels, unc, threshold, error_probability)
    n = int((region == UNCERTAIN_VALUE).sum())
    result.update({"uncertain_threshold": float(threshold), "uncertain_voxels": n,
                   "uncertain_ml": round(n * float(np.prod(spacing)) / 1000.0, 4)})
    return region, result


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


class CheckStudyd(MapTransform):
    """Check that ``data[key]`` is a 4-modality study ``(4, X, Y, Z)`` with finite values.

    Raises ``BraTSInputError`` naming the study file (``data["image_path"]``) otherwise.
    """

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            check_study_array(_as_numpy(d[key]), d.get("image_path", key), channel_dim=0)
        return d


class BundleOutputd:
    """After the bundle's ``postprocessing``: choose the output, restore the study affine, add the summary.

    Reads ``data["pred"]`` (labels ``(1, X, Y, Z)`` uint8) and ``data["unc"]`` (``(1, X, Y, Z)`` float32) as
    ``UncertaintyPostprocessd`` leaves them, and the study affine from ``data["image_meta_dict"]`` (the
    bundle's ``BraTSPreprocessd`` replaces the image's own meta with the preprocessed grid's). Writes
    ``data["pred"]`` = the ``select_output`` array ``(X, Y, Z)``, ``data["pred_meta_dict"]["affine"]`` and the
    result numbers into ``data["result"]``. The threshold is the request's ``uncertain_threshold`` when given.
    """

    def __init__(self, output: str = "labels", pred_key: str = "pred", unc_key: str = "unc",
                 image_key: str = "image", result_key: str = "result", model_path=None,
                 threshold: float = DEFAULT_UNCERTAIN_THRESHOLD,
                 error_probability: ErrorProbability = IDENTITY):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.output, self.pred_key, self.unc_key = output, pred_key, unc_key
        self.image_key, self.result_key = image_key, result_key
        self.model_path = Path(model_path) if model_path else None
        self.threshold = check_threshold(threshold)
        self.error_probability = error_probability

    def __call__(self, data):
        d = dict(data)
        for key in (self.pred_key, self.unc_key, f"{self.image_key}_meta_dict"):
            if key not in d:
                raise KeyError(f"BundleOutputd needs '{key}' (from the bundle's postprocessing / LoadImaged)")
        labels = _as_numpy(d[self.pred_key])
        labels = labels.astype(np.uint8).reshape(labels.shape[-3:])
        unc = _as_numpy(d[self.unc_key]).astype(np.float32).reshape(labels.shape)
        meta = d[f"{self.image_key}_meta_dict"]
        affine = meta.get("original_affine")
        affine = _as_numpy(meta.get("affine") if affine is None else affine).astype(np.float64)
        threshold = check_threshold(d.get("uncertain_threshold", self.threshold))
        out, result = select_output(self.output, labels, unc, tuple(spacing_from_affine(affine)), threshold,
                                    self.error_probability)
        d[self.pred_key] = out
        d[f"{self.pred_key}_meta_dict"] = {"affine": affine}
        result = {**(d.get(self.result_key) or {}), **result}
        if self.model_path is not None and self.model_path.exists():
            # BasicInferTask reloads the network when this file time changes
            result["model_ts"] = int(self.model_path.stat().st_mtime)
        d[self.result_key] = result
        return d
