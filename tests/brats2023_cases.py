"""Crafted BraTS label-map pairs on which the BraTS 2023 ranking code was run (tests/data/README.md).

Each case targets a place where HD95 / lesion-wise definitions part ways: a far small missed lesion
(per-direction vs pooled percentile), a small missed island, anisotropic spacings, very asymmetric
directed distances, empty masks, few surfels (area weighting), label 4, lesions merged by a 26- but not
an 18-neighbourhood dilation, a false-positive component and a dropped small lesion, random tumours.

Every case is built from explicit integer geometry (balls and boxes tested with integer arithmetic) or
from a tiny self-contained 64-bit LCG, so the arrays are bit-identical under any numpy version (the
reference figures were produced under Python 3.9 / numpy 1.24.3, the tests run under the project's
venv). ``case_digest`` gives a SHA-1 of the arrays, stored with the figures in
``tests/data/brats2023_reference.json`` to prove a rebuilt case is the one that was scored.

Labels (BraTS 2023): 0 background, 1 NCR, 2 ED, 3 ET; WT={1,2,3}, TC={1,3}, ET={3}. Arrays are
``(X, Y, Z)`` uint8, spacing ``(sx, sy, sz)`` in mm. ``build(name)`` returns
``{"pred", "gt", "spacing", "note"}``. Plain numpy only: the regeneration script imports this file
under the ranking code's own Python 3.9 environment.
"""

from __future__ import annotations

import hashlib

import numpy as np

NCR, ED, ET = 1, 2, 3


# ------------------------------------------------------------------------------------------------
# integer geometry
# ------------------------------------------------------------------------------------------------
def _grid(shape):
    return np.indices(shape, dtype=np.int64)


def ball(shape, centre, r2, weights=(1, 1, 1)):
    """Voxels with ``sum_i (w_i * (x_i - c_i))**2 <= r2`` (all integers: exact)."""
    g = _grid(shape)
    d = sum((int(w) * (g[i] - int(c))) ** 2 for i, (c, w) in enumerate(zip(centre, weights)))
    return d <= int(r2)


def box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def paint(labels, mask, value):
    labels[mask] = value
    return labels


def tumour(shape, centre, r2_wt, r2_tc, r2_ncr, weights=(1, 1, 1), labels=None):
    """ED ball, TC ball inside it whose rim is ET and whose core (``r2_ncr``) is NCR.

    ``r2_tc`` 0 -> edema only; ``r2_ncr`` >= ``r2_tc`` -> TC without ET.
    """
    lab = np.zeros(shape, np.uint8) if labels is None else labels
    paint(lab, ball(shape, centre, r2_wt, weights), ED)
    if r2_tc > 0:
        paint(lab, ball(shape, centre, r2_tc, weights), ET)
        if r2_ncr > 0:
            paint(lab, ball(shape, centre, r2_ncr, weights), NCR)
    return lab


class LCG:
    """64-bit linear congruential generator (Knuth MMIX constants): version-independent randomness."""

    def __init__(self, seed: int):
        self.state = (int(seed) * 2862933555777941757 + 3037000493) % (1 << 64)

    def next(self) -> int:
        self.state = (6364136223846793005 * self.state + 1442695040888963407) % (1 << 64)
        return self.state >> 33  # top 31 bits

    def randint(self, lo: int, hi: int) -> int:
        """Integer in ``[lo, hi]``."""
        return lo + self.next() % (hi - lo + 1)


# ------------------------------------------------------------------------------------------------
# cases
# ------------------------------------------------------------------------------------------------
def multi_tc_far_miss():
    """(a) three tumours; the prediction has the two big ones (slightly off) but no TC/ET in the small
    far one (only its edema), so TC/ET lose a lesion ~30 voxels away from any predicted TC."""
    shape = (64, 64, 40)
    gt = tumour(shape, (18, 18, 20), 81, 49, 16)
    tumour(shape, (18, 46, 20), 64, 36, 9, labels=gt)
    tumour(shape, (52, 48, 20), 20, 6, 1, labels=gt)
    pred = tumour(shape, (19, 18, 20), 81, 42, 16)
    tumour(shape, (18, 46, 21), 64, 36, 12, labels=pred)
    tumour(shape, (52, 48, 20), 20, 0, 0, labels=pred)
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0),
                note="TC/ET: far small lesion missed; pooled vs per-direction P95 differ a lot")


def small_missed_wt():
    """(b) one tumour plus a small 3x3x3 (27-voxel) edema island 3 voxels off its edge that the
    prediction misses (for lesion-wise scoring the island merges into the tumour's lesion)."""
    shape = (48, 48, 40)
    gt = tumour(shape, (20, 22, 20), 49, 16, 4)
    paint(gt, box(shape, (30, 20, 19), (33, 23, 22)), ED)
    pred = tumour(shape, (20, 22, 20), 49, 16, 4)
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0),
                note="WT: small missed island; sub-mm differences between HD95 definitions")


