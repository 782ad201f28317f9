"""The Triton model repository: fill it from a checkpoint (weights, plan, parameters) and check it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from custom.core.atomic import atomic_path, atomic_write_bytes, atomic_write_json
from custom.core.errors import BraTSInputError
from custom.core.layout import MODEL_REPOSITORY
from custom.model.checkpoints import checkpoint_out_channels, load_state_dict, resolve_plans_path

VOLUME_MODEL = "brats_unc_volume"

PATCH_MODEL = "brats_unc_patch"

MODEL_NAMES = (VOLUME_MODEL, PATCH_MODEL)


# ---------------------------------------------------------------------------------------- model repository
def _read_plans(plans_path):
    with open(plans_path) as fh:
        plans = json.load(fh)
    if "patch_size" not in plans:
        raise BraTSInputError([f"{plans_path}: not a plans.json (no 'patch_size')"], header="invalid plans")
    return plans


def prepare_model_repository(checkpoint, plans_path=None, repo_dir=MODEL_REPOSITORY, template_dir=None,
                             volume_instances: int | None = None) -> Path:
    """Put a trained model into a Triton model repository (what ``scripts/export.py`` calls).

    Writes, each atomically:

    - ``<repo>/brats_unc_patch/1/model.pt``: the checkpoint (``{"model": state_dict}``), checked loadable;
    - ``<repo>/<model>/1/plans.json`` for both models: the training plan (``plans_path``, default the
      plans.json beside the checkpoint);
    - ``<repo>/brats_unc_volume/1/model_info.json``: ``{"with_uncertainty": bool, "out_channels": int}``
      read from the checkpoint.

    When ``repo_dir`` differs from ``template_dir`` (default: the project's ``triton_models/``), the
    ``config.pbtxt`` and ``model.py`` files are copied there first, so any folder becomes a servable repository.
    ``volume_instances`` sets the instance count of the volume model there (= volumes in flight; each
    instance is one Python process), e.g. fewer for a small CPU machine.

    Returns:
        the repository folder.

    Raises:
        BraTSInputError: checkpoint or plan missing or unreadable (the file is named).
    """

    template_dir = Path(template_dir or MODEL_REPOSITORY).resolve()
    repo_dir = Path(repo_dir).resolve()
    checkpoint = Path(checkpoint)
    out_channels = checkpoint_out_channels(load_state_dict(checkpoint))
    plans_path = Path(plans_path) if plans_path else resolve_plans_path(checkpoint)
    if not plans_path.is_file():
        raise BraTSInputError([f"{plans_path}: plans.json not found"], header="cannot export to Triton")
    _read_plans(plans_path)
    if volume_instances is not None and int(volume_instances) < 1:
        raise ValueError(f"volume_instances must be >= 1, got {volume_instances}")
    if volume_instances is not None and repo_dir == template_dir:
        raise ValueError(f"volume_instances would edit the shipped template {template_dir}; pass another repo_dir")
    for name in MODEL_NAMES:
        src, dst = template_dir / name, repo_dir / name
        if not (src / "config.pbtxt").exists():
            raise FileNotFoundError(f"{src / 'config.pbtxt'}: model template not found")
        (dst / "1").mkdir(parents=True, exist_ok=True)
        if src != dst:
            for rel in ("config.pbtxt", "1/model.py"):
                with atomic_path(dst / rel) as tmp:
                    shutil.copyfile(src / rel, tmp)
        with atomic_path(dst / "1" / "plans.json") as tmp:
            shutil.copyfile(plans_path, tmp)
    if volume_instances is not None:
        set_instance_count(repo_dir / VOLUME_MODEL / "config.pbtxt", int(volume_instances))
    with atomic_path(repo_dir / PATCH_MODEL / "1" / "model.pt") as tmp:
        shutil.copyfile(checkpoint, tmp)
    atomic_write_json(repo_dir / VOLUME_MODEL / "1" / "model_info.json",
                      {"with_uncertainty": out_channels == 4, "out_channels": out_channels,
                       "checkpoint": str(checkpoint.resolve())})
    return repo_dir


def set_instance_count(config_path, count: int) -> None:
    """Rewrite the ``count`` of the (single) ``instance_group`` of a ``config.pbtxt`` in place (atomically)."""
    import re

    text = Path(config_path).read_text()
    new, n = re.subn(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{int(count)}", text)
    if n != 1:
        raise ValueError(f"{config_path}: expected one instance_group starting with 'count:', found {n}")
    if new != text:
        atomic_write_bytes(config_path, new.encode())


def read_model_parameters(model_config: dict) -> dict:
    """``parameters { key: ... value { string_value: ... } }`` of a Triton model config, parsed as JSON values."""
    out = {}
    for key, value in (model_config.get("parameters") or {}).items():
        text = value.get("string_value", "") if isinstance(value, dict) else str(value)
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def check_model_repository(repo_dir=MODEL_REPOSITORY) -> Path:
    """Fail early, naming the missing file, when the repository has no exported model in it."""
    repo_dir = Path(repo_dir).resolve()
    missing = [repo_dir / name / rel for name in MODEL_NAMES for rel in ("config.pbtxt", "1/model.py", "1/plans.json")]
    missing += [repo_dir / PATCH_MODEL / "1" / "model.pt", repo_dir / VOLUME_MODEL / "1" / "model_info.json"]
    missing = [str(p) for p in missing if not p.exists()]
    if missing:
        raise FileNotFoundError(
            "model repository incomplete (run scripts/export.py --checkpoint CKPT first):\n"
            + "\n".join(f"  - {p}: missing" for p in missing)
        )
    return repo_dir
