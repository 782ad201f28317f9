"""Report protocol: last-K and fold averaging on metrics.csv files written here, missing/unfinished folds
reported (never averaged), tables/figures/report.md from scripts/report.py, cross_validate planning."""

from __future__ import annotations

import csv
import json
import math
import sys

import numpy as np
import pytest

from custom.core.errors import BraTSInputError
from custom.evaluation.runs import collect_runs, fold_average, last_k_summary, read_metrics_csv
from tests.conftest import run_cmd

COLUMNS = ("epoch,train_loss,lr,time_s,val_dice_wt,val_dice_tc,val_dice_et,val_dice_mean,val_rmsd_unc,"
           "val_corr_unc,val_rmsd_variance_stable,val_corr_variance_stable,val_rmsd_var1shot,val_corr_var1shot,"
           "ema_pseudo_dice").split(",")


def cv_work(prepared_work_dir, path):
    """A work dir with the prepared datalist (2 folds) and plan, and no runs: what the report resolves settings from."""
    import shutil

    path.mkdir(parents=True, exist_ok=True)
    for name in ("datalist.json", "plans.json"):
        shutil.copy(prepared_work_dir / name, path / name)
    return path


def write_settings(work, variant, fold, config=None, overrides=None, **changed):
    """train_config.json of the settings cross_validate plans for (config, overrides), with ``changed`` values."""
    from custom.workflows.cross_validate import config_files, planned_run_config

    d = work / "runs" / variant / f"fold{fold}"
    d.mkdir(parents=True, exist_ok=True)
    settings = planned_run_config(config_files(variant, config), work, fold, overrides)
    settings.update(changed)
    (d / "train_config.json").write_text(json.dumps(settings))
    return settings


