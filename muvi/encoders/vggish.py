"""VGGish (Hershey et al. 2017) in PyTorch, for the paper's FAD as the audioldm_eval toolkit computes it.

The weights are never downloaded: :func:`load_vggish` reads a file the user supplies (the
``torchvggish`` release ``vggish-10086976.pth``, or a ``torch.hub`` VGGish ``state_dict()`` that
also holds the PCA postprocessor), optionally after checking its SHA-256. Key names follow the
widely used PyTorch port ``torchvggish`` (harritaylor): ``features.N`` convolutions (N the index in
its ``Sequential`` of conv/ReLU/max-pool layers), ``embeddings.N`` linears, and
``pproc.pca_eigen_vectors`` / ``pproc.pca_means`` for the PCA (the names the hub version saves;
``pproc._pca_matrix`` / ``pproc._pca_means`` are accepted as aliases).

Front end (torchvggish's ``waveform_to_examples``, after the TF release): mono audio at 16 kHz ->
frames of 25 ms (400 samples) every 10 ms, no padding -> periodic Hann window -> magnitude of a
512-point real FFT -> HTK-style mel matrix (64 bands, 125-7500 Hz, DC bin zeroed) ->
``log(mel + 0.01)`` -> non-overlapping examples of 96 frames (0.96 s; an incomplete trailing
example is dropped), all in float64 as NumPy does it, then float32.

What audioldm_eval's FAD uses (``FrechetAudioDistance(use_pca=False, use_activation=False)``):
each file read as int16 by soundfile, divided by 32768, channels averaged, resampled to 16 kHz
with resampy (``kaiser_best``) -> one 128-d embedding per 0.96 s example, taken from the last
linear layer *without* its ReLU and *without* the PCA/quantisation postprocessing -> the frames
of all files of a set pooled -> Fréchet distance. :meth:`VGGish.embed` and
:func:`read_fad_waveform` do exactly this; ``activation=True, postprocess=True`` give
torchvggish's default output (ReLU, PCA with whitening, clipped to [-2, 2], 8-bit quantised).

Shapes: N examples, T frames (96), M mel bands (64), C channels, D embedding size (128).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from muvi.checkpoint import CheckpointError, check_sha256, load_strict, read_state_dict
from muvi.config import Config

logger = logging.getLogger(__name__)

#: Old attribute names of torchvggish 0.2's postprocessor -> the hub version's state-dict keys.
_PCA_ALIASES = {"pproc._pca_matrix": "pproc.pca_eigen_vectors", "pproc._pca_means": "pproc.pca_means"}


@dataclasses.dataclass
class VGGishConfig(Config):
    """VGGish's input features and layer sizes (defaults: the released network)."""

    sample_rate: int = 16000
    window_seconds: float = 0.025
    hop_seconds: float = 0.010
    n_mels: int = 64
    fmin: float = 125.0
    fmax: float = 7500.0
    log_offset: float = 0.01
    example_seconds: float = 0.96
    example_hop_seconds: float = 0.96
    # Conv widths per block; every block is followed by a 2x2 max pool.
    blocks: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512))
    hidden: tuple[int, ...] = (4096, 4096)
    embedding_dim: int = 128
    pca: bool = False  # whether the network holds the PCA postprocessor ("pproc.*")
    quantize_min: float = -2.0
    quantize_max: float = 2.0

    PRESETS = {"vggish": {}}

    @property
    def window_length(self) -> int:
        return int(round(self.sample_rate * self.window_seconds))

    @property
    def hop_length(self) -> int:
        return int(round(self.sample_rate * self.hop_seconds))

    @property
    def fft_length(self) -> int:
        return 2 ** int(math.ceil(math.log2(self.window_length)))

    @property
    def example_frames(self) -> int:
        return int(round(self.example_seconds / self.hop_seconds))

    @property
    def example_hop_frames(self) -> int:
        return int(round(self.example_hop_seconds / self.hop_seconds))


