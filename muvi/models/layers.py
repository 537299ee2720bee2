"""Layers shared by more than one model.

Shapes: B batch, T sequence length, D width, H heads, K head width.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

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


def _plain_only(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of ``x`` by ``weight`` must take torch's plain path: anything but a
    contiguous fp32 CPU input at inference (no autocast, no gradient to record)."""
    return (x.dtype != torch.float32 or x.device.type != "cpu" or not x.is_contiguous()
            or torch.is_autocast_enabled("cpu")
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


@contextlib.contextmanager
def _forwards_replaced(modules: list[nn.Module], make: Callable[[nn.Module], Callable]) -> Iterator[None]:
    """Within the block, each of ``modules`` runs ``make(module)`` as its forward (an instance
    attribute over the class's); its own forward again on leaving."""
    for m in modules:
        m.forward = make(m)
    try:
        yield
    finally:
        for m in modules:
            vars(m).pop("forward", None)  # (another caller may have left first)


class _PackedLinear:
    """The forward of one ``nn.Linear`` inside :func:`packed_linears`."""

    def __init__(self, linear: nn.Linear):
        self.linear, self.rows, self.packed = linear, None, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias
        rows = x.numel() // weight.shape[1]
        plain = _plain_only(x, weight)
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
    with _forwards_replaced(linears, _PackedLinear):
        yield


class _FusedGeluMlp:
    """The forward of one ``fc1 → GELU → fc2`` MLP inside :func:`fused_gelu_mlps`."""

    def __init__(self, mlp: nn.Module):
        self.mlp, self.weight = mlp, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        if mlp.training or _plain_only(x, mlp.fc1.weight):
            return type(mlp).forward(mlp, x)
        rows = x.reshape(-1, x.shape[-1])
        if self.weight is None:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(mlp.fc1.weight.detach(), rows.shape[0])
        hidden = torch.ops.mkldnn._linear_pointwise(rows, self.weight, mlp.fc1.bias, "gelu", [], "none")
        return mlp.fc2(hidden.view(*x.shape[:-1], -1))


def _is_gelu_mlp(m: nn.Module) -> bool:
    """timm's ``Mlp`` with exact GELU and nothing between the layers (a ViT's, VideoMAE's)."""
    return (isinstance(getattr(m, "fc1", None), nn.Linear) and isinstance(getattr(m, "fc2", None), nn.Linear)
            and type(getattr(m, "act", None)) is nn.GELU and m.act.approximate == "none"
            and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
            and all(type(getattr(m, name, nn.Identity())) in (nn.Identity, nn.Dropout) for name in ("drop1", "drop2")))


@contextlib.contextmanager
def fused_gelu_mlps(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every ``fc1 → exact GELU → fc2`` MLP of ``module`` (timm's ``Mlp``) runs
    its first product and the GELU as one oneDNN primitive (weight reordered once, the GELU
    applied as the product's output is written) instead of a GEMM, a pass to broadcast the bias
    and a pass for the GELU: the ViT-B encoder's widest product and its activation, ~30 % less
    time on an AVX-512 Xeon (recipes/benchmark.py). fp32 CPU inference only; anything else takes
    the module's own forward. A no-op where oneDNN is missing or ``enabled`` is False."""
    mlps = []
    if enabled and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        mlps = [m for m in module.modules() if _is_gelu_mlp(m)]
    with _forwards_replaced(mlps, _FusedGeluMlp):
        yield
