"""Held-out evaluation of the self-assessment (``scripts/evaluate_heldout.py``; issue 13's "evaluation that cannot
flatter"): does a map predict where, and how badly, the segmentation of a case the model never saw is wrong?

For every method (the uncertainty head ``unc``, the Bernoulli variance ``var1shot``, mirroring-TTA variance ``tta``,
MC dropout ``mc_dropout``, the models' ensemble variance ``ensemble``), each case is predicted through the shared
inference path (preprocess -> sliding window -> cancer mask -> original grid) and reduced to a
:class:`custom.evaluation.self_assessment.CaseSummary` twice: against the method's own segmentation, and against
the reference (the evaluated model's) segmentation ("paired"). Then :func:`custom.evaluation.self_assessment.
evaluate_methods` gives, per method, AUROC/AUPRC by voxel type (missed vs correctly segmented tumour, false positive
vs correct background, the whole reporting region), calibration after an isotonic fit on OUT-OF-FOLD cases (ECE,
Brier), the case-level predicted Dice (Spearman with the true Dice, risk-coverage, AURC), cost, and 95% bootstrap
intervals over cases.

Two set-ups share this engine:

- cross-validation (:func:`evaluate_heldout`): each fold's final model on its own validation cases; every case is
  calibrated by a fit on the OTHER folds' cases (:func:`custom.evaluation.calibration.cross_fit_calibrators`);
- a separate test set (:func:`score_test_set`, used by the study :mod:`custom.workflows.study`): models trained on
  one set, calibrated on their validation cases, scored on unseen test cases.

Writes (``ReportDir``): ``heldout.json`` (flat keys ``<method>.<metric>``, e.g. ``unc.auroc_missed_vs_tp``,
``tta.ece_calibrated``, ``var1shot.spearman_pred_dice``, ``mc_dropout.forward_passes``, plus ``meta`` and
``segmentation``), ``heldout.md``, ``heldout_methods_per_case.csv``, ``heldout_per_case.csv`` (segmentation),
``reliability.png``, ``risk_coverage.png``, the product's files in ``heldout/fold<k>/pred``; and the held-out
section of ``report.md`` when it exists.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from custom.core.atomic import atomic_write_bytes, atomic_write_json
from custom.core.constants import REGIONS
from custom.core.errors import BraTSInputError
from custom.core.layout import ReportDir, RunDir, WorkDir
from custom.data.datalist import fold_split, load_datalist
from custom.data.nifti import load_case_arrays, save_prediction
from custom.evaluation.calibration import IsotonicCalibrator, cross_fit_calibrators
from custom.evaluation.folder import evaluate_folder, summarize_rows, to_json_safe, write_rows_csv
from custom.evaluation.segmentation import dice, region_mask
from custom.evaluation.self_assessment import (
    REPORT_DILATION,
    MethodCases,
    SelfAssessment,
    evaluate_methods,
    render_markdown,
    render_reliability_diagram,
    render_risk_coverage,
    reporting_region,
    summarize_method_case,
)
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
from custom.workflows.report import HELDOUT_END, HELDOUT_START

#: method keys in table order
METHOD_ORDER = ("unc", "var1shot", "tta", "mc_dropout", "ensemble")


@dataclass
class Method:
    """One uncertainty method: ``predict(image_pp (4,X',Y',Z')) -> (4,X',Y',Z')`` region probabilities with its
    map in channel 3 (on the preprocessed grid), read on the original grid through ``postprocess_probabilities``
    with ``mask_dilation`` (the map is bounded by the method's own predicted WT dilated, as inference reports it)."""

    key: str
    label: str
    passes: int
    predict: Callable
    mask_dilation: int = 3


@dataclass
class Collected:
    """Case summaries of one method: ``own`` and ``paired`` (against the reference segmentation), seconds per case,
    and per case the Dice of its own segmentation per region (``case_id -> {"WT", "TC", "ET"}``)."""

    own: list = field(default_factory=list)
    paired: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    dice: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- methods
def head_method(segmenter: UncertaintySegmenter, key: str = "unc", label: str = "unc_output") -> Method:
    """The uncertainty head of ``segmenter`` (one forward pass)."""
    if not segmenter.with_uncertainty:
        raise ValueError(f"{label}: the model has no uncertainty channel")

    def predict(image_pp):
        return torch.as_tensor(segmenter.predict_preprocessed(image_pp))

    return Method(key, label, 1, predict, segmenter.mask_dilation)


def var1shot_method(segmenter: UncertaintySegmenter, key: str = "var1shot") -> Method:
    """``4 p_WT (1 - p_WT)`` of the same single pass."""

    def predict(image_pp):
        p = torch.as_tensor(segmenter.predict_preprocessed(image_pp))
        return with_uncertainty_channel(p, compute_prediction_variance(p[0]))

    return Method(key, "var1shot = 4 p (1 - p)", 1, predict, segmenter.mask_dilation)


def tta_method(segmenter: UncertaintySegmenter, key: str = "tta") -> Method:
    """Variance of p_WT over the 8 mirrorings (x4, the Bernoulli maximum), mean probabilities as segmentation."""

    def predict(image_pp):
        x = torch.as_tensor(np.asarray(image_pp))
        single = lambda xi: torch.as_tensor(segmenter.predict_preprocessed(xi.numpy()))  # noqa: E731
        return with_uncertainty_channel(*mean_and_variance(mirrored_predictions(single, x, tta=True)))

    return Method(key, "mirroring TTA variance", len(mirror_axes_combinations(True)), predict,
                  segmenter.mask_dilation)


def mc_dropout_method(segmenter: UncertaintySegmenter, checkpoint, dropout: float, num_samples: int,
                      device="cpu", key: str = "mc_dropout") -> Method:
    """``num_samples`` sliding-window sweeps of ``checkpoint``'s network with dropout ``dropout`` left on."""
    net, _ = load_network(checkpoint, segmenter.plans, device=device, dropout=dropout)
    enable_mc_dropout(net)
    patch_fn = probability_patch_fn(net)

    def predict(image_pp):
        x = torch.as_tensor(np.asarray(image_pp, dtype=np.float32))[None].to(segmenter.device)
        sweep = lambda xb: segmenter.inferer.predict_probabilities(xb, patch_fn)[0].cpu()  # noqa: E731
        return with_uncertainty_channel(*mean_and_variance(mc_dropout_predictions(sweep, x, int(num_samples))))

    return Method(key, f"MC dropout (N={int(num_samples)}, p={dropout})", int(num_samples), predict,
                  segmenter.mask_dilation)


def ensemble_method(members: Sequence[UncertaintySegmenter], key: str = "ensemble", label: str = "") -> Method:
    """Variance of p_WT across the members (one pass each), their mean probabilities as segmentation."""
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 models, got {len(members)}")
    predicts = [lambda x, m=m: torch.as_tensor(m.predict_preprocessed(x)) for m in members]

    def predict(image_pp):
        return with_uncertainty_channel(*mean_and_variance(ensemble_predictions(predicts, image_pp)))

    return Method(key, label or f"ensemble of {len(members)} models", len(members), predict,
                  members[0].mask_dilation)


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


# ---------------------------------------------------------------------------------------------- one case
def predict_case(entry: Mapping, methods: Sequence[Method], plans) -> tuple[np.ndarray, dict, tuple]:
    """Every method's ``(labels, unc, seconds)`` on one datalist case, on its original grid.

    The case is read and preprocessed once; each method's seconds are the preprocessing plus its own passes and
    postprocessing, so methods compare as a user would run them. Returns ``(gt labels, outputs, (affine, spacing))``.
    """
    image, gt, affine, spacing = load_case_arrays(entry["image"], entry.get("label"))
    t0 = time.perf_counter()
    image_pp, _, props = preprocess_case(image, spacing, plans, name=entry["image"][0])
    prep_s = time.perf_counter() - t0
    outputs = {}
    for m in methods:
        t0 = time.perf_counter()
        pred = postprocess_probabilities(m.predict(image_pp), props, m.mask_dilation)
        outputs[m.key] = (pred.labels, pred.unc, prep_s + time.perf_counter() - t0)
    return gt, outputs, (affine, spacing)


def collect_case(collected: dict, case_id: str, gt: np.ndarray, outputs: Mapping, reference_key: str,
                 dilation: int = 3) -> None:
    """Add one case's summaries of every method to ``collected`` (``key -> Collected``)."""
    gt_wt = np.asarray(gt) > 0
    ref_wt = outputs[reference_key][0] > 0
    ref_region = reporting_region(ref_wt, dilation)
    for key, (labels, unc, secs) in outputs.items():
        seg_wt = labels > 0
        region = ref_region if key == reference_key else reporting_region(seg_wt, dilation)
        own, paired = summarize_method_case(case_id, gt_wt, seg_wt, ref_wt, unc, region, ref_region)
        c = collected.setdefault(key, Collected())
        c.own.append(own)
        c.paired.append(paired)
        c.seconds[case_id] = float(secs)
        c.dice[case_id] = {r: dice(region_mask(labels, r), region_mask(gt, r)) for r in REGIONS}


def score(collected: Mapping[str, Collected], methods: Mapping[str, Method], calibration=None, group_of_case=None,
          n_boot: int = 1000, seed: int = 0) -> SelfAssessment:
    """Self-assessment figures of every collected method.

    Calibration is out of fold in one of two ways: ``calibration`` (``key -> Collected`` of other, validation
    cases: one isotonic fit each for own and paired), or ``group_of_case`` (each scored case calibrated by a fit on
    the scored cases of the other groups, e.g. cross-validation folds).
    """
    if (calibration is None) == (group_of_case is None):
        raise ValueError("give exactly one of calibration (validation cases) or group_of_case (cross-fitting)")
    cases = {}
    for key, c in collected.items():
        if calibration is not None:
            if key not in calibration:
                raise ValueError(f"no calibration cases for method {key!r}")
            own_cal = IsotonicCalibrator.fit(calibration[key].own)
            paired_cal = IsotonicCalibrator.fit(calibration[key].paired)
        else:
            own_cal = cross_fit_calibrators(c.own, group_of_case)
            paired_cal = cross_fit_calibrators(c.paired, group_of_case)
        cases[key] = MethodCases(own=c.own, own_calibrators=own_cal, paired=c.paired, paired_calibrators=paired_cal,
                                 forward_passes=methods[key].passes, seconds_per_case=c.seconds)
    return evaluate_methods(cases, n_boot=int(n_boot), seed=int(seed))


def render_heldout_markdown(result: SelfAssessment, methods: Mapping[str, Method], title: str, setup: str,
                            unavailable: Mapping[str, str] | None = None) -> str:
    """The readable report: set-up, the figures table (``render_markdown``), methods and what was not measured."""
    order = [k for k in METHOD_ORDER if k in methods] + [k for k in methods if k not in METHOD_ORDER]
    lines = [f"## {title}", "", setup, "", "| method | what | forward passes |", "|---|---|---|"]
    lines += [f"| `{k}` | {methods[k].label} | {methods[k].passes} |" for k in order]
    lines += ["", render_markdown(result.flat, methods=order, title="Self-assessment on held-out cases").rstrip(), ""]
    for name, why in (unavailable or {}).items():
        lines.append(f"- {name}: not measured — {why}")
    return "\n".join(lines).rstrip() + "\n"


def write_result(out: ReportDir, result: SelfAssessment, extra: Mapping, markdown: str) -> dict:
    """``heldout.json`` (flat figures + ``extra``), ``heldout.md``, per-case CSV and the two figures."""
    out.path.mkdir(parents=True, exist_ok=True)
    heldout = {**result.flat, **extra}
    render_reliability_diagram(result.reliability, out.path / "reliability.png")
    render_risk_coverage({k: v for k, v in result.risk_coverage.items() if k.endswith(".paired")},
                         out.path / "risk_coverage.png")
    markdown += ("\n![reliability](reliability.png) ![risk-coverage, against the reference segmentation]"
                 "(risk_coverage.png)\n")
    write_rows_csv(out.heldout_methods_per_case, result.per_case)
    atomic_write_json(out.heldout, to_json_safe(heldout))
    atomic_write_bytes(out.heldout_markdown, markdown.encode())
    replace_heldout_section(out.report, markdown)
    return heldout


def replace_heldout_section(report: Path, markdown: str) -> None:
    """Put ``markdown`` between the held-out marks of an existing report.md (left alone without the marks)."""
    if not report.is_file():
        return
    text = report.read_text()
    if HELDOUT_START in text and HELDOUT_END in text:
        head, rest = text.split(HELDOUT_START, 1)
        tail = rest.split(HELDOUT_END, 1)[1]
        atomic_write_bytes(report, (head + HELDOUT_START + "\n" + markdown + HELDOUT_END + tail).encode())


# ------------------------------------------------------------------------------------------ cross-validation
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


def evaluate_heldout(work_dir, out_dir, folds=None, variant: str = "unc", mc_variant: str | None = "mcdropout",
                     mc_samples: int = 10, tta: bool = True, ensemble: bool = True, crosscheck: bool = True,
                     max_cases_per_fold: int | None = None, device: str = "cpu", n_boot: int = 1000,
                     seed: int = 0) -> dict:
    """Cross-validation set-up (module docstring): returns the ``heldout.json`` dict and writes the files.

    Raises:
        BraTSInputError: fewer than two folds have a finished final model (each run is named): out-of-fold
            calibration needs cases of at least two folds.
    """
    work, out = WorkDir(Path(work_dir).resolve()), ReportDir(out_dir)
    datalist = load_datalist(work.path)
    num_folds = int(datalist["num_folds"])
    folds = list(range(num_folds)) if folds is None else [int(f) for f in folds]
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
    if len(use) < 2:
        raise BraTSInputError([f"only fold {use[0]} is finished; out-of-fold calibration needs the validation cases "
                               f"of at least two folds"] + [skipped[f] for f in folds if f in skipped],
                              header="cannot calibrate out of fold")

    torch.manual_seed(0)
    fold_models = {f: UncertaintySegmenter.from_checkpoint(ckpt, work_dir=work.path, device=device)
                   for f, ckpt in finished.items()}
    unavailable, collected, group_of_case = {}, {}, {}
    seg_rows, agreements, all_methods = [], [], {}
    for f in use:
        seg = fold_models[f]
        methods = [var1shot_method(seg)]
        if seg.with_uncertainty:
            methods.insert(0, head_method(seg))
        else:
            unavailable.setdefault("unc", f"fold {f}'s model has no uncertainty channel (variant {variant!r})")
        if tta:
            methods.append(tta_method(seg))
        if ensemble:
            if len(fold_models) < 2:
                unavailable.setdefault("ensemble", "an ensemble needs 2+ finished folds")
            else:
                methods.append(ensemble_method(list(fold_models.values()),
                                               label=f"ensemble of the {len(fold_models)} folds' final models*"))
        if mc_variant:
            run = work.run(mc_variant, f)
            if not run.has_final_model():
                unavailable.setdefault("mc_dropout", f"{run.final_model}: no finished '{mc_variant}' run for fold "
                                                     f"{f} (train it with cross_validate.py --variants \"[{mc_variant}]\")")
            else:
                methods.append(mc_dropout_method(seg, run.final_model, run_dropout(run), mc_samples, device))
        all_methods.update({m.key: m for m in methods})
        reference = methods[0].key
        _, val = fold_split(datalist, f)
        val = val[: int(max_cases_per_fold)] if max_cases_per_fold else val
        fold_dir, pred_dir = out.heldout_fold(f), out.heldout_predictions(f)
        for e in val:
            cid = e["case_id"]
            gt, outputs, (affine, _) = predict_case(e, methods, seg.plans)
            # the product's files: evaluated (and cross-checked) below like any other tool's output
            labels, unc, _ = outputs[reference]
            save_prediction(labels, unc, affine, None, pred_dir, cid)
            collect_case(collected, cid, gt, outputs, reference)
            group_of_case[cid] = f
            print(f"[heldout] fold {f} {cid}: " + ", ".join(
                f"{k} {collected[k].own[-1].auroc['missed_vs_tp']:.3f}" for k in outputs), flush=True)
        summ = evaluate_folder(pred_dir, datalist["dataset_dir"], fold_dir, unc_dir=pred_dir,
                               case_ids=[e["case_id"] for e in val], crosscheck=crosscheck)
        with open(fold_dir / "per_case.csv") as fh:
            for row in csv.DictReader(fh):
                seg_rows.append({"fold": f, **{k: v if k in ("case_id", "region") else (float(v) if v else float("nan"))
                                               for k, v in row.items()}})
        if "crosscheck" in summ:
            agreements.append(summ["crosscheck"])

    result = score(collected, all_methods, group_of_case=group_of_case, n_boot=n_boot, seed=seed)
    if "unc" in collected:
        # the deployable calibration: every evaluated case (all out of fold) fits the map of a NEW case; the
        # figures above used cross-fitted calibrators, so none of them is scored by this fit
        IsotonicCalibrator.fit(collected["unc"].own).save(
            out.calibration, map="unc_output", variant=variant, folds=use, setup="cross_validation",
            reporting_dilation=REPORT_DILATION, models=[str(finished[f]) for f in use])
    seg_summary = summarize_rows([{k: v for k, v in r.items() if k != "fold"} for r in seg_rows])
    write_rows_csv(out.heldout_per_case, seg_rows)
    setup = (f"Cross-validation: each fold's final `{variant}` model on its own validation cases ({len(group_of_case)} "
             f"cases, folds {use}); the reference segmentation of the paired figures is that model's. Calibration: "
             "each case through an isotonic fit on the other folds' cases. \\* The ensemble's other members were "
             "trained on the case: an optimistic bound, not a held-out measurement.")
    md = render_segmentation_markdown(seg_summary, _merge_agreements(agreements) if crosscheck else None,
                                      len(group_of_case), use)
    md += "\n" + render_heldout_markdown(result, all_methods, "Self-assessment (cross-validation)", setup, unavailable)
    extra = {"meta": {"setup": "cross_validation", "folds": use, "num_cases": len(group_of_case), "variant": variant,
                      "folds_skipped": {str(f): skipped[f] for f in folds if f not in use},
                      "methods": {k: {"label": m.label, "forward_passes": m.passes} for k, m in all_methods.items()},
                      "unavailable": unavailable},
             "segmentation": seg_summary, "crosscheck": _merge_agreements(agreements) if crosscheck else None}
    return write_result(out, result, extra, md)


def render_segmentation_markdown(seg_summary: Mapping, crosscheck: Mapping | None, num_cases: int, folds) -> str:
    """Segmentation of the evaluated model on the held-out cases (BraTS 2023 metrics) and the cross-check line."""

    def f(v, nd=3):
        return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"

    seg = seg_summary.get("regions", {})
    lines = ["## Held-out segmentation (final models on their validation cases)", "",
             f"Cases: {num_cases} (folds {list(folds)}).", "",
             "| region | legacy Dice | legacy HD95 (mm) | lesion-wise Dice | lesion-wise HD95 (mm) | TP | FP | FN |",
             "|---|---|---|---|---|---|---|---|"]
    for r in REGIONS:
        s = seg.get(r, {})
        lines.append(f"| {r} | {f(s.get('legacy_dice'))} | {f(s.get('legacy_hd95'), 2)} | {f(s.get('lesionwise_dice'))} "
                     f"| {f(s.get('lesionwise_hd95'), 2)} | {f(s.get('num_tp'), 2)} | {f(s.get('num_fp'), 2)} "
                     f"| {f(s.get('num_fn'), 2)} |")
    lines += ["", "Metrics of the BraTS 2023 ranking code (BraTS-2023-Metrics). Legacy HD95: the robust Hausdorff "
              "distance, the larger of the two directed 95th percentiles of surface distances weighted by surfel "
              "area, in mm (374 when one mask is empty). Lesion-wise (GLI): the same HD95 per lesion; ground truth "
              "dilated 3 times with the 18-neighbourhood, lesions of <= 50 mm^3 dropped, false positives Dice 0 / "
              "HD95 374. TP/FP/FN are means per case.", ""]
    if crosscheck:
        if crosscheck.get("available"):
            parts = []
            for key, name in (("legacy_dice", "legacy Dice"),
                              ("pooled_hd95", "HD95 pooled over both directions' border voxels (the tool's definition, "
                                              "not the BraTS 2023 HD95 of the table)"),
                              ("lesions", "matched-lesion Dice and TP count")):
                s = crosscheck.get(key, {})
                parts.append(f"{name}: {s.get('agree', 0)}/{s.get('compared', 0)} agree "
                             f"(max |diff| {f(s.get('max_abs_diff'), 6)})")
            lines += [f"Cross-check against {crosscheck.get('tool')}: " + "; ".join(parts) + ". Compared only where "
                      "the definitions coincide (lesions: one GT component per lesion, one matching prediction, "
                      "nothing dropped or false-positive).", ""]
        else:
            lines += [f"Cross-check against brats_evaluation not available: {crosscheck.get('error')}", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- test set
def score_test_set(methods: Sequence[Method], plans, calibration_entries: Sequence[Mapping],
                   test_entries: Sequence[Mapping], reference_key: str, n_boot: int = 1000,
                   seed: int = 0) -> tuple[SelfAssessment, dict, dict]:
    """Models trained elsewhere: calibrate on ``calibration_entries`` (their validation cases), score on
    ``test_entries`` (unseen cases). Returns ``(result, collected test, collected calibration)``."""
    cal_ids = {e["case_id"] for e in calibration_entries}
    overlap = sorted(cal_ids & {e["case_id"] for e in test_entries})
    if overlap:
        raise BraTSInputError([f"case {c} is both a calibration and a test case" for c in overlap],
                              header="test cases must be unseen")
    by_key = {m.key: m for m in methods}
    calibration, test = {}, {}
    for entries, collected, what in ((calibration_entries, calibration, "calibration"), (test_entries, test, "test")):
        for e in entries:
            gt, outputs, _ = predict_case(e, methods, plans)
            collect_case(collected, e["case_id"], gt, outputs, reference_key)
            print(f"[heldout] {what} {e['case_id']}: " + ", ".join(
                f"{k} {collected[k].own[-1].auroc['missed_vs_tp']:.3f}" for k in outputs), flush=True)
    return score(test, by_key, calibration=calibration, n_boot=n_boot, seed=seed), test, calibration


def summary_line(heldout: Mapping) -> str:
    """One line: cases, and per method the headline figures (paired AUROC missed vs TP, calibrated ECE, Spearman)."""
    meta = heldout.get("meta", {})
    parts = [f"{meta.get('num_cases', '?')} held-out cases ({meta.get('setup', '?')})"]
    for key in list(meta.get("methods", {})):
        def g(name):
            v = heldout.get(f"{key}.{name}")
            return "–" if v is None else f"{v:.3f}"
        parts.append(f"{key}: AUROC missed/TP {g('auroc_missed_vs_tp')}, FP/TN {g('auroc_fp_vs_tn')}, "
                     f"Spearman pred. Dice {g('spearman_pred_dice')}, {meta['methods'][key]['forward_passes']} passes")
    return " | ".join(parts)
