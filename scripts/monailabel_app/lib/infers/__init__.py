from .bundle import BraTSBundleInferTask
from .predictor import StudyPrediction, StudyPredictor
from .shared import BraTSUncertaintyInfer
