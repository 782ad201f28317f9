"""THE checkpoint loader: weights (``weights_only=True``) into the network built from the plan that travels with them.

Every reader of a checkpoint goes through :func:`load_state_dict` (one ``torch.load``, one set of checks and
messages): the bundle's inference and evaluation configs, :class:`custom.inference.segmenter.UncertaintySegmenter`,
export, the Triton models and the held-out study. Training's resume state (optimizer, scheduler, store
snapshot) is restored by :class:`custom.training.handlers.checkpoint.ResumeHandler`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from custom.core.constants import NUM_REGIONS
from custom.core.dist import unwrap_network
from custom.core.errors import BraTSInputError
from custom.core.layout import RunDir, WorkDir
from custom.model.networks import build_network

_HEADER = "cannot load the model"


# ----------------------------------------------------------------------------------------- checkpoint + plan
def resolve_plans_path(checkpoint, work_dir=None) -> Path:
    """plans.json beside ``checkpoint`` (the plan travels with the model), else ``work_dir/plans.json``.

    Raises:
        BraTSInputError: neither exists (both places are named).
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
    raise BraTSInputError(
        [f"no plans.json found (looked at: {', '.join(tried) or 'nothing: no checkpoint or work_dir given'}); "
         "keep the plans.json written by training beside the checkpoint, or pass --work_dir W"],
        header="cannot resolve the plan for inference")


def load_state_dict(checkpoint) -> dict:
    """The network weights of a checkpoint, read with ``weights_only=True``.

    Accepts ``model.pt`` / ``model_final.pt`` (``{"model": state_dict, ...}``), ``checkpoint_last.pt``
    (``{"network": state_dict, ...}``) and a bare state dict.

    Raises:
        BraTSInputError: missing or unreadable file, or no state dict inside (the file is named).
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise BraTSInputError(f"{path}: checkpoint file not found", header=_HEADER)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated files raise many different types
        raise BraTSInputError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})",
                              header=_HEADER) from None
    state = None
    if isinstance(obj, Mapping):
        state = obj.get("model", obj.get("network", obj))
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise BraTSInputError(f"{path}: no network state dict (expected {{'model': state_dict}}; found {keys})",
                              header=_HEADER)
    return dict(state)


def is_deep_supervision_key(key: str) -> bool:
    """A state-dict key of DynUNet's deep-supervision heads (``deep_supervision_heads.*``, registered a second
    time as ``...super_head.*`` in the skip layers); inference networks have none."""
    return key.startswith("deep_supervision_heads.") or ".super_head." in key


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
    """Load ``checkpoint`` into ``network`` (strict; a DDP wrapper is looked through), move it to ``device`` and
    set eval mode. Returns ``network``.

    Raises:
        BraTSInputError: the checkpoint is missing, unreadable, or its weights do not fit the network.
    """
    state = load_state_dict(checkpoint)
    target = unwrap_network(network)
    if not any(is_deep_supervision_key(k) for k in target.state_dict()):
        # a network trained with deep supervision: its extra heads have no use in a network without them
        state = {k: v for k, v in state.items() if not is_deep_supervision_key(k)}
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BraTSInputError(f"{checkpoint}: weights do not fit the network built from the plan "
                              f"({str(exc).splitlines()[0]})", header=_HEADER) from None
    return network.to(device).eval()


def load_network(checkpoint, plans, device="cpu", dropout=None) -> tuple[torch.nn.Module, bool]:
    """Build the network from the plan, with the output channels the checkpoint has, and load it.

    Returns:
        ``(network in eval mode on device, with_uncertainty)``.
    """

    with_uncertainty = checkpoint_out_channels(load_state_dict(checkpoint)) == NUM_REGIONS + 1
    network = build_network(plans, with_uncertainty=with_uncertainty, dropout=dropout)
    return load_weights(network, checkpoint, device), with_uncertainty
