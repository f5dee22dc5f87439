"""Batch normalisation over the ranks of a group and over the runs of one batch, with no host sync.

`torch.nn.SyncBatchNorm` drops the statistics of ranks with empty inputs by boolean indexing
(`count_all[mask]` in torch/nn/modules/_functions.py): the host waits for the device on every
call, about 107 times a STiCA step. Here every rank has a full batch by construction (the
loaders drop the last partial batch), so nothing is dropped: the per-channel sums, sums of
squares and counts go through one all_reduce, and the host never reads a value.

`grouped_batch_norm` gives each run of a batch (a view, a feature crop) its own statistics in
one call, the way the released code's one head call per crop does ("ghost" batch norm: the runs
become channels, with the affine parameters repeated).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


def _channel_view(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (x.dim() - 2)))


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


# The four kernels of a synchronised BN. On CUDA they are PyTorch's fused ones (those its own
# SyncBatchNorm uses, taking bf16 inputs with fp32 statistics); elsewhere the same arithmetic in
# plain ops, which a GPU test holds equal to the fused kernels.

def _stats(x, eps):
    """Per-channel mean and 1/sqrt(var + eps) of this rank's x (biased variance)."""
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    var, mean = torch.var_mean(x, dim=_reduce_dims(x), correction=0)
    return mean, torch.rsqrt(var + eps)


def _normalise(x, weight, bias, mean, invstd, eps):
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    return (x - _channel_view(x, mean)) * _channel_view(x, invstd * weight) + _channel_view(x, bias)


def _backward_reduce(grad, x, mean, invstd, weight):
    """This rank's sum of grad and of grad * (x - mean) per channel, and the affine gradients."""
    if x.is_cuda:
        return torch.batch_norm_backward_reduce(grad, x, mean, invstd, weight, True, True, True)
    dims = _reduce_dims(x)
    sum_dy = grad.sum(dims)
    sum_dy_xmu = (grad * (x - _channel_view(x, mean))).sum(dims)
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy


def _backward_elemt(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """The input gradient from the group's sums (count: the group's values per channel)."""
    if x.is_cuda:
        return torch.batch_norm_backward_elemt(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu,
                                               count.to(torch.int32).view(1))
    c = lambda v: _channel_view(x, v)
    return (grad - c(sum_dy / count) - (x - c(mean)) * c(invstd * invstd * sum_dy_xmu / count)) * c(invstd * weight)


class _SyncBatchNormFunction(torch.autograd.Function):
    """One all_reduce forward (sums, sums of squares, count) and one backward (the two gradient
    sums); every statistic stays on the device."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        if x.is_cuda and not (x.is_contiguous(memory_format=torch.channels_last)
                              or x.is_contiguous(memory_format=torch.channels_last_3d)):
            x = x.contiguous()  # the fused kernels take contiguous or channels-last inputs
        n = x.numel() // x.shape[1]
        mean, invstd = _stats(x, eps)
        var = invstd.pow(-2) - eps
        # fp32 sums of this rank's moments: the group's mean and variance follow without a host read
        moments = torch.cat([mean * n, (var + mean * mean) * n, mean.new_full((1,), n)])
        dist.all_reduce(moments, group=group)
        C = mean.shape[0]
        count = moments[2 * C]
        mean = moments[:C] / count
        var = (moments[C:2 * C] / count - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * count / (count - 1)).to(running_var.dtype), momentum)
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.group = group
        return _normalise(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd, count = ctx.saved_tensors
        if grad.is_cuda and not (grad.is_contiguous(memory_format=torch.channels_last)
                                 or grad.is_contiguous(memory_format=torch.channels_last_3d)):
            grad = grad.contiguous()
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = _backward_reduce(grad, x, mean, invstd, weight)
        both = torch.cat([sum_dy, sum_dy_xmu])
        dist.all_reduce(both, group=ctx.group)
        sum_dy, sum_dy_xmu = both.chunk(2)
        grad_x = _backward_elemt(grad, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
        # The affine gradients stay this rank's own: DDP averages them with every other parameter's.
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm of any N,C,... input whose training statistics come from every rank of `group`
    (None: the whole world). The parameters and buffers of nn.BatchNorm*d, so checkpoints and
    exports are unchanged; in eval mode, and in a world of one, it is the plain BN."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        if not affine or momentum is None:
            raise ValueError("SyncBatchNorm needs affine parameters and a fixed momentum")
        self.group = group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (N, C, ...), got {x.dim()}")

    @property
    def synced(self) -> bool:
        return self.training and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def forward(self, x):
        if not self.synced:
            return super().forward(x)
        self._check_input_dim(x)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
        return batch_norm(self, x, self.weight, self.bias, self.running_mean, self.running_var)

    @classmethod
    def of(cls, bn: _BatchNorm, group) -> "SyncBatchNorm":
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, group)
        sync.load_state_dict(bn.state_dict())
        return sync.to(bn.weight.device)


def batch_norm(bn: _BatchNorm, x, weight, bias, running_mean, running_var):
    """Training-mode BN of x by bn's kind (synchronised or local) with these parameters and
    running buffers, which it updates."""
    if isinstance(bn, SyncBatchNorm) and bn.synced:
        return _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, bn.eps, bn.momentum,
                                            bn.group)
    return F.batch_norm(x, running_mean, running_var, weight, bias, True, bn.momentum, bn.eps)


def grouped_batch_norm(bn: _BatchNorm, x: torch.Tensor, groups: int) -> torch.Tensor:
    """x: `groups` runs of B rows each (G*B, C), every run normalised with its own batch statistics
    in one call. The runs' running statistics are averaged into bn's: one update a step where the
    released code's one call per crop makes 20 in a row, so the last crops weigh most (the head's
    running statistics serve no evaluation: features are read before the head)."""
    if groups == 1 or not bn.training:
        return bn(x)
    C = x.shape[1]
    wide = x.view(groups, -1, C).transpose(0, 1).reshape(-1, groups * C)  # B, G*C: a run's channels are its own
    running = [bn.running_mean.repeat(groups), bn.running_var.repeat(groups)] if bn.track_running_stats else [None, None]
    y = batch_norm(bn, wide, bn.weight.repeat(groups), bn.bias.repeat(groups), *running)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.running_mean.copy_(running[0].view(groups, C).mean(0))
            bn.running_var.copy_(running[1].view(groups, C).mean(0))
            bn.num_batches_tracked.add_(1)
    return y.view(-1, groups, C).transpose(0, 1).reshape(-1, C)


def convert_sync_batchnorm(module: nn.Module, group=None) -> nn.Module:
    """Every BatchNorm under `module` (in place, the module itself included) as a SyncBatchNorm
    over `group`, sharing nothing with the originals."""
    if isinstance(module, _BatchNorm):
        return SyncBatchNorm.of(module, group)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, group))
    return module


def sync_group(size: str | int, world: int, local_world: int):
    """The process group BN statistics are shared over: `world` (None, the default group), `node`
    (this node's ranks, torchrun's LOCAL_WORLD_SIZE, as PySlowFast's BN.NUM_SYNC_DEVICES sets by
    hand) or a number of consecutive ranks. Every rank must call it (it creates the groups)."""
    n = world if size == "world" else local_world if size == "node" else int(size)
    if n < 1 or world % n:
        raise ValueError(f"train.sync_bn_group={size!r}: a group of {n} does not divide {world} processes")
    if n == world:
        return None
    group, _ = dist.new_subgroups(group_size=n)
    return group