def write_run(work, variant, fold, dice_wt, finished=True, val_every=1, corr_unc=None, settings=True):
    """A metrics.csv with one row per epoch; validation every ``val_every`` epochs (other rows empty); with
    ``settings`` (and a plan in ``work``) the train_config.json of train.json's defaults."""
    d = work / "runs" / variant / f"fold{fold}"
    d.mkdir(parents=True, exist_ok=True)
    if settings and (work / "plans.json").is_file():
        write_settings(work, variant, fold)
    with open(d / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for e, v in enumerate(dice_wt):
            row = [e, 1.0, 0.01, 2.0]
            if v is None or e % val_every:
                row += [""] * 11
            else:
                c = corr_unc[e] if corr_unc is not None else 0.9
                row += [v, v - 0.1, v - 0.2, v - 0.1, 0.01, c, 0.02, 0.8, 0.2, 0.2, v]
            w.writerow(row)
    if finished:
        (d / "FINISHED").write_text("done\n")
    return d


def test_last_k_uses_only_validation_epochs(tmp_path):
    d = write_run(tmp_path, "unc", 0, [0.1, None, 0.3, None, 0.5, None, 0.7, None])
    rows = read_metrics_csv(d / "metrics.csv")
    s = last_k_summary(rows, k=4)["val_dice_wt"]
    assert s["final"] == pytest.approx(0.7) and s["final_epoch"] == 6
    assert s["last_k_mean"] == pytest.approx((0.5 + 0.7) / 2)       # epochs 4..7: rounds 4 and 6
    assert s["last_k_epochs"] == [4, 6] and s["num_values"] == 4
    assert last_k_summary(rows, k=2)["val_dice_wt"]["last_k_mean"] == pytest.approx(0.7)  # epochs 6, 7: round 6
    assert last_k_summary(rows, k=30)["val_dice_wt"]["last_k_mean"] == pytest.approx(0.4)  # fewer than K
    assert last_k_summary(rows, k=2)["val_dice_mean"]["final"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="k"):
        last_k_summary(rows, k=0)


def test_last_k_averages_the_last_k_epochs_not_the_last_k_rounds(tmp_path):
    """The paper's "last 30 epochs" with validation every 5 epochs: 6 rounds (epochs 75..100 of 100), not the
    last 30 rounds (which would reach back 150 epochs, here the whole run)."""
    d = tmp_path / "run"
    d.mkdir()
    with open(d / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for e in range(1, 101):                                        # Ignite epochs are 1-based
            w.writerow([e, 1.0, 0.01, 2.0] + ([e / 100] * 11 if e % 5 == 0 else [""] * 11))
    s = last_k_summary(read_metrics_csv(d / "metrics.csv"), k=30)["val_dice_wt"]
    assert s["last_k_epochs"] == [75, 80, 85, 90, 95, 100]
    assert s["last_k_mean"] == pytest.approx(np.mean([75, 80, 85, 90, 95, 100]) / 100)   # rounds: 0.525
    assert s["final"] == pytest.approx(1.0) and s["final_epoch"] == 100 and s["num_values"] == 20


def test_fold_average_excludes_unfinished_and_missing(tmp_path):
    (tmp_path / "datalist.json").write_text(json.dumps({"num_folds": 3}))
    write_run(tmp_path, "unc", 0, [0.2, 0.4, 0.6])
    write_run(tmp_path, "unc", 1, [0.5, 0.7, 0.8])
    write_run(tmp_path, "unc", 2, [0.0, 0.0, 0.0], finished=False)
    runs = collect_runs(tmp_path, variants=("unc", "baseline"), k=2)
    assert [runs["unc"][f]["status"] for f in (0, 1, 2)] == ["finished", "finished", "unfinished"]
    assert all(runs["baseline"][f]["status"] == "missing" for f in (0, 1, 2))
    avg = fold_average(runs["unc"])
    assert avg["folds_used"] == [0, 1] and avg["folds_excluded"] == {2: "unfinished"}
    assert avg["val_dice_wt"]["final"] == pytest.approx((0.6 + 0.8) / 2)
    assert avg["val_dice_wt"]["last_k_mean"] == pytest.approx(((0.4 + 0.6) / 2 + (0.7 + 0.8) / 2) / 2)
    empty = fold_average(runs["baseline"])
    assert empty["folds_used"] == [] and math.isnan(empty["val_dice_mean"]["final"])


def test_bad_metrics_csv_is_named(tmp_path):
    p = tmp_path / "metrics.csv"
    p.write_text("epoch,val_dice_wt\n0,abc\n")
    with pytest.raises(BraTSInputError, match=r"metrics.csv: line 2: column 'val_dice_wt' holds 'abc'"):
        read_metrics_csv(p)
    p.write_text("a,b\n1,2\n")
    with pytest.raises(BraTSInputError, match="no 'epoch' column"):
        read_metrics_csv(p)


def test_report_cli_tables_figure1_and_missing_fold(tmp_path, prepared_work_dir):
    work, out = cv_work(prepared_work_dir, tmp_path / "W"), tmp_path / "R"
    n = 12
    write_run(work, "unc", 0, [0.5 + 0.02 * e for e in range(n)], val_every=2,
              corr_unc=[0.3 + 0.05 * e for e in range(n)])
    write_run(work, "unc", 1, [0.6] * n)
    write_run(work, "baseline", 0, [0.7] * n)
    # baseline fold 1 interrupted: metrics.csv but no FINISHED
    write_run(work, "baseline", 1, [0.1] * 3, finished=False)
    proc = run_cmd([sys.executable, "scripts/report.py", "--work_dir", work, "--out_dir", out, "--last_k", 3],
                   timeout=300)
    assert "baseline fold 1: UNFINISHED" in proc.stderr
    assert "Figure 2 not made" in proc.stderr                      # no store/model in this work dir
    tables = json.loads((out / "tables.json").read_text())
    unc = tables["averages"]["unc"]
    assert unc["folds_used"] == [0, 1]
    # fold 0 validates on even epochs 0..10 of 0..11: final = epoch 10; the last 3 epochs (9, 10, 11) hold round 10
    f0_final, f0_last3 = 0.5 + 0.2, 0.5 + 0.02 * 10
    assert unc["val_dice_wt"]["final"] == pytest.approx((f0_final + 0.6) / 2)
    assert unc["val_dice_wt"]["last_k_mean"] == pytest.approx((f0_last3 + 0.6) / 2)
    assert tables["averages"]["baseline"]["folds_used"] == [0]
    assert tables["averages"]["baseline"]["val_dice_wt"]["final"] == pytest.approx(0.7)   # 0.1 never averaged
    with open(out / "table1.csv") as fh:
        t1 = list(csv.DictReader(fh))
    assert {r["variant"] for r in t1} == {"unc", "baseline"} and len(t1) == 6
    assert (out / "table2.csv").is_file()
    fig1 = out / f"metrics_fold0_{n}_epochs.png"
    assert fig1.is_file() and fig1.stat().st_size > 10_000
    md = (out / "report.md").read_text()
    assert "baseline fold 1: UNFINISHED" in md and "excluded from the averages" in md
    assert "0.901" in md and "0.966" in md                          # the paper's numbers beside ours
    assert f"]({fig1.name})" in md and "Figure 2: not made" in md
    assert md.count(" | 10 |\n") == 2 and "| 9, 10, 11 |" in md      # the epochs each last-K figure averages
    assert [r["last_k_epochs"] for r in t1 if r["variant"] == "unc"] == ["10", "9 10 11", ""]


def test_report_includes_heldout_section(tmp_path, prepared_work_dir):
    """report.md embeds R/heldout.md (the held-out study's own rendering) between its marks."""
    work, out = cv_work(prepared_work_dir, tmp_path / "W"), tmp_path / "R"
    write_run(work, "unc", 0, [0.5, 0.6])
    out.mkdir()
    (out / "heldout.md").write_text("## Self-assessment (cross-validation)\n\n| method | x |\n|---|---|\n| `tta` | 8 |\n")
    run_cmd([sys.executable, "scripts/report.py", "--work_dir", work, "--out_dir", out, "--folds", "[0]",
             "--variants", "[unc]", "--figures", "false"], timeout=300)
    md = (out / "report.md").read_text()
    start, end = md.index("<!-- heldout:start -->"), md.index("<!-- heldout:end -->")
    assert "## Self-assessment (cross-validation)" in md[start:end] and "| `tta` | 8 |" in md[start:end]
    assert "Not run yet" not in md


def test_report_without_runs_is_a_clear_error(tmp_path):
    proc = run_cmd([sys.executable, "scripts/report.py", "--work_dir", tmp_path, "--out_dir", tmp_path / "R"],
                   check=False, timeout=300)
    assert proc.returncode != 0 and "no training runs" in proc.stderr and "Traceback" not in proc.stderr


def test_cross_validate_plans_skip_resume_and_fresh_runs(tmp_path, prepared_work_dir):
    work = cv_work(prepared_work_dir, tmp_path / "W")
    tiny3 = ("tiny", {"num_epochs": 3})
    write_run(work, "unc", 0, [0.5], settings=False)                  # FINISHED, same settings -> skipped
    write_settings(work, "unc", 0, *tiny3)
    interrupted = write_run(work, "unc", 1, [0.5], finished=False, settings=False)  # checkpoint, no FINISHED
    write_settings(work, "unc", 1, "tiny", {"num_epochs": 2})         # -> resumed, to 3 epochs
    (interrupted / "checkpoint_last.pt").write_bytes(b"")
    proc = run_cmd([sys.executable, "scripts/cross_validate.py", "--work_dir", work, "--variants", "[unc,baseline]",
                    "--config", "tiny", "--overrides", '{"num_epochs": 3}', "--dry_run", "true"], timeout=120)
    assert "unc fold 0: finished already (same settings), skipped" in proc.stdout
    jobs = {(j["variant"], j["fold"]): j for j in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert len(jobs) == 4
    assert jobs[("unc", 0)]["state"] == "finished"
    assert jobs[("unc", 1)]["state"] == "resume" and jobs[("unc", 1)]["cmd"][-6:] == [
        "--progress_bar", "false", "--resume", "true", "--num_epochs", "3"]
    assert jobs[("baseline", 1)]["state"] == "fresh" and "--resume" not in jobs[("baseline", 1)]["cmd"]
    cmd = jobs[("baseline", 1)]["cmd"]
    assert cmd[1:5] == ["-m", "monai.bundle", "run", "training"]
    cfg = cmd[cmd.index("--config_file") + 1]
    assert cfg.index("train.json") < cfg.index("baseline.json") < cfg.index("tiny.json")
    assert "baseline.json" not in jobs[("unc", 1)]["cmd"][jobs[("unc", 1)]["cmd"].index("--config_file") + 1]
    assert cmd[cmd.index("--fold") + 1] == "1"
    bad = run_cmd([sys.executable, "scripts/cross_validate.py", "--work_dir", work, "--folds", "[0,7]",
                   "--dry_run", "true"], check=False, timeout=120)
    assert bad.returncode != 0 and "folds [7] outside [0, 2)" in bad.stderr


def test_cross_validate_does_not_count_a_run_of_other_settings(tmp_path, prepared_work_dir):
    """Issue 21.3: a finished 2-epoch smoke test in fold 0 is not fold 0 of the 500-epoch cross-validation."""
    from custom.workflows import cross_validate as cv

    work = cv_work(prepared_work_dir, tmp_path / "W")
    smoke = write_run(work, "unc", 0, [0.5, 0.6], settings=False)
    write_settings(work, "unc", 0, "tiny")                            # the smoke test: train.json + tiny.json
    same = write_run(work, "unc", 1, [0.5], settings=False)
    write_settings(work, "unc", 1)                                    # train.json alone, as planned
    jobs = {j["fold"]: j for j in cv.plan_jobs(work, variants=["unc"])}
    assert jobs[1]["state"] == "finished" and jobs[1]["differences"] == []
    assert jobs[0]["state"] == "other_config"
    assert "num_epochs: 2 here, 500 expected" in jobs[0]["differences"]
    assert "iterations_per_epoch: 8 here, 250 expected" in jobs[0]["differences"]
    # the command stops before training anything, naming the run and each setting
    proc = run_cmd([sys.executable, "scripts/cross_validate.py", "--work_dir", work, "--variants", "[unc]"],
                   check=False, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{smoke}: trained with other settings (" in proc.stderr and "num_epochs: 2 here, 500 expected" in proc.stderr
    assert "--other_config retrain" in proc.stderr
    # the same settings as the smoke test: it is a finished fold 0 of THAT cross-validation
    tiny = {j["fold"]: j for j in cv.plan_jobs(work, variants=["unc"], config="tiny")}
    assert tiny[0]["state"] == "finished" and tiny[1]["state"] == "other_config"
    # --other_config retrain: the run is set aside (kept) and its fold planned anew, without --resume
    cv.set_aside_other_config_runs(list(jobs.values()))
    assert jobs[0]["state"] == "fresh" and "--resume" not in jobs[0]["cmd"]
    assert not smoke.exists() and (smoke.parent / "fold0.other_config-1" / "FINISHED").is_file()
    assert same.is_dir()
    from custom.core.layout import WorkDir
    assert WorkDir(work).folds_of("unc") == [1]


def test_report_averages_only_runs_of_the_cross_validation_settings(tmp_path, prepared_work_dir):
    """Issue 21.3: report.py applies the same rule: a run of other settings is shown, named and never averaged."""
    work, out = cv_work(prepared_work_dir, tmp_path / "W"), tmp_path / "R"
    write_run(work, "unc", 0, [0.5, 0.6])
    write_run(work, "unc", 1, [0.1, 0.2], settings=False)
    write_settings(work, "unc", 1, num_epochs=2, unc_loss="ring")
    proc = run_cmd([sys.executable, "scripts/report.py", "--work_dir", work, "--out_dir", out, "--variants", "[unc]",
                    "--figures", "false"], timeout=300)
    tables = json.loads((out / "tables.json").read_text())
    unc = tables["averages"]["unc"]
    assert unc["folds_used"] == [0] and unc["folds_excluded"] == {"1": "other_config"}
    assert unc["val_dice_wt"]["final"] == pytest.approx(0.6)          # 0.2 of the other run never averaged
    reason = tables["runs"]["unc"]["1"]["reason"]
    assert "num_epochs: 2 here, 500 expected" in reason and 'unc_loss: "ring" here, "paper_proper" expected' in reason
    assert "unc fold 1: OTHER_CONFIG" in proc.stderr
    md = (out / "report.md").read_text()
    assert "unc fold 1: OTHER_CONFIG" in md and "excluded from the averages" in md
    # told the settings fold 1 was trained with, the report averages fold 1 and leaves fold 0 out
    run_cmd([sys.executable, "scripts/report.py", "--work_dir", work, "--out_dir", out, "--variants", "[unc]",
             "--figures", "false", "--overrides", '{"num_epochs": 2, "unc_loss": "ring"}'], timeout=300)
    assert json.loads((out / "tables.json").read_text())["averages"]["unc"]["folds_used"] == [1]


def test_cross_validate_spreads_runs_one_per_device(tmp_path):
    from custom.workflows import cross_validate as cv

    trace = tmp_path / "trace.txt"
    # each "training" records its device and start/end times, so overlaps on one device would show
    code = ("import os, time; d = os.environ['CUDA_VISIBLE_DEVICES']; t0 = time.time(); time.sleep(0.4); "
            f"open({str(trace)!r}, 'a').write(f'{{d}} {{t0}} {{time.time()}}\\n')")
    jobs = [{"variant": "unc", "fold": f, "state": "fresh", "log": str(tmp_path / f"fold{f}.log"),
             "cmd": [sys.executable, "-c", code]} for f in range(4)]
    ran = cv.run_jobs(jobs, devices=[0, 1])
    assert len(ran) == 4 and all(j["returncode"] == 0 for j in ran)
    spans = [line.split() for line in trace.read_text().splitlines()]
    assert sorted({s[0] for s in spans}) == ["0", "1"]
    for dev in ("0", "1"):
        mine = sorted((float(a), float(b)) for d, a, b in spans if d == dev)
        assert all(prev[1] <= nxt[0] for prev, nxt in zip(mine, mine[1:])), f"overlapping runs on device {dev}"


# ----------------------------------------------------------------------------- runs with real checkpoints
# Real (untrained, seeded) network checkpoints and a real error-map store stand in for training, which this
# file must not run: the figure and the held-out path only need the files a finished run leaves.

@pytest.fixture(scope="module")
def finished_runs(prepared_work_dir, tmp_path_factory):
    import shutil

    import torch

    from custom.data.datalist import fold_split, load_datalist
    from custom.model.networks import build_network
    from custom.planning.plans import load_plans
    from custom.uncertainty.store import ErrorMapStore

    work = tmp_path_factory.mktemp("cvwork")
    for name in ("datalist.json", "plans.json"):
        shutil.copy(prepared_work_dir / name, work / name)
    plans = load_plans(work / "plans.json")
    datalist = load_datalist(work)
    for variant, dropout in (("unc", None), ("mcdropout", 0.1)):
        for fold in (0, 1):
            d = work / "runs" / variant / f"fold{fold}"
            d.mkdir(parents=True)
            torch.manual_seed(fold)
            net = build_network(plans, with_uncertainty=True, dropout=dropout)
            torch.save({"model": net.state_dict()}, d / "model_final.pt")
            shutil.copy(work / "plans.json", d / "plans.json")
            (d / "train_config.json").write_text(json.dumps({"dropout": dropout}))
            write_run(work, variant, fold, [0.3, 0.5, 0.6])
    # fold-0 store: error_stable = the GT tumour of each val case, variance_stable = 0.25 (one EMA visit = value)
    _, val = fold_split(datalist, 0)
    store = ErrorMapStore(work / "runs" / "unc" / "fold0" / "store")
    shapes = {e["case_id"]: np.load(e["pp_image"], mmap_mode="r").shape[1:] for e in val}
    store.create(shapes)
    for e in val:
        shape = shapes[e["case_id"]]
        coords = np.stack(np.meshgrid(*[np.arange(1, s + 1, dtype=np.float32) for s in shape], indexing="ij"))
        tumour = (np.load(e["pp_label"]) > 0).astype(np.float32)
        store.scatter(e["case_id"], coords, tumour, np.full(shape, 0.25, np.float32))
    store.flush()
    return work


def test_figure2_shows_store_maps_and_model_maps_on_tumour_slice(finished_runs, tmp_path):
    from custom.data.datalist import fold_split, load_datalist

    from custom.workflows import report
    run0 = finished_runs / "runs" / "unc" / "fold0"
    cases = report.fold0_maps(finished_runs, run0, num_cases=6)
    _, val = fold_split(load_datalist(finished_runs), 0)
    assert [c["case_id"] for c in cases] == [e["case_id"] for e in val][:6]
    for c, e in zip(cases, val):
        label = np.load(e["pp_label"]) > 0
        assert c["z"] == int(np.argmax(label.sum(axis=(0, 1))))        # the slice through the most tumour
        np.testing.assert_allclose(c["maps"]["error_stable"], label[:, :, c["z"]].astype(np.float32))
        np.testing.assert_allclose(c["maps"]["variance_stable"], 0.25)
        for name in ("unc_output", "var1shot"):
            m = c["maps"][name]
            assert m.shape == label.shape[:2] and m.min() >= 0 and m.max() <= 1
    out = report.figure_comparison(cases, tmp_path)
    assert out.name == "Comparison_models_6_views.png" and out.stat().st_size > 20_000


def test_evaluate_heldout_self_assessment(finished_runs, tmp_path):
    """Both folds' final models on their validation cases: every method by voxel type, calibrated out of fold
    (each case by a fit on the other fold), at case level, with cost and intervals; the product's files evaluated."""
    out = tmp_path / "R"
    from custom.workflows.report import make_report

    make_report(finished_runs, out, variants=("unc",), figures=False)
    # the official cross-check inside evaluate_folder is covered in test_evaluation.py; skipped here for time
    proc = run_cmd([sys.executable, "scripts/evaluate_heldout.py", "--work_dir", finished_runs, "--out_dir", out,
                    "--max_cases_per_fold", 2, "--mc_samples", 2, "--crosscheck", "false", "--n_boot", 50],
                   timeout=900)
    assert "4 held-out cases (cross_validation)" in proc.stdout
    res = json.loads((out / "heldout.json").read_text())
    meta = res["meta"]
    assert meta["folds"] == [0, 1] and meta["num_cases"] == 4
    passes = {k: m["forward_passes"] for k, m in meta["methods"].items()}
    assert passes == {"unc": 1, "var1shot": 1, "tta": 8, "ensemble": 2, "mc_dropout": 2}
    for key in passes:
        assert res[f"{key}.forward_passes"] == passes[key] and res[f"{key}.seconds_per_case"] > 0
        assert res[f"{key}.n_cases"] == 4
        # counts by voxel type add up to the region (+ missed outside it) of the method's own segmentation
        n = res[f"{key}.n_tp"] + res[f"{key}.n_fp"] + res[f"{key}.n_tn_region"] + res[f"{key}.n_missed"]
        assert n > 0
        for metric in ("auroc_fp_vs_tn", "brier_calibrated", "spearman_pred_dice", "paired_auroc_overall"):
            v, lo, hi = (res.get(f"{key}.{metric}{s}") for s in ("", "_ci_low", "_ci_high"))
            assert v is None or lo is None or lo - 1e-9 <= v <= hi + 1e-9, (key, metric, v, lo, hi)
    # the reference of the paired figures is the evaluated model's own segmentation: same numbers for unc
    assert res["unc.paired_auroc_overall"] == res["unc.auroc_overall"]
    assert res["segmentation"]["regions"]["WT"]["legacy_dice"] is not None
    # the product's files were written and evaluated like any tool's output
    for f in (0, 1):
        fold_dir = out / "heldout" / f"fold{f}"
        assert len(list((fold_dir / "pred").glob("*-unc.nii.gz"))) == 2
        with open(fold_dir / "per_case.csv") as fh:
            assert len(list(csv.DictReader(fh))) == 6
    for name in ("heldout.md", "reliability.png", "risk_coverage.png", "heldout_methods_per_case.csv"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert "Self-assessment (cross-validation)" in md and "| `tta` | mirroring TTA variance | 8 |" in md
    assert "Not run yet" not in md
    # the deployable calibration of unc_output: fitted on every evaluated (out-of-fold) case, loadable
    from custom.evaluation.calibration import IsotonicCalibrator

    cal = IsotonicCalibrator.load(out / "calibration.json")
    with open(out / "heldout_methods_per_case.csv") as fh:
        evaluated = {r["case_id"] for r in csv.DictReader(fh)}
    assert cal.fitted_case_ids == evaluated and len(evaluated) == 4
    prov = json.loads((out / "calibration.json").read_text())["provenance"]
    assert prov["map"] == "unc_output" and prov["folds"] == [0, 1] and prov["reporting_dilation"] == 3


def test_evaluate_heldout_without_finished_models_names_the_runs(tmp_path):
    work = tmp_path / "W"
    work.mkdir()
    (work / "datalist.json").write_text(json.dumps({"num_folds": 2, "training": [], "modalities": ["t1c", "t1n", "t2f", "t2w"]}))
    write_run(work, "unc", 0, [0.5], finished=False)
    proc = run_cmd([sys.executable, "scripts/evaluate_heldout.py", "--work_dir", work, "--out_dir", tmp_path / "R"],
                   check=False, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "no fold has a finished final model" in proc.stderr and "unc/fold0: no finished run" in proc.stderr
    assert not (tmp_path / "R" / "heldout.json").exists()
