"""Figure of synthetic cases: the four contrasts and the labels of one axial slice per case (README, DESIGN.md)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from custom.core.constants import MODALITIES, SEG_SUFFIX
from custom.data.synthetic import write_dataset

LABEL_COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.8, 0.2), 3: (1.0, 0.9, 0.1)}
LABEL_NAMES = {1: "NCR", 2: "ED", 3: "ET"}


def _load_case(case_dir: Path):
    import nibabel as nib

    case_id = case_dir.name
    image = np.stack([np.asanyarray(nib.load(case_dir / f"{case_id}-{m}.nii.gz").dataobj) for m in MODALITIES])
    seg = np.asanyarray(nib.load(case_dir / f"{case_id}-{SEG_SUFFIX}.nii.gz").dataobj)
    return image.astype(np.float32), seg.astype(np.uint8)


def render_case_figure(case_dirs, out_png, titles=None, dpi: int = 72) -> Path:
    """One row per case folder: t1c, t1n, t2f, t2w and the labels over t1c, axial slice of largest tumour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    case_dirs = [Path(c) for c in case_dirs]
    titles = list(titles) if titles else [c.name for c in case_dirs]
    fig, axes = plt.subplots(len(case_dirs), 5, figsize=(11.0, 2.45 * len(case_dirs)), squeeze=False)
    for row, (case_dir, title) in enumerate(zip(case_dirs, titles)):
        image, seg = _load_case(case_dir)
        area = (seg > 0).sum((0, 1))
        z = int(np.argmax(area)) if area.any() else seg.shape[2] // 2
        # stored LPS-style: i -> patient left, j -> posterior; .T puts anterior up and patient right on the left
        panels = [image[m][:, :, z].T for m in range(len(MODALITIES))]
        for m, panel in enumerate(panels):
            inside = image[m][image[m] > 0]
            vmax = float(np.percentile(inside, 99.5)) if inside.size else 1.0
            axes[row, m].imshow(panel, cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
            axes[row, m].set_title(f"{MODALITIES[m]}", fontsize=9)
        base = panels[0] / max(float(np.percentile(image[0][image[0] > 0], 99.5)), 1.0)
        rgb = np.repeat(np.clip(base, 0, 1)[..., None], 3, axis=2)
        lab = seg[:, :, z].T
        for value, colour in LABEL_COLOURS.items():
            rgb[lab == value] = 0.35 * rgb[lab == value] + 0.65 * np.asarray(colour)
        axes[row, 4].imshow(rgb, interpolation="nearest")
        present = [LABEL_NAMES[v] for v in LABEL_COLOURS if (seg == v).any()]
        axes[row, 4].set_title("labels: " + ", ".join(present), fontsize=9)
        axes[row, 0].set_ylabel(f"{title}\nz={z}", fontsize=9)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    plt.close(fig)
    return out_png


def render_synthetic_examples(out_png, seed: int = 0, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0),
                              anatomies=("blob", "mni152"), dpi: int = 72) -> Path:
    """Generate case 0 of ``seed`` with each generator in ``anatomies`` and render them into ``out_png``."""
    with tempfile.TemporaryDirectory(prefix="synthetic_figure_") as tmp:
        dirs, titles = [], []
        for name in anatomies:
            ids = write_dataset(Path(tmp) / name, 1, shape, spacing, int(seed), anatomy=name)
            dirs.append(Path(tmp) / name / ids[0])
            titles.append(f"{name} (seed {seed})")
        return render_case_figure(dirs, out_png, titles, dpi=int(dpi))
