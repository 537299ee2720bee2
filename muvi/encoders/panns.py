"""PANNs Cnn14 (Kong et al. 2020) in PyTorch, for the paper's FD, KL and IS as audioldm_eval computes them.

The weights are never downloaded: :func:`load_panns` reads a file the user supplies, optionally
after checking its SHA-256: ``Cnn14_16k_mAP=0.438.pth`` (what audioldm_eval uses for 16 kHz
audio) or ``Cnn14_mAP=0.431.pth`` (its 32 kHz choice); the variant is recognised from the
checkpoint's STFT size. Key names are those of ``panns_inference`` / audioldm_eval's ``Cnn14``
(``bn0``, ``conv_block1..6.{conv1,conv2,bn1,bn2}``, ``fc1``, ``fc_audioset``) plus the
torchlibrosa front end that those checkpoints store under ``"model"``:
``spectrogram_extractor.stft.conv_real/conv_imag.weight`` (windowed DFT rows used as a strided
1-D convolution) and ``logmel_extractor.melW`` (librosa's Slaney mel filterbank). Here they are
buffers; the checkpoint's values are the ones used, as in audioldm_eval, and are compared with
freshly computed ones on load (a warning if they differ).

Front end (torchlibrosa, reproduced op for op): reflect-pad n_fft/2 on both sides -> frames of
``window_size`` every ``hop_size`` samples through the DFT kernels -> power (re^2 + im^2) ->
mel (x melW) -> 10 log10(max(mel, 1e-10)). 16 kHz variant: 512/160, 64 bands, 50-8000 Hz; 32 kHz:
1024/320, 64 bands, 50-14000 Hz. Network (eval mode only: no dropout, SpecAugment or mixup):
batch norm over mel bands, six blocks of two 3x3 conv -> BN -> ReLU with a 2x2 average pool
after the first five, mean over frequency, max + mean over time, ``fc1`` + ReLU = the 2048-d
embedding, ``fc_audioset`` = the 527 AudioSet logits, sigmoid = clipwise_output.

What audioldm_eval's ``EvaluationHelper`` does with it: each file read with torchaudio, first
channel only, its mean subtracted, resampled to 16 kHz with ``torchaudio.functional.resample``
(defaults), zero-padded at the end to at least 32000 samples; one forward pass per whole clip
(batch 1) -> per clip "2048" (the embedding) and "logits". FD: Fréchet distance between the two
sets of per-clip embeddings. KL: per pair, KL(softmax(reference logits) || softmax(generated
logits) + 1e-6), summed over classes, mean over pairs ("KL"; "KL_sigmoid" the same on sigmoids).
IS: generated logits shuffled with RandomState(2020), 10 splits, exp(mean KL(p(y|x) || p(y))).
:func:`read_audioldm_waveform` and :func:`clip_outputs` reproduce the per-clip part; the set
metrics are in :mod:`muvi.eval.distances`.

Shapes: B batch, L samples, K frequency bins (n_fft/2 + 1), T frames, M mel bands, C channels.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from muvi.checkpoint import CheckpointError, check_sha256, load_strict, read_state_dict
from muvi.config import Config

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Cnn14Config(Config):
    """Cnn14's front end and layer sizes (defaults: the 16 kHz checkpoint audioldm_eval uses)."""

    sample_rate: int = 16000
    window_size: int = 512
    hop_size: int = 160
    mel_bins: int = 64
    fmin: float = 50.0
    fmax: float = 8000.0
    ref: float = 1.0
    amin: float = 1e-10
    channels: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048)
    embedding_dim: int = 2048
    classes_num: int = 527
    bn_eps: float = 1e-5
    # audioldm_eval pads shorter clips to this many samples (2 s at 16 kHz) before the network.
    min_samples: int = 32000

    PRESETS = {
        "16k": {},
        "32k": {"sample_rate": 32000, "window_size": 1024, "hop_size": 320, "fmax": 14000.0},
    }


class Cnn14Output(NamedTuple):
    logits: torch.Tensor  # (B, classes_num), audioldm_eval's "logits"
    clipwise_output: torch.Tensor  # (B, classes_num), sigmoid probabilities
    embedding: torch.Tensor  # (B, embedding_dim), audioldm_eval's "2048"


# --- front end ----------------------------------------------------------------------------------
def stft_kernels(window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, 1, n) float32 real and imaginary DFT rows times a periodic Hann window, as torchlibrosa.

    kernel[k, 0, n] = w[n] exp(-2 pi i k n / N); k n is reduced mod N in integers so the phase is
    exact before the float64 cos/sin.
    """
    n = torch.arange(window_size, dtype=torch.int64)
    k = torch.arange(window_size // 2 + 1, dtype=torch.int64)
    phase = 2 * math.pi * ((k[:, None] * n[None, :]) % window_size).double() / window_size
    window = 0.5 - 0.5 * torch.cos(2 * math.pi * n.double() / window_size)
    real, imag = torch.cos(phase) * window, -torch.sin(phase) * window
    return real.float().unsqueeze(1), imag.float().unsqueeze(1)


def mel_filterbank(config: Cnn14Config) -> torch.Tensor:
    """(K, M) float32 librosa Slaney mel filterbank, transposed as torchlibrosa stores it."""
    import librosa

    melW = librosa.filters.mel(sr=config.sample_rate, n_fft=config.window_size, n_mels=config.mel_bins,
                               fmin=config.fmin, fmax=config.fmax)
    return torch.from_numpy(np.ascontiguousarray(melW.T))


class _Kernel(nn.Module):
    """A constant tensor under ``<name>.weight``, where torchlibrosa keeps a frozen Conv1d's."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)


