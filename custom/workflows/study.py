"""The self-assessment study (``scripts/study_uncertainty.py``; issue 13): which way of training the uncertainty head
predicts the errors of cases the model never saw, against the usual baselines, over several training seeds.

Steps, each skipped when its output exists with the same settings (the command is resumable; ``study_settings.json``
records them and a different setting is refused, naming it):

1. data: a training set and a separately seeded set of unseen test cases with their own case ids
   (:func:`custom.data.synthetic.write_dataset`, ``anatomy`` "mni152" = real brain anatomy by default), or the user's
   ``dataset_dir`` and ``test_dir`` (real BraTS: hold out a folder of labelled cases);
2. ``prepare_data`` on the training set (``num_folds`` folds; fold 0's validation cases are the calibration set);
3. training, fold 0, one run per (variant, seed) through ``python -m monai.bundle run training`` (``parallel`` at a
   time): the no-head ``baseline``, the candidate heads (``unc_loss``: paper, ring, two_region, proper,
   paper_proper; trained
   jointly, or on detached features: ``_sg``, :data:`STUDY_VARIANTS`) and the dropout-trained ``mcdropout``;
4. per seed, :func:`custom.workflows.heldout.score_test_set`: every map calibrated on fold 0's validation cases and
   scored on the test cases, paired against the paper's joint (``paper``) model's segmentation; Dice with and without
   the head on the test cases; a variant or seed added to a finished study scores only the maps it adds
   (``seed<k>/added<n>/``, :func:`evaluate_seed`);
5. ``study.json`` (flat keys: ``seed<k>.<method>.<metric>``, ``seed_mean.``, ``seed_sd.``; ``dice.*``), ``study.md``.

Methods: ``unc_<head>`` (the head of each candidate, 1 pass), ``var1shot`` and ``tta`` (the no-head baseline model:
1 and 8 passes), ``mc_dropout`` (the dropout model, N passes), ``ensemble`` (the baseline models of all seeds, one
pass each; the same in every seed's column).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from custom.core.atomic import atomic_write_bytes, atomic_write_json
from custom.core.constants import REGIONS
from custom.core.errors import BraTSInputError
from custom.core.layout import CONFIG_DIR, REPO_ROOT, RUN_FINISHED, RUN_RESUMABLE, ReportDir, WorkDir
from custom.data.cases import find_case_files, list_case_folders
from custom.data.datalist import fold_split, load_datalist
from custom.data.synthetic import write_dataset
from custom.evaluation.bootstrap import bootstrap_indices, percentile_interval
from custom.evaluation.folder import to_json_safe
from custom.evaluation.self_assessment import combine_seeds, render_seed_markdown
from custom.inference.segmenter import UncertaintySegmenter
from custom.workflows.cross_validate import training_command
from custom.workflows.heldout import (
    ensemble_method,
    head_method,
    mc_dropout_method,
    render_heldout_markdown,
    run_dropout,
    score_test_set,
    tta_method,
    var1shot_method,
    write_result,
)
from custom.workflows.prepare import prepare_data

#: training variants of the study: extra config file and bundle overrides. ``<head>`` trains the head jointly with
#: the network (the paper's way); ``<head>_sg`` trains it on detached features (``unc_stop_gradient``): the
#: segmentation is then trained by the segmentation loss alone, so heads compare on equal segmentations
STUDY_VARIANTS = {
    "baseline": {"config": "baseline.json", "overrides": {}},
    "paper": {"config": None, "overrides": {"unc_loss": "paper", "unc_stop_gradient": "false"}},
    "ring": {"config": None, "overrides": {"unc_loss": "ring", "unc_stop_gradient": "false"}},
    "two_region": {"config": None, "overrides": {"unc_loss": "two_region", "unc_stop_gradient": "false"}},
    "proper": {"config": None, "overrides": {"unc_loss": "proper", "unc_stop_gradient": "false"}},
    "paper_sg": {"config": None, "overrides": {"unc_loss": "paper", "unc_stop_gradient": "true"}},
    "ring_sg": {"config": None, "overrides": {"unc_loss": "ring", "unc_stop_gradient": "true"}},
    "two_region_sg": {"config": None, "overrides": {"unc_loss": "two_region", "unc_stop_gradient": "true"}},
    "proper_sg": {"config": None, "overrides": {"unc_loss": "proper", "unc_stop_gradient": "true"}},
    "paper_proper": {"config": None, "overrides": {"unc_loss": "paper_proper", "unc_stop_gradient": "false"}},
    "paper_proper_sg": {"config": None, "overrides": {"unc_loss": "paper_proper", "unc_stop_gradient": "true"}},
    "mcdropout": {"config": "mcdropout.json", "overrides": {}},
}
#: the study's default set, sized to fit the ~100 minutes of 2 CPU cores (12 tiny-plan runs, two at a time, and the
#: scoring of 3 seeds: 38 min measured, bundle/docs/study/default_set): the no-head baseline (var1shot, TTA, the
#: ensemble, Dice without a head), the paper's joint head (the paper exactly; its segmentation is the paired figures'
#: reference), the default head (``paper_proper`` on detached features) and the dropout model for MC dropout.
#: bundle/docs/study/ adds every other candidate on detached features (paper_sg, ring_sg, proper_sg, two_region_sg)
#: to the same folder with ``--variants``
DEFAULT_VARIANTS = ("baseline", "paper", "paper_proper_sg", "mcdropout")
HEADS = tuple(v for v in STUDY_VARIANTS if v not in ("baseline", "mcdropout"))
#: the paper's model (head trained jointly): its segmentation is the reference of the paired figures
REFERENCE_VARIANT = "paper"
#: headline metrics of study.md
STUDY_METRICS = ("auroc_missed_vs_tp", "paired_auroc_missed_vs_tp", "auroc_fp_vs_tn", "paired_auroc_fp_vs_tn",
                 "paired_auroc_overall", "brier_calibrated", "paired_brier_calibrated", "ece_calibrated",
                 "spearman_pred_dice", "paired_spearman_pred_dice", "excess_aurc", "paired_excess_aurc",
                 "forward_passes", "seconds_per_case")

_HEADER = "cannot run the uncertainty study"


def run_name(variant: str, seed: int) -> str:
    """The run folder's variant name: ``<variant>-s<seed>`` (``W/runs/<variant>-s<seed>/fold0``)."""
    return f"{variant}-s{int(seed)}"


