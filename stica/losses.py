"""Contrastive losses (paper eqs. 1, 6, 7), with the negatives drawn from the global batch."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's rows; backward hands each rank the summed gradient of its own
    rows from every rank's loss (torch.distributed.nn's version is deprecated in torch 2.13)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows, differentiably (each rank's keys get the gradient of every rank's loss),
    and this rank's offset in the result."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return _AllGather.apply(x), dist.get_rank() * x.shape[0]


def nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. (1): L(alpha, beta) for unit-norm local queries against all ranks' keys; the positive
    of query i is key i of the same rank. (The released code detaches every key, so each
    direction trains its query side only; here gradients flow through keys too.)"""
    all_keys, offset = gather(keys)
    logits = queries @ all_keys.T / temperature
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    return F.cross_entropy(logits.float(), targets)


def cross_modal_loss(video: list[torch.Tensor], audio: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_va = L(v_L1, a) + L(v_L2, a) + L(a, v_L1) + L(a, v_L2), averaged over its terms."""
    terms = [nce(v, audio, temperature) for v in video] + [nce(audio, v, temperature) for v in video]
    return torch.stack(terms).mean()


def within_modal_pairs(crops1: list, crops2: list) -> list[tuple[int, int]]:
    """Eq. (6): every pair of the two views' crop sets except small-small; 2((m+n)^2 - n^2)
    terms once both directions are counted."""
    return [(i, j) for i, a in enumerate(crops1) for j, b in enumerate(crops2) if not (a.small and b.small)]


def within_modal_loss(z1: list[torch.Tensor], z2: list[torch.Tensor], pairs, temperature: float) -> torch.Tensor:
    """L_vv over `pairs`, both directions, averaged over its terms (eq. 6 sums them; averaging,
    as the released code does, keeps lambda_vv meaningful whatever the number of crops)."""
    terms = [t for i, j in pairs for t in (nce(z1[i], z2[j], temperature), nce(z2[j], z1[i], temperature))]
    return torch.stack(terms).mean()
