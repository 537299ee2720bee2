"""The DiT velocity network of MuVi (paper section 3.3, appendix A).

A LLaMA-style transformer over the latent sequence: RoPE, RMSNorm, SwiGLU feed-forward,
pre-norm residual blocks. Its input is the element-wise SUM of three projections, frame by
frame: the noisy latent, the visual condition and the flow time (channel-wise fusion, no
cross-attention). Unconditional generation uses a learnable null embedding repeated over time;
it doubles as the null branch of classifier-free guidance.

Mixed precision as in appendix A: the residual stream and the norms stay fp32 under autocast;
attention and feed-forward matmuls run in the autocast dtype.

Shapes: B batch, T latent frames, C latent channels, D width, H heads, K head width.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from muvi.config import Config
from muvi.models.layers import RMSNorm, RotaryEmbedding, timestep_embedding

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class DiTConfig(Config):
    latent_channels: int = 8
    width: int = 1024
    depth: int = 12
    num_heads: int = 16
    #: SwiGLU hidden width = ffn_mult * width, rounded up to a multiple of 64 (LLaMA).
    ffn_mult: float = 8 / 3
    time_embed_dim: int = 256
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    #: width of the condition fed in; None means the DiT width (the adaptor's output).
    cond_dim: Optional[int] = None

    PRESETS = {
        "small": dict(width=768, depth=12, num_heads=16),
        "base": dict(width=1024, depth=12, num_heads=16),
        "large": dict(width=1280, depth=16, num_heads=16),
        "tiny": dict(width=64, depth=2, num_heads=4),
    }

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def ffn_width(self) -> int:
        return 64 * -(-int(self.ffn_mult * self.width) // 64)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)
        self.rope = RotaryEmbedding(cfg.width // cfg.num_heads, cfg.rope_base)

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3×(B,H,T,K)
        q, k = self.rope(q, k)
        o = _attention(q, k, v, key_padding)
        return self.out(o.transpose(1, 2).reshape(b, t, -1))


def _attention(q, k, v, key_padding: Optional[torch.Tensor]) -> torch.Tensor:
    """Flash attention on CUDA when installed and no mask is needed, torch SDPA otherwise."""
    if key_padding is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            pass
        else:  # flash_attn takes (B, T, H, K)
            return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    mask = None if key_padding is None else key_padding[:, None, None, :]  # (B,1,1,T), True = attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SwiGLU(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(width, hidden, bias=False)
        self.up = nn.Linear(width, hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.width, cfg.ffn_width)

    def forward(self, x: torch.Tensor, key_padding: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x is the fp32 residual stream; branch outputs are cast back to fp32 before the sum.
        x = x + self.attn(self.attn_norm(x), key_padding).float()
        return x + self.ffn(self.ffn_norm(x)).float()


class DiT(nn.Module):
    """Velocity network ``v(x_t, t, c)`` of rectified flow.

    ``forward(x (B,T,C), t (B,) or (B,T), cond (B,T,D) or None)``; ``cond=None`` means the
    null condition. ``valid`` (B, T) marks real frames of a padded batch (attention ignores the
    rest). Returns the velocity (B, T, C) in fp32.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.width
        self.x_proj = nn.Linear(cfg.latent_channels, d)
        self.cond_proj = nn.Linear(cfg.cond_dim or d, d)
        self.time_mlp = nn.Sequential(nn.Linear(cfg.time_embed_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.null_cond = nn.Parameter(torch.zeros(cfg.cond_dim or d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.out = nn.Linear(d, cfg.latent_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.null_cond, std=0.02)
        # Start as a zero velocity field, as DiT zero-initialises its final layer.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def null_condition(self, batch: int, frames: int) -> torch.Tensor:
        """The learnable unconditional embedding repeated over time: (B, T, D)."""
        return self.null_cond.expand(batch, frames, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Optional[torch.Tensor] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        if cond is None:
            cond = self.null_condition(b, n)
        if cond.shape[:2] != (b, n):
            raise ValueError(f"condition has {tuple(cond.shape[:2])} (batch, frames) but the latent "
                             f"has {(b, n)}; resample the condition to the latent rate first")
        t = t.reshape(b, -1).expand(b, n) if t.numel() == b else t.reshape(b, n)
        temb = self.time_mlp(timestep_embedding(t, self.config.time_embed_dim))
        h = (self.x_proj(x) + self.cond_proj(cond) + temb).float()
        for block in self.blocks:
            h = block(h, valid)
        return self.out(self.norm(h)).float()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def no_weight_decay(self) -> set[str]:
        """Parameters to train without weight decay (timm's convention, read by
        ``muvi.training.param_groups``): the null condition is a learned embedding, which decay
        would only pull toward zero."""
        return {"null_cond"}
