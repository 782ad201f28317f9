from .uncertainty import PRED_DICE_KEY, UNC_SCORE_KEY, UNC_SUMMARY_KEY, UNC_TS_KEY, UncertaintyScoring
