"""What :func:`muvi.generate` returns."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

AUDIO_SUFFIXES = {".wav": "WAV", ".flac": "FLAC", ".ogg": "OGG"}


@dataclasses.dataclass
class GenerationOutput:
    """A generated soundtrack: mono ``waveform`` (N,) float32 in [-1, 1] at ``sample_rate``."""

    waveform: torch.Tensor
    sample_rate: int
    source: str = ""
    cfg_scale: float = 4.0
    num_steps: int = 25
    seed: Optional[int] = None

    @property
    def duration(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate

    def numpy(self) -> np.ndarray:
        return self.waveform.detach().cpu().float().numpy()

    def save(self, path: Union[str, Path], *, overwrite: bool = False) -> Path:
        """Write the audio as WAV, FLAC or OGG (chosen by the suffix); never overwrites a file
        unless ``overwrite=True``, and never the source video."""
        import soundfile as sf

        path = Path(path)
        fmt = AUDIO_SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise ValueError(f"{path}: unsupported audio suffix {path.suffix!r}; "
                             f"use one of {sorted(AUDIO_SUFFIXES)} (or `muvi generate` for video)")
        if self.source and path.resolve() == Path(self.source).resolve():
            raise ValueError(f"{path}: refusing to overwrite the input video")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(path), np.clip(self.numpy(), -1.0, 1.0), self.sample_rate, format=fmt)
        return path
