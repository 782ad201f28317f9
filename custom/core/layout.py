"""Names on disk, owned here and nowhere else: the repository, the work directory and the run folders.

::

    <repository>/bundle/configs/*.json               bundle configs (CONFIG_DIR)
    B/ (a MONAI bundle: bundle/ or a packaged one)   configs/{metadata,inference,train,...}.json  configs/logging.conf
                                                     models/model.pt (plain state dict)  models/model.ts  models/plans.json
                                                     docs/README.md  docs/data_license.txt  LICENSE  large_files.yml
                                                     custom/ scripts/ (a packaged bundle's code; BundleDir)
    <repository>/triton_models/                      Triton model repository (MODEL_REPOSITORY)
    W/                                               work directory (WorkDir), from scripts/prepare_data.py
      datalist.json  fingerprint.json  plans.json
      preprocessed/<case_id>_image.npy  <case_id>_seg.npy  <case_id>.json
      runs/<variant>/fold<k>/                        one training run (RunDir)
      runs/<variant>/fold<k>.log                     its log when cross_validate.py started it
      runs/<variant>/fold<k>.other_config-<n>/       a run of other settings set aside (cross_validate.py)
    W/runs/<variant>/fold<k>/
      train_config.json  plans.json  metrics.csv  tb/
      checkpoint_last.pt  store/  store_snapshot/    resume state (checkpoint + EMA store snapshot)
      model.pt                                       best EMA pseudo-Dice (nnU-Net's checkpoint_best)
      model_final.pt  FINISHED                       written when the schedule completes
      *.pt.sha256                                    SHA-256 of each checkpoint (sha256sum -c format)
    OUT/ (inference)                                 <case_id>.nii.gz  <case_id>-unc.nii.gz  summary.json
                                                     <case_id>-ensvar.nii.gz (fold ensemble: members' disagreement)
    SUBMISSION/ (scripts/make_submission.py)         <case_id>.nii.gz label maps only  (+ SUBMISSION.zip)
    R/ (report, held-out study; ReportDir)           report.md  table1.csv  table2.csv  tables.json
                                                     metrics_fold0_<N>_epochs.png  Comparison_models_6_views.png
                                                     heldout.json  heldout.md  heldout_per_case.csv
                                                     heldout_methods_per_case.csv  heldout/fold<k>/pred/

The BraTS case-folder names (``<case_id>/<case_id>-<modality>.nii.gz``) are parsed in
:mod:`custom.data.cases`; the file name patterns they follow are here (:func:`case_file_name`).

Two views of a run's state live here and nowhere else: :meth:`RunDir.state` (what the next training
command does with the folder: skip, resume or start) and :meth:`RunDir.status` (what a report may do
with it: average it, show it, or name it as missing).
"""

from __future__ import annotations

import os
import re
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
RUNS_DIR = "runs"
_FOLD_PREFIX = "fold"
SUMMARY_NAME = "summary.json"
NIFTI_SUFFIX = ".nii.gz"
UNC_SUFFIX = "unc"
#: the fold ensemble's disagreement map: 4 x variance of p_WT across the members (custom.inference.ensemble)
ENSEMBLE_VARIANCE_SUFFIX = "ensvar"
#: the float maps inference may write beside a case's label map, ``<case_id>-<suffix>.nii.gz``
#: ``<case_id>-perror.nii.gz``: calibrated P(error) of the WT label per voxel (inference with a calibration file)
ERROR_PROBABILITY_SUFFIX = "perror"
PREDICTION_MAP_SUFFIXES = (UNC_SUFFIX, ENSEMBLE_VARIANCE_SUFFIX, ERROR_PROBABILITY_SUFFIX)
#: the weights a run selects (best EMA pseudo-Dice); also the name the bundle ships (``bundle/models/model.pt``)
MODEL_NAME = "model.pt"
FINAL_MODEL_NAME = "model_final.pt"
CHECKPOINT_NAME = "checkpoint_last.pt"
FINISHED_NAME = "FINISHED"
METRICS_CSV_NAME = "metrics.csv"
TRAIN_CONFIG_NAME = "train_config.json"
CHECKSUM_SUFFIX = ".sha256"

#: columns of ``metrics.csv``, exactly as bundle/docs/DESIGN.md lists them
METRICS_CSV_COLUMNS = (
    "epoch", "train_loss", "lr", "time_s", "val_dice_wt", "val_dice_tc", "val_dice_et", "val_dice_mean",
    "val_rmsd_unc", "val_corr_unc", "val_rmsd_variance_stable", "val_corr_variance_stable",
    "val_rmsd_var1shot", "val_corr_var1shot", "ema_pseudo_dice",
)

