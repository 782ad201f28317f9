"""Train every fold of every variant through the bundle (5-fold cross-validation, with/without uncertainty).

    python scripts/cross_validate.py --work_dir W [--folds "[0,1,2,3,4]"] [--variants "[unc,baseline]"]
        [--config tiny] [--devices "[0,1]"] [--overrides '{"num_epochs": 4}'] [--dry_run false]

Each run is the same command a user would type:
``python -m monai.bundle run training --bundle_root bundle --config_file "[train.json, <variant>.json?,
<config>.json?]" --work_dir W --fold k`` (the ``unc`` variant is train.json alone). Runs with a FINISHED
marker are skipped; a run with ``checkpoint_last.pt`` but no FINISHED is resumed (``--resume true``);
anything else starts fresh. With ``--devices`` the runs are spread over those GPUs
(``CUDA_VISIBLE_DEVICES``), one process per device at a time; without, they run one after another.
Each run's output goes to ``W/runs/<variant>/fold<k>.log``. Folds default to the datalist's num_folds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import fire  # noqa: E402

from custom.core.cli import as_bool, as_list  # noqa: E402
from custom.core.errors import BraTSInputError  # noqa: E402

BUNDLE_ROOT = REPO_ROOT / "bundle"
CONFIG_DIR = BUNDLE_ROOT / "configs"
#: variants and the config file each adds on top of train.json (None: train.json alone)
VARIANT_CONFIGS = {"unc": None, "baseline": "baseline.json", "mcdropout": "mcdropout.json"}


def config_files(variant: str, config: str | None = None) -> list:
    """``[train.json, <variant>.json?, <config>.json?]`` as paths; unknown names raise ``BraTSInputError``."""
    if variant not in VARIANT_CONFIGS:
        raise BraTSInputError(f"unknown variant {variant!r}; expected one of {sorted(VARIANT_CONFIGS)}",
                              header="cannot plan the cross-validation")
    files = [CONFIG_DIR / "train.json"]
    if VARIANT_CONFIGS[variant]:
        files.append(CONFIG_DIR / VARIANT_CONFIGS[variant])
    if config:
        name = config if str(config).endswith(".json") else f"{config}.json"
        p = Path(name) if Path(name).is_absolute() else CONFIG_DIR / name
        files.append(p)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise BraTSInputError([f"{m}: bundle config file missing" for m in missing],
                              header="cannot plan the cross-validation")
    return files


def run_state(run_dir: Path) -> str:
    """``finished`` (FINISHED marker), ``resume`` (checkpoint_last.pt, no marker) or ``fresh``."""
    if (run_dir / "FINISHED").exists():
        return "finished"
    if (run_dir / "checkpoint_last.pt").is_file():
        return "resume"
    return "fresh"


def plan_jobs(work_dir, folds=None, variants=("unc", "baseline"), config=None, overrides=None) -> list:
    """One job dict per (variant, fold): ``{"variant", "fold", "state", "run_dir", "log", "cmd"}``."""
    work_dir = Path(work_dir).resolve()
    datalist = work_dir / "datalist.json"
    if not datalist.is_file():
        raise BraTSInputError(f"{datalist}: missing (run scripts/prepare_data.py first)",
                              header="cannot plan the cross-validation")
    num_folds = int(json.loads(datalist.read_text()).get("num_folds", 5))
    folds = list(range(num_folds)) if folds is None else [int(f) for f in folds]
    bad = [f for f in folds if not 0 <= f < num_folds]
    if bad:
        raise BraTSInputError(f"{datalist}: folds {bad} outside [0, {num_folds}) of this datalist",
                              header="cannot plan the cross-validation")
    jobs = []
    for v in variants:
        files = config_files(v, config)
        for f in folds:
            run_dir = work_dir / "runs" / v / f"fold{f}"
            state = run_state(run_dir)
            cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", str(BUNDLE_ROOT),
                   "--config_file", "[" + ",".join(f"'{p}'" for p in files) + "]",
                   "--work_dir", str(work_dir), "--fold", str(f)]
            if state == "resume":
                cmd += ["--resume", "true"]
            for key, val in (overrides or {}).items():
                cmd += [f"--{key}", json.dumps(val) if not isinstance(val, str) else val]
            jobs.append({"variant": v, "fold": f, "state": state, "run_dir": str(run_dir),
                         "log": str(work_dir / "runs" / v / f"fold{f}.log"), "cmd": cmd})
    return jobs


def _run_job(job: dict, device=None) -> int:
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
    todo = [j for j in jobs if j["state"] != "finished"]
    if not devices:
        for j in todo:
            _run_job(j)
        return todo
    lock = threading.Lock()
    queue = list(todo)

    def worker(dev):
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            _run_job(job, dev)

    threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return todo


def main(work_dir: str, folds=None, variants="unc,baseline", config: str | None = None, devices=None,
         overrides=None, dry_run: bool = False):
    """Train the missing/interrupted runs; print one line per run and a summary line."""
    try:
        if isinstance(overrides, str):
            overrides = json.loads(overrides)
        if overrides is not None and not isinstance(overrides, dict):
            raise BraTSInputError(f"--overrides must be a JSON object of bundle settings, got {overrides!r}")
        dry_run = as_bool(dry_run, "dry_run")
        devices = as_list(devices, "devices")
        jobs = plan_jobs(work_dir, folds=as_list(folds, "folds"),
                         variants=as_list(variants, "variants") or ("unc", "baseline"), config=config,
                         overrides=overrides)
    except (BraTSInputError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for j in jobs:
        if j["state"] == "finished":
            print(f"[cv] {j['variant']} fold {j['fold']}: finished already, skipped")
    if dry_run:
        print(json.dumps([{k: j[k] for k in ("variant", "fold", "state", "run_dir", "cmd")} for j in jobs]))
        return
    ran = run_jobs(jobs, devices=devices)
    failed = [j for j in ran if j.get("returncode")]
    print(f"[cv] {len(jobs)} runs: {len(jobs) - len(ran)} skipped (finished), {len(ran) - len(failed)} trained, "
          f"{len(failed)} failed" + (": " + ", ".join(f"{j['variant']} fold {j['fold']} ({j['log']})"
                                                       for j in failed) if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    fire.Fire(main)