def aniso_1_1_3():
    """(c) spacing (1, 1, 3): ellipsoids isotropic in mm; prediction shifted by (1, 0, 1) voxels and
    smaller; an isolated 3x3x2 ET lesion (18 voxels = 54 mm^3) that the prediction misses: kept by a
    mm^3 threshold (> 50 mm^3), dropped by a voxel threshold (<= 50 voxels)."""
    shape = (48, 48, 20)
    w = (1, 1, 3)
    gt = tumour(shape, (22, 24, 10), 144, 49, 12, weights=w)
    paint(gt, box(shape, (40, 40, 3), (43, 43, 5)), ET)
    pred = tumour(shape, (23, 24, 11), 121, 49, 16, weights=w)
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 3.0),
                note="anisotropic (1,1,3); 18-voxel = 54 mm^3 missed ET lesion")


def aniso_08_12_25():
    """(c) spacing (0.8, 1.2, 2.5): ellipsoids isotropic in mm (weights 8:12:25, radii x10),
    prediction shifted and with an extra edema bulge."""
    shape = (48, 40, 20)
    w = (8, 12, 25)
    gt = tumour(shape, (24, 20, 10), 130 ** 2, 75 ** 2, 35 ** 2, weights=w)
    pred = tumour(shape, (25, 19, 10), 125 ** 2, 70 ** 2, 40 ** 2, weights=w)
    paint(pred, ball(shape, (36, 20, 12), 60 ** 2, weights=w) & (pred == 0), ED)
    return dict(pred=pred, gt=gt, spacing=(0.8, 1.2, 2.5),
                note="anisotropic (0.8,1.2,2.5); shifted prediction with edema bulge")


def asymmetric():
    """(d) prediction = ground truth plus long thin arms (edema arm for WT, NCR arm for TC):
    pred->gt distances large, gt->pred distances ~0."""
    shape = (48, 48, 48)
    c = (14, 24, 24)
    gt = tumour(shape, c, 64, 16, 4)
    pred = gt.copy()
    paint(pred, box(shape, (21, 23, 23), (46, 26, 26)), ED)          # 25-voxel edema arm along +x
    paint(pred, box(shape, (13, 27, 23), (16, 44, 26)), NCR)         # NCR arm along +y
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0),
                note="very asymmetric directed distances (arms only in the prediction)")


def empty_pred():
    """(e) ground truth has a tumour, prediction is empty."""
    shape = (32, 32, 32)
    gt = tumour(shape, (16, 16, 16), 49, 16, 4)
    return dict(pred=np.zeros(shape, np.uint8), gt=gt, spacing=(1.0, 1.0, 1.0), note="empty prediction")


def empty_gt():
    """(e) ground truth empty, prediction has two separate tumours (2 FP components per region)."""
    shape = (32, 32, 32)
    pred = tumour(shape, (9, 9, 16), 25, 9, 1)
    tumour(shape, (23, 23, 16), 25, 9, 1, labels=pred)
    return dict(pred=pred, gt=np.zeros(shape, np.uint8), spacing=(1.0, 1.0, 1.0), note="empty ground truth")


def both_empty():
    """(e) both empty."""
    shape = (16, 16, 16)
    z = np.zeros(shape, np.uint8)
    return dict(pred=z.copy(), gt=z.copy(), spacing=(1.0, 1.0, 1.0), note="both empty")


def et_absent_in_gt():
    """(e) per region: ground truth has no ET (TC = NCR only), prediction has an ET rim."""
    shape = (32, 32, 32)
    gt = tumour(shape, (16, 16, 16), 64, 25, 25)
    pred = tumour(shape, (16, 16, 16), 64, 25, 9)
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0), note="ET empty in GT, present in prediction")


def between_surfels():
    """(f) tiny ET boxes (few surfels) at spacing (1, 1, 2.5) plus a one-voxel predicted speck: the
    cumulative surfel area jumps over 0.95 inside one surfel, so the area-weighted 95th percentile
    (2.87 mm) differs from an unweighted surfel percentile (8.14 mm) and from the voxel-face one."""
    shape = (16, 16, 12)
    gt = np.zeros(shape, np.uint8)
    paint(gt, box(shape, (5, 7, 3), (9, 11, 5)), ET)
    pred = np.zeros(shape, np.uint8)
    paint(pred, box(shape, (4, 6, 3), (11, 10, 6)), ET)
    paint(pred, box(shape, (9, 3, 8), (10, 4, 9)), ET)
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 2.5),
                note="few surfels; area-weighted vs unweighted percentile differ; 1-voxel FP speck")


