"""Programme loudness (ITU-R BS.1770-4), a look-ahead peak limiter, and the two together:
the mastering step a release may apply to its output.

A release may ask the pipeline to bring its output to a loudness in LUFS
(:attr:`muvi.pipeline.PipelineConfig.loudness_lufs`), as music generators commonly do before
writing audio (audiocraft's ``audio_write(strategy="loudness")`` normalises, then clips) and
as produced music is mastered: :func:`master` applies one gain to the whole track and a
look-ahead limiter (:func:`limit`) that holds the sample peak at a ceiling instead of
clipping. A vocoder makes its waveform's phases itself, so its peaks stand higher over its
loudness than a limited master's do: a gain alone, held under the ceiling, cannot reach a
produced track's level.

:func:`integrated_loudness` follows the recommendation: the K-weighting filter (a high shelf
of about +4 dB above 1.5 kHz, then a 38 Hz high pass), mean squares over 400 ms blocks every
100 ms, an absolute gate at -70 LUFS and a relative gate 10 LU below the mean of the blocks
above it. The filters are designed for any sample rate from their analogue prototypes (the
parameters libebur128 derived from the 48 kHz coefficients of the standard); at 48 kHz they
give the standard's coefficients. Tests compare it with pyloudnorm and with FFmpeg's
``ebur128`` filter on real music.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from scipy.signal import lfilter

logger = logging.getLogger(__name__)

BLOCK_SECONDS = 0.4
HOP_SECONDS = 0.1
ABSOLUTE_GATE_LUFS = -70.0
RELATIVE_GATE_LU = -10.0
#: the loudness targets a release or a request may ask for (the absolute gate would read silence)
TARGET_RANGE = "above -70 and at most 0 LUFS"


def is_target(lufs: float) -> bool:
    """Whether ``lufs`` is a loudness :func:`master` can aim at: above the absolute gate, at
    most full scale (NaN is not)."""
    return ABSOLUTE_GATE_LUFS < lufs <= 0.0

# analogue prototypes of the two K-weighting stages (fitted to the standard's 48 kHz filters)
_SHELF_HZ, _SHELF_GAIN_DB, _SHELF_Q = 1681.974450955533, 3.999843853973347, 0.7071752369554196
_HIGHPASS_HZ, _HIGHPASS_Q = 38.13547087602444, 0.5003270373238773


def k_weighting(sample_rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two biquads (b, a) of the K-weighting filter at ``sample_rate``, in order."""
    k = math.tan(math.pi * _SHELF_HZ / sample_rate)
    vh = 10 ** (_SHELF_GAIN_DB / 20)
    vb = vh ** 0.4996667741545416
    a0 = 1 + k / _SHELF_Q + k * k
    shelf = (np.array([vh + vb * k / _SHELF_Q + k * k, 2 * (k * k - vh), vh - vb * k / _SHELF_Q + k * k]) / a0,
             np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / _SHELF_Q + k * k) / a0]))
    k = math.tan(math.pi * _HIGHPASS_HZ / sample_rate)
    a0 = 1 + k / _HIGHPASS_Q + k * k
    highpass = (np.array([1.0, -2.0, 1.0]),
                np.array([1.0, 2 * (k * k - 1) / a0, (1 - k / _HIGHPASS_Q + k * k) / a0]))
    return [shelf, highpass]


def integrated_loudness(waveform, sample_rate: int) -> float:
    """Integrated loudness in LUFS of a mono ``(samples,)`` or ``(channels, samples)`` signal
    (channel weights 1: left, right, centre). ``-inf`` when no block passes the absolute gate
    (silence, or shorter than one 400 ms block)."""
    x = np.asarray(waveform, dtype=np.float64)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"expected (samples,) or (channels, samples), got shape {x.shape}")
    for b, a in k_weighting(sample_rate):
        x = lfilter(b, a, x, axis=-1)
    block, hop = round(BLOCK_SECONDS * sample_rate), round(HOP_SECONDS * sample_rate)
    count = (x.shape[-1] - block) // hop + 1
    if count < 1:
        return -math.inf
    # mean square of every block, summed over channels, from one cumulative sum per channel
    cumulative = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(x * x, axis=-1)], axis=-1)
    starts = np.arange(count) * hop
    power = ((cumulative[:, starts + block] - cumulative[:, starts]) / block).sum(axis=0)
    with np.errstate(divide="ignore"):
        block_lufs = -0.691 + 10 * np.log10(power)
    power = power[block_lufs > ABSOLUTE_GATE_LUFS]
    if power.size == 0:
        return -math.inf
    relative_gate = -0.691 + 10 * np.log10(power.mean()) + RELATIVE_GATE_LU
    power = power[-0.691 + 10 * np.log10(power) > relative_gate]
    return float(-0.691 + 10 * np.log10(power.mean()))


