"""THE checkpoint loader: weights (``weights_only=True``) into the network built from the plan that travels with them."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from custom.core.constants import NUM_REGIONS
from custom.core.dist import unwrap_network
from custom.core.errors import BraTSInputError
from custom.model.networks import build_network


def load_model_weights(network: torch.nn.Module, checkpoint, map_location="cpu") -> torch.nn.Module:
    """Load ``model.pt`` / ``model_final.pt`` (``{"model": state_dict}``) or ``checkpoint_last.pt``
    (``{"network": state_dict, …}``) into ``network`` with ``weights_only=True``.

    Raises:
        BraTSInputError: missing, unreadable or incompatible checkpoint (named).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise BraTSInputError(f"{path}: checkpoint not found", header="cannot load model weights")
    try:
        state = torch.load(str(path), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise BraTSInputError(f"{path}: unreadable checkpoint ({type(exc).__name__}: {exc})",
                              header="cannot load model weights") from None
    weights = state.get("model", state.get("network")) if isinstance(state, dict) else None
    if weights is None:
        raise BraTSInputError(f"{path}: no 'model' or 'network' entry (keys: {sorted(state) if isinstance(state, dict) else type(state).__name__})",
                              header="cannot load model weights")

    try:
        unwrap_network(network).load_state_dict(weights)
    except RuntimeError as exc:
        raise BraTSInputError(f"{path}: weights do not fit the network built from the plan ({exc})".splitlines()[0],
                              header="cannot load model weights") from None
    return network


# ----------------------------------------------------------------------------------------- checkpoint + plan
def resolve_plans_path(checkpoint, work_dir=None) -> Path:
    """plans.json beside ``checkpoint`` (the plan travels with the model), else ``work_dir/plans.json``.

    Raises:
        BraTSInputError: neither exists (both places are named).
    """
    tried = []
    if checkpoint is not None:
        beside = Path(checkpoint).parent / "plans.json"
        if beside.is_file():
            return beside
        tried.append(str(beside))
    if work_dir not in (None, ""):
        in_work = Path(work_dir) / "plans.json"
        if in_work.is_file():
            return in_work
        tried.append(str(in_work))
    raise BraTSInputError(
        [f"no plans.json found (looked at: {', '.join(tried) or 'nothing: no checkpoint or work_dir given'}); "
         "keep the plans.json written by training beside the checkpoint, or pass --work_dir W"],
        header="cannot resolve the plan for inference")


def load_state_dict(checkpoint) -> dict:
    """The network weights of a training checkpoint (``{"model": state_dict}``, or a bare state dict).

    Raises:
        BraTSInputError: missing or unreadable file, or no state dict inside (the file is named).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise BraTSInputError(f"{path}: checkpoint file not found", header="cannot load the model")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types
        raise BraTSInputError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})",
                              header="cannot load the model") from None
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise BraTSInputError(f"{path}: no network state dict (expected {{'model': state_dict}})",
                              header="cannot load the model")
    return dict(state)


def checkpoint_out_channels(state: Mapping[str, torch.Tensor]) -> int:
    """Output channels of a DynUNet state dict (4 = regions + unc_output, 3 = segmentation only)."""
    keys = [k for k in state if k.endswith("output_block.conv.conv.weight")]
    if len(keys) != 1:
        raise BraTSInputError(f"checkpoint state dict has no unique DynUNet output block (found {keys})",
                              header="cannot load the model")
    return int(state[keys[0]].shape[0])


def checkpoint_has_uncertainty(checkpoint) -> bool:
    """True when the checkpoint's network has the 4th (uncertainty) output channel."""
    return checkpoint_out_channels(load_state_dict(checkpoint)) == NUM_REGIONS + 1


def load_weights(network: torch.nn.Module, checkpoint, device="cpu") -> torch.nn.Module:
    """Load ``checkpoint`` into ``network`` (strict), move it to ``device`` and set eval mode."""
    state = load_state_dict(checkpoint)
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BraTSInputError(f"{checkpoint}: weights do not fit the network built from the plan ({exc})",
                              header="cannot load the model") from None
    return network.to(device).eval()


def load_network(checkpoint, plans, device="cpu", dropout=None) -> tuple[torch.nn.Module, bool]:
    """Build the network from the plan, with the output channels the checkpoint has, and load it.

    Returns:
        ``(network in eval mode on device, with_uncertainty)``.
    """

    with_uncertainty = checkpoint_out_channels(load_state_dict(checkpoint)) == NUM_REGIONS + 1
    network = build_network(plans, with_uncertainty=with_uncertainty, dropout=dropout)
    return load_weights(network, checkpoint, device), with_uncertainty
