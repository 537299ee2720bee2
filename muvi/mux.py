"""Putting a generated soundtrack into a copy of the video, leaving the video stream untouched."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def mux_audio(video_path: str | Path, waveform: np.ndarray, sample_rate: int, out_path: str | Path,
              *, audio_codec: str = "aac", bitrate: int = 192_000) -> Path:
    """Write ``out_path``: the video stream of ``video_path`` copied packet for packet (no
    re-encoding) plus ``waveform`` (mono float in [-1, 1]) as the only audio stream.

    The file is written under a temporary name and renamed, so a failure leaves nothing
    half-written, and ``out_path`` must differ from the input.
    """
    import av

    video_path, out_path = Path(video_path), Path(out_path)
    if out_path.resolve() == video_path.resolve():
        raise ValueError(f"{out_path}: refusing to overwrite the input video")
    tmp = out_path.with_name(f".{out_path.stem}.tmp{out_path.suffix}")
    try:
        with av.open(str(video_path)) as src, av.open(str(tmp), "w") as dst:
            if not src.streams.video:
                raise ValueError(f"{video_path}: no video stream to copy")
            v_in = src.streams.video[0]
            v_out = dst.add_stream_from_template(v_in)
            a_out = dst.add_stream(audio_codec, rate=sample_rate)
            a_out.layout = "mono"
            a_out.bit_rate = bitrate
            for packet in src.demux(v_in):
                if packet.dts is None:  # the demuxer's flush packet
                    continue
                packet.stream = v_out
                dst.mux(packet)
            samples = np.clip(np.asarray(waveform, dtype=np.float32), -1, 1)[None]  # (1, N) planar
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = 0
            for packet in a_out.encode(frame):
                dst.mux(packet)
            for packet in a_out.encode(None):
                dst.mux(packet)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
