"""Contrastive losses (paper eqs. 1, 6, 7), with the negatives drawn from the global batch.

A training step has 2 + 2 x crops + 1 embeddings (4 + 18 + 1 with the paper's crops) and 116
NCE terms. Gathering keys per term would issue one collective per term forward and one
backward, in series with compute. Instead `Keys` stacks every embedding of the step, gathers
them across ranks in one all_gather (its backward is one reduce-scatter), and `Terms` computes
every term of the step from it in one batched matmul and one cross-entropy: a Python loop over
116 terms would be a loop of ~1,000 kernel launches.
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

    def __init__(self, embeddings: torch.Tensor, has_audio: torch.Tensor | None = None):
        local = embeddings.float()  # K,B,E; fp32 logits: at tau=0.1 a bf16 logit resolves only ~0.06
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
        """The keys of a Stica forward's output: the audio, then every window of every view
        (index step_key(view, window, windows))."""
        video = out["video"]
        return cls(torch.cat([out["audio"][None], video.flatten(0, 1)]), has_audio)


AUDIO = 0  # where Keys.of_step puts the audio


def step_key(view: int, window: int, windows: int) -> int:
    """Where Keys.of_step puts window `window` (0: the whole map) of view `view`."""
    return 1 + view * windows + window


class Terms:
    """A fixed set of NCE terms over one step's Keys, each a (query key, key key) pair, in named
    groups with a temperature each; a group is the mean of its terms. All terms are one gather of
    queries and keys, one bmm and one cross-entropy, whatever their number. In `audio_only` groups
    clips without a soundtrack are neither queries nor keys (their 'sound' is silence, shared by
    all of them). The index tensors are built once, on the device."""

    def __init__(self, groups: dict[str, list[tuple[int, int]]], temperatures: dict[str, float],
                 audio_only: set[str] = frozenset(), device="cpu"):
        pairs = [(q, k, 1 / temperatures[g], g in audio_only) for g, ts in groups.items() for q, k in ts]
        self.query = torch.tensor([p[0] for p in pairs], device=device)
        self.key = torch.tensor([p[1] for p in pairs], device=device)
        self.scale = torch.tensor([p[2] for p in pairs], device=device).view(-1, 1, 1)
        self.audio_only = torch.tensor([p[3] for p in pairs], device=device)
        self.slices, start = {}, 0
        for g, ts in groups.items():
            self.slices[g], start = slice(start, start + len(ts)), start + len(ts)

    def per_term(self, keys: Keys) -> torch.Tensor:
        """Eq. (1) for every term (P,): -log softmax of each query's positive, key offset + i of
        every rank's keys for local query i, averaged over the term's queries."""
        with torch.autocast(keys.local.device.type, enabled=False):
            queries = keys.local.index_select(0, self.query)  # P,B,E
            logits = torch.bmm(queries, keys.all.index_select(0, self.key).transpose(1, 2)) * self.scale  # P,B,W*B
            P, B, N = logits.shape
            use_key = ~self.audio_only[:, None] | keys.all_audio[None]  # P,W*B
            use_query = ~self.audio_only[:, None] | keys.local_audio[None]  # P,B
            logits = logits.masked_fill(~use_key[:, None], float("-inf"))
            # A left-out query's row may be all -inf: give it finite logits, then weight it out.
            logits = torch.where(use_query[..., None], logits, 0.0)
            targets = (torch.arange(B, device=logits.device) + keys.offset).repeat(P)
            losses = F.cross_entropy(logits.view(P * B, N), targets, reduction="none").view(P, B)
            weight = use_query.float()
            return (losses * weight).sum(1) / weight.sum(1).clamp_min(1.0)

    def __call__(self, keys: Keys) -> dict[str, torch.Tensor]:
        losses = self.per_term(keys)
        return {g: losses[s].mean() for g, s in self.slices.items()}


def nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, offset: int = 0,
        query_mask: torch.Tensor | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One term of eq. (1), on its own: -log softmax of the positive for unit-norm queries against
    keys; query i's positive is key offset + i. Masked-out keys take no part; the mean runs over
    the unmasked queries (0 if none). Keys carry gradients too (the released code detaches them,
    so each direction trains its query side only). The reference the batched `Terms` is held to."""
    logits = queries.float() @ keys.float().T / temperature
    targets = torch.arange(queries.shape[0], device=queries.device) + offset
    if key_mask is None:
        return F.cross_entropy(logits, targets)
    logits = logits.masked_fill(~key_mask[None], float("-inf"))
    logits = torch.where(query_mask[:, None], logits, torch.zeros_like(logits))
    losses = F.cross_entropy(logits, targets, reduction="none")
    weight = query_mask.float()
    return (losses * weight).sum() / weight.sum().clamp_min(1.0)


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


def cross_modal_pairs(views: int, windows: int) -> list[tuple[int, int]]:
    """L_va's terms: each of the first `views` views' whole map asking the audio, and back."""
    whole = [step_key(v, 0, windows) for v in range(views)]
    return [(v, AUDIO) for v in whole] + [(AUDIO, v) for v in whole]


def stica_terms(loss_cfg, views: int, layout: list, device) -> Terms:
    """Eq. (7)'s terms for a step of `views` views with the crop `layout` each (crops.crop_layout):
    l_va, every view against the audio both ways (eq. 1 at temp_va; clips without audio left
    out), and with two views l_vv, the loss.vv_pairs terms between the views' crops at temp_vv
    (eq. 6 sums them; the mean, as the released code takes it, keeps lambda_vv meaningful
    whatever the number of crops)."""
    windows = 1 + len(layout) if views == 2 else 1
    groups = {"l_va": cross_modal_pairs(views, windows)}
    crop = lambda view, i: step_key(view, 1 + i, windows)
    pairs = within_modal_pairs(layout, layout, loss_cfg.vv_pairs) if views == 2 else []
    if pairs:
        groups["l_vv"] = [(crop(0, i), crop(1, j)) if d == 0 else (crop(1, j), crop(0, i)) for d, i, j in pairs]
    return Terms(groups, {"l_va": loss_cfg.temp_va, "l_vv": loss_cfg.temp_vv}, {"l_va"}, device)
