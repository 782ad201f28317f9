"""The ``summary.json`` entry of one predicted case (its file names are :func:`custom.core.layout.prediction_paths`)."""

from __future__ import annotations

import numpy as np

from custom.core.constants import REGION_LABELS, REGIONS


def case_summary(labels: np.ndarray, unc: np.ndarray, spacing) -> dict:
    """Tumour volumes per region (ml, from the voxel volume) and unc mean / 95th percentile inside predicted WT."""

    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {}
    for region in REGIONS:
        out[f"volume_{region.lower()}_ml"] = round(float(np.isin(labels, REGION_LABELS[region]).sum()) * voxel_ml, 4)
    wt = labels > 0
    if wt.any():
        vals = unc[wt]
        out["unc_mean_wt"] = float(vals.mean())
        out["unc_p95_wt"] = float(np.percentile(vals, 95))
    else:  # no predicted tumour: nothing to average over
        out["unc_mean_wt"] = None
        out["unc_p95_wt"] = None
    return out
