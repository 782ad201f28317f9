"""Mutation check: plant one small, plausible bug at a time in a COPY of the repository and run the tests chosen
for it; a mutant the tests do not notice "survives" and names a gap in the suite.

The mutants are data (``tests/mutants.json``), a list of entries::

    {"id": "masking-no-mask-on-original-grid",          unique name
     "class": "masking",                                 one of MUTANT_CLASSES
     "file": "custom/inference/postprocess.py",
     "old": "exact text", "new": "replacement",
     "tests": ["tests/test_inference_masking.py"],       pytest files or node ids run for this mutant
     "note": "why this bug matters",                     optional
     "all": true,                                        optional: replace every occurrence (default: exactly one)
     "equivalent": "why no test can catch it"}           optional: left out of the score

For each mutant the runner replaces ``old`` by ``new`` in the copy, runs ``pytest -x -q <tests>`` there with
``PYTHONPATH`` = the copy (so the copy's ``custom`` is imported, never the working tree's), records the outcome and
puts the file back. Outcomes:

- ``killed``: a selected test failed (or the run timed out, or a module no longer imports);
- ``survived``: every selected test passed with the bug in place;
- ``error``: the mutant could not be tested. Either its ``old`` text is not in ``file`` (the code moved on: the
  detail names the files that hold the text now, if any) or occurs more than once without ``"all"``, and the list
  must follow the code; or pytest could not run the selection (a test file or node id that does not exist, nothing
  collected). An error is never skipped: it fails the check like a low score.

``score = killed / (killed + survived)`` over the mutants not marked ``equivalent``. Before the mutants, the union
of all selections runs once on the unmutated copy: a failing baseline would make every mutant look killed, so the
run stops there. The working tree is never written.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from custom.core.atomic import atomic_write_bytes, atomic_write_json
from custom.core.layout import REPO_ROOT

#: what each class of mutant plants (issue 20)
MUTANT_CLASSES = {
    "masking": "the cancer mask and the paste-back of the uncertainty map at inference",
    "validation": "which voxels the validation maps are compared on, and what the validation store reads and writes",
    "channels": "which network or label channel is read as p_WT, TC, ET or the uncertainty",
    "evaluation": "evaluation settings: HD95 percentile, ECE bins, AUROC/ECE region, spacing, brain mask",
    "config": "config-to-component wiring of the bundle configs and their layered variants",
    "core": "the method's formulas: loss terms, EMA, regions and labels, dilation, metric definitions",
}

OUTCOMES = ("killed", "survived", "error")

DEFAULT_MUTANTS = REPO_ROOT / "tests" / "mutants.json"

DEFAULT_MARKDOWN = REPO_ROOT / "bundle" / "docs" / "mutation.md"

#: the score a change to the method core, inference, evaluation or configs must keep (issue 20)
MIN_SCORE = 0.95

_REQUIRED = ("id", "class", "file", "old", "new", "tests")

_SEARCHED_SUFFIXES = (".py", ".json", ".yaml", ".yml", ".sh", ".md", ".txt", ".pbtxt")


# ------------------------------------------------------------------------------------------------ the list
def load_mutants(path=DEFAULT_MUTANTS) -> list[dict]:
    """The mutant list of ``path``, checked: required fields, known class, unique ids, a real change.

    Raises ``ValueError`` naming the file and every bad entry.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: mutant list not found") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: expected a non-empty JSON list of mutants")
    problems, seen = [], set()
    for i, m in enumerate(entries):
        name = m.get("id", f"entry {i}") if isinstance(m, dict) else f"entry {i}"
        if not isinstance(m, dict):
            problems.append(f"{name}: not an object")
            continue
        missing = [k for k in _REQUIRED if k not in m]
        if missing:
            problems.append(f"{name}: missing {missing}")
            continue
        if m["id"] in seen:
            problems.append(f"{name}: duplicate id")
        seen.add(m["id"])
        if m["class"] not in MUTANT_CLASSES:
            problems.append(f"{name}: class {m['class']!r} is not one of {sorted(MUTANT_CLASSES)}")
        if not isinstance(m["old"], str) or not isinstance(m["new"], str) or not m["old"] or m["old"] == m["new"]:
            problems.append(f"{name}: 'old' and 'new' must be different strings, 'old' non-empty")
        tests = m["tests"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t for t in tests):
            problems.append(f"{name}: 'tests' must be a non-empty list of pytest paths or node ids")
        if Path(m["file"]).is_absolute() or ".." in Path(m["file"]).parts:
            problems.append(f"{name}: 'file' must be a path inside the repository, got {m['file']!r}")
    if problems:
        raise ValueError(f"{path}: bad mutant list:\n  " + "\n  ".join(problems))
    return entries


