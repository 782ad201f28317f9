"""THE checkpoint loader: weights (``weights_only=True``) into the network built from the plan that travels with them.

Two kinds of files hold weights. Training writes checkpoints with their state (``model.pt`` / ``model_final.pt``:
``{"model": state_dict, "epoch", ...}``; ``checkpoint_last.pt``: ``{"network": ..., "optimizer": ...}``). A released
bundle's ``models/model.pt`` is a bare state dict of the inference network (:func:`save_release_weights`), what
MONAI's tools (``ckpt_export``, ``CheckpointLoader``, MONAI Label) load with their default arguments. This loader
reads both.

Every reader of a checkpoint goes through :func:`load_state_dict` (one ``torch.load``, one set of checks and
messages): the bundle's inference and evaluation configs, :class:`custom.inference.segmenter.UncertaintySegmenter`,
export, the Triton models, MONAI Label's infer tasks and the held-out study. Weights holding NaN or infinite values
are refused there (:class:`custom.core.errors.CheckpointError` naming the file and the first such tensor): a
diverged or bit-flipped network predicts "no tumour" everywhere without any other sign of trouble. Training's resume state (optimizer, scheduler, store
snapshot) is restored by :class:`custom.training.handlers.checkpoint.ResumeHandler`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from custom.core.atomic import atomic_torch_save, verify_checksum
from custom.core.constants import NUM_REGIONS
from custom.core.dist import unwrap_network
from custom.core.errors import BraTSInputError, CheckpointError
from custom.core.layout import RunDir, WorkDir, checksum_path
from custom.model.networks import build_network

_HEADER = "cannot load the model"


# ----------------------------------------------------------------------------------------- checkpoint + plan
def resolve_plans_path(checkpoint, work_dir=None) -> Path:
    """plans.json beside ``checkpoint`` (the plan travels with the model), else ``work_dir/plans.json``.

    Raises:
        CheckpointError: neither exists (both places are named).
    """
    tried = []
    if checkpoint is not None:
        beside = RunDir(Path(checkpoint).parent).plans
        if beside.is_file():
            return beside
        tried.append(str(beside))
    if work_dir not in (None, ""):
        in_work = WorkDir(work_dir).plans
        if in_work.is_file():
            return in_work
        tried.append(str(in_work))
    raise CheckpointError(
        [f"no plans.json found (looked at: {', '.join(tried) or 'nothing: no checkpoint or work_dir given'}); "
         "keep the plans.json written by training beside the checkpoint, or pass --work_dir W"],
        header="cannot resolve the plan for inference")


def load_state_dict(checkpoint) -> dict:
    """The network weights of a checkpoint, read with ``weights_only=True``, every floating tensor finite.

    Accepts ``model.pt`` / ``model_final.pt`` (``{"model": state_dict, ...}``), ``checkpoint_last.pt``
    (``{"network": state_dict, ...}``) and a bare state dict. When the ``<name>.sha256`` that training writes
    lies beside the file, the file must match it.

    Raises:
        CheckpointError: missing or unreadable file, content that differs from its checksum file, no state dict
            inside, or weights holding NaN or infinite values (the file and the first such tensor are named).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found", header=_HEADER)
    if checksum_path(path).is_file():  # written beside it by training (atomic_torch_save); a copy may lack it
        try:
            verify_checksum(path)
        except BraTSInputError as exc:
            raise CheckpointError(exc.problems, header=_HEADER) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})",
                              header=_HEADER) from None
    state = None
    if isinstance(obj, Mapping):
        state = obj.get("model", obj.get("network", obj))
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path}: no network state dict (expected {{'model': state_dict}}; found {keys})",
                              header=_HEADER)
    check_finite_weights(state, path)
    return dict(state)


def check_finite_weights(state: Mapping[str, torch.Tensor], source) -> None:
    """Refuse a state dict with a NaN or infinite value in any floating-point tensor.

    Raises:
        CheckpointError: naming ``source``, the first offending tensor (state-dict order) with its counts, and
            how many tensors are affected.
    """
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if not bad:
        return
    first = state[bad[0]]
    n_nan, n_inf = int(torch.isnan(first).sum()), int(torch.isinf(first).sum())
    raise CheckpointError(
        f"{source}: non-finite weights: tensor '{bad[0]}' holds {n_nan} NaN and {n_inf} inf of {first.numel()} "
        f"values ({len(bad)} of {len(state)} tensors hold NaN or inf); the file is corrupt or training diverged: "
        f"use another checkpoint", header=_HEADER)


