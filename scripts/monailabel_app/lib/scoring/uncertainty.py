"""Scoring method: the model's own judgement of each unlabeled study, stored in the datastore.

For every unlabeled study the shared predictor runs once; the predicted whole-tumour Dice (from calibrated
P(error) when the app has a calibration file) is stored in the study's image info under ``PRED_DICE_KEY``, with
the mean ``unc_output`` inside the predicted tumour (``UNC_SCORE_KEY``), stamped with the model file's
modification time, so that a later scoring pass skips studies already scored by the same model.
"""

from __future__ import annotations

import logging
import time

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from custom.core.errors import BraTSInputError
from lib.infers.predictor import StudyPredictor

logger = logging.getLogger(__name__)

#: image-info keys written by the scoring method and read by the strategy
PRED_DICE_KEY = "predicted_wt_dice"
UNC_SCORE_KEY = "unc_mean_in_tumour"
UNC_TS_KEY = "unc_model_ts"
UNC_SUMMARY_KEY = "unc_summary"


class UncertaintyScoring(ScoringMethod):
    """Store each unlabeled study's predicted WT Dice (``PRED_DICE_KEY``) and mean uncertainty in the datastore.

    Args:
        predictor: the app's shared ``StudyPredictor``.
    """

    def __init__(self, predictor: StudyPredictor):
        super().__init__("Predicted whole-tumour Dice (from P(error)) of each unlabeled study, and its mean unc_output")
        self.predictor = predictor

    def __call__(self, request, datastore: Datastore):
        start = time.time()
        if not self.predictor.is_ready():
            logger.warning(f"UNC-SCORING:: skipped, no model at {self.predictor.model_path}")
            return {"total": 0, "executed": 0, "skipped": 0, "failed": {}, "reason": "no model"}
        model_ts = self.predictor.model_ts()
        force = str(request.get("force", "false")).lower() in ("1", "true", "yes")
        unlabeled = sorted(datastore.get_unlabeled_images())
        executed, skipped, failed, scores = 0, 0, {}, {}
        for image_id in unlabeled:
            info = datastore.get_image_info(image_id)
            if not force and info.get(UNC_TS_KEY) == model_ts and PRED_DICE_KEY in info:
                skipped += 1
                scores[image_id] = info[PRED_DICE_KEY]
                continue
            path = datastore.get_image_uri(image_id)
            try:
                pred = self.predictor.predict_file(path)
            except BraTSInputError as exc:
                # one bad study must not stop the ranking of the others
                logger.error(f"UNC-SCORING:: {image_id}: {exc}")
                failed[image_id] = str(exc)
                continue
            score = float(pred.summary["predicted_wt_dice"])
            datastore.update_image_info(image_id, {
                PRED_DICE_KEY: score, UNC_SCORE_KEY: float(pred.summary["mean_uncertainty_in_tumour"]),
                UNC_TS_KEY: model_ts, UNC_SUMMARY_KEY: pred.summary})
            scores[image_id] = score
            executed += 1
            logger.info(f"UNC-SCORING:: {image_id} => {PRED_DICE_KEY}: {score:.5f}")
        summary = {
            "total": len(unlabeled),
            "executed": executed,
            "skipped": skipped,
            "failed": failed,
            "scores": scores,
            "model_ts": model_ts,
            "latency_s": round(time.time() - start, 3),
        }
        logger.info(f"UNC-SCORING:: {summary}")
        return summary