def _settings_guard(path: Path, settings: Mapping) -> None:
    """Refuse to continue a study folder made with different settings (naming each differing one)."""
    settings = json.loads(json.dumps(settings))
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [f"{k}: {old.get(k)!r} in {path}, {settings.get(k)!r} now" for k in sorted(set(old) | set(settings))
                if k not in ("seeds", "variants", "parallel", "device", "n_boot") and old.get(k) != settings.get(k)]
        if diff:
            raise BraTSInputError(diff + ["use a new --out_dir, or the settings the folder was made with"],
                                  header=f"{path.parent} holds a study made with other settings")
    atomic_write_json(path, settings)


def _case_entries(case_dir) -> list[dict]:
    """``[{"case_id", "image": [4 paths], "label"}]`` of the labelled case folders under ``case_dir``."""
    entries = []
    for d in list_case_folders(case_dir, header=_HEADER):
        case = find_case_files(d)
        if not case.get("label"):
            raise BraTSInputError(f"{d}: no seg file; the test cases must be labelled", header=_HEADER)
        entries.append(case)
    return entries


def _count_cases(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else 0


def make_data(out: Path, settings: Mapping) -> tuple[Path, Path]:
    """The training and test folders (generated into ``out/raw`` unless the user gave them)."""
    if settings["dataset_dir"]:
        return Path(settings["dataset_dir"]), Path(settings["test_dir"])
    train, test = out / "raw" / "train", out / "raw" / "test"
    shape, spacing = settings["shape"], settings["spacing"]
    if _count_cases(train) != settings["num_train"]:
        write_dataset(train, settings["num_train"], shape, spacing, settings["data_seed"],
                      settings["label_noise"], anatomy=settings["anatomy"])
    if _count_cases(test) != settings["num_test"]:
        # a separately seeded draw, its ids after the training ids (no case id in both sets)
        write_dataset(test, settings["num_test"], shape, spacing, settings["data_seed"] + 10_000,
                      settings["label_noise"], anatomy=settings["anatomy"], id_offset=settings["num_train"])
    return train, test


def plan_runs(work: WorkDir, settings: Mapping, seeds: Sequence[int], variants: Sequence[str]) -> list[dict]:
    """One job per (variant, seed): fold 0, the study's schedule, ``--variant <variant>-s<seed> --seed <seed>``."""
    jobs = []
    for seed in seeds:
        for v in variants:
            spec = STUDY_VARIANTS[v]
            files = [CONFIG_DIR / "train.json"] + ([CONFIG_DIR / spec["config"]] if spec["config"] else [])
            if settings["plan"] == "tiny":
                files.append(CONFIG_DIR / "tiny.json")
            name = run_name(v, seed)
            run = work.run(name, 0)
            overrides = {"variant": name, "seed": int(seed), "num_epochs": settings["num_epochs"],
                         "iterations_per_epoch": settings["iterations_per_epoch"],
                         "val_interval": settings["val_interval"], "checkpoint_interval": settings["val_interval"],
                         "progress_bar": "false", **spec["overrides"]}
            if settings["plan"] == "tiny":
                overrides["num_workers"] = 0
            state = run.state()
            if state == RUN_RESUMABLE:
                overrides["resume"] = "true"
            jobs.append({"variant": v, "seed": int(seed), "run": run, "state": state, "log": str(run.log),
                         "cmd": training_command(files, work.path, 0, overrides)})
    return jobs


def run_trainings(jobs: Sequence[dict], parallel: int, device: str) -> None:
    """Run the unfinished jobs, ``parallel`` at a time (one CPU thread each on CPU); a failure is raised at the end,
    naming the run and its log."""
    todo = [j for j in jobs if j["state"] != RUN_FINISHED]
    lock, queue, failed = threading.Lock(), list(todo), []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # parallel runs share the cores instead of oversubscribing them

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                job = queue.pop(0)
            Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            with open(job["log"], "a") as log:
                log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(map(str, job['cmd']))}\n")
                log.flush()
                rc = subprocess.call(job["cmd"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            job["seconds"] = round(time.time() - t0, 1)
            print(f"[study] {job['variant']} seed {job['seed']}: " + ("done" if rc == 0 else f"FAILED ({rc})")
                  + f" in {job['seconds']} s", flush=True)
            if rc != 0:
                with lock:
                    failed.append(f"{job['run'].path}: training failed (exit {rc}), see {job['log']}")

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, int(parallel)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failed:
        raise BraTSInputError(failed, header="study runs failed")


def _bootstrap_mean(values: np.ndarray, idx: np.ndarray) -> tuple[float, float, float]:
    boot = np.nanmean(values[idx], axis=1)
    lo, hi = percentile_interval(boot, 95.0)
    return float(np.nanmean(values)), float(lo), float(hi)


def dice_figures(test: Mapping, case_ids: Sequence[str], n_boot: int, seed: int) -> dict:
    """Test-set Dice per region of each segmentation, and each head's difference to the no-head baseline
    (``var1shot``'s segmentation: the baseline model's single pass), paired over cases, with 95% intervals."""
    idx = bootstrap_indices(len(case_ids), int(n_boot), int(seed))
    out = {}
    segs = {k: c for k, c in test.items() if k.startswith("unc_") or k == "var1shot"}
    for key, c in segs.items():
        name = "baseline" if key == "var1shot" else key[len("unc_"):]
        for r in REGIONS:
            vals = np.array([c.dice[cid][r] for cid in case_ids], dtype=float)
            m, lo, hi = _bootstrap_mean(vals, idx)
            out[f"dice.{name}.{r}"], out[f"dice.{name}.{r}_ci_low"], out[f"dice.{name}.{r}_ci_high"] = m, lo, hi
            if key != "var1shot" and "var1shot" in segs:
                base = np.array([segs["var1shot"].dice[cid][r] for cid in case_ids], dtype=float)
                m, lo, hi = _bootstrap_mean(vals - base, idx)
                out[f"dice.{name}_minus_baseline.{r}"] = m
                out[f"dice.{name}_minus_baseline.{r}_ci_low"] = lo
                out[f"dice.{name}_minus_baseline.{r}_ci_high"] = hi
    return out


def seed_parts(out: Path, seed: int) -> list[Path]:
    """The report folders of one seed's evaluations, in the order they were written: ``seed<k>/`` (the first) then
    ``seed<k>/added<n>/`` (methods added to the study later, or whose definition changed)."""
    first = out / f"seed{int(seed)}"
    if not ReportDir(first).heldout.is_file():
        return []
    added = sorted((p for p in first.glob("added*") if p.name[5:].isdigit() and ReportDir(p).heldout.is_file()),
                   key=lambda p: int(p.name[5:]))
    return [first, *added]


def merged_seed_figures(parts: Sequence[Path]) -> dict:
    """One seed's figures from its parts, later parts replacing earlier ones key by key (``meta.methods`` merged
    the same way). Each method's figures depend only on its own maps, the reference segmentation, the cases and
    the bootstrap resamples, which every part shares, so the union equals one evaluation of all methods."""
    merged, methods = {}, {}
    for part in parts:
        figures = json.loads(ReportDir(part).heldout.read_text())
        meta = figures.pop("meta", {}) or {}
        merged.update(figures)
        methods.update(meta.get("methods", {}))
    return {**merged, "meta": {"methods": methods, "parts": [str(p) for p in parts]}}


def evaluate_seed(work: WorkDir, out: Path, settings: Mapping, seed: int, seeds: Sequence[int],
                  test_entries: Sequence[Mapping], device: str) -> dict:
    """One seed's held-out figures: every map on the test cases (``out/seed<k>/heldout.json``). A seed already
    evaluated scores only the methods it lacks or whose definition changed (e.g. the ensemble when a seed is added:
    its label counts the members) in ``out/seed<k>/added<n>/``, with the reference and var1shot maps that the
    paired figures and the Dice differences need; returns the merged figures (:func:`merged_seed_figures`)."""
    def model(variant, s=seed):
        run = work.run(run_name(variant, s), 0)
        if not run.has_final_model():
            raise BraTSInputError(f"{run.final_model}: missing (train the study first)", header=_HEADER)
        return run, UncertaintySegmenter.from_checkpoint(run.final_model, work_dir=work.path, device=device)

    variants = settings["variants"]
    heads = [v for v in HEADS if v in variants]
    if REFERENCE_VARIANT not in heads:
        raise BraTSInputError(f"the study needs the {REFERENCE_VARIANT!r} variant (the reference segmentation)",
                              header=_HEADER)
    parts = seed_parts(out, seed)
    scored = merged_seed_figures(parts) if parts else {"meta": {"methods": {}}}
    done = scored["meta"]["methods"]

    def head_label(v):
        return f"unc_output of the '{v}' head"

    def needed(key, label):
        return done.get(key, {}).get("label") != label

    n_ensemble = len(seeds) if "baseline" in variants and len(seeds) >= 2 else 0
    ensemble_label = (f"ensemble of the {n_ensemble} seeds' baseline models (the same in every seed's column)"
                      if n_ensemble else "")
    todo_heads = [v for v in heads if needed(f"unc_{v}", head_label(v))]
    todo_ensemble = bool(n_ensemble) and needed("ensemble", ensemble_label)
    todo_mc = "mcdropout" in variants and "mc_dropout" not in done
    todo_base = "baseline" in variants and ("var1shot" not in done or "tta" not in done)
    if parts and not (todo_heads or todo_ensemble or todo_mc or todo_base):
        return scored
    methods, segmenters = [], {}
    # the reference map always: the paired figures are scored against its segmentation
    for v in dict.fromkeys([REFERENCE_VARIANT, *todo_heads]):
        _, segmenters[v] = model(v)
        methods.append(head_method(segmenters[v], key=f"unc_{v}", label=head_label(v)))
    plans = segmenters[REFERENCE_VARIANT].plans
    if "baseline" in variants:
        _, base = model("baseline")
        methods.append(var1shot_method(base))  # 1 pass; the heads' Dice difference to the baseline needs it
        if todo_base:  # true on a seed's first evaluation: nothing is scored yet
            methods.append(tta_method(base))
        if todo_ensemble:
            members = [model("baseline", s)[1] for s in seeds]
            methods.append(ensemble_method(members, label=ensemble_label))
    if todo_mc:
        run, mc = model("mcdropout")
        methods.append(mc_dropout_method(mc, run.final_model, run_dropout(run), settings["mc_samples"], device))
    datalist = load_datalist(work.path)
    _, calibration = fold_split(datalist, 0)
    result, test, _ = score_test_set(methods, plans, calibration, test_entries, reference_key=f"unc_{REFERENCE_VARIANT}",
                                     n_boot=settings["n_boot"], seed=int(seed))
    case_ids = list(result.case_ids)
    dice = dice_figures(test, case_ids, settings["n_boot"], int(seed))
    by_key = {m.key: m for m in methods}
    target = parts[0] / f"added{len(parts)}" if parts else out / f"seed{int(seed)}"
    setup = (f"Seed {seed}: models trained on fold 0 of {settings['num_train']} training cases, calibrated on its "
             f"{len(calibration)} validation cases, scored on {len(case_ids)} unseen test cases "
             f"({settings['data']}). Reference segmentation of the paired figures: the '{REFERENCE_VARIANT}' model's."
             + (f" Methods added after the first evaluation (`{parts[0].name}/heldout.md`); the study merges them "
                "key by key." if parts else ""))
    md = render_heldout_markdown(result, by_key, f"Self-assessment, seed {seed}" + (" (added methods)" if parts
                                                                                     else ""), setup)
    extra = {**dice, "meta": {"setup": "test_set", "seed": int(seed), "num_cases": len(case_ids),
                              "num_calibration_cases": len(calibration),
                              "methods": {k: {"label": m.label, "forward_passes": m.passes} for k, m in by_key.items()}}}
    write_result(ReportDir(target), result, extra, md)
    return merged_seed_figures(seed_parts(out, seed))


def render_study_markdown(combined: Mapping, settings: Mapping, seeds: Sequence[int], time_record: Mapping) -> str:
    """study.md: what was run, the seed table of the headline figures, and Dice with and without the head."""

    def f(v, nd=3):
        return "–" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"

    lines = ["# Self-assessment study", "",
             f"Data: {settings['data']}. Training: fold 0 of {settings['num_train']} cases ({settings['num_folds']} "
             f"folds), {settings['num_epochs']} epochs x {settings['iterations_per_epoch']} iterations, plan "
             f"'{settings['plan']}'; seeds {list(seeds)}. Scored on {settings['num_test']} unseen test cases, "
             "calibrated on fold 0's validation cases (never on a scored case).", "",
             "Each cell: mean over seeds ± sd across seeds. Per-seed values with 95% bootstrap intervals over cases "
             "are in `seed<k>/heldout.md`. `paired_` figures score every map against the errors of one segmentation "
             f"(the '{REFERENCE_VARIANT}' model's), so they compare maps, not segmenters.", "",
             render_seed_markdown({k: v for k, v in combined.items() if ".dice." not in k},
                                  metrics=STUDY_METRICS).rstrip(), "",
             "## Dice on the test cases (mean over seeds; per seed with 95% intervals in study.json)", "",
             "| segmentation | WT | TC | ET | WT minus baseline |", "|---|---|---|---|---|"]
    names = sorted({k.split(".")[2] for k in combined if k.startswith("seed_mean.dice.") and
                    "_minus_" not in k.split(".")[2]})
    for name in names:
        def mean(key):
            return combined.get(f"seed_mean.dice.{key}")
        diff = "" if name == "baseline" else f"{f(mean(f'{name}_minus_baseline.WT'))}"
        lines.append(f"| {name} | {f(mean(f'{name}.WT'))} | {f(mean(f'{name}.TC'))} | {f(mean(f'{name}.ET'))} | {diff} |")
    lines += ["", f"Time: {_render_timing(time_record)}", ""]
    return "\n".join(lines)


def _render_timing(time_record: Mapping) -> str:
    """The ``Time:`` line: wall clock of every call on the folder summed (a study grown by added variants or seeds
    took several calls), then this call's."""
    calls = time_record.get("calls", [])
    total = {k: round(sum(c["timing"].get(k, 0.0) for c in calls), 1) for k in ("data_s", "training_s", "evaluation_s")}
    minutes = sum(total.values()) / 60
    this = time_record.get("this_call", {})
    return (f"{minutes:.0f} min wall clock in {len(calls)} call(s) on this folder (data {total['data_s']} s, training "
            f"{total['training_s']} s, scoring {total['evaluation_s']} s; each call in study_timing.json); this call: "
            + ", ".join(f"{k} {v}" for k, v in this.items()))


def _record_timing(out: Path, settings: Mapping, timing: Mapping) -> dict:
    """Append this call's timing to ``out/study_timing.json``; returns ``{"calls": [...], "this_call": timing}``."""
    path = out / "study_timing.json"
    calls = json.loads(path.read_text())["calls"] if path.is_file() else []
    calls.append({"date": time.strftime("%Y-%m-%d %H:%M:%S"), "seeds": settings["seeds"],
                  "variants": settings["variants"], "parallel": settings["parallel"], "device": settings["device"],
                  "timing": dict(timing)})
    atomic_write_json(path, {"calls": calls})
    return {"calls": calls, "this_call": dict(timing)}


def study(out_dir, seeds=(0, 1, 2), variants=DEFAULT_VARIANTS, anatomy: str = "mni152", num_train: int = 24,
          num_test: int = 12, shape=(64, 64, 48), spacing=(3.0, 3.0, 3.0), label_noise: float = 0.5,
          data_seed: int = 0, num_folds: int = 4, plan: str = "tiny", patch_size=(32, 32, 32),
          filters=(8, 16, 32, 64), num_epochs: int = 70, iterations_per_epoch: int = 25, val_interval: int = 10,
          mc_samples: int = 10, n_boot: int = 1000, parallel: int = 2, device: str = "cpu",
          dataset_dir=None, test_dir=None, train_only: bool = False) -> dict:
    """Run (or continue) the study in ``out_dir`` (module docstring); returns the combined ``study.json`` dict."""
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in seeds]
    variants = list(variants)
    unknown = [v for v in variants if v not in STUDY_VARIANTS]
    if unknown or plan not in ("tiny", "real") or (dataset_dir is None) != (test_dir is None):
        raise BraTSInputError(
            [f"unknown variant {v!r} (known: {sorted(STUDY_VARIANTS)})" for v in unknown]
            + ([f"plan must be 'tiny' or 'real', got {plan!r}"] if plan not in ("tiny", "real") else [])
            + (["give both --dataset_dir and --test_dir (real data), or neither (synthetic)"]
               if (dataset_dir is None) != (test_dir is None) else []), header=_HEADER)
    data = (f"user data {dataset_dir} (test: {test_dir})" if dataset_dir else
            f"synthetic, anatomy '{anatomy}', {list(shape)} voxels at {list(spacing)} mm, label noise {label_noise}")
    settings = {"data": data, "anatomy": anatomy, "num_train": int(num_train), "num_test": int(num_test),
                "shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing],
                "label_noise": float(label_noise), "data_seed": int(data_seed), "num_folds": int(num_folds),
                "plan": plan, "patch_size": [int(p) for p in patch_size] if plan == "tiny" else None,
                "filters": [int(f) for f in filters] if plan == "tiny" else None, "num_epochs": int(num_epochs),
                "iterations_per_epoch": int(iterations_per_epoch), "val_interval": int(val_interval),
                "mc_samples": int(mc_samples), "n_boot": int(n_boot), "dataset_dir": dataset_dir,
                "test_dir": test_dir, "variants": variants, "seeds": seeds, "parallel": int(parallel),
                "device": device}
    _settings_guard(out / "study_settings.json", settings)
    timing = {}
    t0 = time.perf_counter()
    train_dir, test_dir_path = make_data(out, settings)
    work = WorkDir(out / "work")
    if not work.plans.is_file():
        prepare_data(train_dir, work.path, num_folds=int(num_folds), seed=int(data_seed),
                     patch_size=settings["patch_size"], filters=settings["filters"])
    timing["data_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    jobs = plan_runs(work, settings, seeds, variants)
    run_trainings(jobs, parallel, device)
    timing["training_s"] = round(time.perf_counter() - t0, 1)
    if train_only:
        return {"meta": {"trained": [str(j["run"].path) for j in jobs],
                         "timing": _record_timing(out, settings, timing)}}
    t0 = time.perf_counter()
    test_entries = _case_entries(test_dir_path)
    per_seed = {}
    for s in seeds:
        per_seed[s] = evaluate_seed(work, out, settings, s, seeds, test_entries, device)
        per_seed[s] = {k: v for k, v in per_seed[s].items() if k != "meta" and v is not None}
    timing["evaluation_s"] = round(time.perf_counter() - t0, 1)
    time_record = _record_timing(out, settings, timing)
    combined = combine_seeds(per_seed)
    result = {**combined, "meta": {"settings": settings, "timing": time_record,
                                   "date": time.strftime("%Y-%m-%d"), "reference_variant": REFERENCE_VARIANT}}
    atomic_write_json(out / "study.json", to_json_safe(result))
    atomic_write_bytes(out / "study.md", render_study_markdown(combined, settings, seeds, time_record).encode())
    return result
