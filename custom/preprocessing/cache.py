"""The preprocessing cache of a work directory (``W/preprocessed``): plan, then preprocess every case once."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Mapping

from custom.core.atomic import atomic_save_npy, atomic_write_json
from custom.core.constants import MODALITIES
from custom.core.errors import BraTSInputError
from custom.core.layout import WorkDir, preprocessed_paths
from custom.core.parallel import map_cases
from custom.data.datalist import load_datalist
from custom.planning.fingerprint import compute_fingerprint, read_case
from custom.planning.planner import ExperimentPlanner
from custom.planning.plans import Plans
from custom.preprocessing.functional import preprocess_case

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- whole data set
def _file_signature(paths) -> str:
    """Cheap identity of the raw files (size and mtime) so that a changed case is preprocessed again."""
    items = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as exc:
            raise BraTSInputError(f"{p}: cannot be read ({exc.strerror or exc}); re-run scripts/prepare_data.py "
                                  f"if the data set moved") from None
        items.append([str(p), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def _is_cached(paths: Mapping, plan_hash: str, source: str) -> bool:
    if not all(os.path.exists(p) for p in paths.values()):
        return False
    try:
        with open(paths["pp_properties"]) as fh:
            props = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return props.get("plan_hash") == plan_hash and props.get("source_signature") == source


def _preprocess_entry(args) -> tuple[str, bool]:
    """Worker: preprocess one datalist entry into the cache (skipped when cached with the same plan)."""
    entry, plans_dict, pp_dir = args

    plans = Plans(plans_dict)
    case_id = entry["case_id"]
    paths = preprocessed_paths(pp_dir, case_id)
    source = _file_signature(list(entry["image"]) + [entry["label"]])
    if _is_cached(paths, plans.preprocessing_hash(), source):
        return case_id, False
    image, label, affine, spacing = read_case(entry["image"], entry["label"])
    image_pp, seg_pp, props = preprocess_case(image, spacing, plans, seg=label, affine=affine,
                                              name=str(entry["image"][0]))
    props.update(case_id=case_id, source_signature=source)
    atomic_save_npy(paths["pp_image"], image_pp)
    atomic_save_npy(paths["pp_label"], seg_pp)
    atomic_write_json(paths["pp_properties"], props)  # written last: marks the case complete
    return case_id, True


def _cached_fingerprint(path: Path, signature: str):
    try:
        with open(path) as fh:
            fp = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    return fp if fp.get("source_signature") == signature else None


def plan_and_preprocess(work_dir, gpu_memory_gb: float = 8, patch_size=None, filters=None,
                        num_workers: int = 1) -> Plans:
    """Fingerprint -> ``W/plans.json`` -> ``W/preprocessed/*`` for every training case -> datalist ``pp_*`` keys.

    Reads ``W/datalist.json``; writes ``W/fingerprint.json``, ``W/plans.json``, ``W/preprocessed/<id>_image.npy``
    (float32 (4, X', Y', Z')), ``<id>_seg.npy`` (uint8 (X', Y', Z')), ``<id>.json`` (properties) and rewrites
    ``W/datalist.json`` with absolute ``pp_image``, ``pp_label``, ``pp_properties`` on each training entry.
    Every write is atomic. Idempotent: the fingerprint is reused while the raw files are unchanged, and a case
    already cached with the same preprocessing (plan hash) and the same raw files is skipped.

    Args:
        work_dir: the work directory ``W``.
        gpu_memory_gb, patch_size, filters: see ``ExperimentPlanner.plan``.
        num_workers: processes for the fingerprint and the preprocessing (1: in this process).

    Returns:
        the ``Plans`` written to ``W/plans.json``.
    """
    work = WorkDir(Path(work_dir).resolve())
    datalist_path = work.datalist
    datalist = load_datalist(datalist_path)
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an integer >= 1, got {num_workers!r}")
    training = datalist.get("training", [])
    if not training:
        raise BraTSInputError(f"{datalist_path}: no valid training case to plan from")
    for entry in training:
        if not entry.get("label"):
            raise BraTSInputError(f"{datalist_path}: training case {entry.get('case_id')} has no label")

    # fingerprint (reused when the same raw files are listed)
    signature = hashlib.sha256(json.dumps(
        [[e["case_id"], _file_signature(list(e["image"]) + [e["label"]])] for e in training]).encode()).hexdigest()
    fp_path = work.fingerprint
    fingerprint = _cached_fingerprint(fp_path, signature)
    if fingerprint is None:
        fingerprint = compute_fingerprint(datalist, num_workers=num_workers,
                                          modalities=datalist.get("modalities") or MODALITIES)
        fingerprint["source_signature"] = signature
        atomic_write_json(fp_path, fingerprint)

    plans = Plans(ExperimentPlanner().plan(fingerprint, gpu_memory_gb=gpu_memory_gb, patch_size=patch_size,
                                           filters=filters))

    pp_dir = work.preprocessed
    pp_dir.mkdir(parents=True, exist_ok=True)

    jobs = [(entry, plans.to_dict(), str(pp_dir)) for entry in training]
    done = map_cases(_preprocess_entry, jobs, num_workers, "preprocess")
    logger.info("preprocessed %d cases into %s (%d already cached with plan hash %s)",
                sum(new for _, new in done), pp_dir, sum(not new for _, new in done), plans.preprocessing_hash())
    # plans.json and the datalist's pp_* keys appear only once every case is cached, so that an interrupted or
    # failed run never leaves a plan that points at a half-built cache
    plans.save(work.plans)

    new_training = []
    for entry in training:
        entry = dict(entry)
        entry.update(work.preprocessed_paths(entry["case_id"]))
        new_training.append(entry)
    datalist = dict(datalist)
    datalist["training"] = new_training
    atomic_write_json(datalist_path, datalist)
    return plans
