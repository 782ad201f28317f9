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
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import MapTransform

from custom.cli import as_bool
from custom.constants import MODALITIES, REGIONS, SEG_SUFFIX
from custom.errors import BraTSInputError
from custom.io_utils import atomic_save_nifti, atomic_write_json

logger = logging.getLogger(__name__)

PatchFn = Callable[[torch.Tensor], torch.Tensor]
#: spatial axes of a (B, C, X, Y, Z) batch that mirroring TTA flips
SPATIAL_AXES = (2, 3, 4)
NUM_REGIONS = len(REGIONS)


# ----------------------------------------------------------------------------------------- checkpoint + plan
def resolve_plans_path(checkpoint, work_dir=None) -> Path:
    """plans.json beside ``checkpoint`` (the plan travels with the model), else ``work_dir/plans.json``.

    Raises:
        BraTSInputError: neither exists (both places are named).
    """
    tried = []
    if checkpoint is not None:
        beside = Path(checkpoint).parent / "plans.json"
        if beside.is_file():
            return beside
        tried.append(str(beside))
    if work_dir not in (None, ""):
        in_work = Path(work_dir) / "plans.json"
        if in_work.is_file():
            return in_work
        tried.append(str(in_work))
    raise BraTSInputError(
        [f"no plans.json found (looked at: {', '.join(tried) or 'nothing: no checkpoint or work_dir given'}); "
         "keep the plans.json written by training beside the checkpoint, or pass --work_dir W"],
        header="cannot resolve the plan for inference")


def load_state_dict(checkpoint) -> dict:
    """The network weights of a training checkpoint (``{"model": state_dict}``, or a bare state dict).

    Raises:
        BraTSInputError: missing or unreadable file, or no state dict inside (the file is named).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise BraTSInputError(f"{path}: checkpoint file not found", header="cannot load the model")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types
        raise BraTSInputError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})",
                              header="cannot load the model") from None
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise BraTSInputError(f"{path}: no network state dict (expected {{'model': state_dict}})",
                              header="cannot load the model")
    return dict(state)


def checkpoint_out_channels(state: Mapping[str, torch.Tensor]) -> int:
    """Output channels of a DynUNet state dict (4 = regions + unc_output, 3 = segmentation only)."""
    keys = [k for k in state if k.endswith("output_block.conv.conv.weight")]
    if len(keys) != 1:
        raise BraTSInputError(f"checkpoint state dict has no unique DynUNet output block (found {keys})",
                              header="cannot load the model")
    return int(state[keys[0]].shape[0])


def checkpoint_has_uncertainty(checkpoint) -> bool:
    """True when the checkpoint's network has the 4th (uncertainty) output channel."""
    return checkpoint_out_channels(load_state_dict(checkpoint)) == NUM_REGIONS + 1


def load_weights(network: torch.nn.Module, checkpoint, device="cpu") -> torch.nn.Module:
    """Load ``checkpoint`` into ``network`` (strict), move it to ``device`` and set eval mode."""
    state = load_state_dict(checkpoint)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BraTSInputError(f"{checkpoint}: weights do not fit the network built from the plan ({exc})",
                              header="cannot load the model") from None
    return network.to(device).eval()


def load_network(checkpoint, plans, device="cpu", dropout=None) -> tuple[torch.nn.Module, bool]:
    """Build the network from the plan, with the output channels the checkpoint has, and load it.

    Returns:
        ``(network in eval mode on device, with_uncertainty)``.
    """
    from custom.networks import build_network

    with_uncertainty = checkpoint_out_channels(load_state_dict(checkpoint)) == NUM_REGIONS + 1
    network = build_network(plans, with_uncertainty=with_uncertainty, dropout=dropout)
    return load_weights(network, checkpoint, device), with_uncertainty


def probability_patch_fn(network: torch.nn.Module) -> PatchFn:
    """``patch (B,4,p,p,p) -> sigmoid(network(patch)) (B,C,p,p,p)`` (``PatchProbabilityNetwork``)."""
    from custom.networks import PatchProbabilityNetwork

    return PatchProbabilityNetwork(network)


