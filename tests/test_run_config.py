"""THE rule for "the same training" (custom.core.run_config): which settings count and how they are compared."""

from __future__ import annotations

import json

import pytest

from custom.core.errors import BraTSInputError
from custom.core.run_config import (
    FOLD_KEYS,
    RESULT_KEYS,
    RESUMABLE_KEYS,
    config_differences,
    jsonable,
    read_run_config,
)

BASE = {"num_epochs": 500, "iterations_per_epoch": 250, "unc_loss": "paper", "unc_stop_gradient": False,
        "patch_size": [128, 128, 128], "plans": {"patch_size": [128, 128, 128], "batch_size": 2},
        "train_cases": ["a", "b"], "val_cases": ["c"], "fold": 0, "device": "cuda", "num_workers": 12,
        "checkpoint_interval": 50, "output_dir": "/x/runs/unc/fold0"}


def test_same_settings_differ_only_where_the_result_does_not():
    other_machine = dict(BASE, device="cpu", num_workers=0, checkpoint_interval=1, output_dir="/y/runs/unc/fold0")
    assert config_differences(other_machine, BASE) == []
    assert {"device", "num_workers", "checkpoint_interval", "output_dir", "work_dir", "amp"}.isdisjoint(RESULT_KEYS)


def test_each_result_setting_is_named_with_both_values():
    smoke = dict(BASE, num_epochs=2, iterations_per_epoch=8, unc_loss="ring")
    assert config_differences(smoke, BASE) == ["num_epochs: 2 here, 500 expected",
                                               "iterations_per_epoch: 8 here, 250 expected",
                                               'unc_loss: "ring" here, "paper" expected']
    assert config_differences(smoke, BASE, ignore=("num_epochs", "iterations_per_epoch", "unc_loss")) == []


def test_command_line_booleans_tuples_and_missing_settings():
    # --unc_stop_gradient false arrives as the string "false"; a tuple is the list it is written as
    assert config_differences(dict(BASE, unc_stop_gradient="false", patch_size=(128, 128, 128)), BASE) == []
    assert config_differences(dict(BASE, unc_stop_gradient="true"), BASE) == [
        "unc_stop_gradient: true here, false expected"]
    older = {k: v for k, v in BASE.items() if k != "unc_loss"}
    assert config_differences(older, BASE) == ['unc_loss: not recorded here, "paper" expected']


def test_plan_and_case_lists_are_named_by_what_differs():
    other_plan = dict(BASE, plans={"patch_size": [32, 32, 32], "batch_size": 2})
    (msg,) = config_differences(other_plan, BASE)
    assert msg.startswith("plans: differs in patch_size") and "[32, 32, 32] here" in msg
    (msg,) = config_differences(dict(BASE, val_cases=["d"]), BASE)
    assert msg.startswith("val_cases: 1 here, 1 expected") and "e.g. d" in msg and "e.g. c" in msg
    # the folds of one cross-validation differ in their case lists only
    fold1 = dict(BASE, fold=1, train_cases=["a", "c"], val_cases=["b"])
    assert config_differences(fold1, BASE, ignore=FOLD_KEYS) == []
    assert RESUMABLE_KEYS == ("num_epochs",)


def test_jsonable_and_reading_a_run_config(tmp_path):
    class Plan:
        def to_dict(self):
            return {"patch_size": (1, 2, 3)}

    assert jsonable({"plans": Plan(), "x": (1, 2)}) == {"plans": {"patch_size": [1, 2, 3]}, "x": [1, 2]}
    assert read_run_config(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(BraTSInputError, match="bad.json: not a readable run config"):
        read_run_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(BraTSInputError, match="list.json: not a run config"):
        read_run_config(tmp_path / "list.json")
