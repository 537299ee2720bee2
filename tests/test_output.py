"""muvi.output.GenerationOutput: its properties, and save() checked by reading the file back
with soundfile (an independent reader of WAV, FLAC and OGG)."""
import os
import stat

import numpy as np
import pytest
import soundfile as sf
import torch

from muvi.errors import GenerationError, OutputError, OutputExistsError
from muvi.output import GenerationOutput

RATE = 24000


def output(seconds: float = 0.5, **kwargs) -> GenerationOutput:
    """A chord at 0.5 amplitude, with two samples past full scale (to be clipped on save)."""
    t = torch.arange(int(seconds * RATE), dtype=torch.float64) / RATE
    wave = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.2 * torch.sin(2 * torch.pi * 660 * t)
    wave[10], wave[11] = 1.7, -2.5
    return GenerationOutput(waveform=wave.float(), sample_rate=RATE, **kwargs)


@pytest.fixture(autouse=True)
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_properties():
    out = output(0.5, source="clip.mp4", cfg_scale=2.0, num_steps=3, seed=9)
    assert out.duration == 0.5 and isinstance(out.duration, float)
    assert GenerationOutput(torch.zeros(1000), 16000).duration == 1000 / 16000
    array = out.numpy()
    assert isinstance(array, np.ndarray) and array.dtype == np.float32 and array.shape == (12000,)
    assert np.array_equal(array, out.waveform.numpy())
    # a waveform with gradients, in another dtype, still gives a plain float32 array
    grad = GenerationOutput(torch.zeros(10, dtype=torch.float64, requires_grad=True), RATE)
    assert grad.numpy().dtype == np.float32
    default = GenerationOutput(torch.zeros(1), RATE)
    assert (default.source, default.cfg_scale, default.num_steps, default.seed) == ("", 4.0, 25, None)


def test_save_wav_reads_back_clipped(tmp_path):
    out = output()
    path = out.save(tmp_path / "music.wav")
    assert path == tmp_path / "music.wav"
    info = sf.info(str(path))
    assert (info.format, info.samplerate, info.channels, info.frames) == ("WAV", RATE, 1, 12000)
    data, rate = sf.read(str(path), dtype="float32")
    expected = np.clip(out.numpy(), -1.0, 1.0)
    assert rate == RATE and data.shape == (12000,)
    # 16-bit PCM: within one quantisation step of the clipped waveform
    np.testing.assert_allclose(data, expected, rtol=0, atol=1 / 32768 + 1e-7)
    assert data[10] == pytest.approx(1.0, abs=1e-4) and data[11] == -1.0
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["music.wav"]  # no temporary file left


@pytest.mark.parametrize("suffix, fmt, atol", [(".flac", "FLAC", 1 / 32768 + 1e-7), (".OGG", "OGG", 0.05)])
def test_save_other_formats(tmp_path, suffix, fmt, atol):
    out = output()
    path = out.save(tmp_path / "sub" / f"music{suffix}")  # the folder is created
    assert sf.info(str(path)).format == fmt
    data, rate = sf.read(str(path), dtype="float32")
    assert rate == RATE and len(data) == 12000
    np.testing.assert_allclose(data, np.clip(out.numpy(), -1, 1), rtol=0, atol=atol)


def test_save_refuses_an_unknown_suffix(tmp_path):
    with pytest.raises(ValueError) as err:
        output().save(tmp_path / "music.mp3")
    text = str(err.value)
    assert "\n" not in text and str(tmp_path / "music.mp3") in text and "'.mp3'" in text
    assert "['.flac', '.ogg', '.wav']" in text
    assert list(tmp_path.iterdir()) == []


def test_save_never_overwrites_unless_asked(tmp_path):
    path = tmp_path / "music.wav"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError) as err:
        output().save(path)
    assert str(err.value) == f"{path} exists; pass overwrite=True to replace it"
    assert path.read_bytes() == b"precious"
    output().save(path, overwrite=True)
    assert sf.info(str(path)).frames == 12000


def test_save_never_writes_over_the_source_video(tmp_path):
    video = tmp_path / "clip.wav"  # a source of that name, to hit the check and not the suffix one
    video.write_bytes(b"the input")
    out = output(source=str(video))
    for target in (video, tmp_path / "." / "clip.wav"):
        with pytest.raises(OutputError) as err:
            out.save(target, overwrite=True)
        assert str(err.value) == f"{target}: refusing to overwrite the input video"
    assert video.read_bytes() == b"the input"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_save_refuses_non_finite_audio_and_writes_nothing(tmp_path, bad):
    out = output()
    out.waveform[100] = bad
    with pytest.raises(GenerationError) as err:
        out.save(tmp_path / "music.wav")
    assert str(err.value) == f"{tmp_path / 'music.wav'}: the waveform holds NaN or infinite samples; nothing written"
    assert list(tmp_path.iterdir()) == []