def enable_mc_dropout(network: torch.nn.Module) -> torch.nn.Module:
    """Eval mode everywhere except dropout layers, which stay stochastic (MC dropout at inference)."""
    network.eval()
    n = 0
    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.train()
            n += 1
    if n == 0:
        raise ValueError("MC dropout needs a network with dropout layers (build_network(..., dropout=p))")
    return network


def mc_dropout_patch_fn(network: torch.nn.Module, num_samples: int = 10) -> PatchFn:
    """Mean sigmoid probability over ``num_samples`` stochastic passes (dropout on) per patch batch."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    enable_mc_dropout(network)
    prob = probability_patch_fn(network)

    def patch_fn(x: torch.Tensor) -> torch.Tensor:
        out = prob(x)
        for _ in range(num_samples - 1):
            out = out + prob(x)
        return out / num_samples

    return patch_fn


# ------------------------------------------------------------------------------------------------ inferer
def mirror_axes_combinations(tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations of the spatial axes: ``[()]`` without TTA, all 8 subsets of (2, 3, 4) with it."""
    if not tta:
        return [()]
    return [c for r in range(len(SPATIAL_AXES) + 1) for c in itertools.combinations(SPATIAL_AXES, r)]


class UncertaintyInferer(Inferer):
    """Sliding-window probabilities over a whole preprocessed volume, with optional mirroring TTA.

    ``inferer(inputs (B,4,X',Y',Z'), network)`` runs ``sigmoid(network(patch))`` on Gaussian-weighted
    patches (nnU-Net: overlap 0.5, sigma = patch/8) and returns averaged probabilities ``(B,C,X',Y',Z')``
    float32 (C = 4 with the uncertainty channel, 3 without). Probabilities, not logits, are averaged so
    that an external ``patch_fn`` (Triton BLS) and the local network are interchangeable.

    Args:
        roi_size: patch size of the plan ``(px, py, pz)``.
        overlap: fraction of overlap between neighbouring windows.
        sw_batch_size: patches per forward pass.
        tta: average over the 8 mirrorings of the spatial axes (8x the cost).
        sigma_scale: Gaussian sigma as a fraction of the patch size.
        sw_device: device the patches run on (default: the device of the inputs).
    """

    def __init__(self, roi_size: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 2, tta: bool = False,
                 sigma_scale: float = 0.125, sw_device=None) -> None:
        super().__init__()
        roi_size = [int(r) for r in roi_size]
        if len(roi_size) != 3 or min(roi_size) < 1:
            raise ValueError(f"roi_size must be three positive ints, got {roi_size}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.roi_size = tuple(roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.tta = as_bool(tta, "tta")
        self.sigma_scale = float(sigma_scale)
        self.sliding_window = SlidingWindowInferer(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, mode="gaussian",
            sigma_scale=self.sigma_scale, padding_mode="constant", cval=0.0, sw_device=sw_device)

    @property
    def passes_per_volume(self) -> int:
        """Sliding-window sweeps per volume (8 with TTA)."""
        return len(mirror_axes_combinations(self.tta))

    def predict_probabilities(self, inputs: torch.Tensor, patch_fn: PatchFn) -> torch.Tensor:
        """``inputs (B,4,X',Y',Z')`` -> averaged probabilities ``(B,C,X',Y',Z')``; ``patch_fn`` returns probabilities."""
        if inputs.ndim != 5:
            raise ValueError(f"inputs must be (B, C, X, Y, Z), got shape {tuple(inputs.shape)}")
        inputs = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        inputs = inputs.float()
        total = None
        with torch.no_grad():
            for axes in mirror_axes_combinations(self.tta):
                x = torch.flip(inputs, axes) if axes else inputs
                p = self.sliding_window(x, patch_fn)
                p = p.as_tensor() if hasattr(p, "as_tensor") else p
                p = torch.flip(p, axes) if axes else p
                total = p if total is None else total + p
        return total / self.passes_per_volume

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``network`` returns logits (as ``network_def`` does); sigmoid is applied per patch."""
        return self.predict_probabilities(inputs, probability_patch_fn(network))


# ------------------------------------------------------------------------------------------ postprocessing
@dataclass
class Prediction:
    """One case on its original grid.

    labels: uint8 ``(X,Y,Z)`` 0..3; unc: float32 ``(X,Y,Z)`` in [0, 1], zero outside the cancer mask;
    probs: float32 ``(3,X,Y,Z)`` region probabilities [WT, TC, ET]; unc_source: "unc_output" or, for a
    network without the uncertainty channel, "var1shot" (4 p_WT (1 - p_WT)).
    """

    labels: np.ndarray
    unc: np.ndarray
    probs: np.ndarray
    unc_source: str = "unc_output"
    info: dict = field(default_factory=dict)


def predicted_tumour(probs: torch.Tensor) -> torch.Tensor:
    """``(1, 1, …)`` probability that a voxel gets a tumour label: the max over the region channels.

    ``regions_to_labels`` labels a voxel as tumour when ANY region is > 0.5, so this, thresholded at 0.5, is
    exactly the predicted WT of the written labels (for a trained net with nested regions it is p_WT).
    """
    return probs[:NUM_REGIONS].amax(dim=0, keepdim=True)[None]


def masked_uncertainty(probs_pp: torch.Tensor, mask_dilation: int = 3) -> tuple[torch.Tensor, str]:
    """Uncertainty ``(X',Y',Z')`` on the preprocessed grid, times the cancer mask of the predicted WT.

    ``probs_pp`` is ``(C,X',Y',Z')``: channel 3 is ``unc_output`` when C == 4; with C == 3 (no uncertainty
    channel) the Bernoulli variance var1shot = 4 p_WT (1 - p_WT) stands in.
    """
    from custom.networks import get_cancer_mask

    mask = get_cancer_mask(predicted_tumour(probs_pp), dilation=int(mask_dilation))
    mask = torch.as_tensor(mask).reshape(probs_pp.shape[1:]).to(probs_pp.device, torch.float32)
    if probs_pp.shape[0] > NUM_REGIONS:
        return probs_pp[NUM_REGIONS] * mask, "unc_output"
    return 4.0 * probs_pp[0] * (1.0 - probs_pp[0]) * mask, "var1shot"


def postprocess_probabilities(probs_pp, properties: Mapping, mask_dilation: int = 3) -> Prediction:
    """Probabilities on the preprocessed grid -> ``Prediction`` on the original grid.

    Args:
        probs_pp: ``(C,X',Y',Z')`` probabilities (C = 4 or 3), torch or numpy.
        properties: the ``preprocess_case`` properties of the case (bbox, shapes, spacings).
        mask_dilation: voxels by which the predicted WT is dilated to form the cancer mask.

    The mask is applied on the full preprocessed volume (where the network's WT lives), the maps are pasted
    back with linear interpolation, and the mask is re-applied on the original grid from the restored
    labels, so that the written map is exactly zero outside the cancer mask also after resampling.
    """
    from custom.networks import get_cancer_mask
    from custom.preprocess import restore_original_grid
    from custom.transforms import regions_to_labels

    probs_pp = torch.as_tensor(np.asarray(probs_pp) if not torch.is_tensor(probs_pp) else probs_pp)
    probs_pp = (probs_pp.as_tensor() if hasattr(probs_pp, "as_tensor") else probs_pp).float()
    if probs_pp.ndim != 4 or probs_pp.shape[0] not in (NUM_REGIONS, NUM_REGIONS + 1):
        raise ValueError(f"probs_pp must be (3 or 4, X', Y', Z'), got shape {tuple(probs_pp.shape)}")
    unc_pp, unc_source = masked_uncertainty(probs_pp, mask_dilation)
    stacked = torch.cat([probs_pp[:NUM_REGIONS], unc_pp[None]]).cpu().numpy().astype(np.float32)
    restored = np.asarray(restore_original_grid(stacked, properties, order=1, fill=0.0), dtype=np.float32)
    probs = np.clip(restored[:NUM_REGIONS], 0.0, 1.0)
    labels = np.asarray(regions_to_labels(probs), dtype=np.uint8)
    mask = get_cancer_mask(predicted_tumour(torch.from_numpy(probs)), dilation=int(mask_dilation))
    mask = torch.as_tensor(mask).reshape(labels.shape).cpu().numpy().astype(bool)
    unc = np.where(mask, np.clip(restored[NUM_REGIONS], 0.0, 1.0), 0.0).astype(np.float32)
    return Prediction(labels=labels, unc=unc, probs=probs, unc_source=unc_source)


class UncertaintyPostprocessd(MapTransform):
    """Dict wrapper of ``postprocess_probabilities`` for the bundle's ``postprocessing``.

    Reads ``data[key]`` = probabilities ``(C,X',Y',Z')`` from ``UncertaintyInferer`` and
    ``data[properties_key]`` from ``BraTSPreprocessd``; writes ``data[key]`` = labels ``(1,X,Y,Z)`` uint8,
    ``data[unc_key]`` = ``(1,X,Y,Z)`` float32 and, if ``probs_key``, ``(3,X,Y,Z)`` region probabilities,
    all on the original grid (channel-first, as MONAI Label and SaveImaged expect).
    """

    def __init__(self, keys: KeysCollection = "pred", properties_key: str = "image_properties",
                 unc_key: str = "unc", probs_key: str | None = None, mask_dilation: int = 3,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.properties_key = properties_key
        self.unc_key = unc_key
        self.probs_key = probs_key
        self.mask_dilation = int(mask_dilation)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        if self.properties_key not in d:
            raise KeyError(f"UncertaintyPostprocessd needs '{self.properties_key}' (set by BraTSPreprocessd)")
        for key in self.key_iterator(d):
            probs = d[key]
            if probs.ndim == 5:  # a batch of one case (the bundle evaluator does not decollate)
                if probs.shape[0] != 1:
                    raise ValueError(f"UncertaintyPostprocessd handles one case at a time, got batch {probs.shape[0]}")
                probs = probs[0]
            pred = postprocess_probabilities(probs, d[self.properties_key], self.mask_dilation)
            d[key] = torch.from_numpy(pred.labels[None])
            d[self.unc_key] = torch.from_numpy(pred.unc[None])
            if self.probs_key:
                d[self.probs_key] = torch.from_numpy(pred.probs)
            d["unc_source"] = pred.unc_source
        return d


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
    """

    def __init__(self, network: torch.nn.Module | None, plans, device="cpu", with_uncertainty: bool = True,
                 mask_dilation: int = 3, overlap: float = 0.5, sw_batch_size: int = 2, tta: bool = False,
                 inferer: UncertaintyInferer | None = None) -> None:
        from custom.planning import load_plans

        self.plans = load_plans(plans)
        self.device = torch.device(device)
        self.network = network.to(self.device).eval() if network is not None else None
        self.with_uncertainty = bool(with_uncertainty)
        if int(mask_dilation) < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.mask_dilation = int(mask_dilation)
        self.inferer = inferer if inferer is not None else UncertaintyInferer(
            self.plans.patch_size, overlap=overlap, sw_batch_size=sw_batch_size, tta=tta)

    @classmethod
    def from_checkpoint(cls, checkpoint, plans=None, work_dir=None, device="cpu", **kw) -> "UncertaintySegmenter":
        """Build from a training checkpoint; the plan is ``plans`` if given, else found by ``resolve_plans_path``."""
        from custom.planning import load_plans

        plans = load_plans(plans if plans is not None else resolve_plans_path(checkpoint, work_dir))
        network, with_uncertainty = load_network(checkpoint, plans, device=device)
        return cls(network, plans, device=device, with_uncertainty=with_uncertainty, **kw)

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
        from custom.preprocess import preprocess_case

        image, spacing = _check_image(image, spacing)
        t0 = time.perf_counter()
        image_pp, _, properties = preprocess_case(image, spacing, self.plans, name=name)
        t1 = time.perf_counter()
        probs_pp = self.predict_preprocessed(image_pp, patch_fn)
        t2 = time.perf_counter()
        pred = self.postprocess(probs_pp, properties)
        t3 = time.perf_counter()
        pred.info = {"preprocess_s": t1 - t0, "network_s": t2 - t1, "postprocess_s": t3 - t2,
                     "preprocessed_shape": list(image_pp.shape[1:])}
        return pred

    def predict_case_folder(self, case_dir, out_dir) -> dict:
        """Predict one BraTS case folder; write ``<case_id>.nii.gz`` and ``<case_id>-unc.nii.gz`` atomically.

        Returns the case's summary entry. On any error no output file of this case is left in ``out_dir``.
        """
        t0 = time.perf_counter()
        case = find_case_files(case_dir)
        case_id = case["case_id"]
        out_dir = Path(out_dir)
        label_path, unc_path = output_paths(out_dir, case_id)
        try:
            image, affine, spacing, ref_header = load_case(case)
            pred = self.predict(image, spacing, name=case["image"][0])
            save_nifti(pred.labels, affine, ref_header, label_path)
            save_nifti(pred.unc, affine, ref_header, unc_path)
        except BaseException:
            remove_case_outputs(out_dir, case_id)
            raise
        entry = case_summary(pred.labels, pred.unc, spacing)
        entry.update({"case_id": case_id, "labels": label_path.name, "unc": unc_path.name,
                      "unc_source": pred.unc_source, "shape": list(pred.labels.shape),
                      "spacing_mm": list(spacing), "time_s": round(time.perf_counter() - t0, 3)})
        return entry

    def predict_folder(self, input_dir, output_dir, progress: bool = True, raise_on_failure: bool = True) -> dict:
        """Predict every case folder under ``input_dir``; writes outputs and ``output_dir/summary.json``.

        A failing case is reported (message naming it) and skipped; the others finish. With
        ``raise_on_failure`` a ``BraTSInputError`` listing every failed case is raised at the end.
        """
        from tqdm import tqdm

        output_dir = Path(output_dir)
        case_dirs = list_case_folders(input_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        summary = {"input_dir": str(Path(input_dir).resolve()), "tta": self.inferer.tta,
                   "mask_dilation": self.mask_dilation, "with_uncertainty": self.with_uncertainty,
                   "cases": {}, "failures": {}}
        bar = tqdm(case_dirs, desc="inference", unit="case", disable=not progress)
        for case_dir in bar:
            bar.set_postfix_str(case_dir.name)
            try:
                entry = self.predict_case_folder(case_dir, output_dir)
                summary["cases"][entry.pop("case_id")] = entry
            except Exception as exc:  # per-case isolation: one bad case must not stop the others
                msg = f"{case_dir.name}: {exc}"
                logger.error("case failed: %s", msg)
                tqdm.write(f"FAILED {msg}")
                summary["failures"][case_dir.name] = str(exc)
            atomic_write_json(output_dir / "summary.json", summary)
        if summary["failures"] and raise_on_failure:
            raise BraTSInputError(
                [f"{cid}: {msg}" for cid, msg in summary["failures"].items()],
                header=f"{len(summary['failures'])} of {len(case_dirs)} cases failed "
                       f"(no output written for them; the others are in {output_dir})")
        return summary


# ------------------------------------------------------------------------------------------- case folders
def output_paths(out_dir, case_id: str) -> tuple[Path, Path]:
    """``(OUT/<case_id>.nii.gz, OUT/<case_id>-unc.nii.gz)`` (BraTS submission name + uncertainty map)."""
    out_dir = Path(out_dir)
    return out_dir / f"{case_id}.nii.gz", out_dir / f"{case_id}-unc.nii.gz"


def remove_case_outputs(out_dir, case_id: str) -> None:
    """Remove both outputs of a case: a stale result beside a failure would be mistaken for a current one."""
    for p in output_paths(out_dir, case_id):
        if p.exists():
            p.unlink()


def list_case_folders(input_dir) -> list[Path]:
    """Case folders under ``input_dir`` (sorted); ``input_dir`` itself if it is one case folder."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise BraTSInputError(f"{input_dir}: input folder not found", header="cannot run inference")
    if any(input_dir.glob(f"*-{MODALITIES[0]}.nii*")):
        return [input_dir]
    cases = []
    for p in sorted(input_dir.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        if not any(p.glob("*.nii*")):  # not a case (e.g. an output or notes folder): a case has NIfTI files
            logger.warning("skipping %s: no NIfTI files inside", p)
            continue
        cases.append(p)
    if not cases:
        raise BraTSInputError(f"{input_dir}: no case folders inside (expected <case_id>/<case_id>-t1c.nii.gz ...)",
                              header="cannot run inference")
    return cases


def find_case_files(case_dir) -> dict:
    """``{"case_id", "image": [4 paths in MODALITIES order], "label": path or None}`` of a case folder.

    Files are ``<case_id>-<modality>.nii.gz`` (BraTS 2023); a missing one is a ``BraTSInputError`` naming it.
    """
    case_dir = Path(case_dir)
    case_id = case_dir.name
    images, missing = [], []
    for m in MODALITIES:
        candidates = [case_dir / f"{case_id}-{m}.nii.gz", case_dir / f"{case_id}-{m}.nii"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            missing.append(f"{candidates[0]}: missing {m} image")
        else:
            images.append(found[0])
    if missing:
        raise BraTSInputError(missing, header=f"case {case_id}: incomplete case folder")
    seg = case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz"
    return {"case_id": case_id, "image": [str(p) for p in images], "label": str(seg) if seg.is_file() else None}


def load_case(case: Mapping):
    """Validated arrays (``custom.data.load_case_arrays``) and the t1c header for the outputs."""
    import nibabel as nib

    from custom.data import load_case_arrays

    image, _, affine, spacing = load_case_arrays(case["image"], None)
    header = nib.load(case["image"][0]).header
    return image, np.asarray(affine, dtype=np.float64), tuple(float(s) for s in spacing), header


def save_nifti(array: np.ndarray, affine: np.ndarray, ref_header, path: Path) -> None:
    """Write ``array`` with the input's affine (sform and qform codes kept from the input)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_data_dtype(array.dtype)
    if ref_header is not None:
        sform_code = int(ref_header["sform_code"]) or 1
        qform_code = int(ref_header["qform_code"]) or 1
        img.set_sform(affine, code=sform_code)
        img.set_qform(affine, code=qform_code)
        img.header.set_xyzt_units(*ref_header.get_xyzt_units())
    atomic_save_nifti(img, path)


def case_summary(labels: np.ndarray, unc: np.ndarray, spacing) -> dict:
    """Tumour volumes per region (ml, from the voxel volume) and unc mean / 95th percentile inside predicted WT."""
    from custom.constants import REGION_LABELS

    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for region in REGIONS:
        out[f"volume_{region.lower()}_ml"] = round(float(np.isin(labels, REGION_LABELS[region]).sum()) * voxel_ml, 4)
    wt = labels > 0
    if wt.any():
        vals = unc[wt]
        out["unc_mean_wt"] = float(vals.mean())
        out["unc_p95_wt"] = float(np.percentile(vals, 95))
    else:  # no predicted tumour: nothing to average over
        out["unc_mean_wt"] = None
        out["unc_p95_wt"] = None
    return out


def case_datalist(input_dir) -> list[dict]:
    """``[{"case_id", "image": [4 paths]}]`` for the bundle's ``dataset`` (empty when no ``input_dir``)."""
    if input_dir in (None, ""):
        return []
    out = []
    for case_dir in list_case_folders(input_dir):
        case = find_case_files(case_dir)
        out.append({"case_id": case["case_id"], "image": case["image"]})
    return out


def single_case_collate(items: Sequence[Mapping]) -> dict:
    """Batch of one case for the bundle's ``evaluator``: image gets a batch axis, properties stay a plain dict
    (default collation would turn the crop box and shapes into tensors)."""
    if len(items) != 1:
        raise ValueError(f"the inference evaluator runs one case per batch, got {len(items)}")
    d = dict(items[0])
    d["image"] = d["image"][None]
    return d


def run_inference(segmenter: UncertaintySegmenter, input_dir, output_dir, progress: bool = True) -> dict:
    """Entry of the bundle's ``run``: validates the folders, then ``segmenter.predict_folder``."""
    if input_dir in (None, ""):
        raise BraTSInputError("--input_dir is required (a folder of BraTS case folders)",
                              header="cannot run inference")
    if output_dir in (None, ""):
        raise BraTSInputError("--output_dir is required", header="cannot run inference")
    t0 = time.perf_counter()
    summary = segmenter.predict_folder(input_dir, output_dir, progress=as_bool(progress, "progress"))
    logger.info("inference: %d cases in %.1f s -> %s", len(summary["cases"]), time.perf_counter() - t0,
                os.fspath(output_dir))
    return summary
