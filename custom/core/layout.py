"""Names on disk, owned here and nowhere else: the repository, the work directory and the run folders.

::

    <repository>/bundle/configs/*.json               bundle configs (CONFIG_DIR)
    <repository>/triton_models/                      Triton model repository (MODEL_REPOSITORY)
    W/                                               work directory (WorkDir), from scripts/prepare_data.py
      datalist.json  fingerprint.json  plans.json
      preprocessed/<case_id>_image.npy  <case_id>_seg.npy  <case_id>.json
      runs/<variant>/fold<k>/                        one training run (RunDir)
      runs/<variant>/fold<k>.log                     its log when cross_validate.py started it
    W/runs/<variant>/fold<k>/
      train_config.json  plans.json  metrics.csv  tb/
      checkpoint_last.pt  store/  store_snapshot/    resume state (checkpoint + EMA store snapshot)
      model.pt                                       best EMA pseudo-Dice (nnU-Net's checkpoint_best)
      model_final.pt  FINISHED                       written when the schedule completes
    OUT/ (inference)                                 <case_id>.nii.gz  <case_id>-unc.nii.gz  summary.json

The BraTS case-folder names (``<case_id>/<case_id>-<modality>.nii.gz``) are parsed in
:mod:`custom.data.cases`; the file name patterns they follow are here (:func:`case_file_name`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from custom.core.constants import MODALITIES, SEG_SUFFIX

#: the checkout this package lives in (bundle/, triton_models/ and scripts/ beside custom/)
REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLE_ROOT = REPO_ROOT / "bundle"
CONFIG_DIR = BUNDLE_ROOT / "configs"
MODEL_REPOSITORY = REPO_ROOT / "triton_models"

DATALIST_NAME = "datalist.json"
PLANS_NAME = "plans.json"
FINGERPRINT_NAME = "fingerprint.json"
PREPROCESSED_DIR = "preprocessed"
SUMMARY_NAME = "summary.json"
NIFTI_SUFFIX = ".nii.gz"
UNC_SUFFIX = "unc"

#: columns of ``metrics.csv``, exactly as bundle/docs/DESIGN.md lists them
METRICS_CSV_COLUMNS = (
    "epoch", "train_loss", "lr", "time_s", "val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean",
    "val_rmsd_unc", "val_corr_unc", "val_rmsd_variance_stable", "val_corr_variance_stable",
    "val_rmsd_var1shot", "val_corr_var1shot", "ema_pseudo_dice",
)

#: run states (:meth:`RunDir.state`)
RUN_FINISHED, RUN_RESUMABLE, RUN_FRESH = "finished", "resumable", "fresh"


def case_file_name(case_id: str, kind: str) -> str:
    """``<case_id>-<kind>.nii.gz`` for a modality (``t1c`` ...) or ``seg``."""
    if kind not in MODALITIES and kind != SEG_SUFFIX:
        raise ValueError(f"kind must be one of {MODALITIES + (SEG_SUFFIX,)}, got {kind!r}")
    return f"{case_id}-{kind}{NIFTI_SUFFIX}"


def prediction_paths(out_dir, case_id: str) -> tuple[Path, Path]:
    """``(OUT/<case_id>.nii.gz, OUT/<case_id>-unc.nii.gz)``: the BraTS submission name and the uncertainty map."""
    out_dir = Path(out_dir)
    return out_dir / f"{case_id}{NIFTI_SUFFIX}", out_dir / f"{case_id}-{UNC_SUFFIX}{NIFTI_SUFFIX}"


def is_temporary_name(name: str) -> bool:
    """True for the hidden names of unfinished atomic writes (``.stem.tmp-PID.ext``, :mod:`custom.core.atomic`)."""
    return name.startswith(".") and ".tmp-" in name


@dataclass(frozen=True)
class RunDir:
    """One training run ``W/runs/<variant>/fold<k>/`` and the files in it."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def train_config(self) -> Path:
        return self.path / "train_config.json"

    @property
    def plans(self) -> Path:
        return self.path / PLANS_NAME

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoint_last(self) -> Path:
        return self.path / "checkpoint_last.pt"

    @property
    def store(self) -> Path:
        return self.path / "store"

    @property
    def store_snapshot(self) -> Path:
        return self.path / "store_snapshot"

    @property
    def best_model(self) -> Path:
        """``model.pt``: the weights at the best EMA pseudo-Dice (nnU-Net's ``checkpoint_best``)."""
        return self.path / "model.pt"

    @property
    def final_model(self) -> Path:
        """``model_final.pt``: the weights after the last epoch (nnU-Net's ``checkpoint_final``)."""
        return self.path / "model_final.pt"

    @property
    def finished_marker(self) -> Path:
        return self.path / "FINISHED"

    @property
    def log(self) -> Path:
        """``fold<k>.log`` beside the run folder (cross_validate.py appends the run's output to it)."""
        return self.path.with_name(self.path.name + ".log")

    def is_finished(self) -> bool:
        return self.finished_marker.exists()

    def state(self) -> str:
        """:data:`RUN_FINISHED` (FINISHED marker), :data:`RUN_RESUMABLE` (``checkpoint_last.pt``, no marker)
        or :data:`RUN_FRESH`."""
        if self.is_finished():
            return RUN_FINISHED
        if self.checkpoint_last.is_file():
            return RUN_RESUMABLE
        return RUN_FRESH


@dataclass(frozen=True)
class WorkDir:
    """A prepared work directory ``W`` (scripts/prepare_data.py) and its training runs."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def datalist(self) -> Path:
        return self.path / DATALIST_NAME

    @property
    def plans(self) -> Path:
        return self.path / PLANS_NAME

    @property
    def fingerprint(self) -> Path:
        return self.path / FINGERPRINT_NAME

    @property
    def preprocessed(self) -> Path:
        return self.path / PREPROCESSED_DIR

    def preprocessed_paths(self, case_id: str) -> dict[str, str]:
        """``{"pp_image", "pp_label", "pp_properties"}`` of a case in the preprocessing cache (datalist keys)."""
        pp = self.preprocessed
        return {"pp_image": os.fspath(pp / f"{case_id}_image.npy"), "pp_label": os.fspath(pp / f"{case_id}_seg.npy"),
                "pp_properties": os.fspath(pp / f"{case_id}.json")}

    @property
    def runs(self) -> Path:
        return self.path / "runs"

    def run(self, variant: str, fold: int) -> RunDir:
        return RunDir(self.runs / str(variant) / f"fold{int(fold)}")

    def folds_of(self, variant: str) -> list[int]:
        """Fold numbers that have a run folder for ``variant`` (sorted)."""
        base = self.runs / str(variant)
        if not base.is_dir():
            return []
        return sorted(int(p.name[4:]) for p in base.glob("fold*") if p.is_dir() and p.name[4:].isdigit())
