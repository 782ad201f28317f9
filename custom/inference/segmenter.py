"""THE inference path: raw BraTS volume in, labels + uncertainty map on the input grid out.

Bundle inference (``bundle/configs/inference.json``), Triton's volume model and the MONAI Label app all run
the functions below, so that the three give the same answer for the same checkpoint:

    preprocess_case (crop, z-score, resample; custom.preprocess)
      -> sliding window over the preprocessed volume (roi = plan patch, overlap 0.5, Gaussian sigma 1/8),
         averaging PROBABILITIES of every output channel (``PatchProbabilityNetwork``)
      -> optional mirroring TTA (all 8 flip combinations of the 3 spatial axes, averaged)
      -> cancer mask (predicted WT dilated by ``mask_dilation`` voxels) on the full preprocessed volume,
         multiplied into ``unc_output``
      -> restore_original_grid (linear for probabilities and unc) -> regions_to_labels (order 2, 1, 3)

``UncertaintyInferer`` (sliding window + TTA) and ``UncertaintyPostprocessd`` (mask, paste back, labels)
are the thin MONAI wrappers the bundle config declares; ``UncertaintySegmenter`` chains the same objects.
A folder of cases runs through :class:`custom.inference.engine.CaseFolderEvaluator` (the bundle's ``evaluator``),
one :meth:`UncertaintySegmenter.predict_case_folder` per case.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from custom.core.cli import as_bool
from custom.core.constants import MODALITIES, NUM_REGIONS
from custom.core.errors import BraTSInputError
from custom.core.layout import ERROR_PROBABILITY_SUFFIX, prediction_map_path, remove_predictions
from custom.data.cases import find_case_files
from custom.data.nifti import load_case, save_prediction
from custom.evaluation.calibration import IsotonicCalibrator
from custom.evaluation.self_assessment import error_probability_map
from custom.inference.folders import case_summary
from custom.inference.inferer import UncertaintyInferer
from custom.inference.postprocess import Prediction, postprocess_probabilities
from custom.model.checkpoints import load_network, resolve_plans_path
from custom.planning.plans import load_plans
from custom.preprocessing.functional import MAX_PREPROCESSED_VOXELS, preprocess_case
from custom.uncertainty.baselines import PatchFn, probability_patch_fn

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- segmenter
def _check_image(image: np.ndarray, spacing) -> tuple[np.ndarray, tuple[float, float, float]]:
    image = np.asarray(image)
    if image.ndim != 4 or image.shape[0] != len(MODALITIES):
        raise BraTSInputError(f"image must be ({len(MODALITIES)}, X, Y, Z) in {MODALITIES} order, "
                              f"got shape {image.shape}", header="invalid input volume")
    if min(image.shape[1:]) < 1:
        raise BraTSInputError(f"image has an empty spatial shape {image.shape[1:]}", header="invalid input volume")
    if spacing is None or len(tuple(spacing)) != 3:
        raise BraTSInputError(f"spacing must be three voxel sizes in mm, got {spacing}", header="invalid input volume")
    spacing = tuple(float(s) for s in spacing)
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise BraTSInputError(f"spacing must be positive and finite, got {spacing}", header="invalid input volume")
    image = image.astype(np.float32, copy=False)
    if not np.isfinite(image).all():
        raise BraTSInputError("image contains NaN or infinite values", header="invalid input volume")
    return image, spacing


class UncertaintySegmenter:
    """The shared inference path (see module docstring).

    Args:
        network: the DynUNet from ``build_network`` with weights loaded (outputs logits).
        plans: ``Plans``, dict or path to plans.json (the training plan).
        device: where the network runs.
        with_uncertainty: whether the network has the 4th channel (checked against its output).
        mask_dilation: dilation (voxels) of the predicted WT that bounds the uncertainty map.
        overlap, sw_batch_size, tta: sliding-window settings (see ``UncertaintyInferer``).
        inferer: an ``UncertaintyInferer`` to use instead of building one (the bundle passes its ``inferer``).
        max_preprocessed_voxels: refuse a case whose resampled volume would exceed this (:func:`custom.preprocessing.functional.check_preprocessed_size`).
        calibration: an ``IsotonicCalibrator`` of ``unc_output`` (``scripts/evaluate_heldout.py`` writes
            ``calibration.json``; ``IsotonicCalibrator.load``): case folders then also get
            ``<case_id>-perror.nii.gz`` (calibrated P(error) of the WT label, 0 outside the reporting region) and
            their summary entry the predicted WT Dice (:func:`custom.evaluation.self_assessment.error_probability_map`).
    """

    def __init__(self, network: torch.nn.Module | None, plans, device="cpu", with_uncertainty: bool = True,
                 mask_dilation: int = 3, overlap: float = 0.5, sw_batch_size: int = 2, tta: bool = False,
                 inferer: UncertaintyInferer | None = None,
                 max_preprocessed_voxels: int = MAX_PREPROCESSED_VOXELS,
                 calibration: IsotonicCalibrator | None = None) -> None:

        self.plans = load_plans(plans)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval() if network is not None else None
        self.with_uncertainty = as_bool(with_uncertainty, "with_uncertainty")
        if int(mask_dilation) < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.mask_dilation = int(mask_dilation)
        if int(max_preprocessed_voxels) < 1:
            raise ValueError(f"max_preprocessed_voxels must be >= 1, got {max_preprocessed_voxels}")
        self.max_preprocessed_voxels = int(max_preprocessed_voxels)
        if calibration is not None and not self.with_uncertainty:
            # the calibration maps unc_output; this model's map would be var1shot, another scale
            raise BraTSInputError(["the calibration is fitted on unc_output, and this model has no uncertainty "
                                   "channel: drop --calibration_file"], header="cannot calibrate the map")
        self.calibration = calibration
        self.inferer = inferer if inferer is not None else UncertaintyInferer(
            self.plans.patch_size, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta)

    @classmethod
    def from_checkpoint(cls, checkpoint, plans=None, work_dir=None, device="cpu", **kw) -> "UncertaintySegmenter":
        """Build from a training checkpoint; the plan is ``plans`` if given, else found by ``resolve_plans_path``."""

        plans = load_plans(plans if plans is not None else resolve_plans_path(checkpoint, work_dir))
        network, with_uncertainty = load_network(checkpoint, plans, device=device)
        return cls(network, plans, device=device, with_uncertainty=with_uncertainty, **kw)

    def summary_info(self) -> dict:
        """What ``summary.json`` records about the model beyond the settings (the ensemble lists its members)."""
        if self.calibration is None:
            return {"calibrated": False}
        return {"calibrated": True, "calibration_cases": len(self.calibration.fitted_case_ids)}

    @property
    def out_channels(self) -> int:
        return NUM_REGIONS + 1 if self.with_uncertainty else NUM_REGIONS

    def predict_preprocessed(self, image_pp, patch_fn: PatchFn | None = None) -> np.ndarray:
        """Probabilities ``(C,X',Y',Z')`` float32 for a preprocessed volume ``(4,X',Y',Z')``.

        ``patch_fn(batch (B,4,p,p,p) float32) -> (B,C,p,p,p)`` probabilities; default: the local network.
        """
        if patch_fn is None:
            if self.network is None:
                raise ValueError("no network: pass a patch_fn or build the segmenter with a network")
            patch_fn = probability_patch_fn(self.network)
        x = torch.as_tensor(np.asarray(image_pp, dtype=np.float32) if not torch.is_tensor(image_pp) else image_pp)
        if x.ndim != 4 or x.shape[0] != len(MODALITIES):
            raise ValueError(f"image_pp must be ({len(MODALITIES)}, X', Y', Z'), got {tuple(x.shape)}")
        probs = self.inferer.predict_probabilities(x[None].to(self.device, torch.float32), patch_fn)[0]
        if probs.shape[0] != self.out_channels:
            raise ValueError(f"patch_fn returned {probs.shape[0]} channels, expected {self.out_channels}")
        return probs.cpu().numpy().astype(np.float32, copy=False)

    def postprocess(self, probs_pp, properties: Mapping) -> Prediction:
        return postprocess_probabilities(probs_pp, properties, self.mask_dilation)

    def predict(self, image, spacing, patch_fn: PatchFn | None = None, name: str = "image") -> Prediction:
        """``image (4,X,Y,Z)`` float32 in MODALITIES order, ``spacing`` (mm) -> ``Prediction`` on the same grid."""

        image, spacing = _check_image(image, spacing)
        t0 = time.perf_counter()
        image_pp, _, properties = preprocess_case(image, spacing, self.plans, name=name,
                                                  max_voxels=self.max_preprocessed_voxels)
        t1 = time.perf_counter()
        pred = self.predict_preprocessed_case(image_pp, properties, patch_fn)
        pred.info = {"preprocess_s": t1 - t0, **pred.info, "preprocessed_shape": list(image_pp.shape[1:])}
        return pred

    def predict_preprocessed_case(self, image_pp, properties: Mapping, patch_fn: PatchFn | None = None) -> Prediction:
        """A preprocessed case ``(4,X',Y',Z')`` and its ``preprocess_case`` properties -> ``Prediction`` on the
        original grid; ``info`` holds ``network_s`` and ``postprocess_s``."""
        t0 = time.perf_counter()
        probs_pp = self.predict_preprocessed(image_pp, patch_fn)
        t1 = time.perf_counter()
        pred = self.postprocess(probs_pp, properties)
        pred.info = {"network_s": t1 - t0, "postprocess_s": time.perf_counter() - t1}
        return pred

    def predict_case_folder(self, case_dir, out_dir) -> dict:
        """Predict one BraTS case folder; write ``<case_id>.nii.gz``, ``<case_id>-unc.nii.gz`` and the further maps
        of the prediction (``Prediction.maps``, e.g. ``<case_id>-ensvar.nii.gz``; ``<case_id>-perror.nii.gz`` with a
        calibration) as one unit
        (:func:`custom.data.nifti.save_prediction`).

        Returns the case's summary entry. On any error no output file of this case is left in ``out_dir``.
        """
        t0 = time.perf_counter()
        case = find_case_files(case_dir)
        case_id = case["case_id"]
        out_dir = Path(out_dir)
        try:
            image, affine, spacing, ref_header = load_case(case)
            pred = self.predict(image, spacing, name=case["image"][0])
            maps, calibrated = dict(pred.maps), {}
            if self.calibration is not None:
                p_error, dice = error_probability_map(pred.unc, pred.labels > 0, self.calibration)
                maps[ERROR_PROBABILITY_SUFFIX] = p_error
                calibrated = {"predicted_wt_dice": round(float(dice), 4)}
            label_path, unc_path = save_prediction(pred.labels, pred.unc, affine, ref_header, out_dir, case_id,
                                                   maps=maps)
            map_names = {suffix: prediction_map_path(out_dir, case_id, suffix).name for suffix in maps}
        except BaseException:
            remove_predictions(out_dir, case_id)
            raise
        entry = case_summary(pred.labels, pred.unc, spacing)
        entry.update({"case_id": case_id, "labels": label_path.name, "unc": unc_path.name, **map_names, **calibrated,
                      "unc_source": pred.unc_source, "shape": list(pred.labels.shape),
                      "spacing_mm": list(spacing), "time_s": round(time.perf_counter() - t0, 3)})
        return entry
