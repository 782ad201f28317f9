"""Figure: one synthetic case of each generator, four contrasts and the labels on the axial slice of largest tumour.

    .venv/bin/python scripts/render_synthetic_figure.py --out bundle/docs/synthetic_cases.png [--seed 0]
        [--shape "[240,240,155]"] [--spacing "[1,1,1]"] [--anatomies "[blob,mni152]"] [--case_dirs "[A,B]"]

Writes the cases with ``write_dataset`` into a temporary folder (or reads existing case folders given by
``--case_dirs``) and renders them from their NIfTI files, as a user would see them: radiological convention
(patient's right on the left, anterior at the top), labels NCR red, ED green, ET yellow over t1c.
"""

from __future__ import annotations

from pathlib import Path

import fire

from custom.core.cli import as_list
from custom.workflows.synthetic_figure import render_case_figure, render_synthetic_examples


def main(out: str = "bundle/docs/synthetic_cases.png", seed: int = 0, shape="[240,240,155]", spacing="[1,1,1]",
         anatomies="[blob,mni152]", case_dirs=None, dpi: int = 72):
    """Render one axial slice (four contrasts + labels) per case into OUT.

    Args:
        out: PNG to write.
        seed: seed of the generated cases (case 0 of each generator).
        shape, spacing: grid of the generated cases.
        anatomies: generators to show, e.g. "[blob,mni152]".
        case_dirs: render these existing BraTS case folders instead of generating cases.
        dpi: figure resolution.
    """
    if case_dirs is not None:
        path = render_case_figure([Path(c) for c in as_list(case_dirs, "case_dirs")], out, dpi=int(dpi))
    else:
        path = render_synthetic_examples(out, int(seed), as_list(shape, "shape", length=3, cast=int),
                                         as_list(spacing, "spacing", length=3, cast=float),
                                         as_list(anatomies, "anatomies"), dpi=int(dpi))
    print(f"render_synthetic_figure: wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    fire.Fire(main)
