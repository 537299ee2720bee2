"""AudioMAE audio encoder (Huang et al., 2022): the frozen audio side of the contrastive model.

MuVi (section 3.2) embeds music with a pre-trained AudioMAE, averages over frequency and
resamples to the video frame rate; the SIM metric uses the same features. This is the release's
ViT-B/16 over a 128-bin Kaldi fbank of 1024 frames (10 ms hop, 10.24 s), with the published key
names (facebookresearch/AudioMAE, timm ``VisionTransformer`` layout), so its checkpoints load
as released. The release builds its encoder from timm's ``vision_transformer.Block`` (LayerNorm
eps 1e-6, fused ``qkv`` with bias, exact GELU); so do we.

Shapes: B batch, N samples, T fbank frames (10 ms), M mel bins, P time patches, Fp frequency
patches (M / patch), D width, J video frames.

Token order: the spectrogram enters as an image (B, 1, T, M); the conv grid is (T/16, M/16)
and is flattened time-major, so token ``1 + t * (M/16) + f`` is time patch t, frequency patch f.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from muvi.checkpoint import CheckpointError, load_strict, read_state_dict
from muvi.config import Config

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class AudioMAEConfig(Config):
    """Sizes and front-end settings of the AudioMAE release (AudioSet-2M, ViT-B/16).

    ``global_pool`` picks the final norm of the checkpoint layout: ``True`` for the fine-tuned
    release (``fc_norm``, trained with mean pooling, no ``norm``), ``False`` for the pre-trained
    MAE encoder (``norm``, applied to every token during pre-training).
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_length: int = 1024  # fbank frames per window: 10.24 s at a 10 ms hop
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    patch_size: int = 16
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    global_pool: bool = True
    # AudioSet statistics of the release; it normalises as (fbank - mean) / (2 * std).
    fbank_mean: float = -4.2677393
    fbank_std: float = 4.5689974

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "vit-b": {},
        "tiny": {"target_length": 128, "num_mel_bins": 64, "hidden_size": 32, "depth": 2, "num_heads": 2},
    }

    def __post_init__(self) -> None:
        p = self.patch_size
        if self.target_length % p or self.num_mel_bins % p:
            raise ValueError(f"target_length {self.target_length} and num_mel_bins {self.num_mel_bins} "
                             f"must be multiples of patch_size {p}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per window: (time, frequency)."""
        return self.target_length // self.patch_size, self.num_mel_bins // self.patch_size


def fbank(waveform: torch.Tensor, config: Optional[AudioMAEConfig] = None, *, normalize: bool = True) -> torch.Tensor:
    """Kaldi fbank of a mono waveform at ``config.sample_rate``, (N,) → (T, M), as the release computes it.

    Settings of the release's dataset code: mean removed, Hanning window, HTK-compatible, no
    energy, no dither, 10 ms shift (25 ms frames, power spectrum, snip edges: Kaldi defaults).
    With ``normalize`` the result is ``(fbank - mean) / (2 * std)``; without it, the raw
    log-mel, which is what the release zero-pads to ``target_length``.
    """
    import torchaudio.compliance.kaldi as kaldi

    config = config or AudioMAEConfig()
    if waveform.dim() != 1:
        raise ValueError(f"fbank expects a mono waveform (N,), got shape {tuple(waveform.shape)}")
    min_samples = int(config.sample_rate * config.frame_length_ms / 1000)
    if waveform.shape[0] < min_samples:
        raise ValueError(f"audio of {waveform.shape[0]} samples is shorter than one "
                         f"{config.frame_length_ms} ms frame ({min_samples} samples)")
    wav = waveform.float()
    wav = (wav - wav.mean()).unsqueeze(0)
    feats = kaldi.fbank(wav, htk_compat=True, sample_frequency=config.sample_rate, use_energy=False,
                        window_type="hanning", num_mel_bins=config.num_mel_bins, dither=0.0,
                        frame_shift=config.frame_shift_ms, frame_length=config.frame_length_ms)
    return _normalize(feats, config) if normalize else feats


def _normalize(feats: torch.Tensor, config: AudioMAEConfig) -> torch.Tensor:
    return (feats - config.fbank_mean) / (2 * config.fbank_std)


def patch_starts(num_frames: int, config: AudioMAEConfig) -> torch.Tensor:
    """Start frame (in the whole fbank) of every time patch that :meth:`AudioMAEEncoder.encode` returns.

    Paper appendix C: fixed windows of ``target_length`` frames; a remainder is not padded but
    covered by the LAST ``target_length`` frames, of which only the patches over new frames are
    kept. So there are ``ceil(num_frames / patch)`` patches; those of full windows start on the
    patch grid, the tail ones are aligned to the end of the audio (shifted back by less than a
    patch). Audio shorter than one window is zero-padded (as the release does) and cropped to
    the patches that hold real frames.
    """
    p, L = config.patch_size, config.target_length
    total = math.ceil(num_frames / p)
    if num_frames <= L:
        return torch.arange(total) * p
    n_grid = (num_frames // L) * (L // p)  # patches of the full windows
    tail = num_frames - p * torch.arange(total - n_grid, 0, -1)
    return torch.cat([torch.arange(n_grid) * p, tail])


def _release_pos_table(config: AudioMAEConfig) -> torch.Tensor:
    """The fixed 2D sin-cos table the release initialises (1, 1 + P*Fp, D) with; stored in its checkpoints.

    Reproduced for freshly built models only (checkpoints overwrite it). The release builds
    it over a (Fp rows, P columns) grid although tokens are time-major, so token i gets the
    columns-coordinate ``i % P`` in the first half of the channels and ``i // P`` in the second.
    """
    n_t, n_f = config.grid
    i = torch.arange(n_t * n_f, dtype=torch.float64)
    quarter = config.hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def one_axis(pos: torch.Tensor) -> torch.Tensor:
        angle = pos[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    table = torch.cat([one_axis(i % n_t), one_axis(torch.div(i, n_t, rounding_mode="floor"))], dim=1)
    table = F.pad(table, (0, config.hidden_size - table.shape[1]))
    return torch.cat([torch.zeros(1, config.hidden_size, dtype=torch.float64), table]).float()[None]


class AudioMAEEncoder(nn.Module):
    """The AudioMAE ViT encoder, returning the patch-token grid (CLS dropped).

    Final norm per layout (``config.global_pool``): the fine-tuned release has only ``fc_norm``
    (it normalised the mean-pooled tokens); we apply it to each token, the per-token analogue
    of what it was trained on. The pre-trained MAE encoder applies ``norm`` to every token, and
    so do we. Either way it is a LayerNorm on the last block's tokens.
    """

    def __init__(self, config: AudioMAEConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(1, d, kernel_size=p, stride=p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Fixed (not trained) in the release but stored in its checkpoints: a persistent buffer.
        self.register_buffer("pos_embed", _release_pos_table(config), persistent=True)
        from timm.models.vision_transformer import Block  # on use: timm imports torchvision (~2.5 s)

        norm = functools.partial(nn.LayerNorm, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(d, config.num_heads, config.mlp_ratio, qkv_bias=True, norm_layer=norm)
            for _ in range(config.depth))
        final = norm(d)
        if config.global_pool:
            self.fc_norm = final
        else:
            self.norm = final
        self.apply(self._init_weights)
        nn.init.normal_(self.cls_token, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def final_norm(self) -> nn.LayerNorm:
        return self.fc_norm if self.config.global_pool else self.norm

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalised fbank windows (B, T, M) with T = target_length → tokens (B, T/16, M/16, D)."""
        cfg = self.config
        if feats.shape[1:] != (cfg.target_length, cfg.num_mel_bins):
            raise ValueError(f"expected fbank windows (B, {cfg.target_length}, {cfg.num_mel_bins}), "
                             f"got {tuple(feats.shape)}")
        x = self.patch_embed.proj(feats.unsqueeze(1).to(self.cls_token.dtype))  # (B, D, P, Fp)
        n_t, n_f = x.shape[-2:]
        x = rearrange(x, "b d t f -> b (t f) d") + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x[:, 1:])
        return rearrange(x, "b (t f) d -> b t f d", t=n_t, f=n_f)

    def _prepare(self, waveform: torch.Tensor, sample_rate: int) -> torch.Tensor:
        if waveform.dim() == 1:
            waveform = waveform[None]
        if waveform.dim() != 2:
            raise ValueError(f"expected a mono waveform (N,) or a batch (B, N), got {tuple(waveform.shape)}")
        waveform = waveform.float()
        if sample_rate != self.config.sample_rate:
            import torchaudio.functional as AF

            waveform = AF.resample(waveform, int(sample_rate), self.config.sample_rate)
        return waveform

    def encode(self, waveform: torch.Tensor, sample_rate: int, *, window_batch: int = 64) -> torch.Tensor:
        """Waveform (B, N) or (N,) of any length → time patches (B, P, M/16, D), P = ceil(T / 16).

        Windowing as in paper appendix C (see :func:`patch_starts`). Windows are cut from the
        fbank of the whole clip, which equals the fbank of each window's own samples since every
        Kaldi step is per frame (the release's mean removal is undone by per-frame DC removal).
        At most ``window_batch`` windows go through the network at once, bounding memory on
        long recordings.
        """
        cfg = self.config
        L, p = cfg.target_length, cfg.patch_size
        feats = torch.stack([fbank(w, cfg, normalize=False) for w in self._prepare(waveform, sample_rate)])
        num_frames = feats.shape[1]
        if num_frames < L:  # the release pads the raw log-mel with zeros, then normalises
            feats = F.pad(feats, (0, 0, 0, L - num_frames))
        starts = list(range(0, feats.shape[1] - L + 1, L))
        if num_frames > L and num_frames % L:
            starts.append(num_frames - L)
        windows = torch.stack([feats[:, s:s + L] for s in starts], dim=1)  # (B, W, L, M)
        windows = _normalize(windows.flatten(0, 1), cfg)
        tokens = torch.cat([self(chunk) for chunk in windows.split(window_batch)])
        tokens = rearrange(tokens, "(b w) t f d -> b (w t) f d", b=feats.shape[0])
        total = math.ceil(num_frames / p)
        if num_frames <= L:
            return tokens[:, :total]
        n_full = (num_frames // L) * (L // p)
        return torch.cat([tokens[:, :n_full], tokens[:, tokens.shape[1] - (total - n_full):]], dim=1)

    def patch_times(self, num_samples: int) -> torch.Tensor:
        """Centre time in seconds of each patch :meth:`encode` returns for ``num_samples`` at 16 kHz, (P,)."""
        cfg = self.config
        shift, length = cfg.frame_shift_ms / 1000, cfg.frame_length_ms / 1000
        num_frames = 1 + (num_samples - round(length * cfg.sample_rate)) // round(shift * cfg.sample_rate)
        starts = patch_starts(num_frames, cfg).double()
        return (starts + (cfg.patch_size - 1) / 2) * shift + length / 2

    def frame_features(self, waveform: torch.Tensor, sample_rate: int, fps: float, num_frames: int) -> torch.Tensor:
        """Features at the video frame rate, (B, J, D): mean over frequency, linear interpolation in time.

        Video frame j is taken at time j / fps; each patch sits at the centre of its frames
        (:meth:`patch_times`). Outside the first/last patch centre the nearest patch is held.
        """
        wav = self._prepare(waveform, sample_rate)
        feats = self.encode(wav, self.config.sample_rate).mean(dim=2)  # (B, P, D)
        src = self.patch_times(wav.shape[-1]).to(feats.device)
        dst = torch.arange(num_frames, dtype=torch.float64, device=feats.device) / fps
        return _interp_time(feats, src, dst)


def _interp_time(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear resampling of (B, P, D) from times ``src`` (P, increasing) to ``dst`` (J,)."""
    if x.shape[1] == 1:
        return x.expand(-1, dst.shape[0], -1)
    dst = dst.clamp(src[0], src[-1])
    hi = torch.searchsorted(src, dst, right=True).clamp(1, src.shape[0] - 1)
    lo = hi - 1
    w = ((dst - src[lo]) / (src[hi] - src[lo])).to(x.dtype)[None, :, None]
    return x[:, lo] * (1 - w) + x[:, hi] * w


def _is_dropped(key: str) -> bool:
    """Keys of the release we do not use: the MAE decoder (and its mask token) and the classifier."""
    return key.startswith(("decoder_", "head.")) or key == "mask_token"


def _infer_config(state: dict[str, torch.Tensor], source: str) -> AudioMAEConfig:
    """Sizes from tensor shapes. Not in the shapes: heads (ViT convention: width / 64) and mel
    bins (the release's 128), from which the window length follows."""
    try:
        d = state["cls_token"].shape[-1]
        p = state["patch_embed.proj.weight"].shape[-1]
        num_patches = state["pos_embed"].shape[1] - 1
        fc1 = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise CheckpointError(f"{source}: not an AudioMAE checkpoint (no {err.args[0]!r})") from None
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    mel = AudioMAEConfig.num_mel_bins
    if num_patches % (mel // p):
        raise CheckpointError(f"{source}: {num_patches} patches do not fit {mel} mel bins; pass a config")
    return AudioMAEConfig(target_length=num_patches // (mel // p) * p, num_mel_bins=mel, patch_size=p,
                          hidden_size=d, depth=depth, num_heads=max(1, d // 64), mlp_ratio=fc1 / d,
                          global_pool="fc_norm.weight" in state)


def load_audiomae_encoder(path: str | Path, config: Optional[AudioMAEConfig] = None) -> AudioMAEEncoder:
    """Load a released AudioMAE checkpoint (.pth, nested under "model") or a safetensors file.

    Pre-trained (MAE) and fine-tuned release files both load: ``decoder_*``, ``mask_token`` and
    ``head.*`` are dropped (logged at INFO); everything else must match strictly. Without a
    ``config`` the sizes are inferred from the shapes and the final-norm layout from the keys.
    """
    state = read_state_dict(path)
    source = str(path)
    dropped = sorted(k for k in state if _is_dropped(k))
    if dropped:
        logger.info("%s: dropping %d unused tensors (MAE decoder / classifier head): %s%s", source,
                    len(dropped), ", ".join(dropped[:8]), ", …" if len(dropped) > 8 else "")
    state = {k: v for k, v in state.items() if not _is_dropped(k)}
    if config is None:
        config = _infer_config(state, source)
    pos = state.get("pos_embed")
    expected = 1 + config.grid[0] * config.grid[1]
    if pos is not None and pos.dim() == 3 and pos.shape[1] != expected:
        raise CheckpointError(
            f"{source}: pos_embed holds {pos.shape[1] - 1} patches but the config expects "
            f"{config.grid[0]}x{config.grid[1]} = {expected - 1} (target_length {config.target_length}, "
            f"num_mel_bins {config.num_mel_bins}); the release is trained on 1024 frames x 128 bins")
    model = AudioMAEEncoder(config)
    load_strict(model, state, source=source)
    return model.eval()
