"""Synthetic BraTS 2023 GLI cases on real brain anatomy: the MNI152 2009a template, deformed per case.

The blob generator (``custom.data.synthetic``) draws a smooth head, so a network only has to find a clean
boundary. Real BraTS errors sit at infiltrative edema, thin enhancing rims, necrosis and satellite lesions next
to grey matter, white matter and CSF. This generator puts the tumour into a real 1 mm brain:

- **anatomy**: the grey- and white-matter probability maps of the MNI152 2009a template (shipped in the
  ``nilearn`` wheel; CSF is the template's brain mask minus both), moved by a random small affine
  (scale, rotation) and a smooth random displacement field (a few mm, low frequency), so no two brains are
  identical; a mild mass effect pushes tissue radially away from the tumour. The maps are resampled onto the
  requested grid (anti-aliased for coarse spacings); a field of view smaller than the brain shrinks the
  anatomy isotropically until it fits (``zoom`` < 1; tumour sizes scale with it, so volumes at 1 mm
  equivalents are ``voxels * prod(spacing) / zoom**3``);
- **tumour**: centred in deep white matter of the cerebrum; an irregular core (union of one to three
  noise-perturbed ellipsoidal lobes, optional satellite nodules) with a necrotic centre inside an enhancing
  rim of spatially varying thickness; edema is the set of voxels within a geodesic distance of the core where
  travelling through white matter is cheap and through grey matter or CSF is expensive (Dijkstra on a coarse
  26-neighbour grid, refined on the fine grid), so it spreads along white matter and stops at the cortex;
  types "both", "no_et" (non-enhancing core) and "no_ncr" (solid enhancing core) as in BraTS;
- **contrasts**: per-tissue means of ``custom.data.synthetic.INTENSITY_TABLE`` (T1n: WM > GM > CSF; T1c the same
  plus a bright enhancing rim; T2w: CSF > GM > WM, edema and necrosis bright; FLAIR: CSF suppressed, edema
  bright, GM > WM), mixed by the tissue fractions (partial volume), with a random per-case contrast (table
  jitter and a gamma), tissue texture, unlabelled white-matter hyperintensities, a smooth bias field, a
  partial-volume blur of the tumour boundaries and Rician noise; skull stripped (exactly 0 outside the brain).

Labels are nested (ET and NCR inside TC inside WT, the core wrapped in edema) and lie inside the brain;
``label_noise`` displaces the label boundaries from the image boundaries as in the blob generator. A case is a
deterministic function of the generator state. A 240x240x155 case takes a few seconds on one core.

Template, as its notice asks (nilearn's description file gives "License: unknown" and points to the MNI):
    MNI ICBM 2009a Nonlinear Symmetric template (1 mm; T1 and GM/WM probability maps, as converted for
    nilearn), http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009
    Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
    McGill University. Permission to use, copy, modify, and distribute this software and its documentation
    for any purpose and without fee is hereby granted, provided that the above copyright notice appear in
    all copies. The authors and McGill University make no representations about the suitability of this
    software for any purpose. It is provided "as is" without express or implied warranty. The authors are
    not responsible for any data loss, equipment damage, property loss, or injury to subjects or patients
    resulting from the use or misuse of this software package.
    References: V.S. Fonov, A.C. Evans, K. Botteron, C.R. Almli, R.C. McKinstry, D.L. Collins and BDCG,
    "Unbiased average age-appropriate atlases for pediatric studies", NeuroImage 54(1):313-327, 2011;
    V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli and D.L. Collins, "Unbiased nonlinear average
    age-appropriate brain templates from birth to adulthood", NeuroImage 47(Suppl 1):S102, 2009;
    D.L. Collins, A.P. Zijdenbos, W.F.C. Baare and A.C. Evans, "ANIMAL+INSECT: Improved Cortical Structure
    Segmentation", IPMI 1999, LNCS 1613:210-223.
"""

from __future__ import annotations

import functools
import importlib.resources
import itertools
from typing import NamedTuple, Sequence

import numpy as np
from scipy import ndimage

