"""Contrastive losses (paper eqs. 1, 6, 7), with the negatives drawn from the global batch.

A training step has 2 + 2 x crops + 1 embeddings (4 + 18 + 1 with the paper's crops) and 116
NCE terms. Gathering keys per term would issue one collective per term forward and one
backward, in series with compute. Instead `Keys` stacks every embedding of the step, gathers
them across ranks in one all_gather, and each term indexes into the result; its backward is one
reduce-scatter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """K,B,D on each rank -> W,K,B,D from every rank (one collective). Backward hands each rank
    the summed gradient of its own rows from every rank's loss (one reduce-scatter)."""

    @staticmethod
    def forward(ctx, x):
        world = dist.get_world_size()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))  # ranks concatenated along dim 0
        # torch 2.13 renamed the single-tensor collectives; older builds (2.11 on GPU machines) have the old names.
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, x.contiguous())
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(grad.shape[1:])
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(out, grad.contiguous().flatten(0, 1))
        return out


class Keys:
    """All of one step's embeddings (each B x E on this rank) and every rank's copy of them,
    gathered once. `has_audio` rides along as an extra column, so masking silent clips out of
    the cross-modal terms costs no collective of its own."""

    def __init__(self, embeddings: list[torch.Tensor], has_audio: torch.Tensor | None = None):
        local = torch.stack(embeddings).float()  # fp32 logits: at tau=0.1 a bf16 logit resolves only ~0.06
        B = local.shape[1]
        flags = (has_audio if has_audio is not None else torch.ones(B, dtype=torch.bool, device=local.device))
        flags = flags.to(local.device, local.dtype).view(1, B, 1).expand(local.shape[0], B, 1)
        local = torch.cat([local, flags], dim=2)
        if _distributed():
            gathered = _AllGather.apply(local)  # W,K,B,E+1
            self.offset = dist.get_rank() * B
        else:
            gathered, self.offset = local[None], 0
        everyone = gathered.transpose(0, 1).flatten(1, 2)  # K, W*B, E+1
        self.local, self.all = local[..., :-1], everyone[..., :-1]
        self.local_audio, self.all_audio = local[0, :, -1] > 0.5, everyone[0, :, -1] > 0.5

    @classmethod
    def of_step(cls, out: dict, has_audio: torch.Tensor | None = None) -> "Keys":
        """The keys of a Stica forward's output, laid out as: audio, the views, then each view's
        crops; `.audio`, `.video` and `.crops` hold their indices."""
        keys = cls([out["audio"], *out["video"], *(z for zs in out["crops"] for z in zs)], has_audio)
        keys.audio, keys.video, keys.crops = 0, list(range(1, 1 + len(out["video"]))), []
        first = 1 + len(out["video"])
        for zs in out["crops"]:
            keys.crops.append(list(range(first, first + len(zs))))
            first += len(zs)
        return keys

    def nce(self, q: int, k: int, temperature: float, audio_only: bool = False) -> torch.Tensor:
        """Eq. (1) for local embedding `q` against every rank's embedding `k`; the positive of
        query i is key i of this rank. With audio_only, clips without a soundtrack are neither
        queries nor keys (their 'sound' is silence, shared by all of them)."""
        if not audio_only:
            return nce(self.local[q], self.all[k], temperature, self.offset)
        return nce(self.local[q], self.all[k], temperature, self.offset, self.local_audio, self.all_audio)


def nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, offset: int = 0,
        query_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """-log softmax of the positive for unit-norm queries against keys; query i's positive is key
    offset + i. Masked-out keys take no part; the mean runs over the unmasked queries (0 if none),
    on the device, without a host sync. Keys carry gradients too (the released code detaches
    them, so each direction trains its query side only)."""
    with torch.autocast(queries.device.type, enabled=False):
        logits = queries.float() @ keys.float().T / temperature
        targets = torch.arange(queries.shape[0], device=queries.device) + offset
        if key_mask is None:
            return F.cross_entropy(logits, targets)
        logits = logits.masked_fill(~key_mask[None], float("-inf"))
        # A masked query's row may be all -inf: give it a finite target logit, then weight it out.
        logits = torch.where(query_mask[:, None], logits, torch.zeros_like(logits))
        losses = F.cross_entropy(logits, targets, reduction="none")
        weight = query_mask.float()
        return (losses * weight).sum() / weight.sum().clamp_min(1.0)


def cross_modal_loss(keys: Keys, video: list[int], audio: int, temperature: float) -> torch.Tensor:
    """L_va = L(v_L1, a) + L(v_L2, a) + L(a, v_L1) + L(a, v_L2), averaged over its terms; clips
    without audio are left out."""
    terms = [keys.nce(v, audio, temperature, audio_only=True) for v in video] + \
            [keys.nce(audio, v, temperature, audio_only=True) for v in video]
    return torch.stack(terms).mean()


def within_modal_pairs(crops1: list, crops2: list, scheme: str = "all") -> list[tuple[int, int, int]]:
    """The directed L_vv terms as (query view, i, j) between crops1[i] and crops2[j]: query view 0
    asks with crops1[i] against crops2[j], view 1 the other way.

    all: eq. (6), every pair of the two views' crop sets except small-small, both directions:
      2((m+n)^2 - n^2) terms (112 with the paper's crops).
    released: as the released code pairs them, space and time apart: the second large crop of
      each view with the other's (both directions), and every small crop of view 2 asking
      against every large crop of view 1 (14 terms with the paper's crops)."""
    if scheme == "all":
        return [(d, i, j) for i, a in enumerate(crops1) for j, b in enumerate(crops2) if not (a.small and b.small)
                for d in (0, 1)]
    if scheme != "released":
        raise ValueError(f"loss.vv_pairs={scheme!r}: 'all' or 'released'")
    terms = []
    for axis in ("space", "time"):
        large1 = [i for i, c in enumerate(crops1) if c.axis == axis and not c.small]
        large2 = [j for j, c in enumerate(crops2) if c.axis == axis and not c.small]
        small2 = [j for j, c in enumerate(crops2) if c.axis == axis and c.small]
        if len(large1) > 1 and len(large2) > 1:
            terms += [(0, large1[1], large2[1]), (1, large1[1], large2[1])]
        terms += [(1, i, j) for i in large1 for j in small2]
    return terms


def within_modal_loss(keys: Keys, z1: list[int], z2: list[int], terms, temperature: float) -> torch.Tensor:
    """L_vv over the directed `terms` (within_modal_pairs) between the embeddings z1[i] and
    z2[j], averaged over them (eq. 6 sums them; averaging, as the released code does, keeps
    lambda_vv meaningful whatever the number of crops)."""
    terms = [keys.nce(z1[i], z2[j], temperature) if d == 0 else keys.nce(z2[j], z1[i], temperature)
             for d, i, j in terms]
    return torch.stack(terms).mean()
