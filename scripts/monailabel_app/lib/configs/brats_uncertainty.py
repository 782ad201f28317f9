"""The one model of this app, as a MONAI Label ``TaskConfig``: its conf, infer tasks, trainer, scoring, strategies.

App conf (``--conf KEY VALUE``; relative paths are taken from the repository root):

    bundle_path          bundle directory (default ``<repo>/bundle``)
    model_path           checkpoint (``{"model": state_dict}`` or a plain state dict) with ``plans.json`` beside it
                         (default ``<bundle_path>/models/model.pt``)
    plans_path           explicit plans.json (default: beside ``model_path``)
    device               torch device for the shared engine and scoring (default: cuda if available, else cpu)
    tta                  mirroring test-time augmentation, true/false (default false)
    infer_engine         "bundle" (default): infer tasks are ``BundleInferTask``s on inference.json;
                         "shared": they call ``UncertaintySegmenter`` directly (same computation)
    uncertain_threshold  default error-probability threshold of the ``uncertain`` region (default 0.5)
    calibration_path     calibration.json of scripts/evaluate_heldout.py: the uncertain region and the predicted
                         Dice (scoring, ``most_uncertain``) use calibrated P(error) (default: none, the raw map)
    train_configs        extra bundle configs merged after train.json, comma separated (e.g. bundle/configs/tiny.json)
    prepare_args         JSON object of extra scripts/prepare_data.py arguments for training
    train_dir            where training writes its cases and work dir (default ``<app>/model/train``)
    max_upload_mb        largest request body accepted (default 512; see ``lib.security``)
    cors_origins         web origins allowed to call the server, comma separated (default: none)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError, CheckpointError, input_error_in
from custom.core.layout import REPO_ROOT
from lib.activelearning import MostUncertain
from lib.infers import BraTSBundleInferTask, BraTSUncertaintyInfer, StudyPredictor
from lib.labels import REVIEW_LABELS, TUMOUR_LABELS, UNCERTAIN_NAME
from lib.scoring import UncertaintyScoring
from lib.security import DEFAULT_MAX_UPLOAD_MB, check_cors_origins
from lib.trainers import BraTSBundleTrainTask
from lib.transforms import DEFAULT_UNCERTAIN_THRESHOLD, ErrorProbability, check_threshold

logger = logging.getLogger(__name__)

#: infer task name -> (output, description); the first is what Slicer runs on "Next Sample"
INFER_TASKS = {
    "segmentation": ("labels", "Label map: necrosis 1, edema 2, enhancing tumor 3 (volumes and uncertainty "
                               "summary in the JSON result)"),
    "uncertainty": ("uncertain_region", f"The label map with an '{UNCERTAIN_NAME}' region (4) where the error "
                                        f"probability is at least uncertain_threshold: decide those voxels"),
    "uncertainty_map": ("uncertainty", "Uncertainty map, float32 in [0, 1] in the study grid (0 away from the "
                                       "predicted tumour): a volume to overlay"),
}


def resolve(path) -> Path:
    """A conf path: relative ones are taken from the repository root (where the server command is run)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)


class BraTSUncertainty(TaskConfig):
    """Infer tasks ``segmentation``, ``uncertainty``, ``uncertainty_map``; train task ``segmentation`` (the
    bundle's train config); scoring ``uncertainty``; strategies ``most_uncertain`` and ``random``."""

    def init(self, name: str, model_dir: str, conf: Dict[str, str], planner: Any = None, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        self.bundle_path = resolve(conf.get("bundle_path", "bundle")).resolve()
        self.path = resolve(conf.get("model_path", str(self.bundle_path / "models" / "model.pt"))).resolve()
        self.labels = REVIEW_LABELS
        self.threshold = check_threshold(conf.get("uncertain_threshold", DEFAULT_UNCERTAIN_THRESHOLD))
        # P(error) and the predicted Dice: calibrated by evaluate_heldout's calibration.json when given
        calibration = conf.get("calibration_path")
        self.error_probability = ErrorProbability.from_file(resolve(calibration) if calibration else None)
        try:
            self.max_upload_mb = float(conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB))
        except ValueError:
            self.max_upload_mb = float("nan")
        if not self.max_upload_mb > 0:
            raise BraTSInputError([f"max_upload_mb must be positive, got {self.max_upload_mb}"],
                                  "invalid MONAI Label app conf")
        self.cors_origins = check_cors_origins(as_list(conf.get("cors_origins"), "conf cors_origins", cast=str) or [])
        self.engine = conf.get("infer_engine", "bundle")
        if self.engine not in ("bundle", "shared"):
            raise BraTSInputError([f"infer_engine must be 'bundle' or 'shared', got {self.engine!r}"],
                                  "invalid MONAI Label app conf")
        plans = conf.get("plans_path")
        self.predictor = StudyPredictor(
            self.path, plans_path=resolve(plans) if plans else None,
            device=conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"),
            tta=as_bool(conf.get("tta", "false"), "conf tta"), error_probability=self.error_probability,
        )
        self.train_dir = resolve(conf.get("train_dir", str(Path(model_dir) / "train")))
        if not self.path.exists():
            logger.warning(f"No model at {self.path}: infer tasks stay hidden until it exists (train first)")

    def infer(self) -> Union[InferTask, Dict[str, InferTask]]:
        infers: Dict[str, InferTask] = {}
        for name, (output, description) in INFER_TASKS.items():
            labels = TUMOUR_LABELS if output == "labels" else REVIEW_LABELS
            common = dict(output=output, labels=labels, description=description, threshold=self.threshold,
                          error_probability=self.error_probability)
            task = None
            if self.engine == "bundle" and self.path.exists():
                try:
                    task = BraTSBundleInferTask(self.bundle_path, self.path, conf=self.conf, **common)
                except RuntimeError as exc:  # the bundle config reads the model; MONAI wraps the loader's error
                    error = input_error_in(exc)
                    if not isinstance(error, CheckpointError):
                        raise
                    # the server still starts: every infer request is answered 503 with this reason until the
                    # model file is replaced (the shared engine reloads it when it changes)
                    logger.error(f"{error}\nServing '{name}' through the shared inference path, which refuses "
                                 f"the model the same way until it is replaced")
                else:
                    if not task.is_valid():
                        logger.warning(f"BundleInferTask on {self.bundle_path} is not usable; serving '{name}' "
                                       f"through the shared inference path instead")
                        task = None
            # the shared engine also serves a model that only appears after start-up (e.g. trained here)
            infers[name] = task or BraTSUncertaintyInfer(self.predictor, **common)
        return infers

    def trainer(self) -> Optional[TrainTask]:
        if not (self.bundle_path / "configs" / "train.json").exists():
            logger.warning(f"No train.json in {self.bundle_path / 'configs'}: training from MONAI Label disabled")
            return None
        extra = [str(resolve(c.strip())) for c in self.conf.get("train_configs", "").split(",") if c.strip()]
        return BraTSBundleTrainTask(
            str(self.bundle_path), self.conf, model_path=str(self.path), work_root=str(self.train_dir),
            extra_configs=extra, prepare_args=json.loads(self.conf.get("prepare_args", "{}")),
            repo_root=str(REPO_ROOT),
        )

    def strategy(self) -> Union[None, Strategy, Dict[str, Strategy]]:
        return {"most_uncertain": MostUncertain(), "random": Random()}

    def scoring_method(self) -> Union[None, ScoringMethod, Dict[str, ScoringMethod]]:
        return {"uncertainty": UncertaintyScoring(self.predictor)}
