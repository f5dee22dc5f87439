"""STiCA networks: R(2+1)D-18 video trunk, ResNet-9 audio trunk, temporal transformer pooling,
MLP heads, and the module that turns trunk feature maps (whole or feature-cropped) into
embeddings. Layouts follow torchvision's VideoResNet and ResNet (as the released code copies
them), written here so the project needs no torchvision."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from stica.batchnorm import grouped_batch_norm


class FrameConv(nn.Conv3d):
    """A (1,k,k) Conv3d run as a 2-D convolution over the B*T frames: the same weight and
    state_dict keys, a 2-D kernel instead of a 3-D one of depth 1. In channels-last memory
    (B,T,H,W,C) the frames are a view, not a copy."""

    def forward(self, x):
        B, C, T, H, W = x.shape
        weight = self.weight.view(*self.weight.shape[:2], *self.weight.shape[3:])
        y = F.conv2d(x.transpose(1, 2).reshape(B * T, C, H, W), weight, None, self.stride[1:], self.padding[1:])
        return y.view(B, T, *y.shape[1:]).transpose(1, 2)


class TimeConv(nn.Conv3d):
    """A (k,1,1) Conv3d run as a 2-D convolution with a (k,1) kernel over the (T, H*W) plane; the
    same weight and keys. A view of the input in both memory formats."""

    def forward(self, x):
        B, C, T, H, W = x.shape
        # view, not squeeze: the weight's gradient then keeps the parameter's strides, as DDP's buckets expect
        y = F.conv2d(x.reshape(B, C, T, H * W), self.weight.view(self.weight.shape[:4]), None, self.stride[:2],
                     self.padding[:2])
        return y.view(*y.shape[:3], H, W)


# model.conv: how the (2+1)D factors run (same parameters either way; stica-bench --gpu-check times both)
CONVS = {"conv3d": (nn.Conv3d, nn.Conv3d), "conv2d": (FrameConv, TimeConv)}


class Conv2Plus1D(nn.Sequential):
    """A 3x3x3 convolution factored into 1x3x3 spatial then 3x1x1 temporal."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1, conv: str = "conv3d"):
        spatial, temporal = CONVS[conv]
        super().__init__(
            spatial(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(mid), nn.ReLU(inplace=True),
            temporal(mid, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False))


class VideoBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv: str = "conv3d"):
        super().__init__()
        # Mid-channels chosen so the factored pair has the parameters of a full 3x3x3 conv.
        mid = (cin * cout * 27) // (cin * 9 + 3 * cout)
        self.conv1 = nn.Sequential(Conv2Plus1D(cin, cout, mid, stride, conv), nn.BatchNorm3d(cout),
                                   nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv2Plus1D(cout, cout, mid, 1, conv), nn.BatchNorm3d(cout))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.conv2(self.conv1(x)) + skip)


def widths(width: float) -> list[int]:
    """Stage widths 64-128-256-512 times `width` (1.0 is the paper's; the CPU demo uses less)."""
    return [max(8, int(round(c * width))) for c in (64, 128, 256, 512)]


class R2Plus1D18(nn.Module):
    """Clips B,3,T,H,W -> feature map B,512,T/8,H/16,W/16 (512x4x7x7 for 30x112x112). With
    zero_init_residual, each block's last BN starts at zero, so the block starts as its skip."""

    def __init__(self, width: float = 1.0, zero_init_residual: bool = False, conv: str = "conv3d"):
        super().__init__()
        if conv not in CONVS:
            raise ValueError(f"model.conv={conv!r}: {' | '.join(CONVS)}")
        spatial, temporal = CONVS[conv]
        w = widths(width)
        stem = max(8, int(round(45 * width)))
        self.out_dim = w[-1]
        self.stem = nn.Sequential(
            spatial(3, stem, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False), nn.BatchNorm3d(stem),
            nn.ReLU(inplace=True),
            temporal(stem, w[0], (3, 1, 1), 1, (1, 0, 0), bias=False), nn.BatchNorm3d(w[0]), nn.ReLU(inplace=True))
        stages, cin = [], w[0]
        for cout, stride in zip(w, (1, 2, 2, 2)):
            stages.append(nn.Sequential(VideoBlock(cin, cout, stride, conv), VideoBlock(cout, cout, 1, conv)))
            cin = cout
        self.stages = nn.Sequential(*stages)
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for block in self.modules():
                if isinstance(block, VideoBlock):
                    nn.init.zeros_(block.conv2[1].weight)

    def forward(self, x):
        return self.stages(self.stem(x))


class AudioBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        skip = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + skip)


class ResNet9Audio(nn.Module):
    """Log-mel B,1,F,T -> B,512. The released code keeps torchvision's unused 1000-way fc (which
    forces find_unused_parameters in DDP); it is left out here."""

    def __init__(self, width: float = 1.0, zero_init_residual: bool = False):
        super().__init__()
        w = widths(width)
        self.out_dim = w[-1]
        self.stem = nn.Sequential(nn.Conv2d(1, w[0], 7, 2, 3, bias=False), nn.BatchNorm2d(w[0]),
                                  nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], w[0]
        for cout, stride in zip(w, (1, 2, 2, 2)):
            blocks.append(AudioBlock(cin, cout, stride))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for block in self.modules():
                if isinstance(block, AudioBlock):
                    nn.init.zeros_(block.bn2.weight)

    def forward(self, x):
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class TransformerLayer(nn.Module):
    """Post-LayerNorm encoder layer as released: by default only queries and keys are learned
    (value and output projections are identities; `full_attention` learns them too)."""

    def __init__(self, width: int, heads: int, ffn: int, dropout: float, full_attention: bool):
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.v = nn.Linear(width, width) if full_attention else nn.Identity()
        self.out = nn.Linear(width, width) if full_attention else nn.Identity()
        self.norm1, self.norm2 = nn.LayerNorm(width, eps=1e-12), nn.LayerNorm(width, eps=1e-12)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, width))
        self.dropout = dropout

    def forward(self, x, mask=None):
        B, T, D = x.shape
        split = lambda t: t.view(B, T, self.heads, D // self.heads).transpose(1, 2)
        attn = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask,
                                              dropout_p=self.dropout if self.training else 0.0)
        x = self.norm1(x + self.out(attn.transpose(1, 2).reshape(B, T, D)))
        return self.norm2(x + self.ffn(x))


class TemporalPooling(nn.Module):
    """N,T,D time steps (each averaged over space) -> N,D. With layers=0 it is the average over
    time; otherwise a small transformer whose output at the CLS token, or at the first time step as
    released, is the clip's feature. `valid` (N,T) marks the steps of sequences shorter than T
    (time crops batched with whole maps): padding takes no part, so each sequence pools as it
    would alone."""

    def __init__(self, cfg, width: int = 512):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(width, cfg.heads, cfg.ffn, cfg.dropout, cfg.full_attention) for _ in range(cfg.layers))
        self.cls = nn.Parameter(torch.zeros(1, 1, width)) if cfg.layers and cfg.token == "cls" else None
        self.pos = nn.Embedding(cfg.max_steps, width) if cfg.layers and cfg.positional else None
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x, valid=None):
        if not self.layers:
            if valid is None:
                return x.mean(dim=1)
            w = valid.unsqueeze(-1).to(x.dtype)
            return (x * w).sum(dim=1) / w.sum(dim=1)
        if self.pos is not None:
            x = x + self.pos.weight[: x.shape[1]]
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
            valid = None if valid is None else F.pad(valid, (1, 0), value=True)
        mask = None if valid is None else valid[:, None, None, :]  # keys only: padded queries are never read
        for layer in self.layers:
            x = layer(x, mask)
        return x[:, 0]


def time_steps(fmap: torch.Tensor) -> torch.Tensor:
    """A trunk map B,D,T,H,W -> B,T,D: each time step averaged over space, the pooling's input."""
    return fmap.mean(dim=(3, 4)).transpose(1, 2)


