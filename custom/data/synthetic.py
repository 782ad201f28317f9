"""Synthetic BraTS 2023 GLI cases: a skull-stripped brain with a glioma, four MRI contrasts and a label map.

The generator exists so that the whole pipeline (ingestion, planning, training, inference, serving) can run
without the real data. It is built so that a network has to learn the same things it learns on BraTS:

- the four modalities carry different information (see ``INTENSITY_TABLE``): edema is bright only in
  t2f/t2w, the enhancing rim is bright only in t1c, the necrotic core is dark in t1c and bright in t2w
  (like CSF, from which only t2f tells it apart), and unlabelled white-matter hyperintensities are bright
  in t2f like edema, so no single-modality threshold finds the tumour;
- boundaries are ambiguous: edema fades out towards its edge, tissue texture, a smooth bias field,
  Rician noise and partial-volume blur perturb every boundary, and ``label_noise`` moves the label
  boundaries away from the image boundaries by a smooth random displacement (aleatoric uncertainty);
- tumours vary in size, position and shape; some have no enhancing tumour, some no necrosis.

Smooth random fields are built as a Gaussian-weighted interpolation of white noise on a coarse grid
(three small matrix products, separable), which keeps a 240x240x155 case at a few seconds and a
64x64x48 case well under a second.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage

from custom.core.atomic import atomic_write_bytes
from custom.core.constants import MODALITIES, SEG_SUFFIX
from custom.data.anatomy import make_anatomy_case
from custom.data.tissue_model import (
    BG,
    CSF,
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    ED,
    ET,
    GM,
    INTENSITY_TABLE,
    NCR,
    TUMOUR_TYPES,
    WM,
    WMH,
    smooth_field,
)

#: case generators of ``write_dataset``: "blob" (``make_case``, a smooth synthetic head) and "mni152"
#: (``custom.data.anatomy.make_anatomy_case``, the MNI152 2009a brain deformed per case; needs nilearn)
ANATOMIES = ("blob", "mni152")


def case_id_for(index: int) -> str:
    """BraTS 2023 case id of synthetic case ``index`` (``BraTS-GLI-00000-000``)."""
    if not 0 <= int(index) <= 99999:
        raise ValueError(f"case index must be in [0, 99999], got {index}")
    return f"BraTS-GLI-{int(index):05d}-000"


def make_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """BraTS-like voxel-to-world affine: axes flipped in x and y (LPS-style storage), origin on the grid.

    Returns a float64 ``(4, 4)`` matrix with ``diag(-sx, -sy, sz)`` and translation ``(0, (Y-1)*sy, 0)``,
    the convention of the released BraTS 2023 files (which have translation (0, 239, 0) at 1 mm).
    """
    sx, sy, sz = (float(s) for s in spacing)
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[1, 3] = (int(shape[1]) - 1) * sy
    return affine


def _validate_geometry(shape, spacing):
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8 voxels, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    return shape, spacing


def _grid(shape, spacing, centre_mm):
    """Open mesh of voxel-centre coordinates in mm relative to ``centre_mm``, one array per axis."""
    return [
        (np.arange(n, dtype=np.float32) * s - c).reshape([-1 if i == k else 1 for k in range(3)])
        for i, (n, s, c) in enumerate(zip(shape, spacing, centre_mm))
    ]


def _ellipsoid_radius(coords, semi_axes):
    """Normalised ellipsoidal radius: < 1 inside the ellipsoid with the given semi-axes (mm)."""
    return np.sqrt(sum((c / a) ** 2 for c, a in zip(coords, semi_axes)))


def _make_brain(rng, shape, spacing):
    """Normal anatomy: tissue class map (uint8), normalised brain radius and the brain mask."""
    extent = np.asarray(shape, np.float32) * np.asarray(spacing, np.float32)
    centre = extent / 2 + rng.uniform(-0.03, 0.03, 3).astype(np.float32) * extent
    semi = extent * np.array([0.34, 0.41, 0.39], np.float32) * rng.uniform(0.9, 1.05, 3).astype(np.float32)
    size = float(semi.mean())

    coords = _grid(shape, spacing, centre)
    r = _ellipsoid_radius(coords, semi)
    # irregular outline: lobes (coarse) plus gyri (fine) perturb the radius
    lobes = smooth_field(rng, shape, spacing, 0.35 * size)
    gyri = smooth_field(rng, shape, spacing, 0.08 * size)
    r_pert = r * (1.0 + 0.05 * lobes + 0.015 * gyri)
    brain = r_pert < 1.0

    tissue = np.full(shape, WM, np.uint8)
    cortex_depth = 0.80 + 0.04 * smooth_field(rng, shape, spacing, 0.12 * size) + 0.03 * gyri
    tissue[r_pert > cortex_depth] = GM
    sulci = smooth_field(rng, shape, spacing, 0.06 * size)
    tissue[(r_pert > 0.9) & (sulci > 0.9)] = CSF
    # paired lateral ventricles
    vsemi = semi * np.array([0.08, 0.26, 0.13], np.float32) * rng.uniform(0.8, 1.25, 3).astype(np.float32)
    for side in (-1.0, 1.0):
        vc = [coords[0] - side * 0.13 * semi[0], coords[1], coords[2] - 0.05 * semi[2]]
        tissue[_ellipsoid_radius(vc, vsemi) < 1.0 + 0.1 * lobes] = CSF
    # unlabelled white-matter hyperintensities: bright in t2f like edema, but not tumour
    if rng.random() < 0.7:
        wmh_field = smooth_field(rng, shape, spacing, 0.05 * size)
        tissue[(tissue == WM) & (wmh_field > 2.6) & (r_pert < 0.7)] = WMH
    tissue[~brain] = BG
    return tissue, r_pert, brain, centre, semi


def _tumour_geometry(rng, shape, spacing, r_pert, brain_centre, brain_semi, label_noise, tumour_type):
    """Tumour masks inside a bounding box.

    Returns ``(bbox slices, distances for the image, label masks (wt, tc, ncr), edema grade)``; the
    image uses the unperturbed distance maps, the labels the ones displaced by ``label_noise`` voxels.
    """
    spacing_arr = np.asarray(spacing, np.float32)
    # tumour centre: somewhere in the inner brain
    direction = rng.standard_normal(3)
    direction /= np.linalg.norm(direction) + 1e-9
    centre = brain_centre + direction * rng.uniform(0.0, 0.5) * brain_semi
    radius = brain_semi.mean() * rng.uniform(0.3, 0.55) * rng.uniform(0.8, 1.2, 3).astype(np.float32)
    core_offset = rng.standard_normal(3).astype(np.float32) * 0.12 * radius

    vox_radius = float((radius / spacing_arr).mean())
    # fixed margin (not a function of label_noise, so the image does not depend on it); label boundaries
    # displaced by more than ~6 voxels are cut at the box
    margin_mm = 1.45 * radius + 6.0 * spacing_arr
    lo = np.clip(np.floor((centre - margin_mm) / spacing_arr), 0, np.asarray(shape) - 1).astype(int)
    hi = np.clip(np.ceil((centre + margin_mm) / spacing_arr) + 1, 1, np.asarray(shape)).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    bshape = tuple(int(b - a) for a, b in zip(lo, hi))
    origin = lo * spacing_arr

    coords = _grid(bshape, spacing, centre - origin)
    scale = 0.35 * float(radius.mean())
    shape_field = np.clip(smooth_field(rng, bshape, spacing, scale), -1.5, 1.5)
    d_wt = _ellipsoid_radius(coords, radius) * np.exp(0.2 * shape_field)
    core_coords = [c - o for c, o in zip(coords, core_offset)]
    core_field = np.clip(smooth_field(rng, bshape, spacing, 0.6 * scale), -1.5, 1.5)
    d_core = _ellipsoid_radius(core_coords, radius) * np.exp(0.2 * shape_field + 0.12 * core_field)

    t_tc = rng.uniform(0.45, 0.75)
    t_ncr = t_tc * rng.uniform(0.5, 0.8)
    inside = r_pert[box] < 0.95
    # label noise draws from its own stream, so the image does not depend on label_noise
    label_rng = np.random.default_rng(rng.integers(0, 2**63))

    def masks(noise_amp):
        if noise_amp > 0:
            # a displacement of `label_noise` voxels moves a normalised distance by about label_noise / R
            ln_scale = 2.0 * float(spacing_arr.mean())
            fields = [smooth_field(label_rng, bshape, spacing, ln_scale) for _ in range(3)]
            shifts = [noise_amp * f / vox_radius for f in fields]
        else:
            shifts = [0.0, 0.0, 0.0]
        wt = (d_wt + shifts[0] < 1.0) & inside
        tc = (d_core + shifts[1] < t_tc) & ndimage.binary_erosion(wt)
        ncr = d_core + shifts[2] < t_ncr
        return wt, tc, ncr

    wt_img, tc_img, ncr_img = masks(0.0)
    if label_noise > 0:
        wt_lab, tc_lab, ncr_lab = masks(float(label_noise))
    else:
        wt_lab, tc_lab, ncr_lab = wt_img, tc_img, ncr_img
    # edema fades towards its outer edge: ambiguous boundary like real peritumoral edema
    grade = 0.5 + 0.5 * np.clip((1.0 - d_wt) / 0.3, 0.0, 1.0)
    return box, (wt_img, tc_img, ncr_img), (wt_lab, tc_lab, ncr_lab), grade


def _nest(tumour_type, wt, tc, ncr):
    """Label map of one box from the three masks; enforces NCR (1) inside ET (3) inside edema (2)."""
    seg = np.zeros(wt.shape, np.uint8)
    seg[wt] = 2
    if tumour_type == "no_et":
        seg[tc] = 1
    elif tumour_type == "no_ncr":
        seg[tc] = 3
    else:
        seg[tc] = 3
        seg[ncr & ndimage.binary_erosion(tc)] = 1
    return seg


def make_case(
    rng: np.random.Generator,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    label_noise: float = 0.5,
    *,
    tumour_type: str | None = None,
    p_no_et: float = 0.15,
    p_no_ncr: float = 0.15,
    noise_level: float = 0.04,
    bias_strength: float = 0.15,
    blur_mm: float = 0.6,
    texture_strength: float = 0.05,
    tumour_heterogeneity: float = 0.12,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case.

    Args:
        rng: random generator; the case is a deterministic function of its state.
        shape: ``(X, Y, Z)`` voxels.
        spacing: ``(sx, sy, sz)`` in mm; anatomy is sized relative to the field of view.
        label_noise: typical displacement, in voxels, of the label boundaries relative to the image
            boundaries (smooth random field); 0 makes labels follow the image exactly.
        tumour_type: one of ``TUMOUR_TYPES``; drawn at random (``p_no_et``, ``p_no_ncr``) when None.
        noise_level: Rician noise sigma relative to white-matter intensity.
        bias_strength: amplitude of the log bias field (0.15 gives roughly +-30 % across the brain).
        blur_mm: Gaussian sigma (mm) of the partial-volume blur.
        texture_strength: relative amplitude of normal tissue texture.
        tumour_heterogeneity: relative amplitude of tumour texture.

    Returns:
        ``image`` float32 ``(4, X, Y, Z)`` in ``MODALITIES`` order (non-negative integers as floats,
        exactly 0 outside the brain) and ``seg`` uint8 ``(X, Y, Z)`` with labels 0..3.
    """
    shape, spacing = _validate_geometry(shape, spacing)
    if not np.isfinite(label_noise) or label_noise < 0:
        raise ValueError(f"label_noise must be >= 0 voxels, got {label_noise}")
    if tumour_type is None:
        u = rng.random()
        tumour_type = "no_et" if u < p_no_et else "no_ncr" if u < p_no_et + p_no_ncr else "both"
    if tumour_type not in TUMOUR_TYPES:
        raise ValueError(f"tumour_type must be one of {TUMOUR_TYPES}, got {tumour_type!r}")

    tissue, r_pert, brain, brain_centre, brain_semi = _make_brain(rng, shape, spacing)
    box, img_masks, lab_masks, grade = _tumour_geometry(
        rng, shape, spacing, r_pert, brain_centre, brain_semi, label_noise, tumour_type
    )
    tumour_img = _nest(tumour_type, *img_masks)
    seg = np.zeros(shape, np.uint8)
    seg[box] = _nest(tumour_type, *lab_masks)
    seg[~brain] = 0

    table = INTENSITY_TABLE * rng.uniform(0.95, 1.05, INTENSITY_TABLE.shape).astype(np.float32)
    size = float(brain_semi.mean())
    tex_a = smooth_field(rng, shape, spacing, 0.04 * size)
    tex_b = smooth_field(rng, shape, spacing, 0.08 * size)
    bshape = tumour_img.shape
    tumour_tex = smooth_field(rng, bshape, spacing, 0.1 * size)
    label_of_tissue = {1: NCR, 2: ED, 3: ET}

    image = np.empty((len(MODALITIES),) + shape, np.float32)
    sigma_vox = [blur_mm / s for s in spacing]
    for m in range(len(MODALITIES)):
        w = rng.uniform(-1, 1, 2).astype(np.float32)
        texture = (w[0] * tex_a + w[1] * tex_b) / np.sqrt((w**2).sum() + 1e-6)
        vol = table[m][tissue] * (1.0 + texture_strength * texture)
        # tumour overrides normal tissue; edema blends with what lies beneath according to its grade
        sub = vol[box]
        normal = sub.copy()
        tm = rng.uniform(-1, 1)
        tumour_scale = 1.0 + tumour_heterogeneity * (tm * tumour_tex + (1 - abs(tm)) * texture[box])
        for lab, t in label_of_tissue.items():
            sel = tumour_img == lab
            value = table[m, t] * tumour_scale[sel]
            if lab == 2:
                g = grade[sel]
                value = normal[sel] * (1 - g) + value * g
            sub[sel] = value
        vol[box] = sub
        vol = ndimage.gaussian_filter(vol, sigma_vox, truncate=3.0)
        bias = np.exp(bias_strength * smooth_field(rng, shape, spacing, 0.7 * size))
        vol *= bias
        noise_sigma = noise_level * float(table[m, WM] if table[m, WM] > 0 else 1.0)
        # Rician noise, drawn only where it survives skull stripping (a quarter of the voxels)
        inside = vol[brain]
        n1 = rng.standard_normal(inside.shape, dtype=np.float32)
        n2 = rng.standard_normal(inside.shape, dtype=np.float32)
        inside = np.sqrt((inside + noise_sigma * n1) ** 2 + (noise_sigma * n2) ** 2)
        scanner_scale = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
        # skull-stripped: background exactly 0, brain strictly positive
        image[m] = 0.0
        image[m][brain] = np.maximum(np.rint(inside * scanner_scale), 1.0)
    return image, seg


