"""Layers shared by more than one model.

Shapes: B batch, T sequence length, D width, H heads, K head width.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich, 2019), computed in fp32.

    Matches ``torch.nn.RMSNorm(dim, eps)``; the output is fp32 whatever the input's dtype,
    so that the residual stream stays fp32 under autocast (paper appendix A).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x * self.weight.float()


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al.) over the sequence axis, half-split layout.

    ``forward(q, k)`` takes (B, H, T, K) tensors and returns them rotated. The frequencies are
    a buffer (not saved) and the angles are computed in fp32 for any length, so the model
    runs on sequences longer than those it was trained on.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head width, got {head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.arange(q.shape[-2], device=q.device, dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq)  # (T, K/2)
        cos, sin = angles.cos(), angles.sin()
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """The fixed 1D sinusoid position table of "Attention is all you need", (P, D) float32.

    Even channels take sin, odd channels cos, of ``pos / 10000^(2*(i//2)/dim)`` (the layout
    VideoMAE and VideoMAE V2 use; computed in float64 then rounded, as they do).
    """
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    i = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.empty_like(angle)
    table[:, 0::2] = torch.sin(angle[:, 0::2])
    table[:, 1::2] = torch.cos(angle[:, 1::2])
    return table.float()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of flow time ``t`` in [0, 1] (any shape) → ``(*t.shape, dim)``, fp32.

    ``t`` is scaled by 1000 so that the frequencies cover the unit interval well (as DiT does
    with integer diffusion steps).
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[..., None] * freqs
    emb = torch.cat((args.cos(), args.sin()), dim=-1)
    return F.pad(emb, (0, dim % 2))



def mkl_packing_available() -> bool:
    """Whether this torch can multiply by MKL-packed weights (x86 builds with MKL)."""
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class _PackedLinear:
    """The forward of one ``nn.Linear`` inside :func:`packed_linears`."""

    def __init__(self, linear: nn.Linear):
        self.linear, self.rows, self.packed = linear, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        rows = x.numel() // weight.shape[1]
        plain = (x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
                 or torch.is_autocast_enabled("cpu")
                 or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))
        if not plain and self.packed is None:
            self.rows, self.packed = rows, torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
        if plain or rows != self.rows:
            return F.linear(x, weight, bias)
        return torch.ops.mkl._mkl_linear(x, self.packed, weight, bias, rows)


@contextlib.contextmanager
def packed_linears(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every fp32 CPU ``nn.Linear`` of ``module`` multiplies by a copy of its
    weight that MKL packed once (``cblas_sgemm_pack``), for the row count of its first input,
    instead of packing the weight again inside every product. It pays where the same small
    products repeat: the DiT's sampling (about 200 rows a product for 10 s, 25 steps) runs its
    GEMMs ~30 % faster on an AVX-512 Xeon (recipes/benchmark.py). Inputs of another row count,
    or that need gradients, take the plain product; the packed copies (about the weights' size)
    are freed on leaving. A no-op where MKL is not available or ``enabled`` is False."""
    linears = []
    if enabled and mkl_packing_available():
        linears = [m for m in module.modules() if type(m) is nn.Linear
                   and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    for m in linears:
        m.forward = _PackedLinear(m)
    try:
        yield
    finally:
        for m in linears:
            del m.forward