#: training states (:meth:`RunDir.state`): skip it, resume it (``--resume true``), start it
RUN_FINISHED, RUN_RESUMABLE, RUN_FRESH = "finished", "resume", "fresh"
#: report statuses (:meth:`RunDir.status`): only RUN_FINISHED runs enter an average
RUN_UNFINISHED, RUN_MISSING = "unfinished", "missing"
#: a run whose train_config.json differs from the planned settings (custom.core.run_config): not skipped as done,
#: not resumed, not averaged
RUN_OTHER_CONFIG = "other_config"
_SET_ASIDE_INFIX = ".other_config-"


def case_file_name(case_id: str, kind: str) -> str:
    """``<case_id>-<kind>.nii.gz`` for a modality (``t1c`` ...) or ``seg``."""
    if kind not in MODALITIES and kind != SEG_SUFFIX:
        raise ValueError(f"kind must be one of {MODALITIES + (SEG_SUFFIX,)}, got {kind!r}")
    return f"{case_id}-{kind}{NIFTI_SUFFIX}"


def prediction_paths(out_dir, case_id: str) -> tuple[Path, Path]:
    """``(OUT/<case_id>.nii.gz, OUT/<case_id>-unc.nii.gz)``: the BraTS submission name and the uncertainty map."""
    out_dir = Path(out_dir)
    return out_dir / f"{case_id}{NIFTI_SUFFIX}", out_dir / f"{case_id}-{UNC_SUFFIX}{NIFTI_SUFFIX}"


def prediction_map_path(out_dir, case_id: str, suffix: str) -> Path:
    """``OUT/<case_id>-<suffix>.nii.gz`` for a map of :data:`PREDICTION_MAP_SUFFIXES` (``unc``, ``ensvar``,
    ``perror``)."""
    if suffix not in PREDICTION_MAP_SUFFIXES:
        raise ValueError(f"suffix must be one of {PREDICTION_MAP_SUFFIXES}, got {suffix!r}")
    return Path(out_dir) / f"{case_id}-{suffix}{NIFTI_SUFFIX}"


def label_prediction_case_id(name: str) -> str | None:
    """The case id of a label-map file name ``<case_id>.nii.gz``; None for anything else (a ``-unc``/``-ensvar``
    map, another extension, a hidden name: editors' files and the unfinished atomic writes a killed run leaves,
    ``.<id>.tmp-PID.nii.gz``)."""
    if not name.endswith(NIFTI_SUFFIX) or name.startswith("."):
        return None
    stem = name[: -len(NIFTI_SUFFIX)]
    if not stem or any(stem.endswith(f"-{s}") for s in PREDICTION_MAP_SUFFIXES):
        return None
    return stem


def remove_predictions(out_dir, case_id: str) -> None:
    """Remove every output of a case: a stale result beside a failure would be mistaken for a current one."""
    paths = [prediction_paths(out_dir, case_id)[0]] + [prediction_map_path(out_dir, case_id, s)
                                                        for s in PREDICTION_MAP_SUFFIXES]
    for p in paths:
        p.unlink(missing_ok=True)


