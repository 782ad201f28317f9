"""``torch.distributed`` helpers: which process writes files, barriers, unwrapping DDP for state dicts."""

from __future__ import annotations

import torch


def is_main_process() -> bool:
    """True outside ``torch.distributed`` or on rank 0: only this process writes files."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier() -> None:
    if dist_ready():
        torch.distributed.barrier()


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``state_dict`` is saved: strips DDP / DataParallel wrappers (no ``module.`` prefix)."""
    while isinstance(network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        network = network.module
    return network