def select_mutants(mutants: Sequence[dict], ids=None, classes=None) -> list[dict]:
    """The mutants with one of ``ids`` and one of ``classes`` (None: all); unknown ids or classes are errors."""
    out = list(mutants)
    if ids:
        ids = [str(i) for i in ids]
        unknown = sorted(set(ids) - {m["id"] for m in mutants})
        if unknown:
            raise ValueError(f"no mutant with id {unknown}")
        out = [m for m in out if m["id"] in ids]
    if classes:
        unknown = sorted(set(classes) - set(MUTANT_CLASSES))
        if unknown:
            raise ValueError(f"unknown mutant class {unknown}; classes: {sorted(MUTANT_CLASSES)}")
        out = [m for m in out if m["class"] in classes]
    return out


# ------------------------------------------------------------------------------------------------ the copy
def repository_files(repo_root) -> list[str]:
    """Tracked files and untracked ones git does not ignore (what a commit of the working tree would hold)."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo_root,
                          capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{repo_root}: git ls-files failed: {proc.stderr.decode(errors='replace').strip()}")
    root = Path(repo_root)
    return sorted({f for f in proc.stdout.decode().split("\0") if f and (root / f).is_file()})


def copy_repository(repo_root, dest) -> Path:
    """Copy :func:`repository_files` of ``repo_root`` into ``dest`` (created); returns ``dest``."""
    repo_root, dest = Path(repo_root), Path(dest)
    for rel in repository_files(repo_root):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo_root / rel, target)
    return dest


def where_text_is(root, text: str, skip: str | None = None) -> list[str]:
    """Files under ``root`` (sources, configs, docs) that contain ``text``, relative paths; ``skip`` left out."""
    root = Path(root)
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == skip or not path.is_file() or path.suffix not in _SEARCHED_SUFFIXES or rel.startswith("tests/"):
            continue
        try:
            if text in path.read_text(errors="ignore"):
                found.append(rel)
        except OSError:
            continue
    return found


def apply_mutant(root, mutant: dict) -> tuple[str | None, str]:
    """Write the mutant into the copy at ``root``. Returns ``(original text, "")`` when applied, or
    ``(None, reason)`` when its ``old`` text does not match (the reason names the file and where the text is now)."""
    root = Path(root)
    path = root / mutant["file"]
    if not path.is_file():
        return None, f"{mutant['file']} does not exist"
    text = path.read_text()
    count = text.count(mutant["old"])
    if count == 0:
        elsewhere = where_text_is(root, mutant["old"], skip=mutant["file"])
        hint = f"; the text is now in {elsewhere}" if elsewhere else "; the text is nowhere in the repository"
        return None, f"'old' text not found in {mutant['file']}{hint}"
    if count > 1 and not mutant.get("all"):
        return None, f"'old' text occurs {count} times in {mutant['file']} (make it unique or set \"all\": true)"
    path.write_text(text.replace(mutant["old"], mutant["new"]))
    return text, ""


def restore_file(root, mutant: dict, original: str) -> None:
    (Path(root) / mutant["file"]).write_text(original)


# ------------------------------------------------------------------------------------------------ running tests
_FAILED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)


def run_tests(root, tests: Sequence[str], timeout: float, python: str = sys.executable) -> dict:
    """``pytest -x -q <tests>`` in the copy at ``root``; ``{"rc", "seconds", "output", "timed_out"}``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root)
    # no bytecode: a mutant and its restore can share size and mtime, and a stale .pyc would run the wrong code
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("PYTHONUNBUFFERED", "1")
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        rc, output, timed_out = proc.returncode, proc.stdout + proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or b""
        rc, output, timed_out = None, out.decode(errors="replace") if isinstance(out, bytes) else out, True
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 1), "output": output, "timed_out": timed_out}


def outcome_of(run: dict) -> tuple[str, str]:
    """``(outcome, detail)`` of one pytest run on a mutant: rc 0 survived; rc 1 (a test failed), 2 (collection
    interrupted: the mutant broke an import) or a timeout killed; any other rc an error of the selection."""
    if run["timed_out"]:
        return "killed", "timed out"
    rc = run["rc"]
    failed = _FAILED.findall(run["output"])
    if rc == 0:
        return "survived", ""
    if rc in (1, 2):
        return "killed", failed[0][1] if failed else f"pytest exit {rc}"
    tail = " ".join(run["output"].strip().splitlines()[-3:])[-300:]
    return "error", f"pytest exit {rc}: {tail}"


def _git(repo_root, *args) -> str:
    proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


