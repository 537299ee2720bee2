"""CLIP ViT image encoder (Radford et al., 2021) applied frame by frame: the MuVi paper's
table-1 alternative to VideoMAE V2 (per-frame CLIP image features; ViT-B/16 at 224 px).

Two published key layouts load, strictly, and convert to the same weights:

- OpenAI's release (``clip/model.py``, ``VisionTransformer`` under ``visual.``; also open_clip's
  files of the OpenAI models): ``visual.conv1``, ``visual.class_embedding``,
  ``visual.positional_embedding``, ``visual.ln_pre``, ``visual.transformer.resblocks.N.{ln_1,
  attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``,
  ``visual.ln_post``, ``visual.proj``. These are muvi's own names too, without ``visual.``.
- transformers' ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel``
  (``vision_model.embeddings.{patch_embedding, class_embedding, position_embedding}``,
  ``pre_layrnorm``, ``encoder.layers.N.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
  mlp.fc1, mlp.fc2}``, ``post_layernorm``; transformers 5 saves a ``CLIPVisionModel`` without
  the ``vision_model.`` prefix, which is read too). Separate q/k/v matrices are stacked, in that
  order, into the release's fused ``in_proj``.

The text tower, the projection into the joint image-text space (``visual.proj``,
``visual_projection``) and the temperature are not used: they are dropped and named in one
INFO log line. Any other unknown tensor is an error. OpenAI's own ``.pt`` files are TorchScript
archives, which are not read (unpickling them could run code): save their ``state_dict()`` once.

Architecture: a bias-free patch Conv2d, a learned class token, learned absolute positions (1 +
h*w of them), a LayerNorm BEFORE the blocks (``ln_pre``), pre-norm blocks (LayerNorm eps 1e-5,
attention scale ``head_width ** -0.5``, MLP 4x), and ``ln_post`` on the class token only. The
MLP activation is QuickGELU, x * sigmoid(1.702 x), in every OpenAI model (transformers'
``hidden_act="quick_gelu"``); exact GELU is a config choice (LAION's OpenCLIP ViTs use it).
The weights cannot tell the two apart: a transformers ``config.json`` beside the weights
supplies it (with the LayerNorm eps and the head count), otherwise QuickGELU is assumed.

Output, per frame, in transformers' conventions: the patch tokens are ``last_hidden_state[:, 1:]``
(the last block's output, NOT normalised: ln_post was trained on the class token alone, and
VideoMAE's tokens are un-normalised block outputs too), as the (h, w) grid the visual adaptor
reads; the CLS token is ``pooler_output`` = ln_post(last_hidden_state[:, 0]), CLIP's image
feature before its projection, the query of the adaptor's ``attention`` and ``cls`` aggregations.
At 224 px / patch 16 the grid is 14 x 14, VideoMAE's, so the adaptor's stride-2 conv gives 7 x 7.

Time: one token step per ``tubelet_size`` frames (default 1: every frame its own step, 10 Hz at
10 FPS, the latent rate); with more, grids and CLS tokens of a step are averaged.

Shapes: B videos, F frames, N = B*F images, C colour channels, h x w patch grid, L = 1 + h*w
tokens (CLS first), D width, S = ceil(F / tubelet_size) token steps.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from muvi.checkpoint import CheckpointError, load_strict, read_state_dict
from muvi.config import Config, read_json
from muvi.video import standardize

logger = logging.getLogger(__name__)

#: per-channel statistics of frames scaled to [0, 1] that CLIP was trained with (OpenAI's release).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): OpenAI's cheap approximation of GELU, which its CLIP weights need."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


@dataclasses.dataclass
class CLIPEncoderConfig(Config):
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-5
    #: the MLP's: "quick_gelu" (every OpenAI model) or "gelu" (exact, erf).
    activation: str = "quick_gelu"
    #: frames averaged into one token step (1: per-frame features, as CLIP is an image model).
    tubelet_size: int = 1
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD

    PRESETS = {
        "b16": {},  # ViT-B/16, the paper's: width 768, 12 layers, 12 heads
        # heads of OpenAI's width 64, so that a bare checkpoint's inferred config is this one
        "tiny": dict(image_size=32, patch_size=8, hidden_size=128, depth=2, num_heads=2),
    }

    def __post_init__(self):
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            problems.append(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.activation not in ACTIVATIONS:
            problems.append(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.tubelet_size < 1:
            problems.append(f"tubelet_size must be >= 1, got {self.tubelet_size}")
        if not len(self.mean) == len(self.std) == self.in_channels:
            problems.append(f"mean/std need {self.in_channels} values each")
        if problems:
            raise ValueError("invalid CLIPEncoderConfig: " + "; ".join(problems))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """L: the class token and the patches."""
        return 1 + self.grid_size ** 2

    @property
    def mlp_hidden_size(self) -> int:
        return round(self.hidden_size * self.mlp_ratio)

    # VideoMAE-compatible view for code that windows videos clip by clip
    # (muvi.encoders.frames.encode_video_file): a "clip" is one token step.
    @property
    def num_frames(self) -> int:
        return self.tubelet_size

    @property
    def steps_per_clip(self) -> int:
        return 1


class Attention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s tensor names (the release's):
    one fused input projection (rows: q, k, v) and ``out_proj``."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = rearrange(qkv, "n l (three h k) -> three n h l k", three=3, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_width ** -0.5, as CLIP's
        return self.out_proj(rearrange(out, "n h l k -> n l (h k)"))


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, config: CLIPEncoderConfig):
        super().__init__()
        d, eps = config.hidden_size, config.layer_norm_eps
        self.ln_1 = nn.LayerNorm(d, eps=eps)
        self.attn = Attention(d, config.num_heads)
        self.ln_2 = nn.LayerNorm(d, eps=eps)
        self.mlp = nn.Sequential(collections.OrderedDict(
            c_fc=nn.Linear(d, config.mlp_hidden_size), act=ACTIVATIONS[config.activation](),
            c_proj=nn.Linear(config.mlp_hidden_size, d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class CLIPEncoder(nn.Module):
    """The CLIP ViT image tower without its projection, as a per-frame video encoder (module docstring)."""

    def __init__(self, config: CLIPEncoderConfig):
        super().__init__()
        self.config = config
        d, scale = config.hidden_size, config.hidden_size ** -0.5
        self.conv1 = nn.Conv2d(config.in_channels, d, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(d))
        self.positional_embedding = nn.Parameter(scale * torch.randn(config.num_tokens, d))
        self.ln_pre = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.transformer = nn.ModuleDict(
            {"resblocks": nn.ModuleList(ResidualBlock(config) for _ in range(config.depth))})
        self.ln_post = nn.LayerNorm(d, eps=config.layer_norm_eps)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames scaled to [0, 1], (..., C, H, W) → normalised with the config's mean/std."""
        return standardize(frames, self.config.mean, self.config.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (N, C, H, W) at ``image_size`` → last hidden state (N, L, D), CLS first
        (transformers' ``last_hidden_state``: no final norm)."""
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            # The learned position table is defined for exactly this grid.
            raise ValueError(f"CLIPEncoder expects images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(images.shape)}")
        x = rearrange(self.conv1(images), "n d h w -> n (h w) d")
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat((cls, x), dim=1) + self.positional_embedding.to(x.dtype))
        for block in self.transformer["resblocks"]:
            x = block(x)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last hidden state (N, L, D) → the normalised CLS token (N, D) (transformers' ``pooler_output``)."""
        return self.ln_post(hidden[:, 0])

    def encode_with_cls(self, frames: torch.Tensor, max_batch: Optional[int] = 16
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Videos (B, F, C, H, W) normalised → patch tokens (B, S, h, w, D) and CLS tokens (B, S, D),
        the adaptor's ``tokens`` and ``cls``. S = ceil(F / t), t = ``tubelet_size``: step i is the
        mean of frames t*i .. t*i + t - 1 (the last step: the frames that remain). Frames go
        through the network ``max_batch`` at a time (None: all at once); the result does not
        depend on it."""
        if frames.ndim != 5 or frames.shape[1] < 1:
            raise ValueError(f"encode expects frames (B, F >= 1, C, H, W), got {tuple(frames.shape)}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        batch = frames.shape[0]
        images = frames.flatten(0, 1)
        chunk = max_batch or images.shape[0]
        grids, pooled = [], []
        for i in range(0, images.shape[0], chunk):
            hidden = self(images[i:i + chunk])
            grids.append(rearrange(hidden[:, 1:], "n (h w) d -> n h w d", h=self.config.grid_size))
            pooled.append(self.pool(hidden))
        t = self.config.tubelet_size
        return (_average_steps(torch.cat(grids).unflatten(0, (batch, -1)), t),
                _average_steps(torch.cat(pooled).unflatten(0, (batch, -1)), t))

    def encode(self, frames: torch.Tensor, max_batch: Optional[int] = 16) -> torch.Tensor:
        """Videos (B, F, C, H, W) normalised → patch tokens (B, S, h, w, D) (:meth:`encode_with_cls`)."""
        return self.encode_with_cls(frames, max_batch)[0]


def _average_steps(x: torch.Tensor, t: int) -> torch.Tensor:
    """(B, F, ...) → (B, ceil(F / t), ...): the mean of each run of t frames (the last may be shorter)."""
    if t == 1:
        return x
    full = x.shape[1] - x.shape[1] % t
    steps = [x[:, :full].unflatten(1, (-1, t)).mean(2)]
    if full < x.shape[1]:
        steps.append(x[:, full:].mean(1, keepdim=True))
    return torch.cat(steps, dim=1)


# ----------------------------------------------------------------------------------------------
# Checkpoints

#: transformers names (after ``vision_model.``) → ours, outside the layers.
_HF_NAMES = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight", "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight", "post_layernorm.bias": "ln_post.bias",
}
#: transformers module names inside ``encoder.layers.N.`` → ours inside ``transformer.resblocks.N.``.
_HF_LAYER_MODULES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                     "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_HF_QKV = ("q", "k", "v")  # row order of the release's fused in_proj

#: Published tensors the encoder does not use, by layout (a name, or a prefix ending in "."), with why.
_JOINT = "projection into the joint image-text space"
_UNUSED = {
    "transformers": {"text_model.": "text tower", "text_projection.weight": "text tower",
                     "logit_scale": "temperature", "visual_projection.weight": _JOINT,
                     "vision_model.embeddings.position_ids": "position indices",
                     "embeddings.position_ids": "position indices"},
    "openai": {"transformer.": "text tower", "token_embedding.": "text tower", "positional_embedding": "text tower",
               "ln_final.": "text tower", "text_projection": "text tower", "logit_scale": "temperature",
               "visual.proj": _JOINT, "input_resolution": "hyper-parameters",
               "context_length": "hyper-parameters", "vocab_size": "hyper-parameters"},
    "muvi": {},
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def clip_layout(state: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``"transformers"``, ``"openai"``, ``"muvi"`` (a component saved by muvi), or None when
    ``state`` is not a CLIP image tower in any of them."""
    keys = {_strip_wrappers(k) for k in state}
    if any(k.startswith(("vision_model.embeddings.", "embeddings.patch_embedding.")) for k in keys):
        return "transformers"
    if any(k.startswith("visual.") for k in keys):
        return "openai"
    if {"conv1.weight", "class_embedding", "positional_embedding"} <= keys:
        return "muvi"
    return None


def _unused(key: str, names: Mapping[str, str]) -> Optional[str]:
    for name, why in names.items():
        if key == name or (name.endswith(".") and key.startswith(name)):
            return why
    return None


def convert_hf_clip_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' vision-tower names (with or without ``vision_model.``) → ours; q/k/v stacked
    into ``in_proj_weight``/``in_proj_bias``. Keys it does not know keep their names (and an
    incomplete q/k/v set its parts), so that a strict load reports them."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        name = key.removeprefix("vision_model.")
        layer = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if name in _HF_NAMES:
            out[_HF_NAMES[name]] = value
        elif layer:
            index, module, param = layer.groups()
            part = re.fullmatch(r"self_attn\.([qkv])_proj", module)
            if part:
                qkv.setdefault((index, param), {})[part.group(1)] = (key, value)
            elif module in _HF_LAYER_MODULES:
                out[f"transformer.resblocks.{index}.{_HF_LAYER_MODULES[module]}.{param}"] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (index, param), parts in qkv.items():
        if set(parts) == set(_HF_QKV):
            out[f"transformer.resblocks.{index}.attn.in_proj_{param}"] = torch.cat([parts[p][1] for p in _HF_QKV])
        else:
            out.update(dict(parts.values()))
    return out


def prepare_clip_state_dict(state: Mapping[str, torch.Tensor], *, source: str = "checkpoint"
                            ) -> dict[str, torch.Tensor]:
    """Any supported layout (module docstring) → our names. Tensors the encoder does not use are
    dropped and named in one INFO log line; everything else is left for a strict load to check."""
    layout = clip_layout(state)
    if layout is None:
        raise CheckpointError(f"{source}: not a CLIP ViT checkpoint (no vision_model.* or visual.* tensors); "
                              f"keys start with {sorted(state)[:6]}")
    state = {_strip_wrappers(k): v for k, v in state.items()}
    if layout == "openai" and any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in state):
        raise CheckpointError(f"{source}: a ResNet CLIP (visual.layer1 / visual.attnpool); only the ViT "
                              "models (e.g. ViT-B/16) are supported")
    dropped = {k: why for k in state if (why := _unused(k, _UNUSED[layout]))}
    if dropped:
        logger.info("%s: dropping %d tensors the encoder does not use (%s)", source, len(dropped),
                    "; ".join(sorted(set(dropped.values()))))
    state = {k: v for k, v in state.items() if k not in dropped}
    if layout == "transformers":
        return convert_hf_clip_state_dict(state)
    if layout == "openai":
        return {k.removeprefix("visual."): v for k, v in state.items()}
    return state


def hf_config_fields(folder: str | Path) -> dict:
    """The fields the weights cannot show (activation, LayerNorm eps, head count) from a
    transformers ``config.json`` of a CLIP model in ``folder``; {} when there is none."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    if data.get("model_type") == "clip":
        data = data.get("vision_config") or {}
    elif data.get("model_type") != "clip_vision_model":
        return {}
    names = {"hidden_act": "activation", "layer_norm_eps": "layer_norm_eps", "num_attention_heads": "num_heads"}
    return {ours: data[theirs] for theirs, ours in names.items() if theirs in data}


def infer_clip_config(state: Mapping[str, torch.Tensor], *, head_dim: int = 64, source: str = "checkpoint",
                      **fields) -> CLIPEncoderConfig:
    """Sizes from tensor shapes (in our names): width, patch, channels, image size (from the
    position table), depth, MLP ratio; heads = width / ``head_dim`` (OpenAI's rule). ``fields``
    override the rest (activation, layer_norm_eps, num_heads, tubelet_size)."""
    conv, table = state.get("conv1.weight"), state.get("positional_embedding")
    if conv is None or conv.ndim != 4 or table is None or table.ndim != 2:
        raise CheckpointError(f"{source}: no 4-D conv1.weight and 2-D positional_embedding; not a CLIP ViT? "
                              f"keys start with {sorted(state)[:6]}")
    width, channels, patch, patch_w = conv.shape
    grid = math.isqrt(table.shape[0] - 1)
    if patch != patch_w or grid * grid + 1 != table.shape[0]:
        raise CheckpointError(f"{source}: patches {patch}x{patch_w} and {table.shape[0]} positions are not "
                              "a square grid plus a class token")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks:
        raise CheckpointError(f"{source}: no transformer blocks (transformer.resblocks.N.*) found")
    fc = state.get("transformer.resblocks.0.mlp.c_fc.weight")
    sizes = dict(image_size=grid * patch, patch_size=patch, in_channels=channels, hidden_size=width,
                 depth=max(blocks) + 1, num_heads=max(1, width // head_dim),
                 mlp_ratio=fc.shape[0] / width if fc is not None else CLIPEncoderConfig.mlp_ratio)
    try:
        return CLIPEncoderConfig(**{**sizes, **fields})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: {err}") from None


def load_clip_encoder(path: str | Path, config: Optional[CLIPEncoderConfig] = None, *,
                      state: Optional[Mapping[str, torch.Tensor]] = None) -> CLIPEncoder:
    """Load a CLIP ViT image encoder from a ``.bin``/``.pt``/``.safetensors`` file in the OpenAI,
    transformers or muvi layout; returned frozen (eval mode, no gradients).

    ``config=None`` infers the sizes from the tensor shapes, and takes the activation, LayerNorm
    eps and heads from a transformers ``config.json`` beside the file when there is one
    (:func:`hf_config_fields`). ``state``: the file's contents when the caller has read them
    already. Raises ``CheckpointError`` listing every missing, unexpected or mis-shaped tensor.
    """
    source = str(path)
    raw = read_state_dict(path) if state is None else state
    layout = clip_layout(raw)
    prepared = prepare_clip_state_dict(raw, source=source)
    if config is None:
        fields = hf_config_fields(Path(path).parent) if layout == "transformers" else {}
        config = infer_clip_config(prepared, source=source, **fields)
    model = CLIPEncoder(config)
    load_strict(model, prepared, source=source)
    logger.info("CLIP ViT encoder (%s layout; width %d, %d layers, patch %d, %s; %d x %d tokens per frame) "
                "from %s", layout, config.hidden_size, config.depth, config.patch_size, config.activation,
                config.grid_size, config.grid_size, source)
    return model.eval().requires_grad_(False)
