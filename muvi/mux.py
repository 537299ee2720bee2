"""Putting a generated soundtrack into a copy of the video.

The picture is copied packet for packet when the output container can hold its codec (an .mp4
of H.264 stays bit-identical); otherwise it is transcoded to H.264 (CRF 18, visually lossless
for most footage) and one log line says so, as for a 12 fps cinepak .mkv from an old game. The
source's timestamps are kept (start offset, variable frame rate) and so is its display
rotation; the music starts with the first frame. With ``duration`` the picture is cut there
too, by copying the packets shown before the cut when they are exactly the first ones decoded;
a cut among frames decoded out of order (B-frames) is transcoded, see :func:`_write`. The
source's own audio is left out: the music is the only audio stream.

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


class _CopyRefused(Exception):
    """Why the picture cannot be copied; :func:`_mux` says it once and transcodes instead."""


def _mux(info: VideoInfo, samples: np.ndarray, sample_rate: int, tmp: Path, *,
         duration: Optional[float], bitrate: int) -> None:
    """Copy the picture; transcode it only when the copy is refused (by the container, its
    muxer or the cut). Every other error, the music's included, is the caller's to report."""
    try:
        _write(info, samples, sample_rate, tmp, duration=duration, bitrate=bitrate, copy=True)
    except _CopyRefused as why:
        logger.warning("%s: %s; transcoding it to H.264 (CRF %s)", info.path, why, TRANSCODE_OPTIONS["crf"])
        _write(info, samples, sample_rate, tmp, duration=duration, bitrate=bitrate, copy=False)


def _format_for(tmp: Path) -> str:
    return VIDEO_FORMATS[tmp.suffix.lower()][0]


def _write(info: VideoInfo, samples: np.ndarray, sample_rate: int, tmp: Path, *,
           duration: Optional[float], bitrate: int, copy: bool) -> None:
    """One attempt at the file; with ``copy`` raises :class:`_CopyRefused` when it cannot be.

    A cut is copied only when the packets shown before it are exactly the first ones decoded.
    Otherwise (a P-frame shown after the cut is decoded before the B-frames shown ahead of it)
    the kept B-frames would lose their reference. Keeping that P-frame but hiding it works in
    no container here: Matroska has no edit lists, FFmpeg's mp4 muxer ends its edit list with
    the last packet, and PyAV cannot flag a packet discarded, so the extra frame is shown (as
    FFmpeg decodes both). Transcoding just the last group of frames would splice two encodings
    with different codec headers. So such a cut transcodes the picture.
    """
    import av

    with av.open(str(info.path)) as src, av.open(str(tmp), "w", format=_format_for(tmp)) as dst:
        v_in = src.streams.video[0]
        base = v_in.time_base
        container = tmp.suffix.lstrip(".").lower()
        if copy and info.codec not in dst.supported_codecs:
            raise _CopyRefused(f"the {container} container cannot hold {info.codec} video")
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
        # Opened here, not with the file's header at the first packet, so that an error in the
        # header or the video packets below is the video's, never the music's.
        try:
            a_out.codec_context.open()
        except av.error.FFmpegError as err:
            raise RuntimeError(f"the {a_out.codec_context.name} encoder refused mono audio at "
                               f"{sample_rate} Hz, {bitrate // 1000} kb/s ({err.strerror})") from None

        if copy:
            dropped = False
            for packet in src.demux(v_in):
                if not packet.size:  # the demuxer's flush packet
                    continue
                # a packet without timestamps goes the way of the one decoded before it
                shown = packet.pts if packet.pts is not None else packet.dts
                if end is not None and (dropped if shown is None else shown >= end):
                    dropped = True
                    continue
                if dropped:  # shown before the cut, decoded after a frame it may refer to
                    raise _CopyRefused(f"the cut at {duration:g} s falls among {info.codec} frames "
                                       "decoded out of order, so it cannot be copied")
                packet.stream = v_out
                try:
                    dst.mux(packet)  # the first one writes the header
                except av.error.FFmpegError as err:
                    if isinstance(err, OSError):  # the disk, not the codec
                        raise
                    raise _CopyRefused(f"the {container} muxer refused to copy {info.codec} video "
                                       f"({err.strerror})") from None
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


def loop_video(video_path: str | Path, out_path: str | Path, seconds: float) -> Path:
    """Write ``out_path``: the picture of ``video_path`` played over and over (packets copied,
    timestamps shifted by the clip's span each time) until it lasts at least ``seconds``; no
    audio. For long-video tests and benchmarks made from a short clip (``seconds`` is rounded
    up to whole repeats)."""
    import av

    info = probe_video(video_path)
    with av.open(str(info.path)) as source:
        stream_in = source.streams.video[0]
        packets = [(p.pts, p.dts, p.duration, bytes(p)) for p in source.demux(stream_in) if p.size]
        if any(pts is None or dts is None for pts, dts, _, _ in packets):
            raise InputError(f"{info.path}: packets without timestamps cannot be looped")
        first = min(pts for pts, _, _, _ in packets)
        span = max(pts + (duration or 0) for pts, _, duration, _ in packets) - first
        repeats = max(1, int(np.ceil(seconds / (span * stream_in.time_base))))

        def write(tmp: Path) -> None:
            with av.open(str(tmp), "w", format=_format_for(tmp)) as out:
                stream = out.add_stream_from_template(stream_in)
                for k in range(repeats):
                    for pts, dts, duration, data in packets:
                        packet = av.Packet(data)
                        packet.pts, packet.dts, packet.duration = pts + k * span, dts + k * span, duration
                        packet.time_base, packet.stream = stream_in.time_base, stream
                        out.mux(packet)

        write_atomically(Path(out_path), write)
    return Path(out_path)
