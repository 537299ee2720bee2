"""muvi.loudness: BS.1770 integrated loudness against two implementations nobody here wrote
(pyloudnorm, FFmpeg's ebur128 filter) and the standard's own calibration tone; the limiter's
guarantees; mastering reaches its target."""
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from muvi.loudness import integrated_loudness, k_weighting, limit, master


@pytest.fixture(scope="module")
def music(real_music_24k):
    """Real music at two rates, 0.5 of full scale at its peak."""
    import librosa

    wave, rate = real_music_24k
    wave = 0.5 * wave / np.abs(wave).max()
    return {rate: wave, 48000: librosa.resample(wave, orig_sr=rate, target_sr=48000)}


def test_k_weighting_at_48k_is_the_standards_filter():
    """BS.1770-4 lists the two biquads at 48 kHz; the rate-independent design gives them."""
    (b1, a1), (b2, a2) = k_weighting(48000)
    np.testing.assert_allclose(b1, [1.53512485958697, -2.69169618940638, 1.19839281085285], atol=1e-10)
    np.testing.assert_allclose(a1, [1.0, -1.69065929318241, 0.73248077421585], atol=1e-10)
    np.testing.assert_allclose(b2, [1.0, -2.0, 1.0])
    np.testing.assert_allclose(a2, [1.0, -1.99004745483398, 0.99007225036621], atol=1e-10)


def test_a_full_scale_997_hz_tone_reads_minus_3_01_lufs():
    """The standard's calibration: a 0 dBFS 997 Hz sine in one channel is -3.01 LKFS."""
    rate = 48000
    tone = np.sin(2 * np.pi * 997 * np.arange(10 * rate) / rate)
    assert integrated_loudness(tone, rate) == pytest.approx(-3.01, abs=0.005)
    assert integrated_loudness(0.1 * tone, rate) == pytest.approx(-23.01, abs=0.005)


@pytest.mark.parametrize("rate", [24000, 48000])
def test_loudness_of_real_music_equals_pyloudnorm(music, rate):
    """pyloudnorm designs its filters slightly differently (its 997 Hz tone reads 0.04 LU low):
    equal within 0.1 LU."""
    pyloudnorm = pytest.importorskip("pyloudnorm")
    wave = music[rate]
    assert integrated_loudness(wave, rate) == pytest.approx(pyloudnorm.Meter(rate).integrated_loudness(wave), abs=0.1)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs the ffmpeg command line")
@pytest.mark.parametrize("rate", [24000, 48000])
def test_loudness_of_real_music_equals_ffmpeg_ebur128(music, rate, tmp_path):
    """FFmpeg's ebur128 filter prints the integrated loudness to 0.1 LU."""
    import soundfile as sf

    path = tmp_path / "music.wav"
    sf.write(path, music[rate], rate, subtype="FLOAT")
    log = subprocess.run(["ffmpeg", "-nostats", "-i", str(path), "-af", "ebur128", "-f", "null", "-"],
                         capture_output=True, text=True, check=True).stderr
    ffmpeg = float(re.findall(r"I:\s+(-?[\d.]+) LUFS", log)[-1])
    assert integrated_loudness(music[rate], rate) == pytest.approx(ffmpeg, abs=0.051)


