"""MONAI Label app: BraTS segmentation with its uncertainty, and uncertainty-driven review order.

Start (from the repository root; no network access is needed or made)::

    .venv/bin/python -m monailabel.main start_server --app scripts/monailabel_app --studies STUDIES \\
        --host 127.0.0.1 --port 8010 [--conf model_path bundle/models/model.pt]

Studies are 4-channel NIfTI files ``(X, Y, Z, 4)`` (t1c, t1n, t2f, t2w), made from BraTS case folders with
``scripts/make_monailabel_studies.py``. The app conf is described in ``lib/configs/brats_uncertainty.py``,
the usage in README.md beside this file. This module only wires ``lib`` into MONAI Label.
"""

from __future__ import annotations

import os
from typing import Dict

from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs import BraTSUncertainty
from lib.datastore import StudyDatastore
from lib.security import check_infer_request, check_strategy_request, secure_server


class BraTSUncertaintyApp(MONAILabelApp):
    """Infer tasks ``segmentation``, ``uncertainty`` and ``uncertainty_map``, train task ``segmentation``,
    scoring ``uncertainty``, strategies ``most_uncertain`` and ``random``."""

    def __init__(self, app_dir, studies, conf):
        self.model = BraTSUncertainty()
        self.model.init("segmentation", os.path.join(app_dir, "model"), dict(conf or {}))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="BraTS uncertainty-aware nnU-Net",
            description="Glioma sub-regions (necrosis, edema, enhancing tumor) with where the model is likely wrong",
            version="1.0",
            labels=self.model.labels,
        )
        secure_server(self.model.max_upload_mb, self.model.cors_origins)

    def init_datastore(self) -> Datastore:
        return StudyDatastore(self.studies, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                              read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def _load_sessions(self, load=False):
        # sessions keep arbitrary uploads (and unpack archives) outside the datastore: not used here
        return None

    def init_infers(self) -> Dict[str, InferTask]:
        return self.model.infer()

    def init_trainers(self) -> Dict[str, TrainTask]:
        trainer = self.model.trainer()
        return {self.model.name: trainer} if trainer else {}

    def init_strategies(self) -> Dict[str, Strategy]:
        return self.model.strategy()

    def init_scoring_methods(self) -> Dict[str, ScoringMethod]:
        return self.model.scoring_method()

    def infer(self, request, datastore=None):
        datastore = datastore or self.datastore()
        checked = check_infer_request(request, self._infers, datastore)
        result = super().infer(checked.request, datastore)
        if checked.save_label_tag and result.get("file"):  # batch inference: the result as a label, checked
            result["label"] = datastore.save_label(checked.image_id, result["file"], checked.save_label_tag,
                                                   {"model": checked.request["model"], "params": result["params"]})
            result["tag"] = checked.save_label_tag
        return result

    def next_sample(self, request):
        check_strategy_request(request, self._strategies)
        return super().next_sample(request)