def window_tokens(fmaps: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """V maps B,D,T,H,W and pooling weights V,S,T,T*H*W (crops.windows) -> V,S,B,T,D: the time
    steps of every window of every view, in one matmul."""
    x = torch.stack(fmaps).flatten(3)  # V,B,D,T*H*W
    return torch.einsum("vskn,vbdn->vsbkd", weights.to(x.dtype), x)


class Head(nn.Sequential):
    """512 -> 512 -> 256 projection (dropout, BN, ReLU as released); L2 normalisation is applied by the caller."""

    def __init__(self, cin: int = 512, hidden: int = 512, out: int = 256, dropout: float = 0.3):
        super().__init__(nn.Dropout(dropout), nn.Linear(cin, hidden, bias=False), nn.BatchNorm1d(hidden),
                         nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out))

    def forward(self, x, groups: int = 1):
        """x holds `groups` equal runs of clips (a view, a crop): each run's BN statistics are its
        own, as when the released code calls the head once per crop."""
        drop1, fc1, bn, relu, drop2, fc2 = self
        return fc2(drop2(relu(grouped_batch_norm(bn, fc1(drop1(x)), groups))))


class Stica(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.video = R2Plus1D18(cfg.width, cfg.zero_init_residual, cfg.conv)
        self.audio = ResNet9Audio(cfg.width, cfg.zero_init_residual)
        self.pool = TemporalPooling(cfg.transformer, self.video.out_dim)
        self.video_head = Head(self.video.out_dim, cfg.head_hidden, cfg.embed_dim, cfg.head_dropout)
        self.audio_head = Head(self.audio.out_dim, cfg.head_hidden, cfg.embed_dim, cfg.head_dropout)

    def forward(self, views: list[torch.Tensor], spec: torch.Tensor, windows=None) -> dict:
        """All embeddings of a training step in one call (DDP needs its forward to see them all).
        video: V,S,B,E, window 0 of each view its whole map and windows 1.. its feature crops
        (`windows`: the weights and valid steps of crops.windows, for views of one size; None:
        each view's whole map only); audio: B,E."""
        fmaps = [self.video(v) for v in views]  # separate passes: BN statistics per view, as released
        return {"video": self.embed_maps(fmaps, windows), "audio": self.embed_audio(spec)}

    def embed_maps(self, fmaps: list[torch.Tensor], windows=None) -> torch.Tensor:
        """The region after the video trunk (train.compile=heads compiles it): the trunk maps of
        the views -> V,S,B,E, through the crop windows (or each whole map), pooling and head."""
        if windows is None:
            tokens, valid = torch.stack([time_steps(f) for f in fmaps])[:, None], None
        else:
            tokens, valid = window_tokens(fmaps, windows[0]), windows[1]
        return self.embed_tokens(tokens, valid)

    def embed_tokens(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Time steps V,S,B,T,D of S windows of V views -> unit-norm embeddings V,S,B,E: pooled over
        time (valid: S,T), projected. Every window goes through the path of the whole clip, all in
        one call; the head normalises each (view, window) with its own batch statistics."""
        V, S, B, T, D = tokens.shape
        if valid is not None:
            valid = valid[None, :, None].expand(V, S, B, T).reshape(-1, T)
        z = self.video_head(self.pool(tokens.reshape(-1, T, D), valid), groups=V * S)
        return F.normalize(z, dim=1).view(V, S, B, -1)

    def embed_video(self, clips: torch.Tensor) -> torch.Tensor:
        """Whole clips B,3,T,H,W -> unit-norm B,E (the pretraining head's embedding)."""
        return self.embed_tokens(time_steps(self.video(clips))[None, None])[0, 0]

    def embed_audio(self, spec: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.audio_head(self.audio(spec)), dim=1)


def feature_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Shape T,H,W of R2Plus1D18's output map: spatial stride 2 in the stem and three stages,
    temporal stride 2 in three stages (4x7x7 for 30x112x112, 8x7x7 for 60 frames)."""
    half = lambda n: (n - 1) // 2 + 1
    h, w = half(height), half(width)
    for _ in range(3):
        frames, h, w = half(frames), half(h), half(w)
    return frames, h, w
