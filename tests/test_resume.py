"""Resume does what the docs say (issue 21.1, 21.2): a run killed mid-epoch and resumed has, at every iteration,
the learning rate of a run that was never interrupted; a run resumed with a larger --num_epochs trains the extra
epochs on nnU-Net's polynomial curve for the new horizon (the rate of an uninterrupted run of that length); a run
resumed with other settings is refused, naming each one (or, when told, continues with the new ones, saying so).

Every run is `python -m monai.bundle run training` on train.json + tiny.json (2 epochs x 8 iterations), as a user
runs it. The learning rate of each iteration is read from the optimizer by an extra layered config
(`lr_log.json`, written here) that prints it at ITERATION_STARTED and can SIGKILL the process after a given
iteration; it changes nothing the run records (train_config.json).
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import sys

import pytest
import torch
from conftest import run_cmd

from custom.evaluation.runs import read_metrics_csv

TINY = "['bundle/configs/train.json','bundle/configs/tiny.json']"
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def training_cmd(config_file, work, run, *extra):
    return [sys.executable, "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle", "--config_file",
            config_file, "--work_dir", work, "--fold", 0, "--output_dir", run, "--progress_bar", "false", *extra]


def resume_cmd(config_file, work, run, *extra):
    return training_cmd(config_file, work, run, "--resume", "true", *extra)


def lr_log_config(path, kill_after_iteration=None) -> str:
    """train.json + tiny.json + a config printing ``LR_AT <iteration> <lr>`` (the optimizer's rate, repr) as each
    iteration starts, and, with ``kill_after_iteration``, SIGKILLing the process when that iteration completes."""
    hooks = ["$@trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED, lambda e: print('LR_AT', "
             "e.state.iteration, repr(e.optimizer.param_groups[0]['lr']), flush=True))"]
    if kill_after_iteration is not None:
        hooks.append(f"$@trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once="
                     f"{int(kill_after_iteration)}), lambda e: os.kill(os.getpid(), {int(signal.SIGKILL)}))")
    path.write_text(json.dumps({
        "+imports": ["$import ignite.engine"],
        "training": hooks + ["$custom.training.setup.attach_progress_bar(@trainer, @progress_bar)",
                             "$@trainer.run()"]}))
    return TINY[:-1] + f",'{path}']"


def lrs_by_iteration(output: str) -> dict[int, float]:
    """``{iteration: lr}`` from the LR_AT lines (a later line for the same iteration wins: a resumed run repeats
    the iterations after its last checkpoint)."""
    return {int(i): float(lr) for i, lr in re.findall(r"^LR_AT (\d+) (\S+)$", output, flags=re.M)}


@pytest.fixture(scope="module")
def uninterrupted_lrs(prepared_work_dir, tmp_path_factory):
    """The learning rate at each iteration of an uninterrupted 3-epoch run (24 iterations)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    proc = run_cmd(training_cmd(lr_log_config(tmp / "lr_log.json"), prepared_work_dir, tmp / "run",
                                "--num_epochs", 3), env=ENV, timeout=900)
    lrs = lrs_by_iteration(proc.stdout)
    assert sorted(lrs) == list(range(1, 25))
    return lrs


@pytest.fixture
def finished_copy(tiny_training_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_training_run, run)
    assert (run / "FINISHED").is_file() and len(read_metrics_csv(run / "metrics.csv")) == 2
    return run


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_killed_mid_epoch_the_resumed_run_has_the_uninterrupted_learning_rate_at_every_iteration(
        prepared_work_dir, uninterrupted_lrs, tmp_path):
    """A 3-epoch run SIGKILLed after iteration 11 (epoch 2 of 3; the last checkpoint is epoch 1's) and resumed
    with the same command: every iteration, the 11 before the kill and the 16 the resumed process runs (9-24),
    has exactly the uninterrupted run's rate."""
    run = tmp_path / "run"
    killed = run_cmd(training_cmd(lr_log_config(tmp_path / "kill.json", kill_after_iteration=11), prepared_work_dir,
                                  run, "--num_epochs", 3), env=ENV, check=False, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
    before_kill = lrs_by_iteration(killed.stdout)
    assert sorted(before_kill) == list(range(1, 12)) and not (run / "FINISHED").exists()

    resumed = run_cmd(resume_cmd(lr_log_config(tmp_path / "lr_log.json"), prepared_work_dir, run,
                                 "--num_epochs", 3), env=ENV, timeout=900)
    after_resume = lrs_by_iteration(resumed.stdout)
    assert sorted(after_resume) == list(range(9, 25)), "the resumed run did not restart after epoch 1"
    assert before_kill == {i: uninterrupted_lrs[i] for i in range(1, 12)}
    assert after_resume == {i: uninterrupted_lrs[i] for i in range(9, 25)}
    assert len(set(after_resume.values())) == 2  # epochs 2 and 3: the comparison spans a scheduler step
    assert (run / "FINISHED").read_text().strip() == "epoch 3"


def test_more_epochs_train_on_the_new_polynomial_curve(finished_copy, prepared_work_dir, uninterrupted_lrs,
                                                        tmp_path):
    """Issue 21.1: +1 epoch on a finished 2-epoch run: the weights change and every iteration of the extra epoch
    runs at the rate of an uninterrupted 3-epoch run's epoch 3, 0.01 (1 - 2/3)^0.9, not at the old horizon's 0."""
    run = finished_copy
    before = _weights(run / "model_final.pt")
    proc = run_cmd(resume_cmd(lr_log_config(tmp_path / "lr_log.json"), prepared_work_dir, run, "--num_epochs", 3),
                   env=ENV, timeout=900)
    lrs = lrs_by_iteration(proc.stdout)
    assert lrs == {i: uninterrupted_lrs[i] for i in range(17, 25)}
    assert lrs[17] == pytest.approx(0.01 * (1 - 2 / 3) ** 0.9, rel=1e-12)
    after = _weights(run / "model_final.pt")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2, "model_final.pt did not change: the extra epoch did not train"
    rows = read_metrics_csv(run / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr"] == pytest.approx(0.01) and rows[1]["lr"] == pytest.approx(0.01 * 0.5 ** 0.9)
    assert rows[2]["lr"] == pytest.approx(0.01 * (1 - 2 / 3) ** 0.9, rel=1e-6)
    assert (run / "FINISHED").read_text().strip() == "epoch 3"
    assert json.loads((run / "train_config.json").read_text())["num_epochs"] == 3


def test_other_settings_are_refused_naming_each(finished_copy, prepared_work_dir):
    """Issue 21.2: the documented resume command (train.json alone) on a train.json + tiny.json run stops before
    touching the run, naming every differing setting with both values; num_epochs may differ."""
    run = finished_copy
    config_before = (run / "train_config.json").read_text()
    metrics_before = (run / "metrics.csv").read_text()
    proc = run_cmd(resume_cmd("bundle/configs/train.json", prepared_work_dir, run), env=ENV, check=False,
                   timeout=600)
    assert proc.returncode != 0
    assert "other settings than the run was trained with" in proc.stderr
    for difference in ("iterations_per_epoch: 250 now, 8 in train_config.json",
                       "val_interval: 5 now, 1 in train_config.json"):
        assert difference in proc.stderr
    assert "num_epochs:" not in proc.stderr.split("other settings than the run was trained with", 1)[1]
    assert "--resume_config_mismatch warn" in proc.stderr
    assert (run / "train_config.json").read_text() == config_before
    assert (run / "metrics.csv").read_text() == metrics_before and (run / "FINISHED").is_file()


def test_told_to_warn_it_continues_with_the_new_settings(finished_copy, prepared_work_dir):
    """--resume_config_mismatch warn: each difference is logged and the resumed epoch has the new length."""
    run = finished_copy
    proc = run_cmd(resume_cmd(TINY, prepared_work_dir, run, "--num_epochs", 3, "--iterations_per_epoch", 2,
                              "--resume_config_mismatch", "warn"), env=ENV, timeout=900)
    out = proc.stdout + proc.stderr
    assert "continuing with the new one): iterations_per_epoch: 2 now, 8 in train_config.json" in out
    assert "Epoch: 3/3, Iter: 2/2" in out and "Epoch: 3/3, Iter: 3/" not in out
    assert json.loads((run / "train_config.json").read_text())["iterations_per_epoch"] == 2
    assert [r["epoch"] for r in read_metrics_csv(run / "metrics.csv")] == [1, 2, 3]
