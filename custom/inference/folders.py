"""Inference outputs of one case folder: file names, removal on failure, and the case's ``summary.json`` entry."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from custom.core.constants import REGION_LABELS, REGIONS


# ------------------------------------------------------------------------------------------- case folders
def output_paths(out_dir, case_id: str) -> tuple[Path, Path]:
    """``(OUT/<case_id>.nii.gz, OUT/<case_id>-unc.nii.gz)`` (BraTS submission name + uncertainty map)."""
    out_dir = Path(out_dir)
    return out_dir / f"{case_id}.nii.gz", out_dir / f"{case_id}-unc.nii.gz"


def remove_case_outputs(out_dir, case_id: str) -> None:
    """Remove both outputs of a case: a stale result beside a failure would be mistaken for a current one."""
    for p in output_paths(out_dir, case_id):
        if p.exists():
            p.unlink()


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
