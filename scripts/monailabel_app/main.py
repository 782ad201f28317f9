"""MONAI Label app: BraTS segmentation with its uncertainty, and uncertainty-driven review order.

Start (from the repository root; no network access is needed or made)::

    .venv/bin/python -m monailabel.main start_server --app scripts/monailabel_app --studies STUDIES \
        --host 127.0.0.1 --port 8000 [--conf model_path bundle/models/model.pt]

Studies are 4-channel NIfTI files ``(X, Y, Z, 4)`` (t1c, t1n, t2f, t2w), made from BraTS case folders with
``scripts/make_monailabel_studies.py``. See README.md beside this file.

App conf (``--conf KEY VALUE``):
    bundle_path     bundle directory (default: ``<repo>/bundle``)
    model_path      checkpoint ``{"model": state_dict}`` with ``plans.json`` beside it
                    (default: ``<bundle_path>/models/model.pt``)
    plans_path      explicit plans.json (default: beside ``model_path``)
    device          torch device for inference (default: cuda if available, else cpu)
    tta             mirroring test-time augmentation, true/false (default false; shared engine and scoring)
    infer_engine    "bundle" (default): infer tasks are MONAI Label BundleInferTasks on inference.json;
                    "shared": they call custom.inference.segmenter.UncertaintySegmenter directly (same computation)
    train_configs   extra bundle configs merged after train.json, comma separated (e.g. bundle/configs/tiny.json)
    prepare_args    JSON object of extra scripts/prepare_data.py arguments for training
                    (e.g. '{"patch_size": "[32,32,32]", "filters": "[8,16,32,64]"}')
    train_dir       where training from MONAI Label writes its cases and work dir (default: <app>/model/train)
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Dict

import torch
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.random import Random

APP_DIR = Path(__file__).resolve().parent
REPO_ROOT = APP_DIR.parents[1]
for _p in (str(APP_DIR), str(REPO_ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from lib.infer import BraTSBundleInferTask, BraTSUncertaintyInfer  # noqa: E402
from lib.predictor import StudyPredictor  # noqa: E402
from lib.scoring import UncertaintyScoring  # noqa: E402
from lib.strategy import MostUncertain  # noqa: E402

from custom.core.cli import as_bool  # noqa: E402
from custom.core.constants import LABEL_NAMES  # noqa: E402
from custom.core.errors import BraTSInputError  # noqa: E402

logger = logging.getLogger(__name__)


def _resolve(path: str) -> Path:
    """Relative conf paths are taken from the repository root (where the server command is run)."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (REPO_ROOT / p)


def bundle_labels(bundle_path: Path) -> Dict[str, int]:
    """Label name -> value for the label map.

    Taken from an output ``channel_def`` of the bundle's metadata that names the BraTS labels (NCR, ED, ET),
    as ``BundleInferTask`` would read it; otherwise (e.g. a ``channel_def`` that describes the network's
    logit channels) from ``custom.core.constants.LABEL_NAMES``.
    """
    expected = {name: value for value, name in LABEL_NAMES.items() if value}
    meta_path = bundle_path / "configs" / "metadata.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        for out in meta.get("network_data_format", {}).get("outputs", {}).values():
            found = {str(v): int(k) for k, v in (out.get("channel_def") or {}).items()
                     if str(k).isdigit() and str(v) in expected}
            if found:
                if found != expected:
                    logger.warning(f"{meta_path}: channel_def labels {found} differ from {expected}; using them")
                return found
    return expected


class BraTSUncertaintyApp(MONAILabelApp):
    """Infer tasks ``segmentation`` and ``uncertainty``, scoring ``uncertainty``, strategy ``most_uncertain``,
    train task ``segmentation`` (the bundle's train config)."""

    def __init__(self, app_dir, studies, conf):
        conf = dict(conf or {})
        self.bundle_dir = _resolve(conf.get("bundle_path", "bundle")).resolve()
        self.model_path = _resolve(conf.get("model_path", str(self.bundle_dir / "models" / "model.pt"))).resolve()
        plans = conf.get("plans_path")
        device = conf.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        self.predictor = StudyPredictor(
            self.model_path, plans_path=_resolve(plans) if plans else None, device=device,
            tta=as_bool(conf.get("tta", "false"), "conf tta"),
        )
        self.label_map = bundle_labels(self.bundle_dir)
        if not self.model_path.exists():
            logger.warning(f"No model at {self.model_path}: infer tasks stay hidden until it exists (train first)")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="BraTS uncertainty-aware nnU-Net",
            description="Glioma sub-regions (NCR, ED, ET) with a per-voxel map of where the model is likely wrong",
            version="1.0",
            labels=self.label_map,
        )

    def init_infers(self) -> Dict[str, InferTask]:
        descriptions = {
            "labels": "Label map: NCR=1, ED=2, ET=3 (uncertainty summary and volumes in the JSON result)",
            "uncertainty": "Uncertainty map, float32 in [0, 1] in the study grid (0 away from the predicted tumour)",
        }
        names = {"labels": "segmentation", "uncertainty": "uncertainty"}
        infers: Dict[str, InferTask] = {}
        engine = self.conf.get("infer_engine", "bundle")
        if engine not in ("bundle", "shared"):
            raise ValueError(f"--conf infer_engine must be 'bundle' or 'shared', got {engine!r}")
        for output, name in names.items():
            task = None
            if engine == "bundle" and self.model_path.exists():
                task = BraTSBundleInferTask(self.bundle_dir, self.model_path, output=output, labels=self.label_map,
                                            conf=self.conf, description=descriptions[output])
                if not task.is_valid():
                    logger.warning(f"BundleInferTask on {self.bundle_dir} is not usable; serving '{name}' through "
                                   f"the shared inference path instead")
                    task = None
            if task is None:
                # also serves a model that only appears after start-up (e.g. trained from MONAI Label)
                task = BraTSUncertaintyInfer(self.predictor, output=output, labels=self.label_map,
                                             description=descriptions[output])
            infers[name] = task
        return infers

    def init_trainers(self) -> Dict[str, TrainTask]:
        if not (self.bundle_dir / "configs" / "train.json").exists():
            logger.warning(f"No train.json in {self.bundle_dir / 'configs'}: training from MONAI Label disabled")
            return {}
        from lib.trainer import BraTSBundleTrainTask

        extra = [str(_resolve(c.strip())) for c in self.conf.get("train_configs", "").split(",") if c.strip()]
        prepare_args = json.loads(self.conf.get("prepare_args", "{}"))
        work_root = _resolve(self.conf.get("train_dir", str(Path(self.app_dir) / "model" / "train")))
        return {
            "segmentation": BraTSBundleTrainTask(
                str(self.bundle_dir), self.conf, model_path=str(self.model_path), work_root=str(work_root),
                extra_configs=extra, prepare_args=prepare_args, repo_root=str(REPO_ROOT),
            )
        }

    def infer(self, request, datastore=None):
        """MONAI Label's infer, with a bad study answered as HTTP 422 naming the file (not a bare 500)."""
        try:
            return super().infer(request, datastore)
        except BraTSInputError as exc:
            from fastapi import HTTPException

            raise HTTPException(status_code=422, detail=str(exc)) from None

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return {"uncertainty": UncertaintyScoring(self.predictor)}

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"most_uncertain": MostUncertain(), "random": Random()}
