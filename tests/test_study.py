"""The self-assessment study command end to end at the smallest size: data, training runs, held-out scoring, seeds."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import run_cmd

SMALL = ["--variants", "[baseline,paper,ring]", "--anatomy", "blob", "--num_train", 6, "--num_test", 3,
         "--shape", "[48,48,40]", "--spacing", "[1,1,1]", "--num_folds", 2, "--num_epochs", 1,
         "--iterations_per_epoch", 2, "--val_interval", 1, "--n_boot", 30, "--parallel", 2]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    proc = run_cmd([sys.executable, "scripts/study_uncertainty.py", "--out_dir", out, "--seeds", "[0,1]"] + SMALL,
                   timeout=2400)
    return out, proc


def test_study_writes_every_seed_and_the_combination(small_study):
    out, proc = small_study
    assert "-> " in proc.stdout and (out / "study.md").is_file()
    study = json.loads((out / "study.json").read_text())
    assert study["n_seeds"] == 2 and study["meta"]["reference_variant"] == "paper"
    # every map of every seed, and their mean/sd across seeds
    for method in ("unc_paper", "unc_ring", "var1shot", "tta", "ensemble"):
        for seed in (0, 1):
            assert f"seed{seed}.{method}.auroc_fp_vs_tn" in study, (seed, method)
        assert f"seed_mean.{method}.paired_auroc_missed_vs_tp" in study
    assert study["seed0.tta.forward_passes"] == 8 and study["seed0.ensemble.forward_passes"] == 2
    # the ensemble is the seeds' baseline models: the same in both columns
    assert study["seed0.ensemble.auroc_overall"] == study["seed1.ensemble.auroc_overall"]
    # Dice with and without the head, with paired differences
    for key in ("dice.baseline.WT", "dice.paper.WT", "dice.paper_minus_baseline.WT", "dice.ring_minus_baseline.ET"):
        assert f"seed0.{key}" in study and f"seed0.{key}_ci_low" in study, key
    # test cases are unseen: their ids follow the training ids, and none is a calibration case
    seed0 = json.loads((out / "seed0" / "heldout.json").read_text())
    assert seed0["meta"]["num_cases"] == 3 and seed0["meta"]["num_calibration_cases"] == 3
    test_ids = sorted(p.name for p in (out / "raw" / "test").iterdir())
    assert test_ids == [f"BraTS-GLI-0000{i}-000" for i in (6, 7, 8)]
    md = (out / "study.md").read_text()
    assert "unseen test cases" in md and "| paper |" in md and "| baseline |" in md


def test_study_resumes_and_refuses_other_settings(small_study):
    out, _ = small_study
    # same settings: everything is skipped (no training), the result is rewritten
    proc = run_cmd([sys.executable, "scripts/study_uncertainty.py", "--out_dir", out, "--seeds", "[0,1]"] + SMALL,
                   timeout=900)
    assert "[study]" not in proc.stdout and "Traceback" not in proc.stderr
    # another schedule in the same folder is refused, naming the setting
    other = [str(a) for a in SMALL]
    other[other.index("--num_epochs") + 1] = "3"
    proc = run_cmd([sys.executable, "scripts/study_uncertainty.py", "--out_dir", out] + other, check=False, timeout=300)
    assert proc.returncode == 2 and "num_epochs: 1" in proc.stderr and "Traceback" not in proc.stderr


def test_study_adds_a_variant_scoring_only_its_maps(small_study):
    out, _ = small_study
    before = json.loads((out / "study.json").read_text())
    added = [str(a) for a in SMALL]
    added[added.index("--variants") + 1] = "[baseline,paper,ring,two_region]"
    proc = run_cmd([sys.executable, "scripts/study_uncertainty.py", "--out_dir", out, "--seeds", "[0,1]"] + added,
                   timeout=900)
    # only the new variant trains, once per seed
    assert proc.stdout.count("[study]") == 2 and "two_region seed 0" in proc.stdout and "paper seed" not in proc.stdout
    part = json.loads((out / "seed0" / "added1" / "heldout.json").read_text())
    # the new head, the reference (paired figures) and var1shot (Dice difference); nothing already scored
    assert set(part["meta"]["methods"]) == {"unc_two_region", "unc_paper", "var1shot"}
    after = json.loads((out / "study.json").read_text())
    for seed in (0, 1):
        assert f"seed{seed}.unc_two_region.paired_auroc_overall" in after
        assert f"seed{seed}.dice.two_region_minus_baseline.WT" in after
        # maps scored in the first part keep their figures; a map scored again gets the same ones (same cases,
        # same bootstrap resamples): the merge equals one evaluation of all maps
        for key in (f"seed{seed}.tta.auroc_fp_vs_tn", f"seed{seed}.ensemble.brier_calibrated",
                    f"seed{seed}.unc_paper.paired_auroc_overall", f"seed{seed}.unc_paper.auroc_missed_vs_tp_ci_low",
                    f"seed{seed}.var1shot.spearman_pred_dice"):
            assert after[key] == before[key] or (after[key] != after[key] and before[key] != before[key]), key
    assert "seed_mean.unc_two_region.auroc_fp_vs_tn" in after
    # nothing left to do: a second call trains and scores nothing
    proc = run_cmd([sys.executable, "scripts/study_uncertainty.py", "--out_dir", out, "--seeds", "[0,1]"] + added,
                   timeout=900)
    assert "[study]" not in proc.stdout and not (out / "seed0" / "added2").exists()
    # the time of a study grown over several calls is their sum, each call kept (first, resume, added, this one;
    # the refused call did nothing)
    calls = json.loads((out / "study_timing.json").read_text())["calls"]
    assert [len(c["variants"]) for c in calls] == [3, 3, 4, 4]
    total_s = sum(c["timing"]["training_s"] + c["timing"]["evaluation_s"] + c["timing"]["data_s"] for c in calls)
    assert calls[0]["timing"]["training_s"] > calls[1]["timing"]["training_s"]
    assert f"{total_s / 60:.0f} min wall clock in 4 call(s)" in (out / "study.md").read_text()