def test_the_gates_leave_silence_out_and_find_nothing_in_it(music):
    """More silence around the music does not change its integrated loudness (blocks of
    silence fall under the absolute gate; only the blocks across its edges count); silence
    alone, or less than one 400 ms block, has none; a stereo pair sums its channels."""
    rate = 24000
    wave = music[rate]

    def padded(seconds):
        return np.concatenate([np.zeros(seconds * rate), wave, np.zeros(seconds * rate)])

    assert integrated_loudness(padded(10), rate) == pytest.approx(integrated_loudness(padded(1), rate), abs=1e-9)
    assert integrated_loudness(np.zeros(rate), rate) == -math.inf
    assert integrated_loudness(wave[:rate // 4], rate) == -math.inf
    stereo = np.stack([wave, wave])
    assert integrated_loudness(stereo, rate) == pytest.approx(integrated_loudness(wave, rate) + 10 * math.log10(2))


def test_the_limiter_holds_the_ceiling_and_leaves_quiet_music_alone(music):
    rate = 24000
    wave = music[rate]  # peak 0.5 = -6 dBFS
    assert np.array_equal(limit(wave, rate, ceiling_db=-3.0), wave)
    loud = 4 * wave  # peak +6 dBFS
    out = limit(loud, rate, ceiling_db=-1.0)
    assert out.dtype == loud.dtype and np.abs(out).max() <= 10 ** (-1 / 20) * (1 + 1e-6)
    gain = out[np.abs(loud) > 1e-3] / loud[np.abs(loud) > 1e-3]
    assert gain.min() > 0 and gain.max() <= 1 + 1e-6  # one smooth positive gain, never a boost


def test_the_limiter_ramps_ahead_of_a_peak_and_releases_after_it():
    """A lone spike on a quiet tone: the gain starts falling within the look-ahead before it,
    is back to within 0.1 dB of 1 some release times after it, and is 1 far from it."""
    rate, spike = 24000, 12000
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)
    x = tone.copy()
    x[spike] = 1.0
    out = limit(x, rate, ceiling_db=-6.0, lookahead_s=0.005, release_s=0.05)
    assert abs(out[spike]) == pytest.approx(10 ** (-6 / 20), rel=1e-6)
    gain_db = 20 * np.log10(np.abs(out[np.abs(tone) > 0.05] / x[np.abs(tone) > 0.05]))
    where = np.flatnonzero(np.abs(tone) > 0.05)
    before = where < spike - 2 * int(0.005 * rate) - 1
    assert np.all(gain_db[before] > -1e-9)  # untouched before the look-ahead
    after = where > spike + int(6 * 0.05 * rate)
    assert np.all(gain_db[after] > -0.1)  # released
    assert gain_db[(where > spike) & (where < spike + int(0.01 * rate))].min() < -3  # held just after


def test_master_reaches_the_target_under_the_ceiling(music):
    """Mastering to -14 LUFS a track that a gain alone cannot bring there (its peaks would pass
    -1 dBFS first): within 0.05 LU, the peak at the ceiling; silence stays silence."""
    rate = 24000
    wave = music[rate]
    out = master(wave, rate, -14.0)
    assert integrated_loudness(out, rate) == pytest.approx(-14.0, abs=0.05)
    assert np.abs(out).max() <= 10 ** (-1 / 20) * (1 + 1e-6)
    quiet = master(wave, rate, -30.0)  # only a gain: no peak near the ceiling
    np.testing.assert_allclose(quiet, wave * 10 ** ((-30.0 - integrated_loudness(wave, rate)) / 20), rtol=1e-6)
    assert np.array_equal(master(np.zeros(rate), rate, -14.0), np.zeros(rate))


def test_a_target_the_ceiling_cannot_allow_gets_the_loudest_it_can(music, caplog):
    """A DC offset has no K-weighted loudness to raise: past the ceiling a higher gain adds
    nothing, so master stops there, says so, and still holds the ceiling."""
    rate = 24000
    offset = 0.05 + 0.001 * music[rate]
    with caplog.at_level("WARNING", logger="muvi.loudness"):
        out = master(offset, rate, -14.0)
    assert "louder than a -1.0 dBFS ceiling allows" in caplog.text
    assert np.abs(out).max() <= 10 ** (-1 / 20) * (1 + 1e-6) and np.isfinite(out).all()
    assert integrated_loudness(offset, rate) < integrated_loudness(out, rate) < -14.0


def test_targets_are_above_the_absolute_gate_and_at_most_full_scale():
    """One range, read by the pipeline's config check and the CLI's ``--loudness`` alike."""
    from muvi.loudness import is_target

    assert is_target(-16.5) and is_target(0.0) and is_target(-69.9)
    assert not any(is_target(x) for x in (-70.0, 0.1, float("nan"), float("-inf")))
