"""The four READMEs and bundle/docs say what the repository holds (issue 21.4 and 21.9): links resolve, commands
run in the project's environment, one placeholder for the BraTS download, every variable of train.json is
listed, and the entry points' --help describes every flag. Reads files only (fast)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from conftest import REPO_ROOT

DOCS = [REPO_ROOT / p for p in ("README.md", "triton_models/README.md", "scripts/monailabel_app/README.md")]
DOCS += sorted((REPO_ROOT / "bundle" / "docs").glob("*.md"))

#: top-level folders whose files the docs name as `path`
REPO_DIRS = ("custom/", "scripts/", "bundle/", "tests/", "triton_models/")

#: the entry points a user runs on the documented paths (README): their --help must describe every flag
USER_SCRIPTS = ("prepare_data", "make_synthetic", "cross_validate", "report", "evaluate_heldout", "evaluate",
                "make_submission", "make_monailabel_studies")


def _code_blocks(text: str) -> list[str]:
    """Shell blocks: ```bash and unlabelled fences (``` json/python blocks are no commands)."""
    return re.findall(r"^```(?:bash|sh)?\n(.*?)^```", text, re.S | re.M)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_links_and_named_files_exist(doc):
    text = doc.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target) and not (doc.parent / target).exists():
            missing.append(target)
    for path in re.findall(r"`((?:%s)[\w./-]+\.(?:py|md|json|sh|txt|png|pbtxt|conf))`" % "|".join(REPO_DIRS), text):
        if not (REPO_ROOT / path).exists():
            missing.append(path)
    assert not missing, f"{doc}: names files that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_commands_run_in_the_project_environment(doc):
    """Every command line of a bash block calls the project's .venv (plain python is the system's)."""
    bad = []
    for block in _code_blocks(doc.read_text()):
        for line in block.splitlines():
            line = line.strip()
            if re.match(r"(python3?|torchrun|pip)\b", line) or re.search(r"(?<![\w/.])(python3?|torchrun) -m ", line):
                bad.append(line)
    assert not bad, f"{doc}: commands outside .venv: {bad}"


def test_one_placeholder_for_the_brats_download():
    placeholders = set()
    for doc in DOCS:
        placeholders |= set(re.findall(r"(?<![\w.])/data/[\w.-]*BraTS[\w.-]*", doc.read_text()))
    assert placeholders <= {"/data/ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
                            "/data/ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData"}, placeholders


def test_every_train_variable_is_listed():
    """The 'Main variables' paragraph of bundle/docs/README.md names each setting train.json records."""
    train = json.loads((REPO_ROOT / "bundle" / "configs" / "train.json").read_text())
    text = (REPO_ROOT / "bundle" / "docs" / "README.md").read_text()
    paragraph = text[text.index("Main variables (defaults):"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    settings = set(train["run_config"]) - {"plans", "datalist", "train_cases", "val_cases"}
    settings |= {"progress_bar", "val_num_workers", "sw_batch_size"}
    unlisted = sorted(k for k in settings if f"`{k}`" not in paragraph)
    assert not unlisted, f"bundle/docs/README.md 'Main variables' lacks {unlisted}"


@pytest.mark.parametrize("script", USER_SCRIPTS)
def test_help_describes_every_flag(script):
    """fire's --help shows the Args section of the entry function's docstring: every parameter needs a line."""
    source = (REPO_ROOT / "scripts" / f"{script}.py").read_text()
    entry = re.search(r"fire\.Fire\((\w+)\)", source).group(1)
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == entry)
    doc = ast.get_docstring(fn) or ""
    assert "Args:" in doc, f"scripts/{script}.py: {entry}() has no Args section"
    args = doc.split("Args:", 1)[1]
    params = [a.arg for a in fn.args.args + fn.args.kwonlyargs]
    undocumented = [p for p in params if not re.search(rf"^\s+{p}( \([^)]*\))?:", args, re.M)]
    assert not undocumented, f"scripts/{script}.py --help describes no {undocumented}"
