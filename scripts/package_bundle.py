"""Package a trained checkpoint as a self-contained MONAI bundle (the model zoo's layout) and a zip of it.

    python scripts/package_bundle.py --checkpoint W/runs/unc/fold0/model.pt --out_dir dist [--name brats_unc_nnunet]
        [--work_dir W] [--version 0.2.1 --changelog "TEXT"] [--model_url BASE] [--zip true] [--overwrite false]

Writes dist/<name>/ (configs, models/model.pt as a plain state dict, models/model.ts, models/plans.json, docs,
LICENSE, large_files.yml, and the code the configs import under custom/ and scripts/) and dist/<name>.zip. The
bundle runs with only the packages its metadata.json lists, from its own folder:

    cd dist/<name> && python -m monai.bundle run --config_file configs/inference.json --dataset_dir CASES --output_dir OUT

Logic: custom/deploy/package.py.
"""

import json
import sys

import fire

from custom.core.cli import as_bool
from custom.core.errors import BraTSInputError
from custom.deploy.package import BUNDLE_NAME, package_bundle


def main(checkpoint: str, out_dir: str, name: str = BUNDLE_NAME, work_dir: str = None, version: str = None,
         changelog: str = None, model_url: str = "", zip=True, overwrite=False) -> None:
    """Package CHECKPOINT (plans.json beside it, else WORK_DIR/plans.json) into OUT_DIR/NAME/ and OUT_DIR/NAME.zip.

    Args:
        checkpoint: a training checkpoint (model.pt of a run) or a plain state dict.
        out_dir: where the bundle folder and the zip go.
        name: the bundle's folder name.
        work_dir: work directory whose plans.json to use when none lies beside the checkpoint.
        version: bundle version for metadata.json (default: the repository bundle's); a new one needs --changelog.
        changelog: the changelog entry of --version.
        model_url: base URL the large files will be downloadable from (large_files.yml); empty: fill in later.
        zip: also write OUT_DIR/NAME.zip.
        overwrite: replace an existing bundle of that name.
    """
    try:
        report = package_bundle(checkpoint, out_dir, name=name, work_dir=work_dir, version=version,
                                changelog=changelog, model_url=model_url or "", make_zip=as_bool(zip, "zip"),
                                overwrite=as_bool(overwrite, "overwrite"))
    except BraTSInputError as exc:
        print(f"package_bundle failed: {exc}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(report))
    print(f"package_bundle: {report['bundle']} (version {report['version']}, {report['code_files']} code files)"
          + (f", {report['zip']}" if report["zip"] else ""))


if __name__ == "__main__":
    fire.Fire(main)
