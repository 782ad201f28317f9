"""Map a function over cases in worker processes (spawn), with a progress bar and errors that name the case."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_all_start_methods, get_context

import numpy as np

from custom.core.errors import BraTSInputError


def _worker_init():
    import sys

    os.environ["OMP_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _safe_call(fn, item):
    """Run ``fn(item)``; input errors come back as data (their problems), so that every case is reported."""
    try:
        return True, fn(item)
    except BraTSInputError as exc:
        return False, exc.problems


def map_cases(fn, items, num_workers: int, desc: str):
    """Apply ``fn`` to every item, in worker processes when ``num_workers > 1``, with a progress bar.

    Raises:
        BraTSInputError: listing the problems of every item that failed (the others still ran).
    """
    from tqdm import tqdm

    call = partial(_safe_call, fn)
    if num_workers <= 1 or len(items) <= 1:
        results = [call(it) for it in tqdm(items, desc=desc, disable=None)]
    else:
        # fork where available (as torch's DataLoader does): spawned workers would re-import torch/monai, which
        # costs many seconds each; every worker gets one intra-op thread so that workers do not oversubscribe
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=get_context(method),
                                 initializer=_worker_init) as pool:
            results = list(tqdm(pool.map(call, items), total=len(items), desc=desc, disable=None))
    problems = [p for ok, res in results if not ok for p in res]
    if problems:
        raise BraTSInputError(problems, header=f"{desc} failed")
    return [res for _, res in results]


# ------------------------------------------------------------------------------------------------ topology
def check_num_workers(num_workers):
    if not isinstance(num_workers, (int, np.integer)) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
