"""A training run's settings (``train_config.json``) and THE rule for "the same run": which settings define a result.

``train_config.json`` is the ``run_config`` section of ``bundle/configs/train.json`` resolved and written by
:func:`custom.training.setup.write_run_config` (values made JSON by :func:`jsonable`). Three places ask whether
two such configs describe the same training, and all three use :func:`config_differences`:

- cross-validation (``scripts/cross_validate.py``): a finished run counts as done only when its config matches
  the planned one on :data:`RESULT_KEYS` (a 2-epoch smoke test is not fold 0 of the real cross-validation);
- the report (``scripts/report.py``, :func:`custom.evaluation.runs.collect_runs`): the same rule decides which
  runs enter a fold average;
- resume (``--resume true``): the resumed run must match the saved config on :data:`RESULT_KEYS` except
  ``num_epochs`` (training longer is what resume is for);
- the fold ensemble (:mod:`custom.inference.ensemble`): its members must agree on :data:`RESULT_KEYS` except
  the fold's own case lists (:data:`FOLD_KEYS`).

Left out on purpose, because they do not change what is learnt: paths (``work_dir``, ``output_dir``,
``datalist``), ``device`` and ``amp`` (the same run on another machine), ``resume``, ``checkpoint_interval``,
``num_workers`` (the patch stream does not depend on it: ``custom.training.sampling.PatchDataset``), and the
``versions``/``pid`` bookkeeping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from custom.core.errors import BraTSInputError

#: the settings of ``run_config`` (train.json) that define what a training run learns and reports
RESULT_KEYS = (
    "variant", "fold", "plans", "seed", "num_epochs", "iterations_per_epoch", "val_interval", "learning_rate",
    "grad_clip_norm", "unc_weight", "rmsd_weight_cancer", "corr_weight", "unc_loss", "ring_weight", "proper_weight",
    "unc_stop_gradient", "ema_window", "target_transform", "mask_dilation", "with_uncertainty", "deep_supervision",
    "dropout", "fg_fraction", "batch_size", "patch_size", "train_cases", "val_cases",
)

#: what differs between the folds of one cross-validation by design
FOLD_KEYS = ("fold", "train_cases", "val_cases")

#: what may change when a run is resumed (``--num_epochs`` raised to train longer)
RESUMABLE_KEYS = ("num_epochs",)

_BOOL_TEXT = {"true": True, "false": False}


def jsonable(value: Any) -> Any:
    """``value`` as JSON data: lists for tuples, ``to_dict()`` for objects that have it (the plan), else ``str``."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(x) for x in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(x) for k, x in value.items()}
    if hasattr(value, "to_dict"):
        return jsonable(value.to_dict())
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return jsonable(value.item())
    return str(value)


def _canonical(value: Any) -> Any:
    """The value compared: JSON data with command-line spellings of booleans ("true") read as booleans."""
    value = jsonable(value)
    if isinstance(value, str) and value.strip().lower() in _BOOL_TEXT:
        return _BOOL_TEXT[value.strip().lower()]
    if isinstance(value, list):
        return [_canonical(x) for x in value]
    if isinstance(value, dict):
        return {k: _canonical(x) for k, x in value.items()}
    return value


def _shown(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, sort_keys=True)
    if isinstance(value, list) and len(text) > limit:
        return f"{len(value)} entries"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def config_differences(found: Mapping, expected: Mapping, keys: Iterable[str] = RESULT_KEYS,
                       ignore: Iterable[str] = (), labels: tuple[str, str] = ("here", "expected")) -> list[str]:
    """``["<key>: <found> here, <expected> expected", ...]`` for every setting of ``keys`` (minus ``ignore``)
    whose values differ; an empty list means the same training. ``labels`` name the two sides.

    Booleans written on a command line ("true") equal their JSON form; a setting missing from ``found``
    (a run of an older version) is a difference. The plan is compared as a whole and named by its fields.
    """
    ignore = set(ignore)
    here, there = labels
    out = []
    for key in keys:
        if key in ignore or key not in expected:
            continue
        want = _canonical(expected[key])
        if key not in found:
            out.append(f"{key}: not recorded {here}, {_shown(want)} {there}")
            continue
        have = _canonical(found[key])
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            fields = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            out.append(f"{key}: differs in {', '.join(fields)} "
                       + "; ".join(f"{f} {_shown(have.get(f))} {here}, {_shown(want.get(f))} {there}"
                                   for f in fields[:3]))
        elif isinstance(have, list) and isinstance(want, list) and key in FOLD_KEYS:
            extra, missing = sorted(set(map(str, have)) - set(map(str, want))), sorted(
                set(map(str, want)) - set(map(str, have)))
            out.append(f"{key}: {len(have)} {here}, {len(want)} {there}"
                       + (f" ({len(extra)} not expected, e.g. {extra[0]})" if extra else "")
                       + (f" ({len(missing)} missing, e.g. {missing[0]})" if missing else ""))
        else:
            out.append(f"{key}: {_shown(have)} {here}, {_shown(want)} {there}")
    return out


def read_run_config(path) -> dict | None:
    """A run's ``train_config.json`` as a dict; None when the file does not exist.

    Raises:
        BraTSInputError: the file is unreadable or not a JSON object (the file is named).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BraTSInputError(f"{path}: not a readable run config ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise BraTSInputError(f"{path}: not a run config (a JSON {type(data).__name__}, expected an object)")
    return data