# --- front end ----------------------------------------------------------------------------------
def vggish_mel_matrix(config: VGGishConfig) -> np.ndarray:
    """(fft_length // 2 + 1, n_mels) float64 weights, triangles linear on the HTK mel scale.

    This is the TF release's own filterbank, not librosa's: the band edges are equally spaced on
    mel = 1127 ln(1 + f / 700) and the DC bin gets no weight.
    """
    n_bins = config.fft_length // 2 + 1
    nyquist = config.sample_rate / 2.0
    if not 0.0 <= config.fmin < config.fmax <= nyquist:
        raise ValueError(f"need 0 <= fmin < fmax <= {nyquist}, got {config.fmin}, {config.fmax}")

    def to_mel(hz):
        return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)

    bins_mel = to_mel(np.linspace(0.0, nyquist, n_bins))
    edges = np.linspace(to_mel(config.fmin), to_mel(config.fmax), config.n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (bins_mel[:, None] - lower) / (center - lower)
    falling = (upper - bins_mel[:, None]) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


def log_mel(waveform: np.ndarray, config: VGGishConfig) -> np.ndarray:
    """(T, n_mels) float64 log-mel of a 1-D waveform already at ``config.sample_rate``."""
    y = np.asarray(waveform, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"expected a mono waveform (samples,), got shape {y.shape}")
    win, hop = config.window_length, config.hop_length
    if len(y) < win:
        return np.zeros((0, config.n_mels))
    frames = torch.from_numpy(y).unfold(0, win, hop)  # (T, win), no padding
    window = 0.5 - 0.5 * torch.cos(2 * math.pi / win * torch.arange(win, dtype=torch.float64))
    magnitude = torch.fft.rfft(frames * window, n=config.fft_length).abs()
    mel = magnitude @ torch.from_numpy(vggish_mel_matrix(config))
    return torch.log(mel + config.log_offset).numpy()


def waveform_to_examples(waveform: np.ndarray, sample_rate: int, config: VGGishConfig) -> torch.Tensor:
    """(N, 1, T, M) float32 examples of a mono (or ``(samples, channels)``) waveform.

    Multi-channel input is averaged and other sample rates are resampled as torchvggish does
    (see :func:`resample`).
    """
    y = np.asarray(waveform, dtype=np.float64)
    if y.ndim == 2:  # (samples, channels), torchvggish's convention
        y = y.mean(axis=1)
    if sample_rate != config.sample_rate:
        y = resample(y, sample_rate, config.sample_rate)
    mel = log_mel(y, config)
    t, hop = config.example_frames, config.example_hop_frames
    n = 0 if len(mel) < t else 1 + (len(mel) - t) // hop
    examples = np.stack([mel[i * hop:i * hop + t] for i in range(n)]) if n else np.zeros((0, t, config.n_mels))
    return torch.from_numpy(examples).float().unsqueeze(1)


def resample(waveform: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample as torchvggish and audioldm_eval's FAD do: ``resampy.resample`` (kaiser_best).

    Without the ``resampy`` package, librosa's default (soxr) resampler is used with a warning:
    the embeddings then differ slightly from audioldm_eval's.
    """
    try:
        import resampy
    except ImportError:
        import librosa

        warnings.warn("resampy is not installed: resampling with librosa's soxr_hq instead, so FAD "
                      "differs slightly from audioldm_eval's (pip install resampy)", stacklevel=2)
        return librosa.resample(np.asarray(waveform, dtype=np.float64), orig_sr=orig_sr, target_sr=target_sr)
    return resampy.resample(np.asarray(waveform, dtype=np.float64), orig_sr, target_sr)


def read_fad_waveform(path: str | Path, config: VGGishConfig | None = None) -> np.ndarray:
    """audioldm_eval's FAD input: int16 samples / 32768, channels averaged, resampled to 16 kHz."""
    import soundfile

    config = config or VGGishConfig()
    data, sample_rate = soundfile.read(str(path), dtype="int16")
    y = data / 32768.0
    if y.ndim > 1:
        y = y.mean(axis=1)
    if sample_rate != config.sample_rate:
        y = resample(y, sample_rate, config.sample_rate)
    return y


# --- network ------------------------------------------------------------------------------------
def _feature_layers(config: VGGishConfig) -> nn.Sequential:
    """conv3x3 -> ReLU per width, a 2x2 max pool after each block; indices as in torchvggish."""
    layers: list[nn.Module] = []
    channels = 1
    for block in config.blocks:
        for width in block:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
            channels = width
        layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class Postprocessor(nn.Module):
    """PCA (with whitening) and 8-bit quantisation of the AudioSet release embeddings."""

    def __init__(self, config: VGGishConfig):
        super().__init__()
        d = config.embedding_dim
        self.quantize_min, self.quantize_max = config.quantize_min, config.quantize_max
        self.register_buffer("pca_eigen_vectors", torch.eye(d))
        self.register_buffer("pca_means", torch.zeros(d, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, D) values in 0..255 (as float)."""
        projected = (self.pca_eigen_vectors @ (embedding.T - self.pca_means)).T
        clipped = projected.clamp(self.quantize_min, self.quantize_max)
        return torch.round((clipped - self.quantize_min) * (255.0 / (self.quantize_max - self.quantize_min)))


class VGGish(nn.Module):
    """Log-mel examples (N, 1, T, M) -> (N, D) embeddings."""

    def __init__(self, config: VGGishConfig):
        super().__init__()
        self.config = config
        self.features = _feature_layers(config)
        pools = len(config.blocks)
        height, width = config.example_frames >> pools, config.n_mels >> pools
        sizes = [config.blocks[-1][-1] * height * width, *config.hidden, config.embedding_dim]
        linears: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            linears += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        # The final ReLU is applied in forward() so that FAD can leave it out.
        self.embeddings = nn.Sequential(*linears[:-1])
        self.pproc = Postprocessor(config) if config.pca else None

    def forward(self, examples: torch.Tensor, *, activation: bool = True, postprocess: bool = False) -> torch.Tensor:
        """Embeddings; ``activation``: the last layer's ReLU; ``postprocess``: PCA + quantisation."""
        x = self.features(examples)  # (N, C, T / 16, M / 16)
        x = self.embeddings(rearrange(x, "n c h w -> n (h w c)"))  # TF's (H, W, C) flattening order
        if activation:
            x = F.relu(x)
        if postprocess:
            if self.pproc is None:
                raise ValueError("this VGGish has no PCA postprocessor: its checkpoint had no pproc.* tensors")
            x = self.pproc(x)
        return x

    @torch.inference_mode()
    def embed(self, waveform: np.ndarray, sample_rate: int, *, activation: bool = False,
              postprocess: bool = False, batch_size: int = 64) -> np.ndarray:
        """(N, D) float32 embeddings of one clip, by default as audioldm_eval's FAD takes them."""
        examples = waveform_to_examples(waveform, sample_rate, self.config)
        device = next(self.parameters()).device
        outputs = [self(chunk.to(device), activation=activation, postprocess=postprocess).float().cpu()
                   for chunk in examples.split(batch_size)]
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, self.config.embedding_dim), np.float32)

    def embed_file(self, path: str | Path) -> np.ndarray:
        """(N, D) FAD embeddings of an audio file, read exactly as audioldm_eval's FAD reads it."""
        return self.embed(read_fad_waveform(path, self.config), self.config.sample_rate)


# --- loading ------------------------------------------------------------------------------------
def config_from_state_dict(state: dict[str, torch.Tensor]) -> VGGishConfig:
    """The preset with layer widths read from the checkpoint's shapes (published file: unchanged).

    The layer pattern is the preset's; a tensor the pattern expects but the file lacks keeps the
    preset's width, so that :func:`muvi.checkpoint.load_strict` names it as missing.
    """
    config = VGGishConfig.preset("vggish")
    index, blocks = 0, []
    for block in config.blocks:
        widths = []
        for width in block:
            weight = state.get(f"features.{index}.weight")
            widths.append(int(weight.shape[0]) if weight is not None and weight.ndim == 4 else width)
            index += 2  # conv, ReLU
        blocks.append(tuple(widths))
        index += 1  # max pool
    sizes = [*config.hidden, config.embedding_dim]
    for i in range(len(sizes)):
        weight = state.get(f"embeddings.{2 * i}.weight")
        if weight is not None and weight.ndim == 2:
            sizes[i] = int(weight.shape[0])
    return dataclasses.replace(config, blocks=tuple(blocks), hidden=tuple(sizes[:-1]), embedding_dim=sizes[-1],
                               pca="pproc.pca_eigen_vectors" in state)


def vggish_from_state_dict(state: dict[str, torch.Tensor], *, source: str = "checkpoint") -> VGGish:
    """A VGGish in eval mode with ``state`` loaded strictly (PCA aliases renamed, means made (D, 1))."""
    state = {_PCA_ALIASES.get(k, k): v for k, v in state.items()}
    if "pproc.pca_means" in state and state["pproc.pca_means"].ndim == 1:
        state["pproc.pca_means"] = state["pproc.pca_means"].reshape(-1, 1)
    state = {k: v.float() if k.startswith("pproc.") else v for k, v in state.items()}
    network = VGGish(config_from_state_dict(state))
    load_strict(network, state, source=source)
    logger.info("loaded VGGish from %s (PCA postprocessor: %s)", source, network.config.pca)
    return network.eval().requires_grad_(False)


def load_vggish(path: str | Path, sha256: str | None = None) -> VGGish:
    """Load a user-supplied VGGish weight file; with ``sha256``, only if the file's hash matches.

    Raises:
        ValueError: the hash differs (the message names the file).
        CheckpointError: the file is unreadable or does not fit VGGish (missing/unexpected keys).
    """
    if sha256 is not None:
        check_sha256(path, sha256)
    state = read_state_dict(path)
    if not state:
        raise CheckpointError(f"{path}: empty state dict")
    return vggish_from_state_dict(state, source=str(path))
