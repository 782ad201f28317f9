"""Plant the mutants of tests/mutants.json one at a time in a copy of the repository; report which the tests miss.

    python scripts/mutation_check.py --out /tmp/mutation.json [--markdown bundle/docs/mutation.md]
        [--ids "[masking-no-mask-on-original-grid]"] [--classes "[masking,config]"] [--jobs 1] [--timeout 900]

Run it before calling a change to the method core, inference, evaluation or the configs done (slow, not in CI:
minutes per class on two cores). How it works and what the outcomes mean: :mod:`custom.workflows.mutation`.
Exit status 0 when the score is >= --min_score and every mutant applied; 1 otherwise (a survivor names a gap
in the tests; an error with "'old' text not found" means the mutated code moved and tests/mutants.json must
follow it).
"""

from __future__ import annotations

import shlex
import sys

import fire

from custom.core.cli import as_bool, as_list
from custom.workflows.mutation import DEFAULT_MARKDOWN, DEFAULT_MUTANTS, MIN_SCORE, mutation_check


def main(out: str | None = None, markdown: str | None = None, mutants: str = str(DEFAULT_MUTANTS), ids=None,
         classes=None, jobs: int = 1, timeout: float = 900, baseline: bool = True, min_score: float = MIN_SCORE):
    """Run the mutation check and print one line per mutant and a summary.

    Args:
        out: JSON report (every mutant with its outcome and the test that caught it).
        markdown: the record to write (bundle/docs/mutation.md); by default written only for a full run.
        mutants: the mutant list.
        ids: run only these mutant ids, e.g. "[masking-no-mask-on-original-grid,config-momentum-0.9]".
        classes: run only these classes, e.g. "[masking,channels]".
        jobs: copies of the repository tested in parallel.
        timeout: seconds per mutant's pytest run (a run past it counts as killed).
        baseline: first run the union of the selected tests without a mutant (stops if they fail).
        min_score: killed / (killed + survived) required for exit status 0.
    """
    ids = as_list(ids, "ids", cast=str)
    classes = as_list(classes, "classes", cast=str)
    if markdown is None and not ids and not classes and str(mutants) == str(DEFAULT_MUTANTS):
        markdown = str(DEFAULT_MARKDOWN)
    command = "python scripts/mutation_check.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = mutation_check(mutants, out=out, markdown=markdown, ids=ids, classes=classes, timeout=float(timeout),
                                jobs=int(jobs), baseline=as_bool(baseline, "baseline"), min_score=float(min_score),
                                command=command.strip())
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    for r in report["results"]:
        if r["outcome"] != "killed":
            print(f"{r['outcome'].upper()}: {r['id']} ({r['file']}): {r.get('equivalent') or r['detail']}")
    n = report["killed"] + report["survived"]
    print(f"mutation score {report['killed']}/{n} = {100 * report['score']:.1f} % (required {100 * min_score:.0f} %); "
          f"errors {report['errors']}, equivalent {report['equivalent']}"
          + (f" -> {out}" if out else "") + (f", {markdown}" if markdown else ""))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    fire.Fire(main)
