"""The fold ensemble (nnU-Net's default prediction): every cross-validation fold's model on the same case.

Each member runs the shared inference path of :class:`custom.inference.segmenter.UncertaintySegmenter` (same plan,
same preprocessing, sliding window, optional mirroring TTA) and the members' sigmoid probabilities are averaged
channel by channel, as nnU-Net averages the folds' probabilities:

- the labels come from the mean region probabilities (regions -> labels, order 2, 1, 3);
- ``<case_id>-unc.nii.gz`` is the mean of the members' uncertainty heads (``unc_output``; var1shot of the mean
  when the members have no head), times the cancer mask of the ensemble's predicted WT;
- ``<case_id>-ensvar.nii.gz`` is the members' disagreement, a second uncertainty: 4 x the variance of p_WT
  across the members, clipped to [0, 1] (:func:`custom.uncertainty.baselines.mean_and_variance`, the scale of
  unc_output and var1shot), times the same cancer mask.

The members must be one cross-validation: the same plan, the same output channels, and the same training
settings apart from their folds (:func:`custom.core.run_config.config_differences` on the ``train_config.json``
beside each checkpoint). :func:`fold_checkpoints` finds them in a work directory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from custom.core.errors import BraTSInputError
from custom.core.layout import ENSEMBLE_VARIANCE_SUFFIX, FINAL_MODEL_NAME, MODEL_NAME, RunDir, WorkDir
from custom.core.run_config import FOLD_KEYS, config_differences, read_run_config
from custom.data.datalist import load_datalist
from custom.inference.postprocess import Prediction
from custom.inference.segmenter import UncertaintySegmenter
from custom.model.checkpoints import load_network, resolve_plans_path
from custom.planning.plans import load_plans
from custom.uncertainty.baselines import (
    PatchFn,
    ensemble_predictions,
    mean_and_variance,
    probability_patch_fn,
    with_uncertainty_channel,
)

logger = logging.getLogger(__name__)

_HEADER = "cannot build the fold ensemble"

#: the weights each run offers: nnU-Net ensembles the final ones (model_final.pt); model.pt is selected on the
#: fold's own validation cases
CHECKPOINT_NAMES = (FINAL_MODEL_NAME, MODEL_NAME)


def fold_checkpoints(work_dir, variant: str = "unc", folds=None, checkpoint_name: str = FINAL_MODEL_NAME) -> list[str]:
    """``W/runs/<variant>/fold<k>/<checkpoint_name>`` of every fold (default: every fold of ``W/datalist.json``).

    Raises:
        BraTSInputError: no work directory, an unknown checkpoint name, or a fold whose run is not finished or
            lacks the file (every such fold is named).
    """
    if work_dir in (None, ""):
        raise BraTSInputError("--work_dir is required to find the folds' checkpoints (or pass --checkpoints "
                              "\"['a/model_final.pt','b/model_final.pt']\")", header=_HEADER)
    if checkpoint_name not in CHECKPOINT_NAMES:
        raise BraTSInputError(f"--checkpoint_name must be one of {', '.join(CHECKPOINT_NAMES)}, "
                              f"got {checkpoint_name!r}", header=_HEADER)
    work = WorkDir(work_dir)
    if folds is None:
        if not work.datalist.is_file():
            raise BraTSInputError(f"{work.datalist}: missing; pass the work directory the folds were trained in",
                                  header=_HEADER)
        folds = list(range(int(load_datalist(work.datalist).get("num_folds", 0))))
    if isinstance(folds, (int, np.integer)):
        folds = [int(folds)]
    problems, paths = [], []
    for f in folds:
        run = work.run(variant, int(f))
        path = run.path / checkpoint_name
        if not run.is_finished():
            problems.append(f"{run.path}: not finished (no FINISHED marker); train it first "
                            "(scripts/cross_validate.py resumes it)")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        paths.append(str(path))
    if problems:
        raise BraTSInputError(problems, header=_HEADER)
    if not paths:
        raise BraTSInputError(f"no folds given for {work.runs / variant}", header=_HEADER)
    return paths


def ensemble_plans_path(checkpoints: Sequence, work_dir=None) -> Path:
    """The plan of the ensemble: the one beside its first member (:func:`check_members` checks the others)."""
    checkpoints = _as_paths(checkpoints)
    return resolve_plans_path(checkpoints[0], work_dir)


def _as_paths(checkpoints) -> list[Path]:
    if isinstance(checkpoints, (str, Path)) or not isinstance(checkpoints, Sequence) or not checkpoints:
        raise BraTSInputError(f"checkpoints must be a non-empty list of checkpoint files, got {checkpoints!r}",
                              header=_HEADER)
    paths = [Path(c) for c in checkpoints]
    resolved = [p.resolve() for p in paths]
    repeated = sorted({str(p) for p in paths if resolved.count(p.resolve()) > 1})
    if repeated:
        raise BraTSInputError([f"{p}: listed more than once" for p in repeated], header=_HEADER)
    return paths


def check_members(checkpoints: Sequence, plans, work_dir=None) -> list[str]:
    """Refuse members that are not one cross-validation; returns the warnings (members without a saved config).

    Every member's plan (beside it, else ``work_dir``'s) must equal ``plans``, and every member's
    ``train_config.json`` must equal the first member's on :data:`custom.core.run_config.RESULT_KEYS` apart from
    the fold's own (:data:`custom.core.run_config.FOLD_KEYS`).

    Raises:
        BraTSInputError: naming each member and each difference.
    """
    paths = _as_paths(checkpoints)
    want = load_plans(plans).to_dict()
    problems, warnings, first = [], [], None
    for p in paths:
        try:
            member_plans = load_plans(resolve_plans_path(p, work_dir)).to_dict()
        except BraTSInputError as exc:
            problems.extend(exc.problems)
            continue
        if member_plans != want:
            fields = sorted(k for k in set(member_plans) | set(want) if member_plans.get(k) != want.get(k))
            problems.append(f"{p}: trained with another plan than {paths[0]} (differs in {', '.join(fields)})")
        run = RunDir(p.parent)
        saved = read_run_config(run.train_config)
        if saved is None:
            warnings.append(f"{p}: no {run.train_config.name} beside it; its training settings are not checked")
            continue
        if first is None:
            first = (p, saved)
            continue
        differences = config_differences(saved, first[1], ignore=FOLD_KEYS)
        if differences:
            problems.append(f"{p}: trained with other settings than {first[0]}: {'; '.join(differences)}")
    if problems:
        raise BraTSInputError(problems, header=_HEADER)
    return warnings


class EnsembleSegmenter(UncertaintySegmenter):
    """The fold ensemble on the shared inference path (module docstring).

    Args:
        networks: the members (networks from ``build_network`` with weights loaded; logits out), >= 1.
        plans, device, mask_dilation, overlap, sw_batch_size, tta, inferer, max_preprocessed_voxels: as
            :class:`UncertaintySegmenter`; every member runs with them.
        with_uncertainty: whether the members have the uncertainty channel (all or none).
        members: names of the members (their checkpoint files) for ``summary.json``.
    """

    def __init__(self, networks: Sequence[torch.nn.Module], plans, device="cpu", with_uncertainty: bool = True,
                 members: Sequence[str] = (), **kw) -> None:
        if len(networks) < 1:
            raise ValueError("an ensemble needs at least one member")
        super().__init__(None, plans, device=device, with_uncertainty=with_uncertainty, **kw)
        self.networks = [n.to(self.device).eval() for n in networks]
        self.members = [str(m) for m in members] or [f"member {i}" for i in range(len(networks))]

    @classmethod
    def from_checkpoints(cls, checkpoints: Sequence, plans=None, work_dir=None, device="cpu",
                         **kw) -> "EnsembleSegmenter":
        """Load every checkpoint of one cross-validation (:func:`check_members`) with the plan beside the first
        (or ``plans``)."""
        paths = _as_paths(checkpoints)
        plans = load_plans(plans if plans is not None else ensemble_plans_path(paths, work_dir))
        for w in check_members(paths, plans, work_dir):
            logger.warning(w)
        loaded = [load_network(p, plans, device=device) for p in paths]
        channels = {str(p): unc for p, (_, unc) in zip(paths, loaded)}
        if len(set(channels.values())) > 1:
            raise BraTSInputError([f"{p}: {'with' if unc else 'without'} the uncertainty channel"
                                   for p, unc in channels.items()],
                                  header=f"{_HEADER}: the members must all have, or all lack, the uncertainty channel")
        return cls([n for n, _ in loaded], plans, device=device, with_uncertainty=loaded[0][1],
                   members=[str(p) for p in paths], **kw)

    def summary_info(self) -> dict:
        return {**super().summary_info(), "ensemble_members": self.members, "ensemble_map": ENSEMBLE_VARIANCE_SUFFIX}

    def member_probabilities(self, image_pp) -> list[torch.Tensor]:
        """Each member's probabilities ``(C,X',Y',Z')`` of a preprocessed volume (one sliding window each)."""
        predicts = [lambda x, net=net: torch.as_tensor(
            super(EnsembleSegmenter, self).predict_preprocessed(x, probability_patch_fn(net)))
            for net in self.networks]
        return list(ensemble_predictions(predicts, image_pp))

    def predict_preprocessed(self, image_pp, patch_fn: PatchFn | None = None) -> np.ndarray:
        """The members' mean probabilities ``(C,X',Y',Z')`` float32."""
        if patch_fn is not None:
            raise ValueError("an ensemble runs its own members; it takes no patch_fn")
        mean, _ = mean_and_variance(self.member_probabilities(image_pp))
        return mean.numpy().astype(np.float32, copy=False)

    def predict_preprocessed_case(self, image_pp, properties: Mapping, patch_fn: PatchFn | None = None) -> Prediction:
        """``Prediction`` of the mean probabilities, with the members' disagreement in ``maps["ensvar"]``."""
        if patch_fn is not None:
            raise ValueError("an ensemble runs its own members; it takes no patch_fn")
        t0 = time.perf_counter()
        mean, disagreement = mean_and_variance(self.member_probabilities(image_pp))
        t1 = time.perf_counter()
        pred = self.postprocess(mean, properties)
        # the disagreement in the uncertainty slot: the same cancer mask and paste-back as unc_output
        pred.maps[ENSEMBLE_VARIANCE_SUFFIX] = self.postprocess(with_uncertainty_channel(mean, disagreement),
                                                               properties).unc
        pred.info = {"network_s": t1 - t0, "postprocess_s": time.perf_counter() - t1,
                     "members": len(self.networks)}
        return pred
