"""The mutation check itself (custom/workflows/mutation.py): on a tiny repository of its own, every outcome; on this
repository, that the mutant list still applies (each ``old`` text where the list says it is).

The full check is slow and runs by hand (``python scripts/mutation_check.py --out ...``, bundle/docs/mutation.md).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from custom.core.layout import REPO_ROOT
from custom.workflows.mutation import (
    MUTANT_CLASSES,
    copy_repository,
    load_mutants,
    mutation_check,
    render_markdown,
)

CALC = "def add(a, b):\n    return a + b\n\n\ndef untested(a):\n    return a * 2\n"


def _git(root, *args):
    subprocess.run(["git", "-c", "user.email=t@example.org", "-c", "user.name=t", *args], cwd=root, check=True,
                   capture_output=True)


@pytest.fixture()
def tiny_repo(tmp_path):
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "calc.py").write_text(CALC)
    (root / "pkg" / "moved.py").write_text("def square(a):\n    return a ** 2\n")
    (root / "tests" / "test_calc.py").write_text(
        "from pkg.calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n")
    (root / ".gitignore").write_text("ignored/\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "tiny")
    (root / "ignored").mkdir()
    (root / "ignored" / "junk.txt").write_text("not copied")
    (root / "pkg" / "untracked.py").write_text("X = 1\n")   # untracked, not ignored: copied
    return root


def _mutant(id, old, new, file="pkg/calc.py", tests=("tests/test_calc.py",), klass="core", **kw):
    return {"id": id, "class": klass, "file": file, "old": old, "new": new, "tests": list(tests), **kw}


def test_every_outcome_on_a_tiny_repository(tiny_repo, tmp_path):
    mutants = [
        _mutant("killed", "return a + b", "return a - b", note="the test adds"),
        _mutant("survived", "return a * 2", "return a * 3", note="nothing tests untested()"),
        _mutant("equivalent", "return a * 2", "return a + a", equivalent="a + a == a * 2"),
        _mutant("moved", "return a ** 2", "return a ** 3"),
        _mutant("twice", "a", "b"),
        _mutant("no-such-test", "return a + b", "return a - b", tests=["tests/test_missing.py"]),
    ]
    path = tmp_path / "mutants.json"
    path.write_text(json.dumps(mutants))
    logged = []
    report = mutation_check(path, out=tmp_path / "out" / "m.json", markdown=tmp_path / "out" / "m.md",
                            repo_root=tiny_repo, timeout=120, log=logged.append)
    outcome = {r["id"]: r["outcome"] for r in report["results"]}
    # a snippet that no longer matches is an error, never skipped
    assert outcome == {"killed": "killed", "survived": "survived", "equivalent": "survived", "moved": "error",
                       "twice": "error", "no-such-test": "error"}
    detail = {r["id"]: r["detail"] for r in report["results"]}
    assert detail["killed"] == "tests/test_calc.py::test_add"
    assert "not found in pkg/calc.py; the text is now in ['pkg/moved.py']" in detail["moved"]
    assert "occurs" in detail["twice"] and "times" in detail["twice"]
    # the score leaves out equivalents and errors; errors fail the check whatever the score
    assert (report["killed"], report["survived"], report["equivalent"]) == (1, 1, 1)
    assert report["score"] == 0.5 and report["errors"] == 3
    assert report["passed"] is False and report["commit"] and report["baseline"]["rc"] == 0
    assert report["counts"]["core"] == {"killed": 1, "survived": 1, "error": 3, "equivalent": 1}
    # the working tree is never written
    assert (tiny_repo / "pkg" / "calc.py").read_text() == CALC
    saved = json.loads((tmp_path / "out" / "m.json").read_text())
    assert [r["id"] for r in saved["results"]] == [m["id"] for m in mutants]
    md = (tmp_path / "out" / "m.md").read_text()
    assert "**Score: 1 of 2 mutants killed (50.0 %; required 95 %).**" in md
    assert "- `survived` (survived, `pkg/calc.py`): nothing tests untested()" in md
    assert "- `equivalent` (equivalent, `pkg/calc.py`): a + a == a * 2" in md
    assert any("killed" in line and "tests/test_calc.py::test_add" in line for line in logged)


def test_a_failing_baseline_stops_the_check(tiny_repo, tmp_path):
    (tiny_repo / "pkg" / "calc.py").write_text(CALC.replace("a + b", "a + b + 1"))
    path = tmp_path / "mutants.json"
    path.write_text(json.dumps([_mutant("killed", "return a + b", "return a - b")]))
    with pytest.raises(RuntimeError, match="fail WITHOUT any mutant.*test_add"):
        mutation_check(path, repo_root=tiny_repo, timeout=120, log=lambda _: None)


def test_copy_holds_tracked_and_untracked_files_but_not_ignored_ones(tiny_repo, tmp_path):
    dest = copy_repository(tiny_repo, tmp_path / "copy")
    assert (dest / "pkg" / "calc.py").read_text() == CALC and (dest / "pkg" / "untracked.py").is_file()
    assert not (dest / "ignored").exists() and not (dest / ".git").exists()


@pytest.mark.parametrize("entry, message", [
    ({"id": "a", "class": "core", "file": "f.py", "old": "x", "new": "y"}, r"a: missing \['tests'\]"),
    ({"id": "a", "class": "style", "file": "f.py", "old": "x", "new": "y", "tests": ["t"]}, "class 'style'"),
    ({"id": "a", "class": "core", "file": "f.py", "old": "x", "new": "x", "tests": ["t"]}, "must be different"),
    ({"id": "a", "class": "core", "file": "../f.py", "old": "x", "new": "y", "tests": ["t"]}, "inside the repository"),
    ({"id": "a", "class": "core", "file": "f.py", "old": "x", "new": "y", "tests": []}, "non-empty list"),
])
def test_bad_mutant_entries_are_named(tmp_path, entry, message):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([entry]))
    with pytest.raises(ValueError, match=message):
        load_mutants(path)
    path.write_text(json.dumps([_mutant("a", "x", "y"), _mutant("a", "x", "z")]))
    with pytest.raises(ValueError, match="a: duplicate id"):
        load_mutants(path)


def test_the_mutant_list_applies_to_this_tree():
    """Every mutant of tests/mutants.json finds its ``old`` text exactly once (or, with "all", at least once) and
    names test files that exist. When code moves, update the entry (the runner reports where the text is now)."""
    mutants = load_mutants()
    assert len(mutants) >= 60 and {m["class"] for m in mutants} == set(MUTANT_CLASSES)
    problems = []
    for m in mutants:
        path = REPO_ROOT / m["file"]
        count = path.read_text().count(m["old"]) if path.is_file() else 0
        if not (count == 1 or (m.get("all") and count >= 1)):
            problems.append(f"{m['id']}: 'old' found {count} times in {m['file']}")
        problems += [f"{m['id']}: test file {t} missing" for t in m["tests"]
                     if not (REPO_ROOT / t.split("::")[0]).is_file()]
    assert not problems, "tests/mutants.json no longer matches the code:\n" + "\n".join(problems)


def test_markdown_escapes_table_cells():
    result = {"id": "x", "class": "core", "file": "f.py", "old": "a | b", "new": "`c`", "tests": ["t"],
              "outcome": "killed", "detail": "t::test", "seconds": 1.0}
    report = {"results": [result], "killed": 1, "survived": 0, "errors": 0, "equivalent": 0,
              "score": 1.0, "date": "2025-01-01T00:00:00+00:00", "commit": "abc", "dirty": False, "baseline": None,
              "counts": {c: {"killed": int(c == "core"), "survived": 0, "error": 0,
                             "equivalent": 0} for c in MUTANT_CLASSES}}
    md = render_markdown(report, "python scripts/mutation_check.py")
    assert "| x | core | f.py | `a \\| b` -> `'c'` | killed | t::test |" in md
    assert "None: every mutant was killed." in md
