"""Uncertainty baselines: several predictions of one input, and their mean and spread.

- mirroring TTA (:func:`mirrored_predictions`): ``predict(flip(x))`` flipped back, for the 8 flip combinations of the
  three spatial axes (nnU-Net's test-time mirroring);
- MC dropout (:func:`mc_dropout_predictions`): N passes of a network whose dropout layers stay stochastic;
- ensemble (:func:`ensemble_predictions`): one pass of each model (the cross-validation folds' final models).

Each yields probability samples; :func:`mean_of` averages them (the inferer's TTA, MC dropout per patch) and
:func:`mean_and_variance` gives the mean and the WT variance on the unc_output scale (the held-out study).
These loops live here only: :class:`custom.inference.inferer.UncertaintyInferer` and
:mod:`custom.workflows.heldout` call them.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator, Sequence

import torch

from custom.core.constants import NUM_REGIONS
from custom.model.networks import PatchProbabilityNetwork

PatchFn = Callable[[torch.Tensor], torch.Tensor]
Predict = Callable[[torch.Tensor], torch.Tensor]

#: the spatial axes mirroring TTA flips: the last three, so ``(B, C, X, Y, Z)`` and ``(C, X, Y, Z)`` both work
SPATIAL_AXES = (-3, -2, -1)


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


def mirror_axes_combinations(tta: bool) -> list[tuple[int, ...]]:
    """Flip combinations of :data:`SPATIAL_AXES`: ``[()]`` without TTA, all 8 subsets with it."""
    if not tta:
        return [()]
    return [c for r in range(len(SPATIAL_AXES) + 1) for c in itertools.combinations(SPATIAL_AXES, r)]


def mirrored_predictions(predict: Predict, x: torch.Tensor, tta: bool = True) -> Iterator[torch.Tensor]:
    """``predict(flip(x, axes))`` flipped back, for each of :func:`mirror_axes_combinations` (``x``: ``(..., X, Y, Z)``)."""
    for axes in mirror_axes_combinations(tta):
        p = predict(torch.flip(x, axes) if axes else x)
        yield torch.flip(p, axes) if axes else p


def mc_dropout_predictions(predict: Predict, x: torch.Tensor, num_samples: int) -> Iterator[torch.Tensor]:
    """``num_samples`` passes of ``predict`` (a network after :func:`enable_mc_dropout`: each pass differs)."""
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    for _ in range(int(num_samples)):
        yield predict(x)


def ensemble_predictions(predicts: Sequence[Predict], x) -> Iterator[torch.Tensor]:
    """One prediction of ``x`` by each member of the ensemble."""
    if len(predicts) < 1:
        raise ValueError("an ensemble needs at least one member")
    for predict in predicts:
        yield predict(x)


def mean_of(samples: Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean of the samples, accumulated one by one (only one extra sample in memory)."""
    total, n = None, 0
    for p in samples:
        total = p if total is None else total + p
        n += 1
    if total is None:
        raise ValueError("mean_of needs at least one sample")
    return total / n


def mean_and_variance(samples: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (C,…), variance map (…))`` of probability samples ``(C,…)``.

    The map is the population variance of channel 0 (p_WT) across the samples, times 4 (the Bernoulli maximum)
    and clipped to [0, 1]: the scale of unc_output and var1shot, so that the maps compare.
    """
    stack = torch.stack([torch.as_tensor(s) for s in samples])             # (N, C, …)
    variance = stack[:, 0].var(0, unbiased=False)
    return stack.mean(0), torch.clamp(4.0 * variance, 0.0, 1.0)


def with_uncertainty_channel(probs: torch.Tensor, unc_map: torch.Tensor) -> torch.Tensor:
    """``(4, …)`` float32: the region probabilities ``probs[:3]`` and ``unc_map`` in channel 3, the layout the
    inference postprocessing reads as the uncertainty output."""
    return torch.cat([torch.as_tensor(probs[:NUM_REGIONS]), torch.as_tensor(unc_map)[None]]).float()


def mc_dropout_patch_fn(network: torch.nn.Module, num_samples: int = 10) -> PatchFn:
    """Mean sigmoid probability over ``num_samples`` stochastic passes (dropout on) per patch batch."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    enable_mc_dropout(network)
    prob = probability_patch_fn(network)

    def patch_fn(x: torch.Tensor) -> torch.Tensor:
        return mean_of(mc_dropout_predictions(prob, x, num_samples))

    return patch_fn
