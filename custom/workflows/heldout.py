"""Held-out study (``scripts/evaluate_heldout.py``): each fold's FINAL model on its validation cases, and the
quality of every uncertainty method against its cost.

For every fold with a finished ``W/runs/<variant>/fold<k>/model_final.pt``:

1. the final model predicts each validation case through the shared inference path
   (:class:`custom.inference.segmenter.UncertaintySegmenter`: preprocess -> sliding window -> cancer mask -> original
   grid); labels and unc_output are written to ``R/heldout/fold<k>/pred/<case_id>{,-unc}.nii.gz``;
2. segmentation: legacy and BraTS 2023 lesion-wise Dice/HD95 per region from those files
   (:func:`custom.evaluation.folder.evaluate_folder`), cross-checked against ``brats_evaluation``;
3. uncertainty quality against the WT errors of the segmentation each method produces (AUROC inside the dilated
   union of predicted and true WT, Spearman, ECE, QU-BraTS) and cost (forward passes, s/case), for: unc_output
   (1 pass), var1shot = 4 p (1 - p) (same pass), mirroring TTA variance (8 passes), MC dropout variance (N passes
   of the ``mc_variant`` model) and the ensemble variance of all available folds' final models
   (:mod:`custom.uncertainty.baselines`). Variances are scaled by 4 (the Bernoulli maximum) to [0, 1] and bounded
   by the same cancer mask.

Writes ``R/heldout.json``, ``R/heldout_per_case.csv`` (segmentation), ``R/heldout_methods_per_case.csv``,
``R/heldout.md``, and replaces the held-out section of ``R/report.md`` when it exists.

Caveat printed with the table: in cross-validation every ensemble member except one was trained on the other
folds' validation cases, so the ensemble row is not held out for all members (no labelled test set here).
"""

from __future__ import annotations

import csv
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from custom.core.atomic import atomic_write_bytes, atomic_write_json
from custom.core.constants import REGIONS
from custom.core.errors import BraTSInputError
from custom.core.layout import ReportDir, RunDir, WorkDir, prediction_paths
from custom.core.numeric import nanmean
from custom.data.datalist import fold_split, load_datalist
from custom.data.nifti import load_case_arrays, save_nifti
from custom.evaluation.folder import evaluate_folder, summarize_rows, to_json_safe, write_rows_csv
from custom.evaluation.segmentation import dice, region_mask
from custom.evaluation.uncertainty import uncertainty_quality
from custom.inference.postprocess import postprocess_probabilities
from custom.inference.segmenter import UncertaintySegmenter
from custom.model.checkpoints import load_network
from custom.preprocessing.functional import preprocess_case
from custom.uncertainty.baselines import (
    enable_mc_dropout,
    ensemble_predictions,
    mc_dropout_predictions,
    mean_and_variance,
    mirror_axes_combinations,
    mirrored_predictions,
    probability_patch_fn,
    with_uncertainty_channel,
)
from custom.uncertainty.targets import compute_prediction_variance
from custom.workflows.report import HELDOUT_END, HELDOUT_START, QUALITY_COLUMNS, render_quality_vs_cost

#: the methods in the order of the quality-vs-cost table
METHOD_ORDER = ("unc_output", "var1shot", "tta_variance", "mc_dropout", "ensemble")


@dataclass
class Method:
    """One uncertainty method: ``fn(image_pp (4,X',Y',Z')) -> (4,X',Y',Z')`` probabilities with its map in channel 3."""

    name: str
    passes: int
    fn: Callable


def run_dropout(run: RunDir, default: float = 0.1) -> float:
    """Dropout probability the run was trained with (its resolved train_config.json), else ``default``."""
    if run.train_config.is_file():
        try:
            p = json.loads(run.train_config.read_text()).get("dropout")
            if isinstance(p, (int, float)) and 0 < p < 1:
                return float(p)
        except (json.JSONDecodeError, AttributeError):
            pass
    return default


