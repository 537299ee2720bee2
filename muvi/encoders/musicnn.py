"""musicnn music-tagging networks in PyTorch, loaded from the package's TensorFlow checkpoints.

muvi's offline audio-quality metrics (Fréchet distance, kernel distance, tag KL) need a trained
audio network, and VGGish/PANNs/CLAP weights cannot be downloaded here. The ``musicnn`` package
(Pons & Serra, ISMIR 2019 LBD; ISC licence) ships trained tagging networks as TF-1 checkpoints
inside the wheel. This module rebuilds the musicnn architecture in PyTorch and reads those
checkpoints with a pure-Python reader, so TensorFlow is never needed at run time. It is checked
against the original TensorFlow network on real music (tests/test_musicnn.py).

Pipeline, as musicnn's extractor does it: mono audio at 16 kHz (resampled with librosa's default
resampler, as ``librosa.load`` would) -> librosa mel power spectrogram (n_fft 512, hop 256, 96
bins) -> rounded to float16 -> ``log10(10000 * mel + 1)`` in float32 -> patches of 187 frames
(3 s; the last incomplete patch is dropped) -> network -> one row per patch.

Network: a musically motivated front end (after an input batch norm: two "timbral" convolutions
7 frames x 40%/70% of the mel bins and three "temporal" convolutions 128/64/32 frames x 1 bin, each
conv -> ReLU -> batch norm -> max over frequency), a mid end of three 7-frame 1-D convolutions with
residual connections, whose outputs are concatenated with the front end ("dense" connections,
753 channels), and a back end: max and mean over time, batch norm, dense (ReLU, batch norm) and
a linear layer to the tag logits.

Feature taps (musicnn's names): ``penultimate`` (200-d, the batch-normed layer the tags are read
from linearly; the default embedding, small enough for stable covariances), ``mean_pool`` and
``max_pool`` (753-d temporal pools of the mid end). Note that musicnn 0.1.0's own ``extractor``
repeats the first patch's 'penultimate' for every later patch (a bookkeeping bug); this port
returns each patch's own.

Shapes: N patches, T frames per patch, F mel bins, C channels.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muvi.checkpoint import load_strict
from muvi.config import Config

logger = logging.getLogger(__name__)

TAPS = ("penultimate", "mean_pool", "max_pool")
_INSTALL_HINT = ("the musicnn package files are not installed; install them without TensorFlow "
                 "with `pip install --no-deps musicnn==0.1.0` (muvi only reads the checkpoints)")


@dataclasses.dataclass
class MusicnnConfig(Config):
    """Sizes of a musicnn network and its input features (defaults: MTT/MSD_musicnn)."""

    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 256
    n_mels: int = 96
    # librosa>=0.10's STFT padding, which musicnn's extractor gets today; "reflect" reproduces
    # librosa<0.10, the version the models were trained with (only the edge frames differ).
    pad_mode: str = "constant"
    timbral_filters: int = 204  # int(1.6 * 128) in musicnn
    timbral_height_fractions: tuple[float, ...] = (0.4, 0.7)  # kernel height = int(f * n_mels)
    timbral_frames: int = 7
    temporal_filters: int = 51  # int(1.6 * 32)
    temporal_frames: tuple[int, ...] = (128, 64, 32)
    midend_filters: int = 64
    midend_frames: int = 7
    midend_layers: int = 3
    backend_units: int = 200
    num_classes: int = 50
    bn_eps: float = 1e-3  # TF's batch_normalization default
    tag_names: tuple[str, ...] = ()

    PRESETS = {
        "MTT_musicnn": {},
        "MSD_musicnn": {},
        "MSD_musicnn_big": {"midend_filters": 512, "backend_units": 500},  # source install only
    }

    @property
    def hidden_size(self) -> int:
        """Channels of the per-frame features (front end + mid end; 753 for musicnn)."""
        front = (len(self.timbral_height_fractions) * self.timbral_filters
                 + len(self.temporal_frames) * self.temporal_filters)
        return front + self.midend_layers * self.midend_filters


class MusicnnOutput(NamedTuple):
    logits: torch.Tensor  # (N, num_classes)
    penultimate: torch.Tensor  # (N, backend_units)
    mean_pool: torch.Tensor  # (N, C_mid)
    max_pool: torch.Tensor  # (N, C_mid)


class _FrozenBatchNorm(nn.Module):
    """Inference-only batch norm over dim 1: the checkpoints hold moving statistics only, and a
    frozen module cannot silently switch to batch statistics under ``.train()``."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((channels,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return (x - self.running_mean.view(shape)) * scale.view(shape) + self.bias.view(shape)


