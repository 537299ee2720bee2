"""Putting a generated soundtrack into a copy of the video.

The picture is copied packet for packet when the output container can hold its codec (an .mp4
of H.264 stays bit-identical); otherwise it is transcoded to H.264 (CRF 18, visually lossless
for most footage) and one log line says so, as for a 12 fps cinepak .mkv from an old game. The
source's timestamps are kept (start offset, variable frame rate) and so is its display
rotation; the music starts with the first frame. With ``duration`` the picture is cut there
too. The source's own audio is left out: the music is the only audio stream.

The file is written under a unique temporary name in the output's folder (``tempfile``, never
the name of any existing file) and renamed over ``out_path`` only when complete; every error
path removes it.
"""
from __future__ import annotations

import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Optional

import numpy as np

from muvi.errors import InputError, MuxError, one_line
from muvi.media import VIDEO_FORMATS, VideoInfo, probe_video, write_atomically

logger = logging.getLogger(__name__)

#: what an unsupported picture is transcoded to, and how
TRANSCODE_CODEC = "libx264"
TRANSCODE_OPTIONS = {"crf": "18", "preset": "veryfast"}


def mux_audio(video_path: str | Path, waveform: np.ndarray, sample_rate: int, out_path: str | Path,
              *, duration: Optional[float] = None, info: Optional[VideoInfo] = None,
              bitrate: int = 192_000) -> Path:
    """Write ``out_path``: the picture of ``video_path`` (copied, or transcoded when the
    container cannot hold its codec) with ``waveform`` (mono float in [-1, 1]) as its audio.

    ``duration`` (seconds from the first frame) cuts the picture there; by default it runs to
    the end. ``info`` is the video's :func:`~muvi.media.probe_video` when the caller has it.
    Raises :class:`~muvi.errors.MuxError` naming the file when writing fails.
    """
    video_path, out_path = Path(video_path), Path(out_path)
    suffix = out_path.suffix.lower()
    if suffix not in VIDEO_FORMATS:
        raise InputError(f"{out_path}: cannot write a video with suffix {out_path.suffix!r}; "
                         f"use one of {', '.join(sorted(VIDEO_FORMATS))}")
    if out_path.exists() and os.path.samefile(out_path, video_path):
        raise InputError(f"{out_path}: refusing to overwrite the input video")
    samples = np.asarray(waveform, dtype=np.float32).reshape(-1)
    if not np.isfinite(samples).all():
        raise InputError(f"{out_path}: the audio to write holds NaN or infinite samples")
    info = info or probe_video(video_path)
    try:
        write_atomically(out_path, lambda tmp: _mux(info, samples, sample_rate, tmp, duration=duration,
                                                     bitrate=bitrate))
    except Exception as err:  # FFmpeg errors on a file PyAV opened fine while probing
        raise MuxError(f"{out_path}: could not write the video ({one_line(err)})") from None
    return out_path


def _mux(info: VideoInfo, samples: np.ndarray, sample_rate: int, tmp: Path, *,
         duration: Optional[float], bitrate: int) -> None:
    """Copy the picture when the container takes its codec; transcode when it does not, or
    when it claims to but refuses the packets."""
    import av

    try:
        _write(info, samples, sample_rate, tmp, duration=duration, bitrate=bitrate, copy=None)
    except av.error.FFmpegError as err:
        logger.info("%s: copying the %s picture failed (%s); transcoding", info.path, info.codec, err)
        _write(info, samples, sample_rate, tmp, duration=duration, bitrate=bitrate, copy=False)


def _format_for(tmp: Path) -> str:
    return VIDEO_FORMATS[tmp.suffix.lower()][0]


def _write(info: VideoInfo, samples: np.ndarray, sample_rate: int, tmp: Path, *,
           duration: Optional[float], bitrate: int, copy: Optional[bool]) -> None:
    """One attempt at the file; ``copy=None``: copy if the container lists the codec."""
    import av

    with av.open(str(info.path)) as src, av.open(str(tmp), "w", format=_format_for(tmp)) as dst:
        v_in = src.streams.video[0]
        base = v_in.time_base
        if copy is None:
            copy = info.codec in dst.supported_codecs
        if not copy:
            logger.warning("%s: the %s container cannot hold %s video; transcoding it to H.264 (CRF %s)",
                           info.path, tmp.suffix.lstrip("."),
                           info.codec, TRANSCODE_OPTIONS["crf"])
        first = round(info.start_time / base)
        end = None if duration is None else first + round(duration / base)
        if copy:
            v_out = dst.add_stream_from_template(v_in)
        else:
            rate = v_in.average_rate or v_in.guessed_rate or Fraction(25)
            v_out = dst.add_stream(TRANSCODE_CODEC, rate=rate, options=dict(TRANSCODE_OPTIONS))
            v_out.width = v_in.codec_context.width - v_in.codec_context.width % 2
            v_out.height = v_in.codec_context.height - v_in.codec_context.height % 2
            v_out.pix_fmt = "yuv420p"
            v_out.time_base = base
            v_out.codec_context.time_base = base
        if info.rotation:
            v_out.set_display_rotation(info.rotation)
        a_out = dst.add_stream(VIDEO_FORMATS[tmp.suffix.lower()][1], rate=sample_rate, layout="mono")
        a_out.bit_rate = bitrate
        a_out.time_base = Fraction(1, sample_rate)

        if copy:
            for packet in src.demux(v_in):
                if not packet.size:  # the demuxer's flush packet
                    continue
                if end is not None and packet.pts is not None and packet.pts >= end:
                    continue
                packet.stream = v_out
                dst.mux(packet)
        else:
            v_in.thread_type = "AUTO"
            for frame in src.decode(v_in):
                if end is not None and frame.pts is not None and frame.pts >= end:
                    break
                out = frame.reformat(width=v_out.width, height=v_out.height, format="yuv420p")
                out.pts, out.time_base = frame.pts, base
                for packet in v_out.encode(out):
                    dst.mux(packet)
            for packet in v_out.encode(None):
                dst.mux(packet)

        # The music starts with the first frame, in the file's own clock.
        frame = av.AudioFrame.from_ndarray(np.clip(samples, -1, 1)[None], format="fltp", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts = round(info.start_time * sample_rate)
        frame.time_base = Fraction(1, sample_rate)
        for packet in a_out.encode(frame):
            dst.mux(packet)
        for packet in a_out.encode(None):
            dst.mux(packet)
