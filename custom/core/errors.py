"""Errors users see: each names the file (or case) and what is wrong with it."""

from __future__ import annotations


class BraTSInputError(ValueError):
    """Invalid input data (missing modality, shape/affine mismatch, bad labels, NaN, corrupt file...)."""

    def __init__(self, problems, header: str = "invalid BraTS input"):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__(header + ":\n" + "\n".join(f"  - {p}" for p in self.problems))