class _ConvBlock(nn.Module):
    """conv -> ReLU -> batch norm, musicnn's order (the norm comes after the nonlinearity)."""

    def __init__(self, conv: nn.Module, channels: int, eps: float):
        super().__init__()
        self.conv = conv
        self.bn = _FrozenBatchNorm(channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))

    def max_over_frequency(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x).amax(dim=3)`` without the norm and ReLU on the full map: both are monotone
        per channel (the norm decreasing where its scale is negative), so they commute with the
        max (a min there). Halves the front end's time on long inputs."""
        h = self.conv(x)
        increasing = (self.bn.weight >= 0).view(1, -1, 1)
        return self.bn(F.relu(torch.where(increasing, h.amax(dim=3), h.amin(dim=3))))


class Musicnn(nn.Module):
    """The musicnn network: log-mel patches (N, T, F) -> logits and feature taps."""

    def __init__(self, config: MusicnnConfig):
        super().__init__()
        c, eps = config, config.bn_eps
        self.config = config
        self.input_bn = _FrozenBatchNorm(1, eps)
        self.timbral = nn.ModuleList(
            _ConvBlock(nn.Conv2d(1, c.timbral_filters, (c.timbral_frames, int(f * c.n_mels))),
                       c.timbral_filters, eps) for f in c.timbral_height_fractions)
        self.temporal = nn.ModuleList(
            _ConvBlock(nn.Conv2d(1, c.temporal_filters, (k, 1)), c.temporal_filters, eps)
            for k in c.temporal_frames)
        front = len(self.timbral) * c.timbral_filters + len(self.temporal) * c.temporal_filters
        self.midend = nn.ModuleList(
            _ConvBlock(nn.Conv1d(front if i == 0 else c.midend_filters, c.midend_filters, c.midend_frames),
                       c.midend_filters, eps) for i in range(c.midend_layers))
        pooled = front + c.midend_layers * c.midend_filters
        self.pool_bn = _FrozenBatchNorm(2 * pooled, eps)
        self.dense = nn.Linear(2 * pooled, c.backend_units)
        self.dense_bn = _FrozenBatchNorm(c.backend_units, eps)
        self.classifier = nn.Linear(c.backend_units, c.num_classes)

    def frame_features(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel (N, T, F) → the dense front-end + mid-end features (N, C_mid, T), one per mel
        frame: what the back end pools. Fully convolutional, so any T works."""
        c = self.config
        x = self.input_bn(mel.unsqueeze(1))  # (N, 1, T, F)
        # Timbral convs are 'valid' in frequency and zero-padded in time; temporal convs are
        # 'same' (TF pads an even kernel one more frame after than before), then each map is
        # max-pooled over all remaining frequency bins.
        pad = c.timbral_frames // 2
        features = [block.max_over_frequency(F.pad(x, (0, 0, pad, pad))) for block in self.timbral]
        for k, block in zip(c.temporal_frames, self.temporal):
            features.append(block.max_over_frequency(F.pad(x, (0, 0, (k - 1) // 2, k - 1 - (k - 1) // 2))))
        h = torch.cat(features, dim=1)  # (N, C_front, T)
        dense_features = [h]
        pad = c.midend_frames // 2
        for i, block in enumerate(self.midend):
            out = block(F.pad(h, (pad, pad)))
            h = out if i == 0 else out + h  # residual from the second layer on
            dense_features.append(h)
        return torch.cat(dense_features, dim=1)

    def forward(self, mel: torch.Tensor) -> MusicnnOutput:
        h = self.frame_features(mel)  # (N, C_mid, T)
        max_pool, mean_pool = h.amax(dim=2), h.mean(dim=2)
        # TF flattened the (C_mid, 2) stack [max, mean], so the two pools interleave per channel.
        pooled = self.pool_bn(torch.stack([max_pool, mean_pool], dim=2).flatten(1))
        penultimate = self.dense_bn(F.relu(self.dense(pooled)))
        return MusicnnOutput(self.classifier(penultimate), penultimate, mean_pool, max_pool)


def tf_to_torch_state(variables: dict[str, np.ndarray], config: MusicnnConfig) -> dict[str, torch.Tensor]:
    """Rename and transpose musicnn's TF variables into :class:`Musicnn`'s state dict.

    ``tf.compat.v1.layers`` named variables by creation order (``conv2d``, ``conv2d_1``, …,
    ``batch_normalization_N``, ``dense``/``dense_1``); the order below is musicnn's graph order.
    Kernels are (kh, kw, in, out) for convolutions and (in, out) for dense layers.
    """
    counters = {"conv2d": 0, "batch_normalization": 0, "dense": 0}
    state: dict[str, torch.Tensor] = {}

    def tf_name(kind: str) -> str:
        index = counters[kind]
        counters[kind] += 1
        return kind if index == 0 else f"{kind}_{index}"

    def bn(prefix: str) -> None:
        name = tf_name("batch_normalization")
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"),
                             ("running_mean", "moving_mean"), ("running_var", "moving_variance")):
            state[f"{prefix}.{ours}"] = torch.from_numpy(variables[f"{name}/{theirs}"])

    def layer(prefix: str, kind: str, layout: tuple[int, ...], squeeze: int | None = None) -> None:
        name = tf_name(kind)
        kernel = variables[f"{name}/kernel"]
        if squeeze is not None:
            kernel = kernel.squeeze(squeeze)
        state[f"{prefix}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(layout)))
        state[f"{prefix}.bias"] = torch.from_numpy(variables[f"{name}/bias"])

    bn("input_bn")
    for group, count in (("timbral", len(config.timbral_height_fractions)),
                         ("temporal", len(config.temporal_frames))):
        for i in range(count):
            layer(f"{group}.{i}.conv", "conv2d", (3, 2, 0, 1))
            bn(f"{group}.{i}.bn")
    for i in range(config.midend_layers):
        # (7, C_in, 1, C_out): a 2-D conv spanning all channels is a 1-D conv over time.
        layer(f"midend.{i}.conv", "conv2d", (2, 1, 0), squeeze=2)
        bn(f"midend.{i}.bn")
    bn("pool_bn")
    layer("dense", "dense", (1, 0))
    bn("dense_bn")
    layer("classifier", "dense", (1, 0))
    return state


def musicnn_package_dir() -> Path:
    """The installed ``musicnn`` package folder, found without importing it (that imports TF)."""
    spec = importlib.util.find_spec("musicnn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(_INSTALL_HINT)
    return Path(next(iter(spec.submodule_search_locations)))


def _package_tag_names(package: Path, model: str) -> tuple[str, ...]:
    """musicnn's label list for ``model``, read from its configuration.py without executing it."""
    wanted = "MTT_LABELS" if "MTT" in model else "MSD_LABELS"
    tree = ast.parse((package / "configuration.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == wanted for t in node.targets):
            return tuple(ast.literal_eval(node.value))
    raise ValueError(f"{package / 'configuration.py'} defines no {wanted}")


def musicnn_log_mel(waveform: np.ndarray | torch.Tensor, sample_rate: int, config: MusicnnConfig) -> np.ndarray:
    """(T, F) float32 log-mel of a mono (or (channels, N)) waveform, computed like musicnn's
    ``batch_data``; frame k is centred at ``k * hop_length / sample_rate`` seconds."""
    import librosa

    c = config
    y = waveform.detach().cpu().numpy() if isinstance(waveform, torch.Tensor) else np.asarray(waveform)
    if y.ndim == 2:  # (channels, samples), averaged like librosa.load(mono=True)
        y = y.mean(axis=0)
    if y.ndim != 1:
        raise ValueError(f"expected a waveform of shape (samples,) or (channels, samples), got {y.shape}")
    y = y.astype(np.float32)
    if not np.isfinite(y).all():
        raise ValueError("waveform contains NaN or infinite samples")
    if sample_rate != c.sample_rate:
        y = librosa.resample(y, orig_sr=sample_rate, target_sr=c.sample_rate)
    mel = librosa.feature.melspectrogram(y=y, sr=c.sample_rate, n_fft=c.n_fft, hop_length=c.hop_length,
                                         n_mels=c.n_mels, pad_mode=c.pad_mode).T
    # musicnn rounds the mel power to float16 and compresses it with NumPy 1.x promotion, i.e.
    # in float32 (under NumPy 2 its float16 `10000 * mel` overflows at ordinary loudness).
    mel = mel.astype(np.float16).astype(np.float32)
    return np.log10(np.float32(10000) * mel + np.float32(1))


def load_musicnn_network(model: str = "MSD_musicnn") -> Musicnn:
    """A checkpoint shipped inside the installed ``musicnn`` package (no TensorFlow), frozen."""
    from muvi.encoders._tf_checkpoint import read_tf_checkpoint

    package = musicnn_package_dir()
    folder = package / model
    if not (folder / ".index").is_file():
        shipped = sorted(p.parent.name for p in package.glob("*/.index"))
        raise FileNotFoundError(f"no musicnn checkpoint {model!r} in {package}; shipped: {shipped}")
    if model not in MusicnnConfig.PRESETS:
        raise ValueError(f"{model!r} is not a musicnn architecture muvi ports (choose from "
                         f"{sorted(MusicnnConfig.PRESETS)}; the VGG baselines are not ported)")
    config = MusicnnConfig.preset(model, tag_names=_package_tag_names(package, model))
    network = Musicnn(config)
    load_strict(network, tf_to_torch_state(read_tf_checkpoint(f"{folder}/"), config), source=str(folder))
    logger.info("loaded musicnn %s from %s", model, folder)
    return network.eval().requires_grad_(False)


class MusicnnEmbedder:
    """Waveform -> per-patch musicnn embeddings and tag probabilities (numpy float32).

    ``patch_seconds`` and ``hop_seconds`` mirror musicnn's ``input_length`` and ``input_overlap``
    (the latter is in fact the stride between patch starts; ``None`` means non-overlapping) and
    are converted to frames exactly as musicnn does.
    """

    def __init__(self, network: Musicnn, *, patch_seconds: float = 3.0, hop_seconds: float | None = None,
                 batch_size: int = 32):
        import librosa

        c = network.config
        self.network = network.eval().requires_grad_(False)
        frames = dict(sr=c.sample_rate, hop_length=c.hop_length, n_fft=c.n_fft)  # musicnn's conversion
        self.patch_frames = int(librosa.time_to_frames(patch_seconds, **frames)) + 1
        self.hop_frames = (self.patch_frames if hop_seconds is None
                           else int(librosa.time_to_frames(hop_seconds, **frames)))
        if self.hop_frames < 1:
            raise ValueError(f"hop_seconds={hop_seconds} is shorter than one frame")
        self.batch_size = batch_size

    @classmethod
    def from_package(cls, model: str = "MSD_musicnn", **kwargs) -> "MusicnnEmbedder":
        """Load a checkpoint shipped inside the installed ``musicnn`` package (no TensorFlow)."""
        return cls(load_musicnn_network(model), **kwargs)

    @property
    def tag_names(self) -> tuple[str, ...]:
        return self.network.config.tag_names

    def log_mel(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
        """(T, F) float32 log-mel, computed like musicnn's ``batch_data``."""
        return musicnn_log_mel(waveform, sample_rate, self.network.config)

    def patches(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
        """(N, T, F) patches of the log-mel; the trailing incomplete patch is dropped, as in musicnn."""
        mel = self.log_mel(waveform, sample_rate)
        starts = range(0, mel.shape[0] - self.patch_frames + 1, self.hop_frames)
        if not starts:
            c = self.network.config
            seconds = self.patch_frames * c.hop_length / c.sample_rate
            raise ValueError(f"audio of {mel.shape[0]} frames is shorter than one musicnn patch "
                             f"({self.patch_frames} frames, {seconds:.2f} s)")
        return np.stack([mel[s:s + self.patch_frames] for s in starts])

    @torch.inference_mode()
    def outputs(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> MusicnnOutput:
        """All network outputs for every patch, as float32 CPU tensors."""
        patches = torch.from_numpy(self.patches(waveform, sample_rate))
        device = next(self.network.parameters()).device
        chunks = [self.network(chunk.to(device)) for chunk in patches.split(self.batch_size)]
        return MusicnnOutput(*(torch.cat(parts).float().cpu() for parts in zip(*chunks)))

    def embed(self, waveform: np.ndarray | torch.Tensor, sample_rate: int, *,
              tap: str = "penultimate") -> np.ndarray:
        """(N_patches, D) embeddings from the named tap (see :data:`TAPS`)."""
        if tap not in TAPS:
            raise ValueError(f"unknown musicnn tap {tap!r}; choose from {TAPS}")
        return getattr(self.outputs(waveform, sample_rate), tap).numpy()

    def tag_probabilities(self, waveform: np.ndarray | torch.Tensor, sample_rate: int) -> np.ndarray:
        """(N_patches, num_classes) sigmoid tag probabilities, columns named by :attr:`tag_names`."""
        return torch.sigmoid(self.outputs(waveform, sample_rate).logits).numpy()

    def to(self, device: str | torch.device) -> "MusicnnEmbedder":
        self.network.to(device)
        return self
