"""Region-based nnU-Net (MONAI DynUNet) with an uncertainty channel, and its inference wrappers.

Output channels of the network: 0..2 region logits for WT, TC, ET, 3 the uncertainty logit
(``unc_output = sigmoid(channel 3)``); the "without uncertainty" ablation has 3 channels.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import DynUNet
from torch import nn

from custom.core.cli import as_bool

NORM = ("INSTANCE", {"affine": True})

ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def plans_topology(plans) -> dict:
    """``{"kernels", "strides", "filters", "patch_size"}`` from a ``custom.planning.plans.Plans``, a dict or a path
    to ``plans.json`` (duck-typed: no import of the planning module needed)."""
    if isinstance(plans, (str, Path)):
        path = Path(plans)
        if not path.is_file():
            raise FileNotFoundError(f"plans file not found: {path}")
        with open(path) as fh:
            plans = json.load(fh)
    if isinstance(plans, Mapping):
        get = plans.get
    else:
        def get(key, default=None):
            return getattr(plans, key, default)
    topo = {key: get(key) for key in ("kernels", "strides", "filters", "patch_size")}
    missing = [key for key in ("kernels", "strides") if not topo[key]]
    if missing:
        raise ValueError(f"plans lack {missing}; expected plans.json keys kernels/strides/filters/patch_size")
    if len(topo["kernels"]) != len(topo["strides"]):
        raise ValueError(f"plans: {len(topo['kernels'])} kernels but {len(topo['strides'])} strides")
    if topo["filters"] is not None and len(topo["filters"]) != len(topo["kernels"]):
        raise ValueError(f"plans: {len(topo['filters'])} filters for {len(topo['kernels'])} stages")
    return topo


class TrainingDynUNet(DynUNet):
    """``DynUNet`` with the training options of this project; in eval mode (sliding window, export) it is DynUNet.

    - ``deep_supervision``: nnU-Net's deep supervision. MONAI's DynUNet upsamples every supervision head to the full
      resolution and stacks them; nnU-Net supervises each decoder stage at its own resolution against a downsampled
      target. In training mode this returns ``[full, 1/2, 1/4, ...]`` logits, one per decoder stage, highest
      resolution first (``len(strides) - 1`` outputs).
    - ``unc_stop_gradient``: the uncertainty channel is computed from DETACHED decoder features: its loss trains its
      own output weights but never the shared network, so the head cannot cost segmentation quality.
    Neither option adds parameters beyond ``DynUNet(deep_supervision=...)``: the state dict keys are DynUNet's.
    """

    def __init__(self, *args, unc_stop_gradient: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.unc_stop_gradient = as_bool(unc_stop_gradient, "unc_stop_gradient")

    def _output(self, features):
        out = self.output_block(features)
        if not self.unc_stop_gradient:
            return out
        unc = self.output_block(features.detach())[:, 3:4]
        return torch.cat([out[:, :3], unc], dim=1)

    def forward(self, x):
        out = self._output(self.skip_layers(x))
        if self.training and self.deep_supervision:
            return [out] + list(self.heads)
        return out


def build_network(plans, in_channels: int = 4, with_uncertainty: bool = True, deep_supervision: bool = False,
                  dropout: float | None = None, unc_stop_gradient: bool = False) -> DynUNet:
    """nnU-Net 3d_fullres plain conv U-Net (MONAI ``DynUNet``) from a plan.

    Args:
        plans: ``Plans``, dict or path to plans.json (kernels, strides, filters per stage).
        in_channels: input modalities (4: t1c, t1n, t2f, t2w).
        with_uncertainty: 4 output channels (WT, TC, ET, uncertainty logits) if True, else 3.
        deep_supervision: nnU-Net's deep supervision (off by default, as in the paper): a head on every decoder
            stage; in training mode the network returns the list of :class:`TrainingDynUNet`.
        dropout: dropout probability inside the conv blocks (MC-dropout variant), None for none.
        unc_stop_gradient: train the uncertainty channel on detached features (:class:`TrainingDynUNet`).
    Returns:
        ``DynUNet`` mapping ``(B, in_channels, X, Y, Z)`` -> ``(B, 4 or 3, X, Y, Z)`` logits.
    """
    # flags arrive from the command line as text ("false" is a non-empty string): read them, or name the setting
    with_uncertainty = as_bool(with_uncertainty, "with_uncertainty")
    deep_supervision = as_bool(deep_supervision, "deep_supervision")
    unc_stop_gradient = as_bool(unc_stop_gradient, "unc_stop_gradient")
    topo = plans_topology(plans)
    if dropout is not None and not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    strides = [list(s) if isinstance(s, (list, tuple)) else [int(s)] * 3 for s in topo["strides"]]
    # nnU-Net supervises every decoder stage: DynUNet allows one head per upsampling layer but the last
    num_heads = len(strides) - 2
    if deep_supervision and num_heads < 1:
        raise ValueError(f"deep supervision needs a plan with at least 3 stages, got {len(strides)}")
    if unc_stop_gradient and not with_uncertainty:
        raise ValueError("unc_stop_gradient needs the uncertainty channel (with_uncertainty=True)")
    options = {"unc_stop_gradient": True} if unc_stop_gradient else {}
    network_class = TrainingDynUNet if (deep_supervision or unc_stop_gradient) else DynUNet
    return network_class(
        **options,
        spatial_dims=3,
        in_channels=int(in_channels),
        out_channels=4 if with_uncertainty else 3,
        kernel_size=[list(k) if isinstance(k, (list, tuple)) else [int(k)] * 3 for k in topo["kernels"]],
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(topo["filters"]) if topo["filters"] is not None else None,
        dropout=float(dropout) if dropout else None,
        norm_name=NORM,
        act_name=ACT,
        deep_supervision=bool(deep_supervision),
        deep_supr_num=max(num_heads, 1),
        res_block=False,
    )


class MaskedUncertaintyNetwork(nn.Module):
    """Inference/export wrapper: ``x (B,4,…) -> [p_WT, p_TC, p_ET, unc_output * cancer_mask]`` ``(B,4,…)``.

    ``cancer_mask`` = predicted WT (p_WT > 0.5) dilated by ``mask_dilation`` voxels. With
    ``with_uncertainty=False`` the output is the three region probabilities ``(B,3,…)``.
    Apply it on a whole volume (the mask is not translation-local at patch borders); for patches use
    :class:`PatchProbabilityNetwork` and mask afterwards.
    """

    def __init__(self, network: nn.Module, mask_dilation: int = 3, with_uncertainty: bool = True):
        super().__init__()
        if mask_dilation < 0:
            raise ValueError(f"mask_dilation must be >= 0, got {mask_dilation}")
        self.network = network
        self.mask_dilation = int(mask_dilation)
        self.with_uncertainty = as_bool(with_uncertainty, "with_uncertainty")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(self.network(x))
        if not self.with_uncertainty:
            return probs[:, :3]
        mask = (probs[:, 0:1] > 0.5).to(probs.dtype)
        if self.mask_dilation > 0:
            k = 2 * self.mask_dilation + 1
            mask = F.max_pool3d(mask, kernel_size=k, stride=1, padding=self.mask_dilation)
        return torch.cat([probs[:, :3], probs[:, 3:4] * mask], dim=1)


class PatchProbabilityNetwork(nn.Module):
    """``x (B,4,p,p,p) -> sigmoid(network(x))`` for every channel, no masking.

    What the sliding window, Triton's patch model and the ONNX export run; the cancer mask is applied
    on the stitched full volume.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.network(x))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Also accepts the wrapped network's own state dict (the released ``models/model.pt``): this module has
        no weights of its own, so MONAI's ``ckpt_export network_export --ckpt_file models/model.pt`` loads the
        file with its defaults."""
        prefix = "network."
        if state_dict and not any(str(k).startswith(prefix) for k in state_dict):
            state_dict = {prefix + k: v for k, v in state_dict.items()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
