"""The visual adaptor of MuVi (paper section 3.1, appendix A).

It compresses the patch tokens of a frozen video encoder into one vector per time step and
resamples them to the latent rate, so the condition can be summed frame by frame with the
noisy latent. Steps: a 2D conv with stride 2 over the patch grid (14×14 → 7×7 for ViT-B/16 at
224 px), one aggregation over the patches, a linear layer to the DiT width, then linear
interpolation in time to the requested number of latent frames.

Aggregations (``AdaptorConfig.aggregation``):

* ``softmax`` (default): a conv (kernel 3, ``num_gates`` = 4 filters) gives 4 weight maps; a
  softmax over patches turns each into a distribution; 4 weighted averages, then their mean.
* ``sigmoid``: the same with sigmoid gates; each group's weighted sum is divided by the sum of
  its weights (so each group's weights sum to 1).
* ``attention``: single-query multi-head attention pooling with the encoder's CLS token as the
  query and the downsampled patches as keys and values (needs a CLS token).
* ``mean``: the average of the downsampled patches. ``cls``: the CLS token alone.

All hidden sizes equal the DiT width (appendix A).

Shapes: B batch, N encoder time steps, H×W patch grid, E encoder width, D width, T latent frames.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from muvi.config import Config

AGGREGATIONS = ("softmax", "sigmoid", "attention", "mean", "cls")


@dataclasses.dataclass
class AdaptorConfig(Config):
    encoder_dim: int = 768
    width: int = 1024
    aggregation: str = "softmax"
    num_gates: int = 4
    gate_kernel: int = 3
    num_heads: int = 4

    PRESETS = {
        "base": dict(encoder_dim=768, width=1024),
        "tiny": dict(encoder_dim=32, width=64),
    }

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; choose from {AGGREGATIONS}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")


class VisualAdaptor(nn.Module):
    """``forward(tokens (B,N,H,W,E), num_frames=T, cls=(B,N,E) or None) -> (B, T, D)``."""

    def __init__(self, cfg: AdaptorConfig):
        super().__init__()
        self.config = cfg
        d, agg = cfg.width, cfg.aggregation
        self.down = nn.Conv2d(cfg.encoder_dim, d, kernel_size=3, stride=2, padding=1)
        if agg in ("softmax", "sigmoid"):
            self.gate = nn.Conv2d(d, cfg.num_gates, cfg.gate_kernel, padding=cfg.gate_kernel // 2)
        if agg == "attention":
            self.cls_proj = nn.Linear(cfg.encoder_dim, d)
            self.query = nn.Linear(d, d)
            self.key = nn.Linear(d, d)
            self.value = nn.Linear(d, d)
        if agg == "cls":
            self.cls_proj = nn.Linear(cfg.encoder_dim, d)
        self.out = nn.Linear(d, d)

    @property
    def needs_cls(self) -> bool:
        return self.config.aggregation in ("attention", "cls")

    def aggregate(self, tokens: torch.Tensor, cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One vector per encoder time step: (B, N, H, W, E) → (B, N, D)."""
        b, n = tokens.shape[:2]
        agg = self.config.aggregation
        if self.needs_cls and cls is None:
            raise ValueError(f"the {agg!r} aggregation needs the encoder's CLS tokens")
        if agg == "cls":
            return self.out(self.cls_proj(cls))
        grid = self.down(rearrange(tokens, "b n h w e -> (b n) e h w"))  # (BN, D, h, w)
        patches = rearrange(grid, "bn d h w -> bn (h w) d")
        if agg == "mean":
            pooled = patches.mean(1)
        elif agg in ("softmax", "sigmoid"):
            logits = rearrange(self.gate(grid), "bn g h w -> bn g (h w)")
            if agg == "softmax":
                weights = logits.softmax(-1)
            else:
                weights = torch.sigmoid(logits)
                weights = weights / weights.sum(-1, keepdim=True)
            pooled = torch.einsum("bgp,bpd->bgd", weights, patches).mean(1)
        else:  # attention pooling: CLS queries the patches
            heads = self.config.num_heads
            q = rearrange(self.query(self.cls_proj(cls.reshape(b * n, -1)))[:, None],
                          "bn one (h k) -> bn h one k", h=heads)
            k = rearrange(self.key(patches), "bn p (h k) -> bn h p k", h=heads)
            v = rearrange(self.value(patches), "bn p (h k) -> bn h p k", h=heads)
            pooled = rearrange(F.scaled_dot_product_attention(q, k, v), "bn h one k -> bn (one h k)")
        return self.out(pooled).view(b, n, -1)

    def forward(self, tokens: torch.Tensor, num_frames: int, cls: Optional[torch.Tensor] = None) -> torch.Tensor:
        return resample_time(self.aggregate(tokens, cls), num_frames)


def resample_time(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Linear interpolation of (B, N, D) to (B, num_frames, D) along time (paper appendix F)."""
    if x.shape[1] == num_frames:
        return x
    out = F.interpolate(x.transpose(1, 2).float(), size=num_frames, mode="linear", align_corners=False)
    return out.transpose(1, 2).to(x.dtype)