def is_deep_supervision_key(key: str) -> bool:
    """A state-dict key of DynUNet's deep-supervision heads (``deep_supervision_heads.*``, registered a second
    time as ``...super_head.*`` in the skip layers); inference networks have none."""
    return key.startswith("deep_supervision_heads.") or ".super_head." in key


def checkpoint_epoch(checkpoint) -> int | None:
    """The epoch a training checkpoint records (``model.pt``: the best epoch), None for a bare state dict."""
    load_state_dict(checkpoint)  # the checks and messages of the one loader
    obj = torch.load(str(checkpoint), map_location="cpu", weights_only=True)
    epoch = obj.get("epoch") if isinstance(obj, Mapping) and not torch.is_tensor(obj.get("epoch")) else None
    return int(epoch) if isinstance(epoch, (int, float)) else None


def release_state_dict(checkpoint) -> dict:
    """The weights of ``checkpoint`` as the released network holds them: the bare state dict, without
    deep-supervision heads (the inference network has none) and without training state."""
    return {k: v for k, v in load_state_dict(checkpoint).items() if not is_deep_supervision_key(k)}


def save_release_weights(checkpoint, path) -> Path:
    """Write a bundle's ``models/model.pt`` (atomically) from any checkpoint :func:`load_state_dict` reads:
    :func:`release_state_dict`, a plain ``{name: tensor}`` dict. Training checkpoints are left as they are."""
    path = Path(path)
    atomic_torch_save(release_state_dict(checkpoint), path)
    return path


def same_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Two state dicts hold the same tensors (names, shapes, dtypes and values)."""
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def checkpoint_out_channels(state: Mapping[str, torch.Tensor]) -> int:
    """Output channels of a DynUNet state dict (4 = regions + unc_output, 3 = segmentation only)."""
    keys = [k for k in state if k.endswith("output_block.conv.conv.weight")]
    if len(keys) != 1:
        raise CheckpointError(f"checkpoint state dict has no unique DynUNet output block (found {keys})",
                              header="cannot load the model")
    return int(state[keys[0]].shape[0])


def checkpoint_has_uncertainty(checkpoint) -> bool:
    """True when the checkpoint's network has the 4th (uncertainty) output channel."""
    return checkpoint_out_channels(load_state_dict(checkpoint)) == NUM_REGIONS + 1


def load_weights(network: torch.nn.Module, checkpoint, device="cpu") -> torch.nn.Module:
    """Load ``checkpoint`` into ``network`` (strict; a DDP wrapper is looked through), move it to ``device`` and
    set eval mode. Returns ``network``.

    Raises:
        CheckpointError: the checkpoint is missing, unreadable, non-finite, or its weights do not fit the network.
    """
    return _load_into(network, load_state_dict(checkpoint), checkpoint, device)


def _load_into(network: torch.nn.Module, state: dict, checkpoint, device) -> torch.nn.Module:
    target = unwrap_network(network)
    if not any(is_deep_supervision_key(k) for k in target.state_dict()):
        # a network trained with deep supervision: its extra heads have no use in a network without them
        state = {k: v for k, v in state.items() if not is_deep_supervision_key(k)}
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit the network built from the plan "
                              f"({str(exc).splitlines()[0]})", header=_HEADER) from None
    return network.to(device).eval()


def load_network(checkpoint, plans, device="cpu", dropout=None) -> tuple[torch.nn.Module, bool]:
    """Build the network from the plan, with the output channels the checkpoint has, and load it.

    Returns:
        ``(network in eval mode on device, with_uncertainty)``.
    """

    state = load_state_dict(checkpoint)
    with_uncertainty = checkpoint_out_channels(state) == NUM_REGIONS + 1
    network = build_network(plans, with_uncertainty=with_uncertainty, dropout=dropout)
    return _load_into(network, state, checkpoint, device), with_uncertainty
