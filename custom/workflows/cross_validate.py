"""Cross-validation: one ``python -m monai.bundle run training`` per (variant, fold), skipped, resumed or fresh.

Each run is the command a user would type (``scripts/cross_validate.py`` is its entry point):
``python -m monai.bundle run training --bundle_root bundle --config_file "[train.json, <variant>.json?,
<config>.json?]" --work_dir W --fold k``. What happens to a run folder is :meth:`custom.core.layout.RunDir.state`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from custom.core.errors import BraTSInputError
from custom.core.layout import BUNDLE_ROOT, CONFIG_DIR, REPO_ROOT, RUN_FINISHED, RUN_RESUMABLE, WorkDir

#: variants and the config file each adds on top of train.json (None: train.json alone)
VARIANT_CONFIGS = {"unc": None, "baseline": "baseline.json", "mcdropout": "mcdropout.json"}

_HEADER = "cannot plan the cross-validation"


def config_files(variant: str, config: str | None = None) -> list:
    """``[train.json, <variant>.json?, <config>.json?]`` as paths; unknown names raise ``BraTSInputError``."""
    if variant not in VARIANT_CONFIGS:
        raise BraTSInputError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_CONFIGS)}",
                              header=_HEADER)
    files = [CONFIG_DIR / "train.json"]
    if VARIANT_CONFIGS[variant]:
        files.append(CONFIG_DIR / VARIANT_CONFIGS[variant])
    if config:
        name = config if str(config).endswith(".json") else f"{config}.json"
        p = Path(name) if Path(name).is_absolute() else CONFIG_DIR / name
        files.append(p)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise BraTSInputError([f"{m}: bundle config file missing" for m in missing], header=_HEADER)
    return files


def override_args(overrides) -> list:
    """``--key value`` arguments of bundle settings (non-strings as JSON, so lists and numbers survive)."""
    args = []
    for key, val in (overrides or {}).items():
        args += [f"--{key}", json.dumps(val) if not isinstance(val, str) else val]
    return args


def training_command(files, work_dir, fold: int, overrides=None) -> list:
    """``python -m monai.bundle run training --bundle_root bundle --config_file "[...]" --work_dir W --fold k``
    followed by ``overrides`` as ``--key value``: one training run, as a user types it."""
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE_ROOT),
            "--config_file", "[" + ",".join(f"'{p}'" for p in files) + "]",
            "--work_dir", str(work_dir), "--fold", str(int(fold))] + override_args(overrides)


def plan_jobs(work_dir, folds=None, variants=("unc", "baseline"), config=None, overrides=None) -> list:
    """One job dict per (variant, fold): ``{"variant", "fold", "state", "run_dir", "log", "cmd"}``.

    ``state`` is :meth:`RunDir.state` (``finished``, ``resume`` or ``fresh``); folds default to the datalist's
    ``num_folds``; ``overrides`` (bundle settings) become ``--key value`` arguments.
    """
    work = WorkDir(Path(work_dir).resolve())
    if not work.datalist.is_file():
        raise BraTSInputError(f"{work.datalist}: missing (run scripts/prepare_data.py first)", header=_HEADER)
    num_folds = int(json.loads(work.datalist.read_text()).get("num_folds", 5))
    folds = list(range(num_folds)) if folds is None else [int(f) for f in folds]
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad:
        raise BraTSInputError(f"{work.datalist}: folds {bad} outside [0, {num_folds}) of this datalist",
                              header=_HEADER)
    jobs = []
    for v in variants:
        files = config_files(v, config)
        for f in folds:
            run = work.run(v, f)
            state = run.state()
            cmd = training_command(files, work.path, f, {"resume": "true"} if state == RUN_RESUMABLE else {})
            cmd += override_args(overrides)
            jobs.append({"variant": v, "fold": f, "state": state, "run_dir": str(run.path), "log": str(run.log),
                         "cmd": cmd})
    return jobs


def run_job(job: dict, device=None) -> int:
    """Run one job (appending its output to ``job["log"]``); sets ``returncode`` and ``seconds`` on it."""
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(device)
    Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(job["log"], "a") as log:
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} device={device} state={job['state']}\n"
                  f"# {' '.join(job['cmd'])}\n")
        log.flush()
        rc = subprocess.call(job["cmd"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    job["returncode"], job["seconds"] = rc, round(time.time() - t0, 1)
    where = f" on device {device}" if device is not None else ""
    status = "done" if rc == 0 else f"FAILED (exit {rc}, see {job['log']})"
    print(f"[cv] {job['variant']} fold {job['fold']}{where}: {status} in {job['seconds']} s", flush=True)
    return rc


def run_jobs(jobs: list, devices=None) -> list:
    """Run the non-finished jobs: sequentially, or one worker thread per device pulling from a queue."""
    todo = [j for j in jobs if j["state"] != RUN_FINISHED]
    if not devices:
        for j in todo:
            run_job(j)
        return todo
    lock = threading.Lock()
    queue = list(todo)

    def worker(dev):
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            run_job(job, dev)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return todo


def cross_validate(work_dir, folds=None, variants=("unc", "baseline"), config=None, devices=None,
                   overrides=None, dry_run: bool = False) -> list:
    """Plan the jobs, print the skipped ones, and (unless ``dry_run``) train the others.

    Returns the planned jobs; jobs that ran carry ``returncode`` and ``seconds``.
    """
    if overrides is not None and not isinstance(overrides, dict):
        raise BraTSInputError(f"--overrides must be a JSON object of bundle settings, got {overrides!r}")
    jobs = plan_jobs(work_dir, folds=folds, variants=variants, config=config, overrides=overrides)
    for j in jobs:
        if j["state"] == RUN_FINISHED:
            print(f"[cv] {j['variant']} fold {j['fold']}: finished already, skipped")
    if not dry_run:
        run_jobs(jobs, devices=devices)
    return jobs