class _STFT(nn.Module):
    def __init__(self, window_size: int):
        super().__init__()
        real, imag = stft_kernels(window_size)
        self.conv_real, self.conv_imag = _Kernel(real), _Kernel(imag)


class _PowerSpectrogram(nn.Module):
    """(B, L) -> (B, 1, T, K) power spectrogram, centred frames with reflect padding."""

    def __init__(self, config: Cnn14Config):
        super().__init__()
        self.n_fft, self.hop = config.window_size, config.hop_size
        self.stft = _STFT(config.window_size)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        if waveform.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"need more than {self.n_fft // 2} samples, got {waveform.shape[-1]}")
        x = F.pad(waveform[:, None, :], (self.n_fft // 2, self.n_fft // 2), mode="reflect")
        real = F.conv1d(x, self.stft.conv_real.weight, stride=self.hop)[:, None].transpose(2, 3)
        imag = F.conv1d(x, self.stft.conv_imag.weight, stride=self.hop)[:, None].transpose(2, 3)
        return real ** 2 + imag ** 2


class _LogMel(nn.Module):
    """(B, 1, T, K) power -> (B, 1, T, M) decibels, no top_db clipping."""

    def __init__(self, config: Cnn14Config):
        super().__init__()
        self.amin, self.ref = config.amin, config.ref
        self.register_buffer("melW", mel_filterbank(config))

    def forward(self, power: torch.Tensor) -> torch.Tensor:
        mel = torch.matmul(power, self.melW)
        return 10.0 * torch.log10(mel.clamp(min=self.amin)) - 10.0 * math.log10(max(self.amin, self.ref))


# --- network ------------------------------------------------------------------------------------
class _FrozenBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d (same keys, incl. num_batches_tracked) that always uses the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


class _ConvBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = _FrozenBatchNorm2d(out_channels, eps=eps)
        self.bn2 = _FrozenBatchNorm2d(out_channels, eps=eps)

    def forward(self, x: torch.Tensor, pool: int) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.avg_pool2d(x, pool) if pool > 1 else x


class Cnn14(nn.Module):
    """Waveform (B, L) at ``config.sample_rate`` -> :class:`Cnn14Output` (inference only)."""

    def __init__(self, config: Cnn14Config):
        super().__init__()
        self.config = config
        self.spectrogram_extractor = _PowerSpectrogram(config)
        self.logmel_extractor = _LogMel(config)
        self.bn0 = _FrozenBatchNorm2d(config.mel_bins, eps=config.bn_eps)
        widths = (1, *config.channels)
        for i in range(len(config.channels)):
            self.add_module(f"conv_block{i + 1}", _ConvBlock(widths[i], widths[i + 1], config.bn_eps))
        self.fc1 = nn.Linear(config.channels[-1], config.embedding_dim)
        self.fc_audioset = nn.Linear(config.embedding_dim, config.classes_num)

    def forward(self, waveform: torch.Tensor) -> Cnn14Output:
        x = self.logmel_extractor(self.spectrogram_extractor(waveform))  # (B, 1, T, M)
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # normalise each mel band
        blocks = len(self.config.channels)
        for i in range(blocks):
            x = getattr(self, f"conv_block{i + 1}")(x, pool=2 if i < blocks - 1 else 1)
        x = x.mean(dim=3)  # (B, C, T')
        x = x.amax(dim=2) + x.mean(dim=2)
        embedding = F.relu(self.fc1(x))
        logits = self.fc_audioset(embedding)
        return Cnn14Output(logits, torch.sigmoid(logits), embedding)


# --- audioldm_eval's per-clip input --------------------------------------------------------------
def prepare_waveform(waveform: np.ndarray | torch.Tensor, sample_rate: int, config: Cnn14Config) -> torch.Tensor:
    """(L,) float32: mean removed, resampled with torchaudio's defaults, padded to ``min_samples``."""
    import torchaudio.functional as AF

    y = waveform.detach().float().cpu() if torch.is_tensor(waveform) else torch.from_numpy(
        np.asarray(waveform, dtype=np.float32))
    if y.ndim != 1:
        raise ValueError(f"expected a mono waveform (samples,), got shape {tuple(y.shape)}")
    y = y - y.mean()
    if sample_rate != config.sample_rate:
        y = AF.resample(y[None], orig_freq=sample_rate, new_freq=config.sample_rate)[0]
    if y.shape[-1] < config.min_samples:
        y = F.pad(y, (0, config.min_samples - y.shape[-1]))
    return y


def read_audioldm_waveform(path: str | Path, config: Cnn14Config) -> torch.Tensor:
    """An audio file as audioldm_eval feeds PANNs: first channel only, then :func:`prepare_waveform`."""
    import soundfile

    data, sample_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return prepare_waveform(np.ascontiguousarray(data[:, 0]), int(sample_rate), config)


@torch.inference_mode()
def clip_outputs(network: Cnn14, path: str | Path) -> Cnn14Output:
    """One clip's outputs (batch of 1, float32 CPU), read as audioldm_eval reads it."""
    device = next(network.parameters()).device
    waveform = read_audioldm_waveform(path, network.config).to(device)
    return Cnn14Output(*(t.float().cpu() for t in network(waveform[None])))


# --- loading ------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list:
    """The numpy objects a training-state pickle holds, for ``torch.load(weights_only=True)``.

    The published PANNs files keep their data sampler's state (int64 index arrays, numpy
    scalars) beside ``"model"``, which the weights-only unpickler rejects by default. Arrays and
    scalars are plain data, so they are allowed here, under numpy 1's module names (those in the
    files) and numpy 2's; nothing else is.
    """
    import importlib

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list = [np.ndarray, np.dtype]
    for prefix in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray._reconstruct, f"{prefix}._reconstruct"), (multiarray.scalar, f"{prefix}.scalar")]
    numeric = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
               "float16", "float32", "float64")
    return allowed + [type(np.dtype(name)) for name in numeric]