from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.data.tissue_model import (
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

__all__ = [
    "NILEARN_REQUIREMENT",
    "TEMPLATE_FILES",
    "Template",
    "fit_zoom",
    "load_template",
    "make_anatomy_case",
]

#: the pinned package whose wheel ships the template (requirements.txt)
NILEARN_REQUIREMENT = "nilearn==0.14.1"
#: template files inside the nilearn package (``nilearn/datasets/data``), 197x233x189 at 1 mm, uint8 0..255
TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
_HEADER = "MNI152 template unavailable"
#: template world z (mm) below which the field of view may cut the brain (lower brainstem), as BraTS does
_Z_CUT_MM = -60.0
#: fraction of the field of view the (cut) brain may fill before the anatomy is shrunk
_FILL = 0.92
#: the 13 directions of a 26-neighbourhood, one per undirected edge
_DIRECTIONS = [d for d in itertools.product((-1, 0, 1), repeat=3) if d > (0, 0, 0)]


class Template(NamedTuple):
    """The MNI152 2009a template as the generator uses it (RAS axes, 1 mm voxels, cropped to the brain)."""

    #: ``(3, X, Y, Z)`` float32 tissue fractions gm, wm, csf (0 outside the brain mask)
    maps: np.ndarray
    #: world mm of voxel (0, 0, 0)
    origin: np.ndarray
    #: world mm box of the brain mask
    box_lo: np.ndarray
    box_hi: np.ndarray
    #: world mm box that must fit the field of view (the brain above ``_Z_CUT_MM``)
    fit_lo: np.ndarray
    fit_hi: np.ndarray
    #: ``(N, 3)`` world mm candidate tumour centres: deep supratentorial white matter
    centres: np.ndarray
    #: ``(N,)`` mm from each candidate centre to the brain surface
    depths: np.ndarray


def _template_dir():
    try:
        return importlib.resources.files("nilearn").joinpath("datasets", "data")
    except ImportError as exc:
        raise BraTSInputError(
            f"the Python package 'nilearn' is not installed ({exc}); the MNI152 2009a template "
            f"({', '.join(TEMPLATE_FILES.values())}) is read from its package data: "
            f"pip install '{NILEARN_REQUIREMENT}'",
            header=_HEADER,
        ) from exc


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Read the template from the nilearn package data once per process.

    Raises:
        BraTSInputError: nilearn is not installed, a template file is missing or unreadable, or its
            geometry is not the expected 1 mm RAS grid; the message names the package or file.
    """
    import nibabel as nib

    base = _template_dir()
    arrays, affine = {}, None
    for key, name in TEMPLATE_FILES.items():
        resource = base.joinpath(name)
        if not resource.is_file():
            raise BraTSInputError(f"{resource}: missing from the installed nilearn package; reinstall it: "
                                  f"pip install --force-reinstall '{NILEARN_REQUIREMENT}'", header=_HEADER)
        try:
            with importlib.resources.as_file(resource) as path:
                img = nib.load(str(path))
                arrays[key] = np.asarray(img.dataobj, dtype=np.float32) / 255.0
        except Exception as exc:  # noqa: BLE001 - any read failure names the file
            raise BraTSInputError(f"{resource}: cannot be read ({exc})", header=_HEADER) from exc
        if affine is None:
            affine = img.affine
        if (img.shape != arrays["t1"].shape or not np.allclose(img.affine, affine)
                or not np.allclose(affine[:3, :3], np.eye(3))):
            raise BraTSInputError(f"{resource}: expected a 1 mm RAS grid shared by all three template files, "
                                  f"got shape {img.shape} and affine {img.affine.tolist()}", header=_HEADER)

    # brain mask: the skull-stripped T1 without the small detached islands (optic nerves)
    labels, _ = ndimage.label(arrays["t1"] > 0)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = labels == int(np.argmax(sizes))
    mask = ndimage.binary_fill_holes(mask)
    lo = np.argwhere(mask).min(0) - 3
    hi = np.argwhere(mask).max(0) + 4
    lo, hi = np.maximum(lo, 0), np.minimum(hi, mask.shape)
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask = mask[crop]
    gm = arrays["gm"][crop] * mask
    wm = arrays["wm"][crop] * mask
    csf = np.clip(mask - gm - wm, 0.0, 1.0)
    maps = np.ascontiguousarray(np.stack([gm, wm, csf]), dtype=np.float32)
    origin = affine[:3, 3] + lo

    idx = np.argwhere(mask)
    box_lo, box_hi = origin + idx.min(0), origin + idx.max(0)
    fit_lo, fit_hi = box_lo.copy(), box_hi.copy()
    fit_lo[2] = max(fit_lo[2], _Z_CUT_MM)

    # candidate tumour centres on a 2 mm lattice: white matter, >= 15 mm deep, above the cerebellum
    depth = 2.0 * ndimage.distance_transform_edt(mask[::2, ::2, ::2])
    world_z = origin[2] + np.arange(0, mask.shape[2], 2)
    cand = (wm[::2, ::2, ::2] > 0.75) & (depth > 15.0) & (world_z > -25.0)[None, None, :]
    centres = origin + 2.0 * np.argwhere(cand).astype(np.float64)
    depths = depth[cand].astype(np.float64)
    if len(centres) == 0:
        raise BraTSInputError(f"{base}: the template has no deep white matter (wrong files?)", header=_HEADER)
    for a in (maps, origin, box_lo, box_hi, fit_lo, fit_hi, centres, depths):
        a.setflags(write=False)
    return Template(maps, origin, box_lo, box_hi, fit_lo, fit_hi, centres, depths)


@functools.lru_cache(maxsize=4)
def _smoothed_maps(sigma: tuple) -> np.ndarray:
    """Template maps low-passed by ``sigma`` (template voxels) before sampling a coarser grid (anti-aliasing)."""
    maps = load_template().maps
    if max(sigma) <= 0:
        return maps
    out = np.stack([ndimage.gaussian_filter(m, sigma, truncate=3.0) for m in maps])
    out.setflags(write=False)
    return out


def _validate_geometry(shape, spacing):
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes >= 8 voxels, got {shape}")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise ValueError(f"spacing must be three positive sizes in mm, got {spacing}")
    return shape, spacing


def _fov(shape, spacing):
    """World box of the output grid under ``custom.data.synthetic.make_affine`` (x, y flipped): lo, hi, half size."""
    sp = np.asarray(spacing, np.float64)
    n = np.asarray(shape, np.float64) - 1
    lo = np.array([-n[0] * sp[0], 0.0, 0.0])
    hi = np.array([0.0, n[1] * sp[1], n[2] * sp[2]])
    return lo, hi, (hi - lo) / 2 + sp / 2


def fit_zoom(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Isotropic factor (<= 1) by which the anatomy is shrunk so that the brain fits the field of view.

    1.0 for BraTS-sized grids (240x240x155 at 1 mm, or e.g. 96x96x64 at 2x2x2.4 mm); region volumes in 1 mm
    equivalents are ``voxels * prod(spacing) / fit_zoom(shape, spacing) ** 3``.
    """
    shape, spacing = _validate_geometry(shape, spacing)
    tpl = load_template()
    half = (tpl.fit_hi - tpl.fit_lo) / 2
    return float(min(1.0, np.min(_FILL * _fov(shape, spacing)[2] / half)))


def _rotation(angles):
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _nest(tumour_type, wt, tc, ncr):
    """Label map from the three masks: NCR (1) inside ET (3) inside edema (2), by tumour type."""
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


def _geodesic_mm(speed, seeds, step_mm):
    """Shortest-path distance (mm) from ``seeds`` with local cost ``1 / speed``, 26-neighbour Dijkstra."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import dijkstra

    shape = speed.shape
    n = speed.size
    index = np.arange(n).reshape(shape)
    cost = (1.0 / speed).ravel()
    rows, cols, weights = [], [], []
    for d in _DIRECTIONS:
        a = tuple(slice(max(0, -k), s - max(0, k)) for k, s in zip(d, shape))
        b = tuple(slice(max(0, k), s - max(0, -k)) for k, s in zip(d, shape))
        ia, ib = index[a].ravel(), index[b].ravel()
        length = float(np.sqrt(sum((k * s) ** 2 for k, s in zip(d, step_mm))))
        rows.append(ia)
        cols.append(ib)
        weights.append(length * 0.5 * (cost[ia] + cost[ib]))
    graph = coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    dist = dijkstra(graph.tocsr(), directed=False, indices=np.flatnonzero(seeds.ravel()), min_only=True)
    return dist.reshape(shape)


def _upsample_matrix(n_fine, n_coarse, factor):
    """``(n_fine, n_coarse)`` linear interpolation from samples taken at ``factor // 2 + factor * m``."""
    u = np.clip((np.arange(n_fine) - factor // 2) / factor, 0, n_coarse - 1)
    lo = np.floor(u).astype(int)
    hi = np.minimum(lo + 1, n_coarse - 1)
    w = (u - lo).astype(np.float32)
    mat = np.zeros((n_fine, n_coarse), np.float32)
    np.add.at(mat, (np.arange(n_fine), lo), 1 - w)
    np.add.at(mat, (np.arange(n_fine), hi), w)
    return mat


def _upsample(coarse, mats):
    out = np.tensordot(mats[0], coarse, axes=(1, 0))
    out = np.tensordot(out, mats[1], axes=(1, 1)).transpose(0, 2, 1)
    return np.ascontiguousarray(np.tensordot(out, mats[2], axes=(2, 1)), dtype=np.float32)


def _field(rng, shape, spacing, scale_mm):
    """``smooth_field`` with the correlation length kept above the voxel size (cost and meaning)."""
    return smooth_field(rng, shape, spacing, max(float(scale_mm), 1.5 * max(spacing)))


def make_anatomy_case(
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
    p_satellites: float = 0.3,
    deformation_mm: float = 3.0,
    mass_effect: float = 1.0,
    return_tissue: bool = False,
):
    """One synthetic case on the deformed MNI152 anatomy; arguments and return as ``custom.data.synthetic.make_case``.

    Args:
        rng: random generator; the case is a deterministic function of its state.
        shape: ``(X, Y, Z)`` voxels (default 240x240x155).
        spacing: ``(sx, sy, sz)`` mm; the template is resampled to it (the anatomy shrinks when the field of
            view is smaller than a brain, see ``fit_zoom``).
        label_noise: typical displacement, in voxels, of the label boundaries relative to the image
            boundaries (smooth random field); 0 makes labels follow the image exactly.
        tumour_type: one of ``TUMOUR_TYPES``; drawn at random (``p_no_et``, ``p_no_ncr``) when None.
        noise_level, bias_strength, blur_mm, texture_strength, tumour_heterogeneity: as in ``make_case``.
        p_satellites: probability of one to three satellite nodules around the main tumour.
        deformation_mm: standard deviation of the smooth random displacement of the anatomy (mm).
        mass_effect: scale of the radial push of tissue away from the tumour (0 disables it).
        return_tissue: also return a dict of the deformed tissue fractions ``gm``, ``wm``, ``csf``
            (float32, shape ``(X, Y, Z)``, 0 outside the brain), ``brain`` (bool) and ``zoom`` (float).

    Returns:
        ``image`` float32 ``(4, X, Y, Z)`` in ``MODALITIES`` order (non-negative integers as floats, exactly 0
        outside the brain) and ``seg`` uint8 ``(X, Y, Z)`` with labels 0..3 (and the tissue dict when asked).

    Raises:
        ValueError: bad geometry, ``label_noise`` or ``tumour_type``.
        BraTSInputError: the template cannot be loaded (nilearn missing; names the pip command).
    """
    shape, spacing = _validate_geometry(shape, spacing)
    if not np.isfinite(label_noise) or label_noise < 0:
        raise ValueError(f"label_noise must be >= 0 voxels, got {label_noise}")
    if tumour_type is None:
        u = rng.random()
        tumour_type = "no_et" if u < p_no_et else "no_ncr" if u < p_no_et + p_no_ncr else "both"
    if tumour_type not in TUMOUR_TYPES:
        raise ValueError(f"tumour_type must be one of {TUMOUR_TYPES}, got {tumour_type!r}")
    tpl = load_template()
    sp = np.asarray(spacing, np.float64)
    zoom = fit_zoom(shape, spacing)

    # --- placement: random affine (template world -> output world), brain top kept inside the field of view
    fov_lo, fov_hi, fov_half = _fov(shape, spacing)
    fov_c = (fov_lo + fov_hi) / 2
    c_t = (tpl.fit_lo + tpl.fit_hi) / 2
    half = (tpl.fit_hi - tpl.fit_lo) / 2
    scale = rng.uniform(0.87, 1.0) * rng.uniform(0.97, 1.03, 3)
    fwd = zoom * _rotation(rng.uniform(-1, 1, 3) * np.deg2rad(6.0)) @ np.diag(scale)
    inv = np.linalg.inv(fwd)
    ext = np.abs(fwd) @ half
    c_out = fov_c.copy()
    c_out[2] = min(fov_c[2], fov_hi[2] + sp[2] / 2 - 0.03 * 2 * fov_half[2] - ext[2])

    # work box: the output voxels the deformed brain can reach
    corners = np.array(list(itertools.product(*zip(tpl.box_lo, tpl.box_hi))))
    world = c_out + (corners - c_t) @ fwd.T
    pad = 12.0 * zoom + 2 * sp
    w_lo, w_hi = world.min(0) - pad, world.max(0) + pad
    # voxel index of world coordinates: i = -x / sx, j = (Y - 1) - y / sy, k = z / sz
    to_vox = lambda p: np.array([-p[0] / sp[0], shape[1] - 1 - p[1] / sp[1], p[2] / sp[2]])  # noqa: E731
    v_a, v_b = to_vox(w_lo), to_vox(w_hi)
    i_lo = np.clip(np.floor(np.minimum(v_a, v_b)), 0, np.asarray(shape) - 1).astype(int)
    i_hi = np.clip(np.ceil(np.maximum(v_a, v_b)) + 1, 1, shape).astype(int)
    work = tuple(slice(a, b) for a, b in zip(i_lo, i_hi))
    wshape = tuple(int(b - a) for a, b in zip(i_lo, i_hi))
    axes_world = [-np.arange(i_lo[0], i_hi[0]) * sp[0], (shape[1] - 1 - np.arange(i_lo[1], i_hi[1])) * sp[1],
                  np.arange(i_lo[2], i_hi[2]) * sp[2]]

    # smooth random displacement (mm, template world), low frequency
    deform_scale = rng.uniform(25.0, 40.0) * zoom
    disp = [float(deformation_mm) * zoom * _field(rng, wshape, spacing, deform_scale) for _ in range(3)]

    # --- tumour: sizes in mm of the (zoomed) anatomy; centre in white matter deep enough for most of the core
    r_core = zoom * float(np.clip(np.exp(rng.normal(np.log(20.0), 0.35)), 7.0, 35.0))
    deep = np.flatnonzero(tpl.depths >= min(0.9 * r_core / zoom, float(np.percentile(tpl.depths, 90))))
    p_t = tpl.centres[deep[rng.integers(len(deep))]] + rng.uniform(-1.0, 1.0, 3)
    c_tum = c_out + fwd @ (p_t - c_t)
    for _ in range(2):  # p_t = c_t + inv (p - c_out) + disp(p)  =>  p = c_out + fwd (p_t - c_t - disp(p))
        k = np.clip(np.rint(to_vox(c_tum)).astype(int) - i_lo, 0, np.asarray(wshape) - 1)
        c_tum = c_out + fwd @ (p_t - c_t - np.array([d[tuple(k)] for d in disp]))
    d_edema = zoom * float(np.clip(np.exp(rng.normal(np.log(22.0), 0.45)), 4.0, 45.0))
    mass_amp = float(mass_effect) * rng.uniform(0.15, 0.35) * r_core
    mass_len = 1.3 * r_core
    n_lobes = int(rng.integers(1, 4))
    lobes = [(np.zeros(3), r_core * rng.uniform(0.75, 1.15, 3))]
    for _ in range(n_lobes - 1):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction) + 1e-9
        lobes.append((direction * rng.uniform(0.35, 0.75) * r_core, r_core * rng.uniform(0.45, 0.8, 3)))
    satellites = []
    if rng.random() < p_satellites:
        for _ in range(int(rng.integers(1, 4))):
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction) + 1e-9
            satellites.append((direction * rng.uniform(1.4, 2.6) * r_core, zoom * rng.uniform(2.5, 6.0)))
    # enhancing rim 2.5-8 mm thick on average, varying by about a third around the core
    rim_mm = zoom * float(np.exp(rng.uniform(np.log(2.5), np.log(8.0))))
    t_ncr = float(np.clip(1.0 - rim_mm / r_core, 0.35, 0.9))
    rim_amp = 0.35 * rim_mm / r_core
    # label noise draws from its own stream, so the image does not depend on label_noise
    label_rng = np.random.default_rng(rng.integers(0, 2**63))

    # --- warp: output voxel -> template voxel, with the mass effect around the tumour
    coords = np.empty((3,) + wshape, np.float32)
    q = [(a - c).reshape([-1 if i == k else 1 for k in range(3)]) for i, (a, c) in enumerate(zip(axes_world, c_out))]
    base = c_t - tpl.origin
    for a in range(3):
        coords[a] = inv[a, 0] * q[0] + inv[a, 1] * q[1] + inv[a, 2] * q[2] + base[a] + disp[a]
    del disp
    if mass_amp > 0:
        reach = 3.5 * mass_len
        m_lo = np.maximum(np.floor(np.minimum(to_vox(c_tum - reach), to_vox(c_tum + reach))).astype(int) - i_lo, 0)
        m_hi = np.minimum(np.ceil(np.maximum(to_vox(c_tum - reach), to_vox(c_tum + reach))).astype(int) + 1 - i_lo,
                          wshape)
        if np.all(m_hi > m_lo):
            sub = tuple(slice(a, b) for a, b in zip(m_lo, m_hi))
            rel = [(ax[s] - c).reshape([-1 if i == k else 1 for k in range(3)]).astype(np.float32)
                   for i, (ax, s, c) in enumerate(zip(axes_world, sub, c_tum))]
            r = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2)
            # radial displacement peaking (mass_amp) at mass_len, |d mag / d r| < 1 so the map stays invertible
            gain = (mass_amp / mass_len) * np.exp(0.5 * (1.0 - (r / mass_len) ** 2))
            for a in range(3):
                coords[a][sub] -= gain * (inv[a, 0] * rel[0] + inv[a, 1] * rel[1] + inv[a, 2] * rel[2])
    s_eff = sp / zoom
    sigma = tuple(round(float(0.42 * np.sqrt(max(s * s - 1.0, 0.0))), 1) for s in s_eff)
    maps = _smoothed_maps(sigma)
    gm, wm, csf = (ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0, output=np.float32)
                   for m in maps)
    del coords
    total = gm + wm + csf
    brain = total > 0.5
    norm = np.where(brain, 1.0 / np.maximum(total, 1e-3), 0.0).astype(np.float32)
    gm *= norm
    wm *= norm
    csf *= norm
    del total, norm

    # --- tumour geometry in a box around the centre (work-box indices)
    c_vox = to_vox(c_tum) - i_lo
    # the box holds every voxel the image tumour can reach (noise fields are clipped, geodesic >= euclidean),
    # so nothing is cut at its faces, plus a fixed margin for the label displacement (not a function of
    # label_noise, so that the image does not depend on it)
    core_mm = max(np.linalg.norm(o) + float(np.max(a)) for o, a in lobes) * np.exp(0.22 * 1.5)
    for offset, radius in satellites:
        core_mm = max(core_mm, np.linalg.norm(offset) + radius * np.exp(0.15 * 1.5))
    reach_mm = core_mm + d_edema * np.exp(0.25 * 1.5) + 4.0 * float(sp.mean()) + 2 * sp.max()
    t_lo = np.clip(np.floor(c_vox - reach_mm / sp), 0, np.asarray(wshape) - 1).astype(int)
    t_hi = np.clip(np.ceil(c_vox + reach_mm / sp) + 1, 1, wshape).astype(int)
    box = tuple(slice(a, b) for a, b in zip(t_lo, t_hi))
    bshape = tuple(int(b - a) for a, b in zip(t_lo, t_hi))
    rel = [(axes_world[i][box[i]] - c_tum[i]).reshape([-1 if i == k else 1 for k in range(3)]).astype(np.float32)
           for i in range(3)]
    brain_b, wm_b, gm_b, csf_b = brain[box], wm[box], gm[box], csf[box]

    shape_noise = np.clip(_field(rng, bshape, spacing, 0.35 * r_core), -1.5, 1.5)
    d_core = np.full(bshape, np.inf, np.float32)
    for offset, semi in lobes:
        d = np.sqrt(sum(((c - o) / s) ** 2 for c, o, s in zip(rel, offset, semi)))
        d_core = np.minimum(d_core, d)
    d_core *= np.exp(0.22 * shape_noise)
    for offset, radius in satellites:
        centre = np.rint(c_vox + offset * np.array([-1, -1, 1]) / sp).astype(int) - t_lo
        inside_box = np.all((centre >= 0) & (centre < bshape))
        if inside_box and brain_b[tuple(centre)] and wm_b[tuple(centre)] > 0.4:
            d = np.sqrt(sum((c - o) ** 2 for c, o in zip(rel, offset))) / radius
            d_core = np.minimum(d_core, d * np.exp(0.15 * shape_noise))
    rim_noise = _field(rng, bshape, spacing, 0.3 * r_core)
    edema_noise = _field(rng, bshape, spacing, max(0.3 * d_edema, 3.0 * zoom))
    tumour_tex = _field(rng, bshape, spacing, 3.0 * zoom)

    # edema: geodesic distance from the core, cheap through white matter, dear through grey matter and CSF
    speed = np.where(brain_b, wm_b + 0.15 * gm_b + 0.02 * csf_b + 0.01, 1e-3).astype(np.float32)
    tc_raw = (d_core < 1.0) & brain_b
    factor = [max(1, int(np.ceil(n / 64))) for n in bshape]
    pick = tuple(slice(f // 2, None, f) for f in factor)
    seeds = tc_raw[pick]
    if not seeds.any():
        seeds = np.zeros(seeds.shape, bool)
        seeds[tuple(np.clip((c_vox - t_lo - np.array(factor) // 2) // factor, 0,
                            np.array(seeds.shape) - 1).astype(int))] = True
    geo = _geodesic_mm(speed[pick].astype(np.float64), seeds, sp * factor)
    geo = np.where(np.isfinite(geo), geo, 1e4)
    geo = _upsample(geo.astype(np.float32), [_upsample_matrix(n, c, f) for n, c, f in
                                             zip(bshape, seeds.shape, factor)])
    geo = geo * (1.0 + 1.5 * (1.0 - wm_b)) * np.exp(0.25 * np.clip(edema_noise, -1.5, 1.5))
    geo[tc_raw] = 0.0
    geo[~brain_b] = 1e4
    grade = 0.35 + 0.65 * np.clip((d_edema - geo) / (0.6 * d_edema), 0.0, 1.0)

    def masks(sub, noise_mm):
        """(wt, tc, ncr) in the sub-box ``sub`` of the tumour box; label boundaries moved by ``noise_mm``."""
        sub_shape = d_core[sub].shape
        if noise_mm > 0:
            f = [np.clip(_field(label_rng, sub_shape, spacing, 2.0 * float(sp.mean())), -3.5, 3.5)
                 for _ in range(3)]
            shift = [noise_mm * f[0], noise_mm * f[1] / r_core, noise_mm * f[2] / r_core]
        else:
            shift = [0.0, 0.0, 0.0]
        tc0 = (d_core[sub] + shift[1] < 1.0) & brain_b[sub]
        wt = ((geo[sub] + shift[0] < d_edema) | ndimage.binary_dilation(tc0)) & brain_b[sub]
        tc = tc0 & ndimage.binary_erosion(wt)
        ncr = d_core[sub] + rim_amp * rim_noise[sub] + shift[2] < t_ncr
        return wt, tc, ncr

    everything = (slice(None),) * 3
    wt_img, tc_img, ncr_img = masks(everything, 0.0)
    tumour_img = _nest(tumour_type, wt_img, tc_img, ncr_img)
    seg_box = tumour_img
    if label_noise > 0 and wt_img.any():
        # label noise only where labels can move: the whole tumour's bounding box plus ~4 displacements
        noise_mm = float(label_noise) * float(sp.mean())
        idx = np.argwhere(wt_img)
        pad = np.ceil(4.0 * noise_mm / sp).astype(int) + 3
        lo, hi = np.maximum(idx.min(0) - pad, 0), np.minimum(idx.max(0) + pad + 1, bshape)
        sub = tuple(slice(a, b) for a, b in zip(lo, hi))
        seg_box = tumour_img.copy()
        seg_box[sub] = _nest(tumour_type, *masks(sub, noise_mm))

    # --- intensities
    table = INTENSITY_TABLE * rng.uniform(0.94, 1.06, INTENSITY_TABLE.shape).astype(np.float32)
    gamma = rng.uniform(0.85, 1.15, len(MODALITIES))
    tex_a = _field(rng, wshape, spacing, 3.0 * zoom)
    tex_b = _field(rng, wshape, spacing, 6.0 * zoom)
    wmh = None
    if rng.random() < 0.6:
        wmh_field = _field(rng, wshape, spacing, 4.0 * zoom)
        wmh = (np.clip((wmh_field - 2.3) / 0.4, 0.0, 1.0) * wm * (wm > 0.6)).astype(np.float32)
        del wmh_field
    label_tissue = {1: NCR, 2: ED, 3: ET}
    sigma_vox = [blur_mm / s for s in spacing]
    image = np.zeros((len(MODALITIES),) + shape, np.float32)
    for m in range(len(MODALITIES)):
        t = table[m]
        w = rng.uniform(-1, 1, 2).astype(np.float32)
        texture = (w[0] * tex_a + w[1] * tex_b) / np.float32(np.sqrt((w**2).sum() + 1e-6))
        vol = t[CSF] * csf + t[GM] * gm + t[WM] * wm
        if wmh is not None:
            vol += (t[WMH] - t[WM]) * wmh
        vol *= 1.0 + texture_strength * texture
        sub = vol[box]
        normal = sub.copy()
        tm = rng.uniform(-1, 1)
        tumour_scale = 1.0 + tumour_heterogeneity * (tm * tumour_tex + (1 - abs(tm)) * texture[box])
        for lab, tissue in label_tissue.items():
            sel = tumour_img == lab
            value = t[tissue] * tumour_scale[sel]
            if lab == 2:
                g = grade[sel]
                value = normal[sel] * (1 - g) + value * g
            sub[sel] = value
        if blur_mm > 0:
            sub = ndimage.gaussian_filter(sub, sigma_vox, truncate=3.0)
        vol[box] = sub
        # random per-case contrast: a gamma around white matter keeps the tissue order
        ref = float(t[WM])
        vol = ref * np.power(np.maximum(vol, 0.0) / ref, gamma[m])
        vol *= np.exp(bias_strength * _field(rng, wshape, spacing, 50.0 * zoom))
        sigma_n = noise_level * ref
        inside = vol[brain]
        n1 = rng.standard_normal(inside.shape, dtype=np.float32)
        n2 = rng.standard_normal(inside.shape, dtype=np.float32)
        inside = np.sqrt((inside + sigma_n * n1) ** 2 + (sigma_n * n2) ** 2)
        scanner_scale = float(np.exp(rng.uniform(np.log(300.0), np.log(3000.0))))
        out = np.zeros(wshape, np.float32)
        out[brain] = np.maximum(np.rint(inside * scanner_scale), 1.0)
        image[m][work] = out

    seg = np.zeros(shape, np.uint8)
    seg_work = np.zeros(wshape, np.uint8)
    seg_work[box] = seg_box
    seg_work[~brain] = 0
    seg[work] = seg_work
    if not return_tissue:
        return image, seg
    tissue = {}
    for name, arr in (("gm", gm), ("wm", wm), ("csf", csf), ("brain", brain)):
        full = np.zeros(shape, arr.dtype)
        full[work] = arr
        tissue[name] = full
    tissue["zoom"] = zoom
    return image, seg, tissue
