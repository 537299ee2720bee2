"""Frozen music encoders for the contrastive model: AudioMAE (the paper's) or musicnn frames.

The contrastive pre-training (paper section 3.2) compares the visual adaptor's output with a
frozen audio encoder's features, frame by frame. The paper's encoder is AudioMAE, whose weights
cannot be installed from a package index. The ``musicnn`` wheel (ISC licence) ships trained
music-tagging networks, ported in :mod:`muvi.encoders.musicnn`; :class:`MusicnnFrameEncoder` turns
one into a frame-level music encoder: the 753 per-frame channels the network's back end pools
(its "dense" front-end + mid-end features, 62.5 frames/s at 16 kHz: two timbral convolutions and
three temporal ones of 0.5–2 s, then three 7-frame convolutions), averaged over each output frame.

Output frame ``j`` at ``fps`` averages the musicnn frames whose centres fall in
``[j / fps, (j + 1) / fps)``: the span a latent frame covers (latent frame j is mel frames
``[8j, 8j + 8)`` at 80 frames/s). The whole clip goes through the network at once, not in
musicnn's 3 s patches: the network is convolutional with frozen batch norms, so only the
clip's edges see padding.

:func:`muvi.hub.load_encoder` reads the command-line specs (``musicnn`` / ``musicnn:MTT_musicnn``,
an AudioMAE checkpoint path, ...). Shapes: B clips, N samples, T' musicnn frames, T output frames, C channels.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from muvi.encoders.musicnn import Musicnn, MusicnnConfig, musicnn_log_mel

#: the package checkpoint ``musicnn`` alone stands for.
DEFAULT_MUSICNN = "MSD_musicnn"


def bucket_means(num_source: int, source_rate: float, fps: float, num_frames: int) -> torch.Tensor:
    """(T, T') averaging matrix: output frame j is the mean of the source frames (frame k centred
    at ``k / source_rate`` s) in ``[j / fps, (j + 1) / fps)``. An output frame with no source
    frame in its span (past the end of the audio) takes the nearest source frame."""
    centres = torch.arange(num_source, dtype=torch.float64) / source_rate
    bucket = torch.floor(centres * fps + 1e-9).long()
    weights = torch.zeros(num_frames, num_source, dtype=torch.float64)
    inside = bucket < num_frames
    weights[bucket[inside], torch.arange(num_source)[inside]] = 1.0
    counts = weights.sum(1, keepdim=True)
    for j in torch.nonzero(counts[:, 0] == 0).flatten().tolist():
        nearest = int(torch.argmin((centres - (j + 0.5) / fps).abs()))
        weights[j, nearest], counts[j] = 1.0, 1.0
    return (weights / counts).float()


class MusicnnFrameEncoder(nn.Module):
    """A frozen musicnn network as a frame-level music encoder (``frame_features``)."""

    def __init__(self, network: Musicnn):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    @property
    def config(self) -> MusicnnConfig:
        return self.network.config

    def train(self, mode: bool = True) -> "MusicnnFrameEncoder":
        return super().train(False)  # frozen batch norms either way; keep eval() honest

    def frame_features(self, waveform: torch.Tensor, sample_rate: int, fps: float, num_frames: int) -> torch.Tensor:
        """Waveforms (B, N) or (N,) → (B, num_frames, 753) features at ``fps``, float32."""
        if waveform.dim() == 1:
            waveform = waveform[None]
        if waveform.dim() != 2:
            raise ValueError(f"expected a mono waveform (N,) or a batch (B, N), got {tuple(waveform.shape)}")
        c = self.config
        mel = np.stack([musicnn_log_mel(w, sample_rate, c) for w in waveform.float().cpu()])
        device = next(self.network.parameters()).device
        with torch.no_grad():
            feats = self.network.frame_features(torch.from_numpy(mel).to(device))  # (B, C, T')
        weights = bucket_means(feats.shape[-1], c.sample_rate / c.hop_length, fps, num_frames).to(device)
        return torch.einsum("jk,bck->bjc", weights, feats.float())
