"""Uncertainty baselines at the patch level: plain probabilities, MC dropout (N passes), mirroring TTA axes."""

from __future__ import annotations

import itertools
from typing import Callable

import torch

from custom.model.networks import PatchProbabilityNetwork

PatchFn = Callable[[torch.Tensor], torch.Tensor]

#: spatial axes of a (B, C, X, Y, Z) batch that mirroring TTA flips
SPATIAL_AXES = (2, 3, 4)


def probability_patch_fn(network: torch.nn.Module) -> PatchFn:
    """``patch (B,4,p,p,p) -> sigmoid(network(patch)) (B,C,p,p,p)`` (``PatchProbabilityNetwork``)."""

    return PatchProbabilityNetwork(network)


def enable_mc_dropout(network: torch.nn.Module) -> torch.nn.Module:
    """Eval mode everywhere except dropout layers, which stay stochastic (MC dropout at inference)."""
    network.eval()
    n = 0
    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.train()
            n += 1
    if n == 0:
        raise ValueError("MC dropout needs a network with dropout layers (build_network(..., dropout=p))")
    return network


def mc_dropout_patch_fn(network: torch.nn.Module, num_samples: int = 10) -> PatchFn:
    """Mean sigmoid probability over ``num_samples`` stochastic passes (dropout on) per patch batch."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    enable_mc_dropout(network)
    prob = probability_patch_fn(network)

    def patch_fn(x: torch.Tensor) -> torch.Tensor:
        out = prob(x)
        for _ in range(num_samples - 1):
            out = out + prob(x)
        return out / num_samples

    return patch_fn


# ------------------------------------------------------------------------------------------------ inferer
def mirror_axes_combinations(tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations of the spatial axes: ``[()]`` without TTA, all 8 subsets of (2, 3, 4) with it."""
    if not tta:
        return [()]
    return [c for r in range(len(SPATIAL_AXES) + 1) for c in itertools.combinations(SPATIAL_AXES, r)]
