"""The paper's tables and figures from the cross-validation runs of a work dir (``scripts/report.py``).

Reads ``W/runs/<variant>/fold<k>/metrics.csv`` (DESIGN.md columns) and writes into R:
- ``table1.csv`` (Dice WT/TC/ET/mean with vs without uncertainty, per fold and averaged, at the final
  validation epoch and averaged over the validation rounds of the last K epochs), ``table2.csv`` (RMSD and
  correlation of unc_output, variance_stable, var1shot against error_stable), ``tables.json`` (both, plus run
  states and the epochs each figure averages);
- ``metrics_fold0_<N>_epochs.png`` (Figure 1: per-epoch RMSD and correlation of the three maps, fold 0);
- ``Comparison_models_6_views.png`` (Figure 2: error_stable, unc_output, variance_stable, var1shot on six
  fold-0 validation cases, axial slice through the tumour over the t2f image, shared colour bar);
- ``report.md`` (tables beside the paper's numbers, figures, run states, and the held-out
  self-assessment section when ``R/heldout.md`` exists).
Only FINISHED runs of the cross-validation's settings enter the fold averages: a run whose train_config.json
differs from the settings resolved from ``--config``/``--overrides`` (the ones given to cross_validate.py) is
``other_config``; missing, unfinished and other-settings runs are listed in report.md and on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from custom.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.core.layout import FINAL_MODEL_NAME, MODEL_NAME, RUN_FINISHED, RUN_MISSING, ReportDir, RunDir, WorkDir
from custom.data.datalist import fold_split, load_datalist
from custom.evaluation.folder import to_json_safe, write_rows_csv
from custom.evaluation.runs import DICE_COLUMNS, UNC_METRIC_COLUMNS, collect_runs, fold_average, read_metrics_csv
from custom.inference.postprocess import masked_uncertainty
from custom.inference.segmenter import UncertaintySegmenter
from custom.workflows.cross_validate import expected_run_configs
from custom.uncertainty.store import ErrorMapStore
from custom.uncertainty.targets import compute_prediction_variance

#: report.md marks around the held-out section (``custom.workflows.heldout`` replaces what lies between them)
HELDOUT_START, HELDOUT_END = "<!-- heldout:start -->", "<!-- heldout:end -->"

#: the paper's reported numbers (METHOD.md): BraTS 2023, 5 folds, 500 epochs, batch 2
PAPER_TABLE1 = {"unc": {"val_dice_wt": 0.916, "val_dice_tc": 0.916, "val_dice_et": 0.873, "val_dice_mean": 0.901},
                "baseline": {"val_dice_wt": 0.918, "val_dice_tc": 0.917, "val_dice_et": 0.871, "val_dice_mean": 0.902}}
PAPER_TABLE2 = {"unc": (0.00360, 0.966), "variance_stable": (0.00542, 0.894), "var1shot": (0.0319, 0.207)}
VARIANT_NAMES = {"unc": "with uncertainty", "baseline": "without uncertainty", "mcdropout": "MC dropout variant"}
MAPS = ("unc", "variance_stable", "var1shot")
MAP_NAMES = {"unc": "unc_output", "variance_stable": "variance_stable", "var1shot": "var1shot"}


def _fmt(v, nd=3):
    return "–" if v is None or not np.isfinite(v) else f"{v:.{nd}f}"


def epochs_text(epochs) -> str:
    """The epochs a 'last K' figure averages: all of them up to six, else ``"a, b, …, z (n rounds)"``."""
    epochs = list(epochs)
    if not epochs:
        return "none"
    if len(epochs) <= 6:
        return ", ".join(map(str, epochs))
    return f"{epochs[0]}, {epochs[1]}, …, {epochs[-1]} ({len(epochs)} rounds)"


def _window(entry: dict, column: str) -> list:
    return list(entry["summary"][column]["last_k_epochs"]) if entry["summary"] else []


# ------------------------------------------------------------------------------------------- tables
def build_tables(runs: dict) -> dict:
    """Rows of Table 1 and Table 2 (per fold and averaged over finished folds) from ``collect_runs``."""
    t1, t2, averages = [], [], {}
    for variant, folds in runs.items():
        avg = fold_average(folds)
        averages[variant] = avg
        for fold, e in sorted(folds.items()):
            row = {"variant": variant, "fold": fold, "status": e["status"], "epochs": e["num_epochs"],
                   "final_val_epoch": e["summary"]["val_dice_mean"]["final_epoch"] if e["summary"] else None,
                   "last_k_epochs": " ".join(map(str, _window(e, "val_dice_mean")))}
            for stat in ("final", "last_k_mean"):
                for c in DICE_COLUMNS:
                    row[f"{c}_{stat}"] = e["summary"][c][stat] if e["summary"] else float("nan")
            t1.append(row)
        row = {"variant": variant, "fold": "mean", "status": f"{len(avg['folds_used'])} finished folds",
               "epochs": "", "final_val_epoch": "", "last_k_epochs": ""}
        for stat in ("final", "last_k_mean"):
            for c in DICE_COLUMNS:
                row[f"{c}_{stat}"] = avg[c][stat]
        t1.append(row)
    if "unc" in runs:
        folds = runs["unc"]
        for fold, e in sorted(folds.items()):
            row = {"fold": fold, "status": e["status"], "epochs": e["num_epochs"],
                   "last_k_epochs": " ".join(map(str, _window(e, "val_rmsd_unc")))}
            for stat in ("final", "last_k_mean"):
                for c in UNC_METRIC_COLUMNS:
                    row[f"{c}_{stat}"] = e["summary"][c][stat] if e["summary"] else float("nan")
            t2.append(row)
        avg = averages["unc"]
        row = {"fold": "mean", "status": f"{len(avg['folds_used'])} finished folds", "epochs": "",
               "last_k_epochs": ""}
        for stat in ("final", "last_k_mean"):
            for c in UNC_METRIC_COLUMNS:
                row[f"{c}_{stat}"] = avg[c][stat]
        t2.append(row)
    return {"table1": t1, "table2": t2, "averages": averages}


def run_problems(runs: dict) -> list:
    """One message per run that is not finished, or not of the cross-validation's settings (these never enter an
    average)."""
    msgs = []
    for variant, folds in runs.items():
        for fold, e in sorted(folds.items()):
            if e["status"] != RUN_FINISHED:
                msgs.append(f"{variant} fold {fold}: {e['status'].upper()} — {e['reason']}; excluded from the averages")
    return msgs


# ------------------------------------------------------------------------------------------- figures
def figure_metrics(metrics_csv, out_dir) -> Path:
    """Figure 1: RMSD and correlation against error_stable per epoch for the three maps (fold 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics_csv(metrics_csv)
    n_epochs = len(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"unc": "tab:red", "variance_stable": "tab:blue", "var1shot": "tab:green"}
    for ax, kind in zip(axes, ("rmsd", "corr")):
        plotted = False
        for m in MAPS:
            pts = [(r["epoch"], r.get(f"val_{kind}_{m}", np.nan)) for r in rows]
            pts = [(e, v) for e, v in pts if np.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=colours[m], label=MAP_NAMES[m])
                plotted = True
        ax.set_xlabel("epoch")
        ax.set_ylabel("RMSD to error_stable" if kind == "rmsd" else "weighted Pearson corr. with error_stable")
        ax.set_title(("RMSD" if kind == "rmsd" else "Correlation") + " (validation, GT WT voxels)")
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no validation values", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"Fold 0: uncertainty maps vs error_stable over {n_epochs} epochs")
    fig.tight_layout()
    out = ReportDir(out_dir).figure_metrics(n_epochs)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return out


def fold0_maps(work_dir, run_dir, num_cases: int = 6) -> list:
    """For up to ``num_cases`` fold-0 validation cases: the four maps on the preprocessed grid.

    error_stable / variance_stable come from the run's store (``full(case_id)``); unc_output (times the
    cancer mask, as the product outputs it) and var1shot = 4 p_WT (1 - p_WT) from the final model's
    sliding-window prediction on the preprocessed case. Returns dicts with ``case_id, t2f, maps, z``.
    """
    run = RunDir(run_dir)
    if not run.store.is_dir():
        raise BraTSInputError(f"{run.store}: error-map store missing (needed for Figure 2)")
    ckpt = run.final_model if run.final_model.is_file() else run.best_model
    if not ckpt.is_file():
        raise BraTSInputError(f"{run.path}: neither {run.final_model.name} nor {run.best_model.name} "
                              "(needed for Figure 2)")
    _, val = fold_split(load_datalist(work_dir), 0)
    store = ErrorMapStore(run.store)
    missing = [e["case_id"] for e in val if e["case_id"] not in store]
    cases = [e for e in val if e["case_id"] in store][: int(num_cases)]
    if not cases:
        raise BraTSInputError(f"{run.store}: holds none of the fold-0 validation cases ({missing[:6]})")
    seg = UncertaintySegmenter.from_checkpoint(ckpt, work_dir=work_dir)
    if not seg.with_uncertainty:
        raise BraTSInputError(f"{ckpt}: network has no uncertainty channel (Figure 2 needs the 'unc' variant)")
    out = []
    for e in cases:
        cid = e["case_id"]
        image = np.load(e["pp_image"], mmap_mode="r")
        stored = store.full(cid)
        if tuple(stored["error"].shape) != tuple(image.shape[1:]):
            raise BraTSInputError(f"{run.store}: case {cid} stored with shape {stored['error'].shape}, "
                                  f"preprocessed image {e['pp_image']} has {image.shape[1:]}")
        probs = torch.from_numpy(seg.predict_preprocessed(np.array(image, dtype=np.float32)))
        unc, _ = masked_uncertainty(probs)
        label = np.load(e["pp_label"]) if e.get("pp_label") else None
        area = (label > 0).sum(axis=(0, 1)) if label is not None else stored["error"].sum(axis=(0, 1))
        z = int(np.argmax(area))
        out.append({"case_id": cid, "z": z, "t2f": np.asarray(image[MODALITIES.index("t2f"), :, :, z]),
                    "maps": {"error_stable": stored["error"][:, :, z],
                             "unc_output": unc.numpy()[:, :, z],
                             "variance_stable": stored["variance"][:, :, z],
                             "var1shot": compute_prediction_variance(probs[0]).numpy()[:, :, z]},
                    "gt_wt_voxels": int(area[z]), "checkpoint": ckpt.name})
    return out


def figure_comparison(cases: list, out_dir) -> Path:
    """Figure 2: one row per case, columns error_stable, unc_output, variance_stable, var1shot over t2f."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ("error_stable", "unc_output", "variance_stable", "var1shot")
    n = len(cases)
    fig, axes = plt.subplots(n, len(cols), figsize=(3.0 * len(cols) + 1.2, 3.0 * n), squeeze=False)
    im = None
    for i, c in enumerate(cases):
        t2f = c["t2f"]
        lo, hi = np.percentile(t2f[t2f != 0], [1, 99]) if np.any(t2f != 0) else (0.0, 1.0)
        for j, name in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(t2f.T, cmap="gray", origin="lower", vmin=lo, vmax=hi)
            m = np.asarray(c["maps"][name], dtype=np.float32)
            # transparent where the map is ~0, so the anatomy stays visible around the tumour
            im = ax.imshow(np.ma.masked_less_equal(m, 1e-3).T, cmap="jet", origin="lower", vmin=0.0, vmax=1.0,
                           alpha=0.75, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(name)
            if j == 0:
                ax.set_ylabel(f"{c['case_id']}\naxial z={c['z']}", fontsize=8)
            ax.text(0.02, 0.02, f"max {m.max():.2f}", color="w", fontsize=7, transform=ax.transAxes)
    fig.subplots_adjust(right=0.88, wspace=0.03, hspace=0.08)
    cax = fig.add_axes([0.9, 0.15, 0.02, 0.7])
    fig.colorbar(im, cax=cax, label="value (probability scale, 0-1)")
    fig.suptitle(f"Fold 0 validation: error_stable vs uncertainty maps ({n} cases, t2f beneath)")
    out = ReportDir(out_dir).figure_comparison
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------- markdown
def render_report(runs, tables, k, figures: dict, problems: list, heldout_markdown: str | None = None) -> str:
    avg = tables["averages"]
    lines = ["# Uncertainty-aware nnU-Net: cross-validation report", ""]
    lines += ["## Runs", "", "| variant | fold | state | epochs | note |", "|---|---|---|---|---|"]
    for v, folds in runs.items():
        for f, e in sorted(folds.items()):
            lines.append(f"| {v} | {f} | {e['status']} | {e['num_epochs']} | {e['reason'] or ''} |")
    lines.append("")
    if problems:
        lines += ["**Not every run is finished with the cross-validation's settings: the averages below hold only "
                  "those that are.**", ""]
        lines += [f"- {p}" for p in problems] + [""]

    lines += ["## Table 1: Dice with vs without the uncertainty channel", "",
              f"Averages over the finished folds; 'final' = the last validation epoch, 'last {k}' = mean of the "
              f"validation rounds in the last {k} epochs of each fold (epoch > last epoch - {k}; all rounds when a "
              "run has fewer epochs). The epochs each fold's 'last-K' figure averages are listed per fold below.", "",
              "| | folds | WT | TC | ET | mean |", "|---|---|---|---|---|---|"]
    for v in ("unc", "baseline"):
        if v not in avg:
            continue
        used = ",".join(map(str, avg[v]["folds_used"])) or "none"
        for stat, label in (("final", "final"), ("last_k_mean", f"last {k}")):
            vals = " | ".join(_fmt(avg[v][c][stat]) for c in DICE_COLUMNS)
            lines.append(f"| {VARIANT_NAMES[v]} (ours, {label}) | {used} | {vals} |")
        p = PAPER_TABLE1[v]
        lines.append(f"| {VARIANT_NAMES[v]} (paper) | 5 | " + " | ".join(f"{p[c]:.3f}" for c in DICE_COLUMNS) + " |")
    lines += ["", "Per fold:", "",
              "| variant | fold | state | final val. epoch | WT | TC | ET | mean | WT last-K | TC last-K | ET last-K "
              "| mean last-K | last-K epochs averaged |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in tables["table1"]:
        vals = [_fmt(r[f"{c}_final"]) for c in DICE_COLUMNS] + [_fmt(r[f"{c}_last_k_mean"]) for c in DICE_COLUMNS]
        ep = "" if r["final_val_epoch"] is None else r["final_val_epoch"]
        window = "" if r["fold"] == "mean" else epochs_text(r["last_k_epochs"].split())
        lines.append(f"| {r['variant']} | {r['fold']} | {r['status']} | {ep} | " + " | ".join(vals) + f" | {window} |")

    lines += ["", "## Table 2: uncertainty maps against error_stable (variant 'unc', GT WT voxels)", ""]
    if "unc" in avg:
        a = avg["unc"]
        lines += [f"Folds: {','.join(map(str, a['folds_used'])) or 'none'}.", "",
                  f"| map | RMSD final | corr final | RMSD last {k} | corr last {k} | RMSD (paper) | corr (paper) |",
                  "|---|---|---|---|---|---|---|"]
        for m in MAPS:
            pr, pc = PAPER_TABLE2[m]
            lines.append(f"| {MAP_NAMES[m]} | {_fmt(a[f'val_rmsd_{m}']['final'], 5)} | {_fmt(a[f'val_corr_{m}']['final'])} "
                         f"| {_fmt(a[f'val_rmsd_{m}']['last_k_mean'], 5)} | {_fmt(a[f'val_corr_{m}']['last_k_mean'])} "
                         f"| {pr:.5f} | {pc:.3f} |")
        lines += ["", f"Per fold (final / last-K; last-K = the validation rounds in the last {k} epochs, a "
                  "correlation only where it is defined):", "", "| fold | state | " + " | ".join(
            f"{MAP_NAMES[m]} RMSD | {MAP_NAMES[m]} corr" for m in MAPS) + " | last-K epochs averaged |",
            "|---|---|" + "---|" * 7]
        for r in tables["table2"]:
            cells = []
            for m in MAPS:
                cells.append(f"{_fmt(r[f'val_rmsd_{m}_final'], 5)} / {_fmt(r[f'val_rmsd_{m}_last_k_mean'], 5)}")
                cells.append(f"{_fmt(r[f'val_corr_{m}_final'])} / {_fmt(r[f'val_corr_{m}_last_k_mean'])}")
            window = "" if r["fold"] == "mean" else epochs_text(r["last_k_epochs"].split())
            lines.append(f"| {r['fold']} | {r['status']} | " + " | ".join(cells) + f" | {window} |")
    else:
        lines.append("No 'unc' variant in this report.")
    lines += ["", "Paper: BraTS 2023, 5 folds x 500 epochs, batch 2. Numbers here come from this work dir's runs "
              "and are only comparable at that scale.", ""]

    lines += ["## Figures", ""]
    n0 = runs.get("unc", {}).get(0, {}).get("num_epochs", 0)
    for key, caption in (("figure1", "Figure 1: per-epoch RMSD and correlation of unc_output, variance_stable and "
                                     f"var1shot against error_stable (fold 0, validation; every validation round of "
                                     f"its {n0} epochs, no averaging)."),
                         ("figure2", "Figure 2: error_stable, unc_output, variance_stable and var1shot on fold-0 "
                                     "validation cases; axial slice with the most ground-truth tumour, t2f beneath, "
                                     f"shared colour bar (0-1). Maps of the run's end state: the store after its last "
                                     f"epoch ({n0}) and {FINAL_MODEL_NAME} ({MODEL_NAME} when there is no final model).")):
        f = figures.get(key)
        if isinstance(f, Path):
            lines += [f"![{caption}]({f.name})", "", caption, ""]
        else:
            lines += [f"{caption.split(':')[0]}: not made — {f}", ""]
    lines += [HELDOUT_START, heldout_markdown.rstrip() if heldout_markdown else
              "## Held-out evaluation\n\nNot run yet (`scripts/evaluate_heldout.py --work_dir W --out_dir R`).",
              HELDOUT_END, ""]
    return "\n".join(lines)


def make_report(work_dir, out_dir, last_k: int = 30, folds=None, variants=("unc", "baseline"),
                num_cases: int = 6, figures: bool = True, config=None, overrides=None) -> dict:
    """Write the tables, figures and report.md into ``out_dir``; returns the tables dict.

    ``config``/``overrides``: those the cross-validation was run with (``scripts/cross_validate.py``); runs of
    other settings are shown and never averaged (:func:`custom.evaluation.runs.collect_runs`).
    """
    work, out = WorkDir(work_dir), ReportDir(out_dir)
    if not work.runs.is_dir():
        raise BraTSInputError(f"{work.runs}: no training runs (run scripts/cross_validate.py first)")
    runs = collect_runs(work_dir, variants=tuple(variants), folds=folds, k=int(last_k),
                        expected=expected_run_configs(work_dir, config, overrides))
    tables = build_tables(runs)
    problems = run_problems(runs)
    for p in problems:
        print(f"WARNING: {p}", file=sys.stderr)
    out.path.mkdir(parents=True, exist_ok=True)
    figs = {}
    if figures:
        fold0 = runs.get("unc", {}).get(0)
        if fold0 is None or fold0["status"] == RUN_MISSING:
            figs["figure1"] = figs["figure2"] = "the 'unc' fold-0 run has no metrics.csv"
        else:
            figs["figure1"] = figure_metrics(RunDir(fold0["dir"]).metrics_csv, out.path)
            try:
                figs["figure2"] = figure_comparison(fold0_maps(work_dir, fold0["dir"], num_cases), out.path)
            except BraTSInputError as exc:
                figs["figure2"] = "; ".join(exc.problems)
                print(f"WARNING: Figure 2 not made: {figs['figure2']}", file=sys.stderr)
    else:
        figs["figure1"] = figs["figure2"] = "figures disabled (--figures false)"
    # the held-out section is custom.workflows.heldout's own rendering (one source: R/heldout.md)
    heldout_md = out.heldout_markdown.read_text() if out.heldout_markdown.is_file() else None
    write_rows_csv(out.table1, tables["table1"])
    write_rows_csv(out.table2, tables["table2"])
    atomic_write_json(out.tables, to_json_safe({
        "last_k": int(last_k), "table1": tables["table1"], "table2": tables["table2"],
        "averages": tables["averages"], "problems": problems,
        "runs": {v: {str(f): {k2: e[k2] for k2 in ("status", "reason", "dir", "num_epochs")} for f, e in fs.items()}
                 for v, fs in runs.items()},
        "paper": {"table1": PAPER_TABLE1, "table2": {m: {"rmsd": r, "corr": c} for m, (r, c) in PAPER_TABLE2.items()}},
        "figures": {k2: (v.name if isinstance(v, Path) else None) for k2, v in figs.items()}}))
    atomic_write_bytes(out.report,
                       render_report(runs, tables, int(last_k), figs, problems, heldout_md).encode())
    return {"tables": tables, "problems": problems, "figures": figs}


def summary_line(result: dict, last_k: int) -> str:
    """One line per :func:`make_report` result: each variant's Dice mean (final and last K) and its folds."""
    avg = result["tables"]["averages"]
    parts = [f"{v}: Dice mean {_fmt(avg[v]['val_dice_mean']['final'])} (final), "
             f"{_fmt(avg[v]['val_dice_mean']['last_k_mean'])} (last {last_k} epochs) over folds {avg[v]['folds_used']}"
             for v in avg]
    if result["problems"]:
        parts.append(f"{len(result['problems'])} run(s) not finished or of other settings, not averaged "
                     "(see report.md)")
    return " | ".join(parts)
