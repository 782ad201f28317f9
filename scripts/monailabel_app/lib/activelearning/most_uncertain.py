"""Active-learning strategy: review the unlabeled study the model is least sure about first."""

from __future__ import annotations

import logging

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from lib.scoring.uncertainty import UNC_SCORE_KEY

logger = logging.getLogger(__name__)


class MostUncertain(Strategy):
    """Return the unlabeled study with the highest stored ``UNC_SCORE_KEY`` (ties: smallest id).

    Studies not scored yet rank after every scored one; with no study scored at all the first unlabeled
    study (by id) is returned, so an annotator is never left without work.
    """

    def __init__(self, key: str = UNC_SCORE_KEY):
        super().__init__("Unlabeled study with the highest mean predicted uncertainty in its tumour first")
        self.key = key

    def ranking(self, datastore: Datastore, label_tag=None, labels=None) -> list:
        """``[(image_id, score or None)]`` of the unlabeled studies, most uncertain first."""
        images = datastore.get_unlabeled_images(label_tag, labels)
        scored = []
        for image_id in images:
            score = datastore.get_image_info(image_id).get(self.key)
            scored.append((image_id, None if score is None else float(score)))
        return sorted(scored, key=lambda item: (item[1] is None, -(item[1] or 0.0), item[0]))

    def __call__(self, request, datastore: Datastore):
        ranking = self.ranking(datastore, request.get("label_tag"), request.get("labels"))
        if not ranking:
            return None
        image_id, score = ranking[0]
        logger.info(f"most_uncertain: selected {image_id} ({self.key}={score}); ranking: {ranking[:10]}")
        return {"id": image_id, self.key: score, "ranking": [i for i, _ in ranking]}
