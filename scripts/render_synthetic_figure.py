"""Figure: one synthetic case of each generator, four contrasts and the labels on the axial slice of largest tumour.

    python scripts/render_synthetic_figure.py --out bundle/docs/synthetic_cases.png [--seed 0]
        [--shape "[240,240,155]"] [--spacing "[1,1,1]"] [--anatomies "[blob,mni152]"] [--case_dirs "[A,B]"]

Writes the cases with ``write_dataset`` into a temporary folder (or reads existing case folders given by
``--case_dirs``) and renders them from their NIfTI files, as a user would see them: radiological convention
(patient's right on the left, anterior at the top), labels NCR red, ED green, ET yellow over t1c.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402
import numpy as np  # noqa: E402

from custom.cli import as_list  # noqa: E402
from custom.constants import MODALITIES, SEG_SUFFIX  # noqa: E402

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


def main(out: str = "bundle/docs/synthetic_cases.png", seed: int = 0, shape="[240,240,155]", spacing="[1,1,1]",
         anatomies="[blob,mni152]", case_dirs=None, dpi: int = 72):
    """Generate one case per anatomy (case 0 of ``seed``) and render them into OUT."""
    from custom.synthetic import write_dataset

    if case_dirs is not None:
        dirs = [Path(c) for c in as_list(case_dirs, "case_dirs")]
        print(f"render_synthetic_figure: wrote {render_case_figure(dirs, out, dpi=int(dpi))}")
        return
    shape = as_list(shape, "shape", length=3, cast=int)
    spacing = as_list(spacing, "spacing", length=3, cast=float)
    names = as_list(anatomies, "anatomies")
    with tempfile.TemporaryDirectory(prefix="synthetic_figure_") as tmp:
        dirs, titles = [], []
        for name in names:
            ids = write_dataset(Path(tmp) / name, 1, shape, spacing, int(seed), anatomy=name)
            dirs.append(Path(tmp) / name / ids[0])
            titles.append(f"{name} (seed {seed})")
        path = render_case_figure(dirs, out, titles, dpi=int(dpi))
    print(f"render_synthetic_figure: wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    fire.Fire(main)