def checksum_path(path) -> Path:
    """``<file>.sha256`` beside a checkpoint (``sha256sum -c`` format; :func:`custom.core.atomic.atomic_torch_save`)."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


#: ``.<stem>.tmp-<pid>[.<extension>]``: the name of a file an atomic write is still writing
_TEMPORARY_NAME = re.compile(r"^\.(?P<stem>[^.]*)\.tmp-(?P<pid>\d+)(?:\.|$)")


def temporary_path(path, pid: int | None = None) -> Path:
    """``dir/.name.tmp-PID.ext`` for ``path``, written by :mod:`custom.core.atomic` before the rename: hidden, per
    process, and with the full extension kept (nibabel and numpy choose the format, and numpy even the file name,
    from it)."""
    path = Path(path)
    stem, dot, extension = path.name.partition(".")
    return path.with_name(f".{stem}.tmp-{os.getpid() if pid is None else int(pid)}{dot}{extension}")


def is_temporary_name(name: str) -> bool:
    """True for the hidden names of unfinished atomic writes: files (:func:`temporary_path`) and the folders the
    store and its snapshots are copied through (``.<name with dots>.tmp-<pid or random>``)."""
    return name.startswith(".") and ".tmp-" in name


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files (:func:`temporary_path`) in ``folder`` whose writer is no longer running (a
    process killed mid-write leaves them). Returns the removed paths."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY_NAME.match(entry.name)
        if match and entry.is_file() and not _process_alive(int(match["pid"])):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def remove_unfinished_predictions(out_dir) -> list[Path]:
    """Clean an inference output folder before writing into it: stale temporary files and every map of
    :data:`PREDICTION_MAP_SUFFIXES` (``-unc``, ``-ensvar``) without its label map. A case's label map is written
    last (:func:`custom.data.nifti.save_prediction`), so a map alone is the remainder of an interrupted write.
    Returns the removed paths."""
    out_dir = Path(out_dir)
    removed = remove_stale_temporaries(out_dir)
    if out_dir.is_dir():
        for suffix in PREDICTION_MAP_SUFFIXES:
            ending = f"-{suffix}{NIFTI_SUFFIX}"
            for path in sorted(out_dir.glob(f"*{ending}")):
                if path.name.startswith("."):
                    continue
                label, _ = prediction_paths(out_dir, path.name[: -len(ending)])
                if not label.exists():
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


@dataclass(frozen=True)
class BundleDir:
    """A MONAI bundle folder and MONAI's names in it (the repository's ``bundle/`` or one that
    ``scripts/package_bundle.py`` wrote, which also holds its code: ``custom/`` and ``scripts/``)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def configs(self) -> Path:
        return self.path / "configs"

    def config(self, name: str) -> Path:
        """``configs/<name>.json`` (``metadata``, ``inference``, ``train``, ``tiny`` ...)."""
        return self.configs / f"{name}.json"

    @property
    def metadata(self) -> Path:
        return self.config("metadata")

    @property
    def logging_conf(self) -> Path:
        return self.configs / "logging.conf"

    @property
    def models(self) -> Path:
        return self.path / "models"

    @property
    def weights(self) -> Path:
        """``models/model.pt``: the released weights, a plain state dict."""
        return self.models / MODEL_NAME

    @property
    def torchscript(self) -> Path:
        return self.models / "model.ts"

    @property
    def plans(self) -> Path:
        """``models/plans.json``: the plan travels beside the weights (``resolve_plans_path``)."""
        return self.models / PLANS_NAME

    @property
    def docs(self) -> Path:
        return self.path / "docs"

    @property
    def readme(self) -> Path:
        return self.docs / "README.md"

    @property
    def data_license(self) -> Path:
        return self.docs / "data_license.txt"

    @property
    def license(self) -> Path:
        return self.path / "LICENSE"

    @property
    def large_files(self) -> Path:
        return self.path / "large_files.yml"

    @property
    def code(self) -> Path:
        """``custom/``: the package a packaged bundle carries (MONAI puts the bundle root on ``sys.path``)."""
        return self.path / "custom"

    @property
    def scripts(self) -> Path:
        return self.path / "scripts"


