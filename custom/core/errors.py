"""Errors users see: each names the file (or case) and what is wrong with it; and how an entry point reports them."""

from __future__ import annotations

import sys

#: exit status of an entry point stopped by a :class:`BraTSInputError` (argument errors of ``fire`` are 2 as well)
INPUT_ERROR_EXIT_STATUS = 2


class BraTSInputError(ValueError):
    """Invalid input data (missing modality, shape/affine mismatch, bad labels, NaN, corrupt file...)."""

    def __init__(self, problems, header: str = "invalid BraTS input"):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(header + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class CheckpointError(BraTSInputError):
    """A model file that cannot serve: missing, unreadable, without a state dict, with NaN or infinite weights,
    weights that do not fit the plan's network, or no plan beside it. A server answers it as its own fault (the
    model), not the client's (MONAI Label: HTTP 503), and refuses to start on it (Triton)."""


def input_error_in(exc: BaseException | None) -> BraTSInputError | None:
    """The first :class:`BraTSInputError` in ``exc``'s chain (itself, then ``__cause__``/``__context__``), or None.

    MONAI wraps an error raised while it evaluates a config expression or runs a transform in a
    ``RuntimeError``; the input error is its cause.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BraTSInputError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def report_input_errors() -> None:
    """Make an uncaught :class:`BraTSInputError` (also when wrapped, see :func:`input_error_in`) end the process
    with its message alone on stderr and exit status 2; any other error keeps the interpreter's traceback.

    For ``python -m monai.bundle run``, whose workflow wraps every error of a config expression in
    ``RuntimeError("Failed to evaluate ConfigExpression ...")`` and lets it out through ``fire`` as a long
    traceback with the named error buried in it: the bundle configs call this first in ``initialize``.
    """
    previous = sys.excepthook
    if getattr(previous, "reports_input_errors", False):
        return

    def hook(kind, value, traceback):
        error = input_error_in(value)
        if error is None:
            previous(kind, value, traceback)
            return
        sys.stdout.flush()
        print(f"error: {error}", file=sys.stderr, flush=True)
        # SystemExit raised by an excepthook sets the exit status (CPython handles it like an uncaught one)
        sys.exit(INPUT_ERROR_EXIT_STATUS)

    hook.reports_input_errors = True
    sys.excepthook = hook
