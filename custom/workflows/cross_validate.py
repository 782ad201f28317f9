"""Cross-validation: one ``python -m monai.bundle run training`` per (variant, fold), skipped, resumed or fresh.

Each run is the command a user would type (``scripts/cross_validate.py`` is its entry point):
``python -m monai.bundle run training --bundle_root bundle --config_file "[train.json, <variant>.json?,
<config>.json?]" --work_dir W --fold k``. What happens to a run folder is :meth:`custom.core.layout.RunDir.state`,
for a run of the planned settings: a finished or interrupted run whose ``train_config.json`` differs from the
planned one (:func:`planned_run_config`, compared by :func:`custom.core.run_config.config_differences`) is
:data:`custom.core.layout.RUN_OTHER_CONFIG`: never skipped as done, never resumed, and the cross-validation stops
naming it unless told to set it aside (``other_config="retrain"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Mapping, Sequence

from fire.parser import DefaultParseValue
from monai.bundle import ConfigParser

from custom.core.errors import BraTSInputError
from custom.core.layout import (
    BUNDLE_ROOT,
    CONFIG_DIR,
    REPO_ROOT,
    RUN_FINISHED,
    RUN_FRESH,
    RUN_OTHER_CONFIG,
    RUN_RESUMABLE,
    RunDir,
    WorkDir,
)
from custom.core.run_config import RESUMABLE_KEYS, config_differences, jsonable, read_run_config
from custom.data.datalist import fold_split, load_datalist

#: variants and the config file each adds on top of train.json (None: train.json alone)
VARIANT_CONFIGS = {"unc": None, "baseline": "baseline.json", "mcdropout": "mcdropout.json"}

_HEADER = "cannot plan the cross-validation"

#: what cross_validate does with a run of other settings: stop naming it, or set it aside and train anew
OTHER_CONFIG_ACTIONS = ("stop", "retrain")


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


def planned_run_config(files: Sequence, work_dir, fold: int, overrides: Mapping | None = None) -> dict:
    """The ``run_config`` (train.json) that :func:`training_command` with these arguments writes to
    ``train_config.json``, resolved without training: the config files layered, ``work_dir``/``fold`` and the
    ``overrides`` applied as the command line hands them to the bundle (``--key value`` parsed by ``fire``), the
    fold's case lists read from the datalist (the preprocessed cache need not be on this machine).

    Raises:
        BraTSInputError: the datalist or the plan is missing or unreadable, or the fold is not in the datalist.
    """
    parser = ConfigParser()
    parser.read_config([str(f) for f in files])
    parser.update({"work_dir": str(work_dir), "fold": int(fold)})
    args = override_args(overrides)
    parser.update({args[i][2:]: DefaultParseValue(args[i + 1]) for i in range(0, len(args), 2)})
    datalist = load_datalist(Path(parser.get_parsed_content("datalist")))
    num_folds = int(datalist.get("num_folds", 0))
    if not 0 <= int(fold) < num_folds:
        raise BraTSInputError(f"{parser.get_parsed_content('datalist')}: fold {fold} is not in 0..{num_folds - 1}",
                              header=_HEADER)
    train, val = fold_split(datalist, int(fold))
    parser["train_items"] = [{"case_id": e["case_id"]} for e in train]
    parser["val_items"] = [{"case_id": e["case_id"]} for e in val]
    plans_path = Path(parser.get_parsed_content("plans_path"))
    if not plans_path.is_file():
        raise BraTSInputError(f"{plans_path}: not found (run scripts/prepare_data.py first)", header=_HEADER)
    return jsonable(parser.get_parsed_content("run_config"))


def run_config_differences(run: RunDir, planned: Mapping, state: str) -> list[str]:
    """What in ``run``'s ``train_config.json`` differs from ``planned`` (:mod:`custom.core.run_config`); for a
    run to resume, ``num_epochs`` may differ (a resumed run trains to the planned number)."""
    saved = read_run_config(run.train_config)
    if saved is None:
        return [f"{run.train_config}: missing, so its settings cannot be checked"]
    return config_differences(saved, planned, ignore=RESUMABLE_KEYS if state == RUN_RESUMABLE else ())


def expected_run_configs(work_dir, config=None, overrides=None):
    """``expected(variant, fold) -> planned run_config`` (:func:`planned_run_config`, each resolved once) for
    :func:`custom.evaluation.runs.collect_runs`: what this cross-validation's runs must have been trained with."""
    cache: dict = {}

    def expected(variant: str, fold: int) -> dict:
        if (variant, fold) not in cache:
            cache[variant, fold] = planned_run_config(config_files(variant, config), work_dir, fold, overrides)
        return cache[variant, fold]

    return expected


