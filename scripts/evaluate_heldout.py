"""Held-out evaluation: each fold's FINAL model on its validation cases, and uncertainty quality vs cost.

    python scripts/evaluate_heldout.py --work_dir W --out_dir R [--folds "[0,1]"] [--variant unc]
        [--mc_variant mcdropout] [--mc_samples 10] [--tta true] [--ensemble true] [--crosscheck true]
        [--max_cases_per_fold N] [--device cpu]

For every fold with a finished ``W/runs/<variant>/fold<k>/model_final.pt``:
1. the final model predicts each validation case through the shared inference path
   (``custom.inference.segmenter.UncertaintySegmenter``: preprocess -> sliding window -> cancer mask -> original grid);
   labels and unc_output are written to ``R/heldout/fold<k>/pred/<case_id>{,-unc}.nii.gz``;
2. segmentation: legacy and BraTS 2023 lesion-wise Dice/HD95 per region from those files
   (``custom.evaluation.folder.evaluate_folder``), cross-checked against ``brats_evaluation``;
3. uncertainty quality against the WT errors of the segmentation each method produces (AUROC inside the
   dilated union of predicted and true WT, Spearman, ECE, QU-BraTS) and cost (forward passes, s/case), for:
   unc_output (1 pass), var1shot = 4 p (1 - p) (same pass), mirroring TTA variance (8 passes), MC dropout
   variance (N passes of the ``mc_variant`` model) and the ensemble variance of all available folds' final
   models. Variances are scaled by 4 (the Bernoulli maximum) to [0, 1] and bounded by the same cancer mask.
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fire  # noqa: E402
import numpy as np  # noqa: E402

from custom.core.atomic import atomic_save_nifti, atomic_write_bytes, atomic_write_json  # noqa: E402
from custom.core.cli import as_bool, as_list  # noqa: E402
from custom.core.errors import BraTSInputError  # noqa: E402
from custom.core.numeric import nanmean  # noqa: E402
from custom.evaluation.folder import evaluate_folder, summarize_rows, to_json_safe, write_rows_csv  # noqa: E402
from custom.evaluation.segmentation import dice, region_mask  # noqa: E402
from custom.evaluation.uncertainty import uncertainty_quality  # noqa: E402
from custom.workflows.report import QUALITY_COLUMNS, render_quality_vs_cost  # noqa: E402

MARK_START, MARK_END = "<!-- heldout:start -->", "<!-- heldout:end -->"


def _run_dropout(run_dir: Path, default: float = 0.1) -> float:
    """Dropout probability the run was trained with (its resolved train_config.json), else ``default``."""
    cfg = run_dir / "train_config.json"
    if cfg.is_file():
        try:
            p = json.loads(cfg.read_text()).get("dropout")
            if isinstance(p, (int, float)) and 0 < p < 1:
                return float(p)
        except (json.JSONDecodeError, AttributeError):
            pass
    return default


class MethodRunner:
    """Probabilities ``(3, X', Y', Z')`` and an uncertainty map on the preprocessed grid for one method."""

    def __init__(self, name: str, passes: int, fn):
        self.name, self.passes, self.fn = name, passes, fn


def _stack(probs3, unc_map):
    import torch

    return torch.cat([torch.as_tensor(probs3[:3]), torch.as_tensor(unc_map)[None]]).float()


def build_methods(seg, work_dir: Path, fold: int, fold_models: dict, mc_variant, mc_samples: int, tta: bool,
                  ensemble: bool, device, unavailable: dict) -> list:
    """The methods of one fold; each ``fn(image_pp) -> probs_pp (4, X', Y', Z')`` with the map in channel 3."""
    import torch

    from custom.model.checkpoints import load_network
    from custom.uncertainty.baselines import enable_mc_dropout, mirror_axes_combinations, probability_patch_fn

    def single(image_pp):
        return torch.as_tensor(seg.predict_preprocessed(image_pp))

    def var1shot(image_pp):
        p = single(image_pp)
        return _stack(p, 4.0 * p[0] * (1.0 - p[0]))

    methods = [MethodRunner("var1shot", 1, var1shot)]
    if seg.with_uncertainty:
        methods.insert(0, MethodRunner("unc_output", 1, single))
    else:
        unavailable.setdefault("unc_output", f"fold {fold}'s model has no uncertainty channel "
                                             "(a variant trained without it)")

    def variance_method(samples):
        stack = torch.stack(samples)             # (N, C, X', Y', Z')
        mean = stack.mean(0)
        var = stack[:, 0].var(0, unbiased=False)
        return _stack(mean, torch.clamp(4.0 * var, 0.0, 1.0))

    if tta:
        axes_list = [tuple(a - 1 for a in axes) for axes in mirror_axes_combinations(True)]

        def tta_fn(image_pp):
            x = torch.as_tensor(np.asarray(image_pp))
            outs = []
            for axes in axes_list:
                xi = torch.flip(x, axes) if axes else x
                p = torch.as_tensor(seg.predict_preprocessed(xi.numpy()))
                outs.append(torch.flip(p, axes) if axes else p)
            return variance_method(outs)

        methods.append(MethodRunner("tta_variance", len(axes_list), tta_fn))

    if ensemble:
        if len(fold_models) < 2:
            unavailable.setdefault("ensemble", f"only {len(fold_models)} finished fold model(s); an ensemble needs 2+")
        else:
            def ens_fn(image_pp):
                return variance_method([torch.as_tensor(m.predict_preprocessed(image_pp)) for m in fold_models.values()])

            methods.append(MethodRunner(f"ensemble ({len(fold_models)} folds)*", len(fold_models), ens_fn))
    if mc_variant:
        ckpt = work_dir / "runs" / mc_variant / f"fold{fold}" / "model_final.pt"
        if not ckpt.is_file() or not (ckpt.parent / "FINISHED").exists():
            unavailable.setdefault("mc_dropout", f"{ckpt}: no finished '{mc_variant}' run for fold {fold} "
                                                 f"(train it with cross_validate.py --variants \"[{mc_variant}]\")")
        else:
            p_drop = _run_dropout(ckpt.parent)
            try:
                net, _ = load_network(ckpt, seg.plans, device=device, dropout=p_drop)
                enable_mc_dropout(net)
            except (BraTSInputError, ValueError) as exc:
                unavailable.setdefault("mc_dropout", f"{ckpt}: cannot run with dropout p={p_drop}: {exc}")
                return methods
            patch_fn = probability_patch_fn(net)

            def mc_fn(image_pp):
                x = torch.as_tensor(np.asarray(image_pp, dtype=np.float32))[None].to(seg.device)
                outs = [seg.inferer.predict_probabilities(x, patch_fn)[0].cpu() for _ in range(int(mc_samples))]
                return variance_method(outs)

            methods.append(MethodRunner(f"mc_dropout (N={int(mc_samples)}, p={p_drop})", int(mc_samples), mc_fn))

    return methods


def evaluate_heldout(work_dir, out_dir, folds=None, variant: str = "unc", mc_variant: str | None = "mcdropout",
                     mc_samples: int = 10, tta: bool = True, ensemble: bool = True, crosscheck: bool = True,
                     max_cases_per_fold: int | None = None, device: str = "cpu") -> dict:
    from custom.data.datalist import fold_split, load_datalist
    from custom.data.nifti import load_case_arrays

    work_dir, out_dir = Path(work_dir).resolve(), Path(out_dir)
    datalist = load_datalist(work_dir)
    num_folds = int(datalist["num_folds"])
    folds = list(range(num_folds)) if folds is None else [int(f) for f in folds]

    # final models of every finished fold (the ensemble uses all of them); checked before the heavy imports
    finished, skipped = {}, {}
    for f in range(num_folds):
        run = work_dir / "runs" / variant / f"fold{f}"
        if not (run / "FINISHED").exists() or not (run / "model_final.pt").is_file():
            skipped[f] = f"{run}: no finished run with model_final.pt"
        else:
            finished[f] = run / "model_final.pt"
    use = [f for f in folds if f in finished]
    for f in folds:
        if f not in finished:
            print(f"WARNING: fold {f} skipped: {skipped[f]}", file=sys.stderr)
    if not use:
        raise BraTSInputError([skipped[f] for f in folds], header="no fold has a finished final model to evaluate")

    import nibabel as nib
    import torch

    from custom.inference.postprocess import postprocess_probabilities
    from custom.inference.segmenter import UncertaintySegmenter
    from custom.preprocessing.functional import preprocess_case

    torch.manual_seed(0)
    fold_models = {f: UncertaintySegmenter.from_checkpoint(ckpt, work_dir=work_dir, device=device)
                   for f, ckpt in finished.items()}

    unavailable = {}
    seg_rows, method_rows, agreements = [], [], []
    cost = {}
    for f in use:
        seg = fold_models[f]
        _, val = fold_split(datalist, f)
        val = val[: int(max_cases_per_fold)] if max_cases_per_fold else val
        pred_dir = out_dir / "heldout" / f"fold{f}" / "pred"
        methods = build_methods(seg, work_dir, f, fold_models, mc_variant, mc_samples, tta, ensemble,
                                device, unavailable)
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
                    for arr, name in ((pred.labels, f"{cid}.nii.gz"), (pred.unc, f"{cid}-unc.nii.gz")):
                        atomic_save_nifti(nib.Nifti1Image(arr, affine), pred_dir / name)
                q = uncertainty_quality(pred.unc, pred.labels, gt, brain_mask=brain)
                method_rows.append({"fold": f, "case_id": cid, "method": m.name, "forward_passes": m.passes,
                                    "seconds": secs,
                                    "dice_wt": dice(region_mask(pred.labels, "WT"), region_mask(gt, "WT")), **q})
                cost.setdefault(m.name, m.passes)
            print(f"[heldout] fold {f} {cid}: " + ", ".join(
                f"{r['method'].split(' ')[0]} AUROC {r['auroc_wt_error']:.3f}" for r in method_rows[-len(methods):]),
                flush=True)
        summ = evaluate_folder(pred_dir, datalist["dataset_dir"], out_dir / "heldout" / f"fold{f}",
                               unc_dir=pred_dir, case_ids=[e["case_id"] for e in val], crosscheck=crosscheck)
        with open(out_dir / "heldout" / f"fold{f}" / "per_case.csv") as fh:
            for row in csv.DictReader(fh):
                seg_rows.append({"fold": f, **{k: v if k in ("case_id", "region") else (float(v) if v else float("nan"))
                                               for k, v in row.items()}})
        if "crosscheck" in summ:
            agreements.append(summ["crosscheck"])

    order = ("unc_output", "var1shot", "tta_variance", "mc_dropout", "ensemble")
    methods_summary = []
    for name in sorted(cost, key=lambda n: order.index(n.split(" ")[0]) if n.split(" ")[0] in order else len(order)):
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
    write_rows_csv(out_dir / "heldout_per_case.csv", seg_rows)
    write_rows_csv(out_dir / "heldout_methods_per_case.csv", method_rows)
    atomic_write_json(out_dir / "heldout.json", to_json_safe(heldout))
    md = render_quality_vs_cost(to_json_safe(heldout))
    if any(m["method"].startswith("ensemble") for m in methods_summary):
        md += "\n\\* In cross-validation the other folds' models were trained on these cases: the ensemble row is " \
              "an optimistic bound, not a held-out measurement.\n"
    atomic_write_bytes(out_dir / "heldout.md", md.encode())
    report = out_dir / "report.md"
    if report.is_file():
        text = report.read_text()
        if MARK_START in text and MARK_END in text:
            head, rest = text.split(MARK_START, 1)
            tail = rest.split(MARK_END, 1)[1]
            atomic_write_bytes(report, (head + MARK_START + "\n" + md + MARK_END + tail).encode())
    return heldout


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


def main(work_dir: str, out_dir: str, folds=None, variant: str = "unc", mc_variant: str = "mcdropout",
         mc_samples: int = 10, tta: bool = True, ensemble: bool = True, crosscheck: bool = True,
         max_cases_per_fold: int | None = None, device: str = "cpu"):
    """Run the held-out evaluation; print a one-line summary."""
    try:
        res = evaluate_heldout(work_dir, out_dir, folds=as_list(folds, "folds", cast=int),
                               variant=variant, mc_variant=mc_variant or None, mc_samples=int(mc_samples),
                               tta=as_bool(tta, "tta"), ensemble=as_bool(ensemble, "ensemble"),
                               crosscheck=as_bool(crosscheck, "crosscheck"),
                               max_cases_per_fold=max_cases_per_fold, device=device)
    except BraTSInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    seg = res["segmentation"]["regions"]
    parts = [f"{res['num_cases']} held-out cases, folds {res['folds']}",
             "legacy Dice WT/TC/ET " + "/".join(f"{seg[r]['legacy_dice']:.3f}" for r in ("WT", "TC", "ET"))]
    parts += [f"{m['method']}: AUROC {m['auroc_wt_error']:.3f}, {m['forward_passes']} passes, "
              f"{m['seconds_per_case']:.2f} s/case" for m in res["methods"]]
    print(" | ".join(parts) + f" -> {Path(out_dir) / 'heldout.json'}")


if __name__ == "__main__":
    fire.Fire(main)