def nifti_gz_bytes(array: np.ndarray, affine: np.ndarray, dtype) -> bytes:
    """Bytes of a ``.nii.gz`` file; the gzip header carries no timestamp, so equal inputs give equal bytes."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1, mtime=0)


def write_case(out_dir, case_id: str, image: np.ndarray, seg: np.ndarray | None, affine: np.ndarray) -> Path:
    """Write one case folder in the BraTS 2023 layout (four modalities + seg), each file atomically.

    Images are stored as int16 like the released BraTS files; ``seg`` as uint8. Returns the case folder.
    """
    case_dir = Path(out_dir) / case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    if image.shape[0] != len(MODALITIES):
        raise ValueError(f"image must have {len(MODALITIES)} channels, got shape {image.shape}")
    if image.max() > np.iinfo(np.int16).max or image.min() < 0:
        raise ValueError("image intensities must fit int16 and be non-negative")
    for m, name in enumerate(MODALITIES):
        atomic_write_bytes(case_dir / f"{case_id}-{name}.nii.gz", nifti_gz_bytes(image[m], affine, np.int16))
    if seg is not None:
        atomic_write_bytes(case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz", nifti_gz_bytes(seg, affine, np.uint8))
    return case_dir


def write_dataset(
    out_dir,
    num_cases: int = 10,
    shape: Sequence[int] = DEFAULT_SHAPE,
    spacing: Sequence[float] = DEFAULT_SPACING,
    seed: int = 0,
    label_noise: float = 0.5,
    first_index: int = 0,
    progress: bool = False,
    anatomy: str = "blob",
    id_offset: int = 0,
    **options,
) -> list[str]:
    """Write ``num_cases`` synthetic cases ``BraTS-GLI-%05d-000`` under ``out_dir``.

    Case ``i`` (``first_index <= i < first_index + num_cases``) depends only on ``(seed, i)`` and ``anatomy``,
    so a larger data set starts with the same cases as a smaller one and the same arguments always give the
    same bytes. Its id is ``case_id_for(i + id_offset)``: ``id_offset`` renames cases without changing them,
    so a separately seeded set (e.g. unseen test cases) can get ids that do not collide with another set's.

    Args:
        anatomy: one of ``ANATOMIES``: "blob" (default, ``make_case``) or "mni152"
            (``custom.data.anatomy.make_anatomy_case``, real brain anatomy; needs nilearn).
        options: keyword options of the chosen generator.

    Returns:
        The case ids.
    """
    num_cases = int(num_cases)
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    if int(id_offset) < 0:
        raise ValueError(f"id_offset must be >= 0, got {id_offset}")
    shape, spacing = _validate_geometry(shape, spacing)
    generate = make_anatomy_case if anatomy == "mni152" else make_case
    affine = make_affine(shape, spacing)
    out_dir = Path(out_dir)
    indices = range(int(first_index), int(first_index) + num_cases)
    # every id is checked before anything is written
    ids = [case_id_for(i + int(id_offset)) for i in indices]
    out_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synthetic cases ({anatomy})", unit="case", disable=None)
    for i, case_id in zip(indices, ids):
        rng = np.random.default_rng([int(seed), i])
        image, seg = generate(rng, shape, spacing, label_noise, **options)
        write_case(out_dir, case_id, image, seg, affine)
    return ids