def plan_jobs(work_dir, folds=None, variants=("unc", "baseline"), config=None, overrides=None) -> list:
    """One job dict per (variant, fold): ``{"variant", "fold", "state", "differences", "run_dir", "log", "cmd"}``.

    ``state`` is :meth:`RunDir.state` (``finished``, ``resume`` or ``fresh``), or ``other_config`` for a finished
    or interrupted run whose settings differ from the planned ones (``differences`` names each); folds default
    to the datalist's ``num_folds``; ``overrides`` (bundle settings) become ``--key value`` arguments.
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
            differences = []
            if state != RUN_FRESH:
                differences = run_config_differences(run, planned_run_config(files, work.path, f, overrides), state)
                if differences:
                    state = RUN_OTHER_CONFIG
            # the output goes to a log file, where a progress bar is noise (the loss lines are the progress)
            run_args = {"progress_bar": "false"}
            if state == RUN_RESUMABLE:
                run_args["resume"] = "true"
            cmd = training_command(files, work.path, f, run_args) + override_args(overrides)
            jobs.append({"variant": v, "fold": f, "state": state, "differences": differences,
                         "run_dir": str(run.path), "log": str(run.log), "cmd": cmd})
    return jobs


def other_config_message(jobs: Sequence[Mapping]) -> list[str]:
    """One line per run of other settings, naming its folder and each differing setting."""
    return [f"{j['run_dir']}: trained with other settings ({'; '.join(j['differences'])})"
            for j in jobs if j["state"] == RUN_OTHER_CONFIG]


def set_aside_other_config_runs(jobs: Sequence[dict]) -> None:
    """Move each run of other settings to :meth:`RunDir.set_aside` and plan it as a fresh run."""
    for j in jobs:
        if j["state"] != RUN_OTHER_CONFIG:
            continue
        moved = RunDir(j["run_dir"]).set_aside()
        print(f"[cv] {j['variant']} fold {j['fold']}: run of other settings moved to {moved}; training anew",
              flush=True)
        j["state"] = RUN_FRESH
        if "--resume" in j["cmd"]:
            i = j["cmd"].index("--resume")
            del j["cmd"][i:i + 2]


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
    todo = [j for j in jobs if j["state"] in (RUN_FRESH, RUN_RESUMABLE)]
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
                   overrides=None, dry_run: bool = False, other_config: str = "stop") -> list:
    """Plan the jobs, print the skipped ones, and (unless ``dry_run``) train the others.

    A run of other settings stops everything before any training (``other_config="stop"``, the default:
    :class:`BraTSInputError` naming each run and setting) or is moved aside and trained anew
    (``other_config="retrain"``). Returns the planned jobs; jobs that ran carry ``returncode`` and ``seconds``.
    """
    if overrides is not None and not isinstance(overrides, dict):
        raise BraTSInputError(f"--overrides must be a JSON object of bundle settings, got {overrides!r}")
    if other_config not in OTHER_CONFIG_ACTIONS:
        raise BraTSInputError(f"--other_config must be one of {', '.join(OTHER_CONFIG_ACTIONS)}, got {other_config!r}",
                              header=_HEADER)
    jobs = plan_jobs(work_dir, folds=folds, variants=variants, config=config, overrides=overrides)
    for j in jobs:
        if j["state"] == RUN_FINISHED:
            print(f"[cv] {j['variant']} fold {j['fold']}: finished already (same settings), skipped")
    others = other_config_message(jobs)
    if others and not dry_run:
        if other_config == "stop":
            raise BraTSInputError(
                others + ["these runs are not part of this cross-validation: move each folder away, or pass "
                          "--other_config retrain to set them aside (renamed, kept) and train them anew; "
                          "or repeat the --config/--overrides they were trained with"],
                header=f"{len(others)} run(s) in {WorkDir(work_dir).runs} have other settings than planned")
        set_aside_other_config_runs(jobs)
    if not dry_run:
        run_jobs(jobs, devices=devices)
    return jobs