def limit(waveform, sample_rate: int, ceiling_db: float = -1.0, lookahead_s: float = 0.005,
          release_s: float = 0.05) -> np.ndarray:
    """``waveform`` with its sample peak at most ``ceiling_db`` dBFS, by a smooth gain that is 1
    wherever no peak within ``lookahead_s + release_s`` needs less.

    The gain is built offline, never above what any sample needs: the needed gain
    ``min(1, ceiling / |x|)``, its minimum over ±``lookahead_s``, averaged over the same span
    (so it ramps down over the look-ahead before a peak and each average is still at most the
    need of the sample in its middle), then its attenuation in dB released no faster than an
    exponential decay with time constant ``release_s`` (a held maximum, so the gain only gets
    lower). A signal under the ceiling comes back unchanged."""
    if not (lookahead_s >= 0 and release_s > 0):
        raise ValueError(f"lookahead_s {lookahead_s} must be >= 0 and release_s {release_s} > 0")
    x = np.asarray(waveform, dtype=np.float64)
    ceiling = 10 ** (ceiling_db / 20)
    magnitude = np.abs(x)
    if magnitude.max(initial=0.0) <= ceiling:
        return np.array(waveform, copy=True)
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    need = ceiling / np.maximum(magnitude, ceiling)
    span = 2 * max(1, round(lookahead_s * sample_rate)) + 1
    ramp = uniform_filter1d(minimum_filter1d(need, span, mode="nearest"), span, mode="nearest")
    ramp = np.minimum(ramp, need)  # the average of minima is already below; guard its rounding
    attenuation = -20 * np.log10(ramp)
    # held maximum with exponential release: A[n] = max_k a[k] d^(n-k), chunk by chunk so the
    # running maximum of a[k] d^-k stays finite
    decay = -1.0 / (release_s * sample_rate)  # log of d per sample
    held, carry = np.empty_like(attenuation), 0.0
    chunk = max(1, min(100_000, int(600 / -decay)))  # exp(600) is far from float64's limit
    for start in range(0, attenuation.size, chunk):
        part = attenuation[start:start + chunk]
        steps = np.arange(part.size)
        scaled = np.maximum.accumulate(np.maximum(part * np.exp(-decay * steps), carry * np.exp(decay)))
        held[start:start + part.size] = scaled * np.exp(decay * steps)
        carry = held[start + part.size - 1]
    gain = 10 ** (-held / 20)
    return (x * gain).astype(np.asarray(waveform).dtype, copy=False)


def master(waveform, sample_rate: int, target_lufs: float, ceiling_db: float = -1.0, tolerance: float = 0.05,
           **limiter) -> np.ndarray:
    """``waveform`` brought to ``target_lufs`` integrated loudness with its sample peak at most
    ``ceiling_db`` dBFS: a gain, then :func:`limit` (keyword arguments go to it). The limiter
    only lowers the loudness, the more the higher the gain, so the gain is found by bracketing
    and regula falsi until the loudness is within ``tolerance`` LU. A target louder than the
    ceiling allows gets the loudest the limiter gives (logged). Silence comes back unchanged."""
    x = np.asarray(waveform)
    loudness = integrated_loudness(x, sample_rate)
    if not math.isfinite(loudness):
        return np.array(x, copy=True)

    def attempt(gain_db):
        out = limit(x * 10 ** (gain_db / 20), sample_rate, ceiling_db, **limiter)
        return out, integrated_loudness(out, sample_rate) - target_lufs

    low = target_lufs - loudness  # the gain that would reach the target if nothing were limited
    low_out, low_miss = attempt(low)
    if low_miss >= -tolerance:
        return low_out
    step, high, start = -low_miss, None, low
    while low + step <= start + 60:  # a gain past the target: raise by twice the shortfall, then more
        out, miss = attempt(low + step)
        if miss >= 0:
            high, high_miss = low + step, miss
            break
        if miss < low_miss + 0.01:  # the limiter takes all a higher gain adds
            break
        low, low_miss, low_out, step = low + step, miss, out, 2 * step
    if high is None:
        logger.warning("%.1f LUFS is louder than a %.1f dBFS ceiling allows here: mastered to %.1f LUFS",
                       target_lufs, ceiling_db, target_lufs + low_miss)
        return low_out
    if high_miss <= tolerance:
        return out
    side = 0
    for _ in range(30):  # regula falsi, Illinois: an end kept twice has its miss halved
        guess = low + (high - low) * -low_miss / (high_miss - low_miss)
        out, miss = attempt(guess)
        if abs(miss) <= tolerance:
            return out
        if miss < 0:
            low, low_miss, low_out = guess, miss, out
            high_miss, side = (high_miss / 2, -1) if side == -1 else (high_miss, -1)
        else:
            high, high_miss = guess, miss
            low_miss, side = (low_miss / 2, 1) if side == 1 else (low_miss, 1)
    return low_out
