"""The documented way from BraTS data to a challenge submission (README, "From BraTS 2023 data to a challenge
submission"), walked on tiny synthetic data with exactly the README's lines (issue 21).

The test reads the README's three marked bash blocks and runs the rehearsal settings, then the six steps, in one
bash process from the repository root; the only change is the rehearsal's root folder (``REHEARSAL=``), which
goes under pytest's temporary folder. So the README cannot drift from what works: a renamed flag, a missing
script or a step that fails breaks this test.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import zipfile

import pytest
from conftest import REPO_ROOT

README = REPO_ROOT / "README.md"
VENV_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"


def readme_block(name: str) -> str:
    """The bash block that follows ``<!-- real-data-path:<name> -->`` in README.md."""
    text = README.read_text()
    mark = f"<!-- real-data-path:{name} -->"
    assert text.count(mark) == 1, f"README.md must hold {mark} exactly once"
    match = re.match(r"\s*```bash\n(.*?)\n```", text[text.index(mark) + len(mark):], re.S)
    assert match, f"README.md: no ```bash block right after {mark}"
    return match.group(1)


def _assigned(block: str) -> set[str]:
    return set(re.findall(r"^([A-Z_]+)=", block, re.M))


def _bash(script: str, timeout: int):
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (f"README path failed ({proc.returncode})\n--- script ---\n{script}\n"
                                  f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def test_the_blocks_fit_together():
    """The rehearsal sets every variable the real settings set, and the steps use only those."""
    settings, rehearsal, commands = (readme_block(n) for n in ("settings", "rehearsal", "commands"))
    assert _assigned(settings) == {"BRATS", "CASES", "W", "OUT", "PREPARE", "TRAIN"}
    assert _assigned(settings) <= _assigned(rehearsal)
    used = set(re.findall(r"\$\{?([A-Z_]+)", commands))
    assert used == _assigned(settings)
    steps = commands.splitlines()
    assert len(steps) == 6 and all(s.startswith(".venv/bin/python ") for s in steps)


@pytest.mark.skipif(not VENV_PYTHON.exists(), reason="the README's commands call .venv/bin/python: "
                                                      "create it with bash scripts/setup_venv.sh")
def test_readme_path_on_tiny_synthetic_data(tmp_path):
    rehearsal = readme_block("rehearsal").splitlines()
    assert rehearsal[0].startswith("REHEARSAL=")
    root = tmp_path / "rehearsal"
    rehearsal[0] = f"REHEARSAL={shlex.quote(str(root))}"
    commands = readme_block("commands")
    _bash("\n".join(rehearsal) + "\n" + commands, timeout=1800)

    work, out = root / "work", root / "out"
    for fold in (0, 1):                                       # step 2: two folds of the tiny schedule
        run = work / "runs" / "unc" / f"fold{fold}"
        assert (run / "FINISHED").is_file() and (run / "model_final.pt").is_file()
        assert json.loads((run / "train_config.json").read_text())["num_epochs"] == 2
    tables = json.loads((out / "report" / "tables.json").read_text())   # step 3: both folds averaged
    assert tables["averages"]["unc"]["folds_used"] == [0, 1] and not tables["problems"]
    cases = sorted(p.name for p in (root / "cases").iterdir())
    assert cases == ["BraTS-GLI-01000-000", "BraTS-GLI-01001-000"]
    summary = json.loads((out / "predictions" / "summary.json").read_text())   # step 4: the 2-fold ensemble
    assert [m.split("/")[-2:] for m in summary["ensemble_members"]] == [["fold0", "model_final.pt"],
                                                                        ["fold1", "model_final.pt"]]
    assert sorted(p.name for p in (out / "predictions").glob("*.nii.gz")) == sorted(
        f"{c}{s}.nii.gz" for c in cases for s in ("", "-unc", "-ensvar"))
    assert sorted(p.name for p in (out / "submission").iterdir()) == [f"{c}.nii.gz" for c in cases]   # step 5
    with zipfile.ZipFile(out / "submission.zip") as zf:
        assert sorted(zf.namelist()) == [f"{c}.nii.gz" for c in cases]
    evaluation = json.loads((out / "evaluation" / "summary.json").read_text())   # step 6
    assert evaluation["num_cases"] == 2 and evaluation["unc_dir"]

    # repeating step 2 keeps the finished folds: same settings, skipped
    again = _bash("\n".join(rehearsal[:1] + rehearsal[3:]) + "\n" + commands.splitlines()[1], timeout=600)
    assert again.stdout.count("finished already (same settings), skipped") == 2
    assert "0 trained, 0 failed" in again.stdout