def build_methods(seg: UncertaintySegmenter, work: WorkDir, fold: int, fold_models: dict, mc_variant, mc_samples: int,
                  tta: bool, ensemble: bool, device, unavailable: dict) -> list:
    """The methods of one fold; ``unavailable`` collects why a method cannot run (named in the report)."""

    def single(image_pp):
        return torch.as_tensor(seg.predict_preprocessed(image_pp))

    def var1shot(image_pp):
        p = single(image_pp)
        return with_uncertainty_channel(p, compute_prediction_variance(p[0]))

    def variance_method(samples):
        return with_uncertainty_channel(*mean_and_variance(samples))

    methods = [Method("var1shot", 1, var1shot)]
    if seg.with_uncertainty:
        methods.insert(0, Method("unc_output", 1, single))
    else:
        unavailable.setdefault("unc_output", f"fold {fold}'s model has no uncertainty channel "
                                             "(a variant trained without it)")
    if tta:
        def tta_fn(image_pp):
            x = torch.as_tensor(np.asarray(image_pp))
            return variance_method(mirrored_predictions(lambda xi: single(xi.numpy()), x, tta=True))

        methods.append(Method("tta_variance", len(mirror_axes_combinations(True)), tta_fn))

    if ensemble:
        if len(fold_models) < 2:
            unavailable.setdefault("ensemble", f"only {len(fold_models)} finished fold model(s); an ensemble needs 2+")
        else:
            members = [lambda x, m=m: torch.as_tensor(m.predict_preprocessed(x)) for m in fold_models.values()]

            def ens_fn(image_pp):
                return variance_method(ensemble_predictions(members, image_pp))

            methods.append(Method(f"ensemble ({len(fold_models)} folds)*", len(fold_models), ens_fn))
    if mc_variant:
        run = work.run(mc_variant, fold)
        if not run.has_final_model():
            unavailable.setdefault("mc_dropout", f"{run.final_model}: no finished '{mc_variant}' run for fold {fold} "
                                                 f"(train it with cross_validate.py --variants \"[{mc_variant}]\")")
        else:
            p_drop = run_dropout(run)
            try:
                net, _ = load_network(run.final_model, seg.plans, device=device, dropout=p_drop)
                enable_mc_dropout(net)
            except (BraTSInputError, ValueError) as exc:
                unavailable.setdefault("mc_dropout", f"{run.final_model}: cannot run with dropout p={p_drop}: {exc}")
                return methods
            patch_fn = probability_patch_fn(net)

            def mc_fn(image_pp):
                x = torch.as_tensor(np.asarray(image_pp, dtype=np.float32))[None].to(seg.device)
                sweep = lambda xb: seg.inferer.predict_probabilities(xb, patch_fn)[0].cpu()  # noqa: E731
                return variance_method(mc_dropout_predictions(sweep, x, int(mc_samples)))

            methods.append(Method(f"mc_dropout (N={int(mc_samples)}, p={p_drop})", int(mc_samples), mc_fn))
    return methods


def _merge_agreements(agreements: list) -> dict:
    if not agreements:
        return {"available": False, "error": "no fold evaluated"}
    if not all(a.get("available") for a in agreements):
        return next(a for a in agreements if not a.get("available"))
    out = {"available": True, "tool": agreements[0].get("tool")}
    for key in ("legacy_dice", "pooled_hd95", "lesions"):
        diffs = [a[key]["max_abs_diff"] for a in agreements if a[key]["max_abs_diff"] is not None]
        out[key] = {"compared": sum(a[key]["compared"] for a in agreements),
                    "agree": sum(a[key]["agree"] for a in agreements),
                    "max_abs_diff": max(diffs) if diffs else None}
    return out


def replace_heldout_section(report: Path, markdown: str) -> None:
    """Put ``markdown`` between the held-out marks of an existing report.md (left alone without the marks)."""
    if not report.is_file():
        return
    text = report.read_text()
    if HELDOUT_START in text and HELDOUT_END in text:
        head, rest = text.split(HELDOUT_START, 1)
        tail = rest.split(HELDOUT_END, 1)[1]
        atomic_write_bytes(report, (head + HELDOUT_START + "\n" + markdown + HELDOUT_END + tail).encode())