# ------------------------------------------------------------------------------------------------ the check
def check_mutants(mutants: Sequence[dict], repo_root=REPO_ROOT, timeout: float = 900, jobs: int = 1,
                  baseline: bool = True, python: str = sys.executable, log=print) -> dict:
    """Run every mutant of ``mutants`` against its tests in copies of ``repo_root``; returns the report dict
    (``results`` in list order, ``counts`` per class, ``score``, ``baseline``)."""
    repo_root = Path(repo_root)
    jobs = max(1, int(jobs))
    workdir = Path(tempfile.mkdtemp(prefix="mutation-"))
    results: list[dict | None] = [None] * len(mutants)
    report = {"repo_root": str(repo_root), "commit": _git(repo_root, "rev-parse", "--short", "HEAD"),
              "dirty": bool(_git(repo_root, "status", "--porcelain", "--untracked-files=no")),
              "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "python": python,
              "timeout_s": timeout, "jobs": jobs}
    try:
        copies = [copy_repository(repo_root, workdir / f"copy{j}") for j in range(jobs)]
        if baseline and mutants:
            # selections naming a missing file are left to their mutants (reported as errors)
            union = [t for t in dict.fromkeys(t for m in mutants for t in m["tests"])
                     if (copies[0] / t.split("::")[0]).exists()]
            log(f"baseline: {len(union)} test selections on the unmutated copy ...")
            run = run_tests(copies[0], union, timeout * 2, python) if union else \
                {"rc": 0, "seconds": 0.0, "output": "", "timed_out": False}
            report["baseline"] = {"rc": run["rc"], "seconds": run["seconds"], "timed_out": run["timed_out"]}
            if run["rc"] != 0:
                failed = _FAILED.findall(run["output"])
                raise RuntimeError("the selected tests fail WITHOUT any mutant (fix them first): "
                                   + (", ".join(f for _, f in failed) or run["output"][-2000:]))
            log(f"baseline passed in {run['seconds']} s")
        todo: queue.Queue = queue.Queue()
        for i, m in enumerate(mutants):
            todo.put(i)
        lock = threading.Lock()
        done = [0]

        def worker(copy: Path) -> None:
            while True:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                m = mutants[i]
                original, reason = apply_mutant(copy, m)
                if original is None:
                    res = {"outcome": "error", "detail": reason, "seconds": 0.0}
                else:
                    try:
                        run = run_tests(copy, m["tests"], timeout, python)
                    finally:
                        restore_file(copy, m, original)
                    outcome, detail = outcome_of(run)
                    res = {"outcome": outcome, "detail": detail, "seconds": run["seconds"]}
                res.update({k: m[k] for k in ("id", "class", "file", "old", "new", "tests")})
                for k in ("note", "equivalent"):
                    if m.get(k):
                        res[k] = m[k]
                results[i] = res
                with lock:
                    done[0] += 1
                    log(f"[{done[0]:3d}/{len(mutants)}] {res['outcome']:<14} {m['id']:<44} "
                        f"{res['detail'][:90]} ({res['seconds']} s)")

        threads = [threading.Thread(target=worker, args=(c,)) for c in copies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["results"] = results
    report.update(score_results(results))
    return report


def score_results(results: Sequence[dict]) -> dict:
    """``{"counts": {class: {outcome: n, "equivalent": n}}, "killed", "survived", "score"}``; equivalent mutants
    that survive are counted apart and left out of the score."""
    counts = {c: {o: 0 for o in OUTCOMES} | {"equivalent": 0} for c in MUTANT_CLASSES}
    for r in results:
        key = "equivalent" if r["outcome"] == "survived" and r.get("equivalent") else r["outcome"]
        counts[r["class"]][key] += 1
    killed = sum(c["killed"] for c in counts.values())
    survived = sum(c["survived"] for c in counts.values())
    return {"counts": counts, "killed": killed, "survived": survived,
            "errors": sum(c["error"] for c in counts.values()),
            "equivalent": sum(c["equivalent"] for c in counts.values()),
            "score": killed / (killed + survived) if killed + survived else float("nan")}


# ------------------------------------------------------------------------------------------------ the record
def _cell(text: str, width: int = 70) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= width else text[: width - 1] + "…"
    return text.replace("|", "\\|").replace("`", "'")


def _change(old: str, new: str, context: int = 16) -> tuple[str, str]:
    """The differing middle of ``old`` and ``new`` with ``context`` characters around it (common ends elided)."""
    p = 0
    while p < min(len(old), len(new)) and old[p] == new[p]:
        p += 1
    s = 0
    while s < min(len(old), len(new)) - p and old[-1 - s] == new[-1 - s]:
        s += 1
    start = max(p - context, 0)

    def part(text: str) -> str:
        stop = min(len(text) - s + context, len(text))
        return ("…" if start > 0 else "") + text[start:stop] + ("…" if stop < len(text) else "")

    return part(old), part(new)


def render_markdown(report: dict, command: str, min_score: float = MIN_SCORE) -> str:
    """``bundle/docs/mutation.md``: score, date, command, counts per class, survivors, the whole list."""
    score = report["score"]
    lines = ["# Mutation check", "",
             "Plants one small, plausible bug at a time (the list: `tests/mutants.json`) in a copy of the repository "
             "and runs the tests chosen for it. A mutant nobody notices *survives*: a gap in the suite. Run it before "
             "calling a change to the method core, inference, evaluation or the configs done (it is slow: not in CI); "
             "`custom/workflows/mutation.py` says how it works.", "",
             f"**Score: {report['killed']} of {report['killed'] + report['survived']} mutants killed "
             f"({100 * score:.1f} %; required {100 * min_score:.0f} %).** "
             f"Errors (not tested: stale snippet or bad test selection): {report['errors']}; "
             f"equivalent (left out of the score): {report['equivalent']}.", "",
             f"- date: {report['date']}",
             f"- commit: `{report['commit'] or 'unknown'}`{' with uncommitted changes' if report['dirty'] else ''}",
             f"- command: `{command}`",
             f"- baseline (the selected tests without a mutant): "
             f"{'passed in ' + str(report['baseline']['seconds']) + ' s' if report.get('baseline') else 'not run'}",
             f"- time: {sum(r['seconds'] for r in report['results']):.0f} s of pytest over {len(report['results'])} "
             f"mutants", "",
             "## Per class", "",
             "| class | what it plants | mutants | killed | survived | equivalent | errors |",
             "|---|---|---|---|---|---|---|"]
    for c, what in MUTANT_CLASSES.items():
        n = report["counts"][c]
        lines.append(f"| {c} | {what} | {sum(n.values())} | {n['killed']} | {n['survived']} | {n['equivalent']} "
                     f"| {n['error']} |")
    lines += ["", "## Survivors, equivalents, errors", ""]
    flagged = [r for r in report["results"] if r["outcome"] != "killed"]
    if not flagged:
        lines.append("None: every mutant was killed.")
    for r in flagged:
        why = r.get("equivalent") or r.get("note") or r["detail"] or \
            "no note: add a test that kills it, or argue in the list why it is equivalent"
        state = "equivalent" if r["outcome"] == "survived" and r.get("equivalent") else r["outcome"]
        lines.append(f"- `{r['id']}` ({state}, `{r['file']}`): {why}" + (
            f" [{r['detail']}]" if r["outcome"] == "error" else ""))
    lines += ["", "## Every mutant", "",
              "| id | class | file | old -> new | outcome | caught by |", "|---|---|---|---|---|---|"]
    for r in report["results"]:
        old, new = _change(r["old"], r["new"])
        change = f"`{_cell(old, 60)}` -> `{_cell(new, 60)}`"
        lines.append(f"| {r['id']} | {r['class']} | {r['file']} | {change} | {r['outcome']} "
                     f"| {_cell(r['detail'], 80)} |")
    return "\n".join(lines) + "\n"


def json_report(report: dict) -> dict:
    """The report without the bulky per-run outputs, JSON-safe (NaN score -> None)."""
    out = dict(report)
    if out.get("score") != out.get("score"):
        out["score"] = None
    return out


def mutation_check(mutants=DEFAULT_MUTANTS, out=None, markdown=None, ids=None, classes=None, timeout: float = 900,
                   jobs: int = 1, baseline: bool = True, repo_root=REPO_ROOT, min_score: float = MIN_SCORE,
                   command: str | None = None, log=print) -> dict:
    """Load, select and run the mutants; write ``out`` (JSON) and ``markdown`` if given; returns the report with
    ``"passed"``: score >= ``min_score`` and no mutant in error (a stale snippet included)."""
    selected = select_mutants(load_mutants(mutants), ids, classes)
    report = check_mutants(selected, repo_root=repo_root, timeout=timeout, jobs=jobs, baseline=baseline, log=log)
    report["min_score"] = float(min_score)
    report["mutants_file"] = str(mutants)
    report["passed"] = bool(report["score"] >= min_score and not report["errors"])
    if out:
        atomic_write_json(out, json_report(report))
    if markdown:
        atomic_write_bytes(markdown, render_markdown(report, command or "python scripts/mutation_check.py",
                                                     min_score).encode())
    return report
