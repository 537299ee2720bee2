"""What :func:`muvi.generate` returns."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from muvi.errors import GenerationError, OutputError, OutputExistsError
from muvi.media import AUDIO_FORMATS as AUDIO_SUFFIXES
from muvi.media import write_atomically


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
            raise OutputError(f"{path}: refusing to overwrite the input video")
        if path.exists() and not overwrite:
            raise OutputExistsError(f"{path} exists; pass overwrite=True to replace it")
        data = self.numpy()
        if not np.isfinite(data).all():
            raise GenerationError(f"{path}: the waveform holds NaN or infinite samples; nothing written")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: sf.write(str(tmp), np.clip(data, -1.0, 1.0), self.sample_rate,
                                                    format=fmt))
        return path