def label4_pred():
    """ET written as label 4 (BraTS 2021 convention) in the prediction, 3 in the ground truth."""
    shape = (32, 32, 32)
    gt = tumour(shape, (16, 16, 16), 64, 25, 9)
    pred = gt.copy()
    pred[pred == ET] = 4
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0), note="prediction uses label 4 for ET")


def dilation_18_vs_26():
    """Two 4x4x4 ET cubes offset diagonally by 7 voxels on every axis: their 3-iteration dilations
    touch with the 26-neighbourhood (one merged lesion) but not with the 18-neighbourhood (two
    lesions); the prediction has only the first cube."""
    shape = (32, 32, 32)
    gt = np.zeros(shape, np.uint8)
    paint(gt, box(shape, (6, 6, 6), (10, 10, 10)), ET)
    paint(gt, box(shape, (16, 16, 16), (20, 20, 20)), ET)
    pred = np.zeros(shape, np.uint8)
    paint(pred, box(shape, (6, 6, 6), (10, 10, 10)), ET)
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0), note="GT lesions merged by 26- but not 18-dilation")


def fp_far_and_small_gt():
    """A far false-positive component, and a small (<= 50 voxel) GT lesion hit by the prediction
    (dropped, but its predicted component is not a false positive)."""
    shape = (48, 48, 32)
    gt = tumour(shape, (14, 14, 16), 49, 16, 4)
    paint(gt, box(shape, (34, 10, 14), (37, 13, 17)), ET)           # 27-voxel ET lesion
    pred = tumour(shape, (14, 15, 16), 49, 16, 4)
    paint(pred, box(shape, (34, 10, 14), (37, 13, 16)), ET)         # hits the small lesion
    paint(pred, box(shape, (36, 36, 14), (40, 40, 18)), ET)         # far false positive
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0), note="FP component + dropped small GT lesion")


def _random_blobs(seed, shape, n_gt, weights):
    rng = LCG(seed)
    gt = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    for _ in range(n_gt):
        c = tuple(rng.randint(6, s - 7) for s in shape)
        r2 = rng.randint(9, 40)
        tc = rng.randint(0, r2 // 2)
        ncr = rng.randint(0, tc)
        tumour(shape, c, r2 * weights[0] ** 2, tc * weights[0] ** 2, ncr * weights[0] ** 2, weights, labels=gt)
        if rng.randint(0, 4) == 0:  # sometimes missed entirely
            continue
        cp = tuple(ci + rng.randint(-1, 1) for ci in c)
        r2p = max(4, r2 + rng.randint(-6, 6))
        tcp = max(0, tc + rng.randint(-3, 3))
        tumour(shape, cp, r2p * weights[0] ** 2, tcp * weights[0] ** 2, ncr * weights[0] ** 2, weights, labels=pred)
    # one false-positive blob
    c = tuple(rng.randint(4, s - 5) for s in shape)
    tumour(shape, c, 6 * weights[0] ** 2, 3 * weights[0] ** 2, 0, weights, labels=pred)
    return gt, pred


def random_blobs_iso():
    """Seeded random tumours (LCG seed 7), 1 mm isotropic: exercises many 2x2x2 configurations."""
    gt, pred = _random_blobs(7, (40, 40, 32), 5, (1, 1, 1))
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 1.0), note="random tumours, seed 7")


def random_blobs_aniso():
    """Seeded random tumours (LCG seed 11) at spacing (1, 1, 3) (balls isotropic in mm)."""
    gt, pred = _random_blobs(11, (40, 40, 16), 4, (1, 1, 3))
    return dict(pred=pred, gt=gt, spacing=(1.0, 1.0, 3.0), note="random tumours, seed 11, spacing (1,1,3)")


CASES = {f.__name__: f for f in (
    multi_tc_far_miss, small_missed_wt, aniso_1_1_3, aniso_08_12_25, asymmetric,
    empty_pred, empty_gt, both_empty, et_absent_in_gt, between_surfels, label4_pred,
    dilation_18_vs_26, fp_far_and_small_gt, random_blobs_iso, random_blobs_aniso)}


def build(name: str) -> dict:
    out = CASES[name]()
    out["pred"] = np.ascontiguousarray(out["pred"], dtype=np.uint8)
    out["gt"] = np.ascontiguousarray(out["gt"], dtype=np.uint8)
    out["spacing"] = tuple(float(s) for s in out["spacing"])
    return out


def case_digest(case: dict) -> str:
    h = hashlib.sha1()
    for k in ("pred", "gt"):
        a = case[k]
        h.update(str(a.shape).encode())
        h.update(a.astype(np.uint8).tobytes())
    h.update(repr(case["spacing"]).encode())
    return h.hexdigest()
