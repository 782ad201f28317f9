"""Train every fold of every variant through the bundle (5-fold cross-validation, with/without uncertainty).

    .venv/bin/python scripts/cross_validate.py --work_dir W [--folds "[0,1,2,3,4]"] [--variants "[unc,baseline]"]
        [--config tiny] [--devices "[0,1]"] [--overrides '{"num_epochs": 4}'] [--other_config stop]
        [--dry_run false]

The procedure is :mod:`custom.workflows.cross_validate`.
"""

from __future__ import annotations

import json
import sys

import fire

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError
from custom.workflows.cross_validate import cross_validate


def main(work_dir: str, folds=None, variants="unc,baseline", config: str | None = None, devices=None,
         overrides=None, other_config: str = "stop", dry_run: bool = False):
    """Train the missing and interrupted runs of a work dir; print one line per run and a summary line.

    Each run is ``.venv/bin/python -m monai.bundle run training --bundle_root bundle --config_file "[train.json,
    <variant>.json?, <config>.json?]" --work_dir W --fold k --progress_bar false`` (the ``unc`` variant is
    train.json alone), its output appended to ``W/runs/<variant>/fold<k>.log``. A run with a FINISHED marker and
    the planned settings (its train_config.json against the resolved configs and overrides) is skipped; one
    with ``checkpoint_last.pt`` but no FINISHED is resumed (``--resume true``); anything else starts fresh. A
    finished or interrupted run of OTHER settings (a 2-epoch smoke test in fold 0 of a 500-epoch plan) is never
    counted as done: see --other_config. Exit status 1 when a run fails, 2 on bad options or runs of other
    settings.

    Args:
        work_dir: the prepared work directory W (scripts/prepare_data.py).
        folds: folds to train, e.g. "[0,1]" (default: every fold of W/datalist.json).
        variants: "unc" (with the uncertainty channel), "baseline" (without) and/or "mcdropout" (dropout for
            the MC-dropout comparison), e.g. "[unc,baseline]".
        config: an extra config layered last, a name in bundle/configs ("tiny") or a path to a .json file.
        devices: GPUs to spread the runs over, one run per device at a time (CUDA_VISIBLE_DEVICES), e.g.
            "[0,1]"; without, the runs go one after another.
        overrides: JSON object of bundle settings passed to every run as --key value, e.g. '{"num_epochs": 4}'.
        other_config: what to do with a run whose settings differ from the planned ones: "stop" (default: name
            each run and setting, train nothing) or "retrain" (rename it to fold<k>.other_config-<n>, kept, and
            train the fold anew).
        dry_run: print the planned jobs (variant, fold, state, differences, run_dir, cmd) as one JSON line and
            train nothing.
    """
    try:
        if isinstance(overrides, str):
            overrides = json.loads(overrides)
        dry_run = as_bool(dry_run, "dry_run")
        jobs = cross_validate(work_dir, folds=as_list(folds, "folds"),
                              variants=as_list(variants, "variants") or ("unc", "baseline"), config=config,
                              devices=as_list(devices, "devices"), overrides=overrides,
                              other_config=str(other_config), dry_run=dry_run)
    except (BraTSInputError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    if dry_run:
        print(json.dumps([{k: j[k] for k in ("variant", "fold", "state", "differences", "run_dir", "cmd")}
                          for j in jobs]))
        return
    ran = [j for j in jobs if "returncode" in j]
    failed = [j for j in ran if j["returncode"]]
    print(f"[cv] {len(jobs)} runs: {len(jobs) - len(ran)} skipped (finished), {len(ran) - len(failed)} trained, "
          f"{len(failed)} failed" + (": " + ", ".join(f"{j['variant']} fold {j['fold']} ({j['log']})"
                                                       for j in failed) if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