def read_panns_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``"model"`` state dict of a PANNs checkpoint, read weights-only with numpy data allowed."""
    if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: no scoped allowlist
        return read_state_dict(path)
    with torch.serialization.safe_globals(_numpy_safe_globals()):
        return read_state_dict(path)


def config_from_state_dict(state: dict[str, torch.Tensor]) -> Cnn14Config:
    """The preset whose STFT size matches the checkpoint, with layer widths read from its shapes.

    A tensor the layout expects but the file lacks keeps the preset's size, so that
    :func:`muvi.checkpoint.load_strict` names it as missing.
    """
    kernel = state.get("spectrogram_extractor.stft.conv_real.weight")
    presets = {Cnn14Config.preset(name).window_size: name for name in Cnn14Config.PRESETS}
    if kernel is not None and kernel.shape[-1] not in presets:
        raise CheckpointError(f"Cnn14 checkpoint with an STFT of {kernel.shape[-1]} points; muvi knows "
                              f"{sorted(presets)} (presets {sorted(Cnn14Config.PRESETS)})")
    config = Cnn14Config.preset(presets[kernel.shape[-1]] if kernel is not None else "16k")
    channels = list(config.channels)
    for i in range(len(channels)):
        weight = state.get(f"conv_block{i + 1}.conv1.weight")
        if weight is not None and weight.ndim == 4:
            channels[i] = int(weight.shape[0])
    sizes = {}
    for name, field in (("fc1", "embedding_dim"), ("fc_audioset", "classes_num")):
        weight = state.get(f"{name}.weight")
        sizes[field] = int(weight.shape[0]) if weight is not None and weight.ndim == 2 else getattr(config, field)
    return dataclasses.replace(config, channels=tuple(channels), **sizes)


def _check_front_end(network: Cnn14, source: str) -> None:
    """Warn if the checkpoint's STFT/mel matrices differ from the ones its preset implies."""
    fresh_real, fresh_imag = stft_kernels(network.config.window_size)
    pairs = (("STFT (real)", network.spectrogram_extractor.stft.conv_real.weight, fresh_real),
             ("STFT (imaginary)", network.spectrogram_extractor.stft.conv_imag.weight, fresh_imag),
             ("mel filterbank", network.logmel_extractor.melW, mel_filterbank(network.config)))
    for name, stored, fresh in pairs:
        diff = float((stored.float().cpu() - fresh).abs().max())
        if diff > 1e-4 * float(fresh.abs().max()):
            logger.warning("%s: the checkpoint's %s differs from the %d Hz preset's by up to %.3g; "
                           "using the checkpoint's, as audioldm_eval does", source, name,
                           network.config.sample_rate, diff)


def cnn14_from_state_dict(state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> Cnn14:
    """A Cnn14 in eval mode with ``state`` loaded strictly."""
    network = Cnn14(config_from_state_dict(state))
    load_strict(network, state, source=source)
    _check_front_end(network, source)
    logger.info("loaded PANNs Cnn14 (%d Hz) from %s", network.config.sample_rate, source)
    return network.eval().requires_grad_(False)


def load_panns(path: str | Path, sha256: str | None = None) -> Cnn14:
    """Load a user-supplied PANNs Cnn14 file; with ``sha256``, only if the file's hash matches.

    Raises:
        ValueError: the hash differs (the message names the file).
        CheckpointError: the file is unreadable or does not fit Cnn14 (missing/unexpected keys).
    """
    if sha256 is not None:
        check_sha256(path, sha256)
    return cnn14_from_state_dict(read_panns_checkpoint(path), source=str(path))