@dataclass(frozen=True)
class RunDir:
    """One training run ``W/runs/<variant>/fold<k>/`` and the files in it."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def train_config(self) -> Path:
        return self.path / TRAIN_CONFIG_NAME

    @property
    def plans(self) -> Path:
        return self.path / PLANS_NAME

    @property
    def metrics_csv(self) -> Path:
        return self.path / METRICS_CSV_NAME

    @property
    def tensorboard(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoint_last(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def store(self) -> Path:
        return self.path / "store"

    @property
    def store_snapshot(self) -> Path:
        return self.path / "store_snapshot"

    @property
    def store_snapshot_pending(self) -> Path:
        """The next snapshot while its checkpoint is being written (renamed to ``store_snapshot/`` after)."""
        return self.path / ".store_snapshot.pending"

    @property
    def store_snapshot_previous(self) -> Path:
        """The replaced snapshot during the rename of a pending one (removed after)."""
        return self.path / ".store_snapshot.previous"

    @property
    def best_model(self) -> Path:
        """``model.pt``: the weights at the best EMA pseudo-Dice (nnU-Net's ``checkpoint_best``)."""
        return self.path / MODEL_NAME

    @property
    def final_model(self) -> Path:
        """``model_final.pt``: the weights after the last epoch (nnU-Net's ``checkpoint_final``)."""
        return self.path / FINAL_MODEL_NAME

    @property
    def finished_marker(self) -> Path:
        return self.path / FINISHED_NAME

    @property
    def log(self) -> Path:
        """``fold<k>.log`` beside the run folder (cross_validate.py appends the run's output to it)."""
        return self.path.with_name(self.path.name + ".log")

    def is_finished(self) -> bool:
        return self.finished_marker.exists()

    def has_final_model(self) -> bool:
        """A finished run with ``model_final.pt``: what the held-out study and the ensemble use."""
        return self.is_finished() and self.final_model.is_file()

    def state(self) -> str:
        """What the next training command does: :data:`RUN_FINISHED` (FINISHED marker: skip),
        :data:`RUN_RESUMABLE` (``checkpoint_last.pt``, no marker: ``--resume true``) or :data:`RUN_FRESH`."""
        if self.is_finished():
            return RUN_FINISHED
        if self.checkpoint_last.is_file():
            return RUN_RESUMABLE
        return RUN_FRESH

    def set_aside(self) -> Path:
        """Rename the run folder to ``fold<k>.other_config-<n>`` (the first free ``n``), so a run of other settings
        is kept while its fold is trained anew; returns the new path."""
        n = 1
        while (target := self.path.with_name(f"{self.path.name}{_SET_ASIDE_INFIX}{n}")).exists():
            n += 1
        self.path.rename(target)
        return target

    def status(self) -> tuple[str, str]:
        """``(status, reason)`` for a report: :data:`RUN_FINISHED` (FINISHED marker and metrics.csv),
        :data:`RUN_UNFINISHED` (metrics.csv without FINISHED) or :data:`RUN_MISSING` (no metrics.csv);
        ``reason`` says why a run is not finished (empty when it is)."""
        if not self.path.is_dir():
            return RUN_MISSING, f"{self.path}: run folder does not exist"
        if not self.metrics_csv.is_file():
            return RUN_MISSING, f"{self.metrics_csv}: missing"
        if not self.is_finished():
            return RUN_UNFINISHED, f"{self.path}: no {FINISHED_NAME} marker (training interrupted or still running)"
        return RUN_FINISHED, ""


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
        return preprocessed_paths(self.preprocessed, case_id)

    @property
    def runs(self) -> Path:
        return self.path / RUNS_DIR

    def run(self, variant: str, fold: int) -> RunDir:
        return RunDir(self.runs / str(variant) / f"{_FOLD_PREFIX}{int(fold)}")

    def folds_of(self, variant: str) -> list[int]:
        """Fold numbers that have a run folder for ``variant`` (sorted)."""
        base = self.runs / str(variant)
        if not base.is_dir():
            return []
        n = len(_FOLD_PREFIX)
        return sorted(int(p.name[n:]) for p in base.glob(f"{_FOLD_PREFIX}*") if p.is_dir() and p.name[n:].isdigit())


def preprocessed_paths(pp_dir, case_id: str) -> dict[str, str]:
    """``{"pp_image", "pp_label", "pp_properties"}``: ``<case_id>_image.npy``, ``<case_id>_seg.npy`` and
    ``<case_id>.json`` in the cache folder ``pp_dir`` (``W/preprocessed``); the datalist keys of a case."""
    pp = Path(pp_dir)
    return {"pp_image": os.fspath(pp / f"{case_id}_image.npy"), "pp_label": os.fspath(pp / f"{case_id}_seg.npy"),
            "pp_properties": os.fspath(pp / f"{case_id}.json")}


@dataclass(frozen=True)
class ReportDir:
    """The report folder ``R`` that ``scripts/report.py`` and ``scripts/evaluate_heldout.py`` share."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def report(self) -> Path:
        return self.path / "report.md"

    @property
    def table1(self) -> Path:
        return self.path / "table1.csv"

    @property
    def table2(self) -> Path:
        return self.path / "table2.csv"

    @property
    def tables(self) -> Path:
        return self.path / "tables.json"

    def figure_metrics(self, num_epochs: int) -> Path:
        """Figure 1 of a fold-0 run with ``num_epochs`` epochs."""
        return self.path / f"metrics_fold0_{int(num_epochs)}_epochs.png"

    @property
    def figure_comparison(self) -> Path:
        """Figure 2 (the name of the paper's figure file)."""
        return self.path / "Comparison_models_6_views.png"

    @property
    def heldout(self) -> Path:
        return self.path / "heldout.json"

    @property
    def heldout_markdown(self) -> Path:
        return self.path / "heldout.md"

    @property
    def calibration(self) -> Path:
        """The deployable calibration of ``unc_output`` (fitted on every evaluated out-of-fold case) that inference
        reads to write ``<case_id>-perror.nii.gz`` and the predicted Dice."""
        return self.path / "calibration.json"

    @property
    def heldout_per_case(self) -> Path:
        return self.path / "heldout_per_case.csv"

    @property
    def heldout_methods_per_case(self) -> Path:
        return self.path / "heldout_methods_per_case.csv"

    def heldout_fold(self, fold: int) -> Path:
        """``R/heldout/fold<k>/``: the fold's evaluation (``per_case.csv``, ``summary.json``) and ``pred/``."""
        return self.path / "heldout" / f"{_FOLD_PREFIX}{int(fold)}"

    def heldout_predictions(self, fold: int) -> Path:
        """``R/heldout/fold<k>/pred/``: the final model's ``<case_id>.nii.gz`` and ``<case_id>-unc.nii.gz``."""
        return self.heldout_fold(fold) / "pred"