def evaluate_heldout(work_dir, out_dir, folds=None, variant: str = "unc", mc_variant: str | None = "mcdropout",
                     mc_samples: int = 10, tta: bool = True, ensemble: bool = True, crosscheck: bool = True,
                     max_cases_per_fold: int | None = None, device: str = "cpu") -> dict:
    """Run the study (module docstring) and write its files into ``out_dir``; returns the ``heldout.json`` dict.

    Raises:
        BraTSInputError: no requested fold has a finished final model (each run is named).
    """
    work, out = WorkDir(Path(work_dir).resolve()), ReportDir(out_dir)
    datalist = load_datalist(work.path)
    num_folds = int(datalist["num_folds"])
    folds = list(range(num_folds)) if folds is None else [int(f) for f in folds]

    # final models of every finished fold (the ensemble uses all of them)
    finished, skipped = {}, {}
    for f in range(num_folds):
        run = work.run(variant, f)
        if run.has_final_model():
            finished[f] = run.final_model
        else:
            skipped[f] = f"{run.path}: no finished run with {run.final_model.name}"
    use = [f for f in folds if f in finished]
    for f in folds:
        if f not in finished:
            print(f"WARNING: fold {f} skipped: {skipped[f]}", file=sys.stderr)
    if not use:
        raise BraTSInputError([skipped[f] for f in folds], header="no fold has a finished final model to evaluate")

    torch.manual_seed(0)
    fold_models = {f: UncertaintySegmenter.from_checkpoint(ckpt, work_dir=work.path, device=device)
                   for f, ckpt in finished.items()}

    unavailable = {}
    seg_rows, method_rows, agreements = [], [], []
    cost = {}
    for f in use:
        seg = fold_models[f]
        _, val = fold_split(datalist, f)
        val = val[: int(max_cases_per_fold)] if max_cases_per_fold else val
        fold_dir, pred_dir = out.heldout_fold(f), out.heldout_predictions(f)
        methods = build_methods(seg, work, f, fold_models, mc_variant, mc_samples, tta, ensemble, device, unavailable)
        for e in val:
            cid = e["case_id"]
            image, gt, affine, spacing = load_case_arrays(e["image"], e["label"])
            brain = np.any(image != 0, axis=0)
            for m in methods:
                t0 = time.perf_counter()
                image_pp, _, props = preprocess_case(image, spacing, seg.plans, name=e["image"][0])
                probs_pp = m.fn(image_pp)
                pred = postprocess_probabilities(probs_pp, props, seg.mask_dilation)
                secs = time.perf_counter() - t0
                if m is methods[0]:
                    # the product's files: evaluated (and cross-checked) below like any other tool's output
                    for arr, path in zip((pred.labels, pred.unc), prediction_paths(pred_dir, cid)):
                        save_nifti(arr, affine, None, path)
                q = uncertainty_quality(pred.unc, pred.labels, gt, brain_mask=brain)
                method_rows.append({"fold": f, "case_id": cid, "method": m.name, "forward_passes": m.passes,
                                    "seconds": secs,
                                    "dice_wt": dice(region_mask(pred.labels, "WT"), region_mask(gt, "WT")), **q})
                cost.setdefault(m.name, m.passes)
            print(f"[heldout] fold {f} {cid}: " + ", ".join(
                f"{r['method'].split(' ')[0]} AUROC {r['auroc_wt_error']:.3f}" for r in method_rows[-len(methods):]),
                flush=True)
        summ = evaluate_folder(pred_dir, datalist["dataset_dir"], fold_dir, unc_dir=pred_dir,
                               case_ids=[e["case_id"] for e in val], crosscheck=crosscheck)
        with open(fold_dir / "per_case.csv") as fh:
            for row in csv.DictReader(fh):
                seg_rows.append({"fold": f, **{k: v if k in ("case_id", "region") else (float(v) if v else float("nan"))
                                               for k, v in row.items()}})
        if "crosscheck" in summ:
            agreements.append(summ["crosscheck"])

    def rank(name):
        stem = name.split(" ")[0]
        return METHOD_ORDER.index(stem) if stem in METHOD_ORDER else len(METHOD_ORDER)

    methods_summary = []
    for name in sorted(cost, key=rank):
        rows = [r for r in method_rows if r["method"] == name]
        methods_summary.append({"method": name, "forward_passes": cost[name], "num_cases": len(rows),
                                "seconds_per_case": nanmean([r["seconds"] for r in rows]),
                                "dice_wt": nanmean([r["dice_wt"] for r in rows]),
                                **{c: nanmean([r[c] for r in rows]) for c in QUALITY_COLUMNS}})
    seg_summary = summarize_rows([{k: v for k, v in r.items() if k != "fold"} for r in seg_rows])
    heldout = {"folds": use, "folds_skipped": {str(f): skipped[f] for f in folds if f not in use},
               "num_cases": seg_summary["num_cases"], "variant": variant,
               "segmentation": seg_summary, "crosscheck": _merge_agreements(agreements) if crosscheck else None,
               "methods": methods_summary, "unavailable": unavailable,
               "notes": ["each map is scored against the WT errors of its own method's segmentation",
                         "* ensemble members other than the case's own fold model were trained on that case"]}
    write_rows_csv(out.heldout_per_case, seg_rows)
    write_rows_csv(out.heldout_methods_per_case, method_rows)
    atomic_write_json(out.heldout, to_json_safe(heldout))
    md = render_quality_vs_cost(to_json_safe(heldout))
    if any(m["method"].startswith("ensemble") for m in methods_summary):
        md += "\n\\* In cross-validation the other folds' models were trained on these cases: the ensemble row is " \
              "an optimistic bound, not a held-out measurement.\n"
    atomic_write_bytes(out.heldout_markdown, md.encode())
    replace_heldout_section(out.report, md)
    return heldout


def summary_line(heldout: dict) -> str:
    """One line per study: cases, legacy Dice and each method's AUROC, passes and seconds per case."""
    seg = heldout["segmentation"]["regions"]
    parts = [f"{heldout['num_cases']} held-out cases, folds {heldout['folds']}",
             "legacy Dice WT/TC/ET " + "/".join(f"{seg[r]['legacy_dice']:.3f}" for r in REGIONS)]
    parts += [f"{m['method']}: AUROC {m['auroc_wt_error']:.3f}, {m['forward_passes']} passes, "
              f"{m['seconds_per_case']:.2f} s/case" for m in heldout["methods"]]
    return " | ".join(parts)
