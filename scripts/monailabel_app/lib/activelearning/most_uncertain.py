"""Active-learning strategy: review first the unlabeled study whose segmentation the model predicts to be worst."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.uncertainty import PRED_DICE_KEY

logger = logging.getLogger(__name__)


class MostUncertain(Strategy):
    """Return the unlabeled study with the lowest stored predicted WT Dice (``PRED_DICE_KEY``; ties: smallest id).

    The predicted Dice comes from P(error) (calibrated when the app has a calibration file), so a large tumour
    with a thin uncertain rim and a small tumour that is uncertain throughout are ranked by what matters to the
    annotator: how wrong the segmentation is expected to be. Studies not scored yet rank after every scored one;
    with no study scored at all the first unlabeled study (by id) is returned, so an annotator is never left
    without work.
    """

    def __init__(self, key: str = PRED_DICE_KEY):
        super().__init__("Unlabeled study with the lowest predicted whole-tumour Dice (worst expected) first")
        self.key = key

    def ranking(self, datastore: Datastore, label_tag=None, labels=None) -> list:
        """``[(image_id, predicted Dice or None)]`` of the unlabeled studies, worst predicted first."""
        images = datastore.get_unlabeled_images(label_tag, labels)
        scored = []
        for image_id in images:
            score = datastore.get_image_info(image_id).get(self.key)
            scored.append((image_id, None if score is None else float(score)))
        return sorted(scored, key=lambda item: (item[1] is None, item[1] or 0.0, item[0]))

    def __call__(self, request, datastore: Datastore):
        ranking = self.ranking(datastore, request.get("label_tag"), request.get("labels"))
        if not ranking:
            return None
        image_id, score = ranking[0]
        logger.info(f"most_uncertain: selected {image_id} ({self.key}={score}); ranking: {ranking[:10]}")
        return {"id": image_id, self.key: score, "ranking": [i for i, _ in ranking]}
