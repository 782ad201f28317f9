"""custom.cli: the one parser of command-line flags and lists used by every script and bundle config."""

import sys

import numpy as np
import pytest
from conftest import run_cmd

from custom.core.cli import as_bool, as_list
from custom.core.errors import BraTSInputError


@pytest.mark.parametrize("value", [True, np.bool_(True), 1, np.int64(1), "true", "True", " YES ", "1", "on", "On"])
def test_as_bool_true(value):
    assert as_bool(value) is True


@pytest.mark.parametrize("value", [False, np.bool_(False), 0, np.int32(0), "false", "FALSE", "no", "0", " off "])
def test_as_bool_false(value):
    assert as_bool(value) is False


@pytest.mark.parametrize("value", ["maybe", "", "none", None, 2, -1, 0.5, 1.0, [True], "t"])
def test_as_bool_rejects_anything_else_naming_the_option(value):
    with pytest.raises(BraTSInputError, match=r"--resume: expected true or false, got ") as info:
        as_bool(value, "resume")
    assert isinstance(info.value, ValueError)  # callers that catch ValueError keep working
    assert str(info.value).startswith("invalid command-line option:")
    with pytest.raises(ValueError, match="--flag: expected true or false"):
        as_bool(value)


def test_as_list_literals_and_scalars():
    assert as_list("[32,32,32]", "patch_size", 3, cast=int) == [32, 32, 32]
    assert as_list([8, 16, 32, 64], "filters", cast=int) == [8, 16, 32, 64]
    assert as_list((1, 1.5, 2), "spacing", 3, cast=float) == [1.0, 1.5, 2.0]
    assert as_list(32, "patch_size", 3, cast=int) == [32, 32, 32]
    assert as_list("32", "patch_size", 3, cast=int) == [32, 32, 32]
    assert as_list(np.int64(4)) == [4] and as_list(7) == [7] and as_list(2.5) == [2.5]
    assert as_list(np.array([1, 2])) == [1, 2]
    assert as_list("0,1") == [0, 1] and as_list("(0, 1)") == [0, 1]
    assert as_list("['a', 'b']") == ["a", "b"]
    assert as_list("[]") == [] and as_list(()) == []


@pytest.mark.parametrize("value", [None, "None", "none", "NULL", "", "  "])
def test_as_list_none(value):
    assert as_list(value, "patch_size", 3, cast=int) is None


def test_as_list_bare_words():
    """Variant and case names reach the scripts unquoted: "[unc,baseline]", "unc,baseline", "unc"."""
    assert as_list("[unc,baseline]", "variants") == ["unc", "baseline"]
    assert as_list("unc,baseline") == ["unc", "baseline"]
    assert as_list(" [ unc , 'baseline' ,\"mcdropout\" ] ") == ["unc", "baseline", "mcdropout"]
    assert as_list("(unc, baseline)") == ["unc", "baseline"]
    assert as_list("unc") == ["unc"]
    assert as_list("[BraTS-GLI-00000-000,BraTS-GLI-00001-000]", "cases", cast=str) == [
        "BraTS-GLI-00000-000", "BraTS-GLI-00001-000"]
    assert as_list("unc,,baseline,") == ["unc", "baseline"]
    assert as_list("[0,x]", "folds") == ["0", "x"]


def test_as_list_errors_name_the_option():
    with pytest.raises(ValueError, match="--patch_size: expected 3 values"):
        as_list("[32,32]", "patch_size", 3, cast=int)
    with pytest.raises(BraTSInputError, match="--filters: cannot parse"):
        as_list("[8,16", "filters", cast=int)
    for bad in ("unc]", "(unc", "[unc)", "[a,[b]"):
        with pytest.raises(BraTSInputError, match="--variants: cannot parse"):
            as_list(bad, "variants")
    with pytest.raises(BraTSInputError, match=r"--folds: expected int values, got '\[0,x\]'") as info:
        as_list("[0,x]", "folds", cast=int)
    assert str(info.value).startswith("invalid command-line option:")
    with pytest.raises(BraTSInputError, match="--shape: expected float values"):
        as_list([1, None, 2], "shape", cast=float)
    for bad in (True, {"a": 1}, "{'a': 1}", "{1, 2}", object()):
        with pytest.raises(BraTSInputError, match="--x: expected a list"):
            as_list(bad, "x")


def test_as_list_cast_without_name_is_still_clear():
    with pytest.raises(BraTSInputError, match="--value: expected .*lambda.* values"):
        as_list("[1,2]", cast=lambda v: int("x"))


def test_scripts_report_bad_options_with_the_option_name(tmp_path):
    proc = run_cmd([sys.executable, "scripts/evaluate.py", "--pred_dir", tmp_path, "--gt_dir", tmp_path,
                    "--out_dir", tmp_path / "R", "--crosscheck", "maybe"], timeout=300, check=False)
    assert proc.returncode == 2
    assert "--crosscheck: expected true or false, got 'maybe'" in proc.stderr
    proc = run_cmd([sys.executable, "scripts/prepare_data.py", "--dataset_dir", tmp_path, "--work_dir",
                    tmp_path / "W", "--patch_size", "[32,32]"], timeout=300, check=False)
    assert proc.returncode == 1
    assert "--patch_size: expected 3 values" in proc.stderr
