from .uncertainty import UNC_SCORE_KEY, UNC_SUMMARY_KEY, UNC_TS_KEY, UncertaintyScoring
