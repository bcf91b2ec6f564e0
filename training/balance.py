"""The MoLE balance loss over the global batch: the core op on one process, one all-reduce of
every layer's expert counts under DDP/FSDP/DeepSpeed."""
from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def balance_losses(routings: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
    """The Switch balance loss of each MoLE layer on non-padding tokens, over the *global* batch:
    ``routings`` holds each layer's ``(probs, expert)``; returns a ``[L]`` tensor.

    One process: the core op ``mole_ext.load_balance_loss`` per layer. Under DDP each rank sees
    part of the batch; every layer's ``f_k`` (no gradient) and the token count go through *one*
    all-reduce for all layers, and the local ``P_k`` share is scaled by the world size, so that
    DDP's gradient averaging and the mean of the logged values both equal the single-process loss
    on the whole batch. Nothing here waits for the device.
    """
    from mole_ext import load_balance_loss

    W = world()
    if W == 1:
        return torch.stack([load_balance_loss(p, e, mask) for p, e in routings])
    stats, local = [], []
    for probs, expert in routings:
        K = probs.shape[-1]
        m = mask.to(probs.dtype)
        counts = torch.zeros(K, dtype=probs.dtype, device=probs.device).index_add_(0, expert.long(), m)
        stats.append(torch.cat([counts, m.sum().view(1)]).detach())
        local.append((probs * m[:, None]).sum(0))
    flat = torch.cat(stats)  # layers may differ in K only in principle; keep them flat
    dist.all_reduce(flat)
    out, at = [], 0
    for P_sum, probs in zip(local, (p for p, _ in routings)):
        K = probs.shape[-1]
        s = flat[at:at + K + 1]
        at += K + 1
        M = s[K].clamp_min(1)
        out.append(K * (s[:K] / M * (P_sum / M)).sum() * W)
    return torch.stack(out)


def balance_loss(probs: torch.Tensor, expert: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One layer's :func:`balance_losses`."""
    return balance_losses([(probs, expert)], mask)[0]


