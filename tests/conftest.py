"""Shared, session-scoped fixtures: one synthetic data set, one prepared work dir, one tiny training run.

Every fixture runs the real command-line entry points in a subprocess, as a user would.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY_PATCH = "[32,32,32]"
TINY_FILTERS = "[8,16,32,64]"


def run_cmd(args, timeout=900, check=True, env=None, cwd=REPO_ROOT):
    """Run a command from the repository root; on failure show its output in the assertion."""
    full_env = dict(os.environ)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        full_env.update(env)
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Six synthetic BraTS cases, 64x64x48 at 1 mm, seed 0."""
    out = tmp_path_factory.mktemp("raw")
    run_cmd([PYTHON, "scripts/make_synthetic.py", "--out_dir", out, "--num_cases", 6,
             "--shape", "[64,64,48]", "--spacing", "[1,1,1]", "--seed", 0])
    return out


@pytest.fixture(scope="session")
def prepared_work_dir(synthetic_dataset, tmp_path_factory) -> Path:
    """datalist, plan and preprocessed cache for the synthetic set, with a tiny plan (2 folds)."""
    work = tmp_path_factory.mktemp("work")
    run_cmd([PYTHON, "scripts/prepare_data.py", "--dataset_dir", synthetic_dataset, "--work_dir", work,
             "--num_folds", 2, "--seed", 0, "--patch_size", TINY_PATCH, "--filters", TINY_FILTERS])
    return work


@pytest.fixture(scope="session")
def tiny_training_run(prepared_work_dir) -> Path:
    """One run of the tiny config through `python -m monai.bundle run training` (fold 0)."""
    run_cmd([PYTHON, "-m", "monai.bundle", "run", "training", "--bundle_root", "bundle",
             "--config_file", "['bundle/configs/train.json','bundle/configs/tiny.json']",
             "--work_dir", prepared_work_dir, "--fold", 0], timeout=1200)
    out = prepared_work_dir / "runs" / "unc" / "fold0"
    assert (out / "model.pt").exists(), f"training left no model.pt in {out}"
    return out
