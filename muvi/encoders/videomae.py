"""VideoMAE V2 ViT video encoder (Wang et al., 2023): MuVi's frozen visual encoder.

The published ``.pth`` files of the OpenGVLab/VideoMAEv2 release (``models/modeling_finetune.py``,
``VisionTransformer``; e.g. the distilled ViT-B/16 ``vit_b_k710_dl_from_giant.pth``, the paper's
choice) load by their key names, strictly. The same architecture is VideoMAE v1, so its
checkpoints load too, from either the release or the transformers layout.

Architecture as released: a Conv3d tubelet embedding (tubelet x patch x patch), plus the FIXED
1D sinusoid table over the flattened (time, row, column) token index (recomputed, never stored),
then pre-norm blocks: LayerNorm (eps 1e-6), attention with scale ``head_width ** -0.5``, exact
(erf) GELU MLP, no layer scale (``init_values=0``): timm's ``vision_transformer.Block``, which
the blocks are. The stored tensors differ in one place: the release has a bias-free ``qkv``
matrix plus separate ``q_bias`` and ``v_bias`` and NO key bias, timm one fused ``qkv.bias``. At
load time ``q_bias``/``v_bias`` become ``qkv.bias = [q_bias, 0, v_bias]``: the loaded key bias is
zero, as in the release (a key bias adds the same number to every logit of a query, so softmax
ignores it and its gradient is zero). muvi saves and reloads ``qkv.bias`` as it is.

No final norm: with mean pooling the release sets ``norm`` to Identity and applies ``fc_norm``
only AFTER averaging the tokens, so the per-token last hidden state is the raw output of the last
block (transformers' ``VideoMAEModel`` with ``use_mean_pooling=True`` returns the same).

Shapes: B videos, F frames, C colour channels, N clips, T frames per clip (``num_frames``),
S = T / tubelet token steps per clip, h x w patch grid, L = S*h*w tokens, D width.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from einops import rearrange
from torch import nn

from muvi.checkpoint import CheckpointError, load_strict, read_state_dict
from muvi.config import Config
from muvi.models.layers import fused_gelu_mlps, sinusoid_table
from muvi.video import standardize

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VideoMAEConfig(Config):
    image_size: int = 224
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    in_channels: int = 3
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    #: q/v biases (every released VideoMAE / VideoMAE V2 model has them; the k bias is zero).
    qkv_bias: bool = True
    #: per-channel statistics of frames scaled to [0, 1]: the ImageNet values that the
    #: release's fine-tuning and distillation data pipelines normalise with.
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    PRESETS = {
        "vit-b": {},
        "vit-s": dict(hidden_size=384, num_heads=6),
        "tiny": dict(image_size=32, patch_size=8, hidden_size=32, depth=2, num_heads=2),
    }

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.num_frames % self.tubelet_size:
            problems.append(f"num_frames {self.num_frames} is not a multiple of tubelet_size {self.tubelet_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if not len(self.mean) == len(self.std) == self.in_channels:
            problems.append(f"mean/std need {self.in_channels} values each")
        if problems:
            raise ValueError("invalid VideoMAEConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def steps_per_clip(self) -> int:
        return self.num_frames // self.tubelet_size

    @property
    def num_tokens(self) -> int:
        return self.steps_per_clip * self.grid_size ** 2

    @property
    def mlp_hidden_size(self) -> int:
        # The release uses int(dim * ratio); rounding gives the same integer without the risk
        # of a float just below it (ViT-g's ratio is 48/11).
        return round(self.hidden_size * self.mlp_ratio)


class PatchEmbed(nn.Module):
    """Non-overlapping tubelets (tubelet x patch x patch) projected to D by one Conv3d."""

    def __init__(self, config: VideoMAEConfig):
        super().__init__()
        kernel = (config.tubelet_size, config.patch_size, config.patch_size)
        self.proj = nn.Conv3d(config.in_channels, config.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(clips), "n d s h w -> n (s h w) d")


class VideoMAEEncoder(nn.Module):
    """The VideoMAE (V2) ViT without its classification head; see the module docstring."""

    #: :meth:`encode` on the CPU runs each MLP's first product and GELU as one oneDNN primitive
    #: (:func:`muvi.models.layers.fused_gelu_mlps`); False: timm's own MLP, as ``forward`` always is
    fuse_mlp: bool = True

    def __init__(self, config: VideoMAEConfig):
        from timm.models.vision_transformer import Block  # on use: timm imports torchvision (~2.5 s)

        super().__init__()
        self.config = config
        self.patch_embed = PatchEmbed(config)
        # timm floors dim * mlp_ratio; half a unit over the exact width keeps the float product
        # from landing just below it (e.g. 61 / 448 * 448 < 61).
        mlp_ratio = (config.mlp_hidden_size + 0.5) / config.hidden_size
        norm = functools.partial(nn.LayerNorm, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(config.hidden_size, config.num_heads, mlp_ratio, qkv_bias=config.qkv_bias, norm_layer=norm)
            for _ in range(config.depth))
        if config.qkv_bias:  # the release initialises q_bias and v_bias to zero (and has no k bias)
            for block in self.blocks:
                nn.init.zeros_(block.attn.qkv.bias)
        # Fixed, never trained, never stored in the release's checkpoints: a buffer, not saved.
        self.register_buffer("pos_embed", sinusoid_table(config.num_tokens, config.hidden_size)[None],
                             persistent=False)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames scaled to [0, 1], (..., C, H, W) → normalised with the config's mean/std."""
        return standardize(frames, self.config.mean, self.config.std)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Normalised clips (N, C, T, H, W), T = num_frames → last hidden state (N, S, h, w, D)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.num_frames, cfg.image_size, cfg.image_size)
        if clips.ndim != 5 or tuple(clips.shape[1:]) != expected:
            # The position table is defined for exactly this token layout.
            raise ValueError(f"VideoMAEEncoder expects clips of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(clips.shape)}")
        x = self.patch_embed(clips) + self.pos_embed.to(clips.dtype)
        for block in self.blocks:
            x = block(x)
        return rearrange(x, "n (s h w) d -> n s h w d", s=cfg.steps_per_clip, h=cfg.grid_size)

    def encode(self, frames: torch.Tensor, max_batch: Optional[int] = 4) -> torch.Tensor:
        """Variable-length videos, paper appendix C: (B, F, C, H, W) normalised → (B, ceil(F/t), h, w, D).

        t is the tubelet (2): one token grid per pair of frames. F may be any length >= 1:

        - F not a multiple of t (odd F): the last frame is repeated so that the final pair is
          complete (its token sees that frame twice).
        - F < num_frames: the last frame is replicated up to one clip; only the tokens of the
          real frames are kept.
        - otherwise the video is cut into consecutive num_frames segments; a remainder is NOT
          zero-padded: the final segment is the LAST num_frames frames of the video, and only
          the tokens of its new frames are kept. Since num_frames and the remainder are
          multiples of t, these tokens cover the same frame pairs as the segmentation would.

        The segments of all videos go through the encoder ``max_batch`` clips at a time (None:
        all at once), so memory does not grow with the video's length. Results do not depend
        on ``max_batch``.
        """
        if frames.ndim != 5 or frames.shape[1] < 1:
            raise ValueError(f"encode expects frames (B, F >= 1, C, H, W), got {tuple(frames.shape)}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        cfg = self.config
        batch, num_input, t, clip = frames.shape[0], frames.shape[1], cfg.tubelet_size, cfg.num_frames
        steps = -(-num_input // t)
        length = max(steps * t, clip)
        if length > num_input:
            last = frames[:, -1:]
            frames = torch.cat((frames, last.expand(-1, length - num_input, -1, -1, -1)), dim=1)
        num_full, remainder = divmod(length, clip)
        starts = [i * clip for i in range(num_full)] + ([length - clip] if remainder else [])

        jobs = [(b, s) for b in range(batch) for s in starts]  # video-major, as stacked in appendix C
        chunk = max_batch or len(jobs)
        grids = []
        with fused_gelu_mlps(self, enabled=self.fuse_mlp):
            for i in range(0, len(jobs), chunk):
                clips = torch.stack([frames[b, s:s + clip] for b, s in jobs[i:i + chunk]])
                grids.append(self(rearrange(clips, "n t c h w -> n c t h w")))
        grids = rearrange(torch.cat(grids), "(b n) s h w d -> b n s h w d", b=batch)

        tokens = rearrange(grids[:, :num_full], "b n s h w d -> b (n s) h w d")
        if remainder:
            tokens = torch.cat((tokens, grids[:, -1, cfg.steps_per_clip - remainder // t:]), dim=1)
        return tokens[:, :steps]


# ----------------------------------------------------------------------------------------------
# Checkpoints

#: transformers per-layer names (after ``encoder.layer.N.``) → the release's (after ``blocks.N.``).
_HF_LAYER_NAMES = {
    "attention.attention.q_bias": "attn.q_bias",  # transformers 4.x
    "attention.attention.v_bias": "attn.v_bias",
    "attention.attention.query.bias": "attn.q_bias",  # transformers 5.x
    "attention.attention.value.bias": "attn.v_bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
_HF_QKV = ("query", "key", "value")  # row order of the release's fused qkv matrix

#: Tensors of the release (or transformers) that the encoder does not use, with why.
_UNUSED = {
    "fc_norm": "classification head", "head": "classification head", "classifier": "classification head",
    "norm": "final norm (not applied to per-token states)",
    "decoder": "pre-training decoder", "encoder_to_decoder": "pre-training decoder",
    "mask_token": "pre-training decoder",
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile
_RELEASE_PREFIXES = ("backbone.", "encoder.")  # stripped by the release's own fine-tuning loader


def _is_hf_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return any(re.match(r"(videomae\.)?(encoder\.layer\.|embeddings\.patch_embeddings\.)", k) for k in state)


def convert_hf_videomae_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a transformers ``VideoMAEModel``/``VideoMAEForVideoClassification`` state dict to the
    release's names (``q_bias``/``v_bias`` still separate: :func:`prepare_videomae_state_dict` fuses them).

    Handles keys with or without the ``videomae.`` prefix and both bias spellings (4.x ``q_bias``,
    5.x ``query.bias``); the query, key and value matrices are stacked into ``qkv`` in that order.
    ``layernorm.*`` becomes ``norm.*``; heads and decoders keep their names. Keys it does not
    know are passed through unchanged, so that a strict load reports them.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        name = key[len("videomae."):] if key.startswith("videomae.") else key
        layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", name)
        if layer:
            index, rest = layer.groups()
            part = re.fullmatch(r"attention\.attention\.(query|key|value)\.weight", rest)
            if part:
                qkv.setdefault(index, {})[part.group(1)] = value
            else:
                out[f"blocks.{index}.{_HF_LAYER_NAMES.get(rest, rest)}"] = value
        elif name.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + name.rsplit(".", 1)[1]] = value
        elif name.startswith("layernorm."):
            out["norm." + name[len("layernorm."):]] = value
        else:
            out[name] = value
    for index, parts in qkv.items():
        if set(parts) == set(_HF_QKV):
            out[f"blocks.{index}.attn.qkv.weight"] = torch.cat([parts[p] for p in _HF_QKV])
        else:  # incomplete: keep what is there so the strict load names it
            out.update({f"blocks.{index}.attention.attention.{p}.weight": v for p, v in parts.items()})
    return out


def _strip(key: str, prefixes: tuple[str, ...]) -> str:
    while True:
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key


def _fuse_qv_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``blocks.N.attn.q_bias`` and ``v_bias`` → timm's ``blocks.N.attn.qkv.bias = [q, 0, v]``.

    Only a complete, same-shaped 1-D pair is fused (and only where no ``qkv.bias`` is stored
    too); anything else is left as it is, for the strict load to name.
    """
    out = dict(state)
    for key in state:
        match = re.fullmatch(r"(.*attn\.)q_bias", key)
        if not match:
            continue
        prefix = match.group(1)
        q, v = state[key], state.get(prefix + "v_bias")
        if v is None or q.ndim != 1 or q.shape != v.shape or prefix + "qkv.bias" in state:
            continue
        out[prefix + "qkv.bias"] = torch.cat((q, torch.zeros_like(q), v))
        del out[key], out[prefix + "v_bias"]
    return out


def prepare_videomae_state_dict(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
                                ) -> dict[str, torch.Tensor]:
    """Any supported layout (release fine-tuned/distilled/pre-trained, transformers, or muvi's
    own) → our names, the release's with ``q_bias``/``v_bias`` fused into ``qkv.bias`` (module docstring).

    Tensors the encoder does not use (classification head, final norm, pre-training decoder, a
    stored copy of the fixed sinusoid table) are dropped and named in one INFO log line;
    everything else is left for a strict load to check.
    """
    state = {_strip(k, _WRAPPER_PREFIXES): v for k, v in state.items()}
    if _is_hf_layout(state):
        state = convert_hf_videomae_state_dict(state)
    else:
        state = {_strip(k, _RELEASE_PREFIXES): v for k, v in state.items()}
    state = _fuse_qv_biases(state)
    dropped = sorted(k for k in state if k.split(".", 1)[0] in _UNUSED)
    table = state.get("pos_embed")
    if table is not None and table.ndim >= 2 and torch.allclose(
            table.float().reshape(table.shape[-2:]), sinusoid_table(*table.shape[-2:]), atol=1e-4):
        dropped.append("pos_embed")  # a learnable table would stay and be reported as unexpected
    if dropped:
        reasons = sorted({_UNUSED.get(k.split(".", 1)[0], "fixed sinusoid table") for k in dropped})
        logger.info("%s: dropping %d tensors the encoder does not use (%s): %s",
                    source, len(dropped), "; ".join(reasons), ", ".join(dropped))
    dropped_set = set(dropped)
    return {k: v for k, v in state.items() if k not in dropped_set}


def infer_videomae_config(state: Mapping[str, torch.Tensor], *, head_dim: int = 64,
                          source: str = "checkpoint") -> VideoMAEConfig:
    """Sizes from tensor shapes (in our names): width, depth, patch, tubelet, channels, MLP ratio.

    Heads are width / ``head_dim`` (64 in every released model). The clip length and image size
    cannot be read from the weights (the position table is not stored): they keep the defaults
    16 frames at 224 px, the only input the released models were trained on.
    """
    proj = state.get("patch_embed.proj.weight")
    if proj is None or proj.ndim != 5:
        raise CheckpointError(f"{source}: no 5-D patch_embed.proj.weight; not a VideoMAE checkpoint? "
                              f"keys start with {sorted(state)[:8]}")
    width, channels, tubelet, patch, patch_w = proj.shape
    if patch != patch_w:
        raise CheckpointError(f"{source}: non-square patches {patch}x{patch_w} are not supported")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(f"{source}: no transformer blocks (blocks.N.*) found")
    if width % head_dim:
        raise CheckpointError(f"{source}: width {width} is not a multiple of the head width {head_dim}; "
                              "pass an explicit VideoMAEConfig")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    ratio = fc1.shape[0] / width if fc1 is not None else VideoMAEConfig.mlp_ratio
    # Non-RGB input has no known statistics: neutral ones keep the config valid.
    stats = {} if channels == len(VideoMAEConfig.mean) else dict(mean=(0.5,) * channels, std=(0.5,) * channels)
    return VideoMAEConfig(patch_size=patch, tubelet_size=tubelet, in_channels=channels, hidden_size=width,
                          depth=max(blocks) + 1, num_heads=width // head_dim, mlp_ratio=ratio,
                          qkv_bias="blocks.0.attn.qkv.bias" in state, **stats)


def load_videomae_encoder(path: str | Path, config: Optional[VideoMAEConfig] = None, *,
                          state: Optional[Mapping[str, torch.Tensor]] = None) -> VideoMAEEncoder:
    """Load a VideoMAE (V2) encoder from a release ``.pth`` or a safetensors/PyTorch file in our
    or the transformers layout; returned frozen (eval mode, no gradients) as MuVi uses it.

    ``config=None`` infers the sizes from the tensor shapes (see ``infer_videomae_config``).
    ``state``: the file's contents when the caller has read them already.
    Raises ``CheckpointError`` listing every missing, unexpected or mis-shaped tensor.
    """
    source = str(path)
    state = prepare_videomae_state_dict(read_state_dict(path) if state is None else state, source=source)
    if config is None:
        config = infer_videomae_config(state, source=source)
    model = VideoMAEEncoder(config)
    load_strict(model, state, source=source)
    return model.eval().requires_grad_(False)
