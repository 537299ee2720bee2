"""The PyTorch musicnn port against the original TensorFlow musicnn on real music.

The reference outputs in tests/fixtures/musicnn_reference.npz were made by
recipes/make_musicnn_fixture.py with TensorFlow 2.21 running musicnn 0.1.0's own code on 10 s of
Mozart (K. 525, rendered from the MIDI file music21 ships). The checkpoint tests need the musicnn
package files (`pip install --no-deps musicnn==0.1.0`) and skip without them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from muvi.encoders import _tf_checkpoint as tfc
from muvi.encoders import musicnn as mn

FIXTURE = Path(__file__).parents[1] / "fixtures" / "musicnn_reference.npz"


@pytest.fixture(scope="module")
def reference():
    data = np.load(FIXTURE)
    arrays = {key: data[key] for key in data.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    arrays["audio"] = arrays["audio_int16"].astype(np.float32) / 32768.0  # as written for TF
    return arrays


@pytest.fixture(scope="module")
def package_dir():
    try:
        return mn.musicnn_package_dir()
    except ModuleNotFoundError as err:
        pytest.skip(f"musicnn checkpoints unavailable: {err}")


@pytest.fixture(scope="module")
def embedders(package_dir, reference):
    overlaps = reference["meta"]["input_overlap"]
    return {model: mn.MusicnnEmbedder.from_package(model, hop_seconds=overlap or None)
            for model, overlap in overlaps.items()}


def _scale_close(actual: np.ndarray, expected: np.ndarray, rel: float) -> float:
    """Max abs difference, asserted below ``rel`` times the reference's largest magnitude."""
    diff = float(np.abs(actual - expected).max())
    assert diff <= rel * float(np.abs(expected).max()), diff
    return diff


# ----------------------------------------------------------------------------- checkpoint reader

def test_crc32c_and_snappy_known_values():
    assert tfc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    # varint length 12; literal "abc" (tag (3-1)<<2); 1-byte-offset copy len 9 offset 3: tag
    # 0b000_101_01 = (9-4)<<2 | 1, offset byte 3. Overlapping copy repeats the pattern.
    assert tfc.snappy_decompress(bytes([12, 0x08]) + b"abc" + bytes([0x15, 3])) == b"abc" * 4
    # 2-byte-offset copy (tag (len-1)<<2 | 2): "xyz" then copy 3 from offset 3.
    assert tfc.snappy_decompress(bytes([6, 0x08]) + b"xyz" + bytes([0x0A, 3, 0])) == b"xyzxyz"
    # long literal: length-1 = 69 in one extra byte (tag 60<<2).
    assert tfc.snappy_decompress(bytes([70, 60 << 2, 69]) + b"q" * 70) == b"q" * 70
    with pytest.raises(tfc.TFCheckpointError):
        tfc.snappy_decompress(bytes([5, 0x15, 3]))  # copy before any output


@pytest.mark.parametrize("model", ["MSD_musicnn", "MTT_musicnn"])
def test_reader_matches_tensorflow_reader(package_dir, reference, model):
    """Names, shapes and values (float64 sums of x and |x|) equal what TensorFlow's reader gave."""
    expected = reference["meta"]["checkpoint_fingerprints"][model]
    tensors = tfc.read_tf_checkpoint(f"{package_dir / model}/")
    assert sorted(tensors) == sorted(expected)
    for name, (shape, total, total_abs) in expected.items():
        values = tensors[name].astype(np.float64)
        assert list(values.shape) == shape, name
        assert values.sum() == pytest.approx(total, rel=1e-12, abs=1e-12), name
        assert np.abs(values).sum() == pytest.approx(total_abs, rel=1e-12, abs=1e-12), name


def test_reader_rejects_corrupt_index(package_dir, tmp_path):
    source = package_dir / "MSD_musicnn"
    for name in (".index", ".data-00000-of-00001"):
        shutil.copy(source / name, tmp_path / name)
    index = bytearray((tmp_path / ".index").read_bytes())
    index[40] ^= 0xFF  # inside the first data block
    (tmp_path / ".index").write_bytes(bytes(index))
    with pytest.raises(tfc.TFCheckpointError, match="checksum"):
        tfc.read_tf_checkpoint(f"{tmp_path}/")


# ----------------------------------------------------------------------------- port vs TensorFlow

def test_log_mel_matches_musicnn(embedders, reference):
    mel = embedders["MSD_musicnn"].log_mel(reference["audio"], int(reference["sample_rate"]))
    assert mel.dtype == np.float32 and mel.shape == reference["mel"].shape
    np.testing.assert_allclose(mel, reference["mel"], rtol=0, atol=5e-4)


@pytest.mark.parametrize("model", ["MSD_musicnn", "MTT_musicnn"])
def test_port_matches_tensorflow(embedders, reference, model):
    embedder, audio, sr = embedders[model], reference["audio"], int(reference["sample_rate"])
    assert list(embedder.tag_names) == reference["meta"]["tag_names"][model]
    probs = embedder.tag_probabilities(audio, sr)
    assert probs.shape == reference[f"{model}/tags"].shape  # same patching (count and stride)
    np.testing.assert_allclose(probs, reference[f"{model}/tags"], rtol=0, atol=1e-4)
    for tap in mn.TAPS:
        emb = embedder.embed(audio, sr, tap=tap)
        assert emb.dtype == np.float32 and emb.shape == reference[f"{model}/{tap}"].shape
        _scale_close(emb, reference[f"{model}/{tap}"], rel=2e-5)


def test_resampled_and_stereo_input(embedders, reference):
    """Other rates go through librosa's default resampler (what musicnn's librosa.load does);
    (channels, samples) is averaged to mono."""
    import librosa

    embedder, audio = embedders["MTT_musicnn"], reference["audio"]
    audio_22k = librosa.resample(audio, orig_sr=16000, target_sr=22050)
    probs = embedder.tag_probabilities(audio_22k, 22050)
    expected = embedder.tag_probabilities(librosa.resample(audio_22k, orig_sr=22050, target_sr=16000), 16000)
    np.testing.assert_array_equal(probs, expected)
    # The round trip trims the band edge near 8 kHz, so only the ranking is compared with TF.
    top = np.argsort(-reference["MTT_musicnn/tags"].mean(axis=0))[:3]
    assert set(np.argsort(-probs.mean(axis=0))[:3]) == set(top)
    stereo = torch.from_numpy(np.stack([audio, audio]))
    np.testing.assert_array_equal(embedder.embed(stereo, 16000), embedder.embed(audio, 16000))


def test_save_and_load_as_a_hub_component(embedders, reference, tmp_path):
    from muvi.encoders.music_frames import MusicnnFrameEncoder
    from muvi.hub import load_component, save_component

    embedder = embedders["MSD_musicnn"]
    save_component(MusicnnFrameEncoder(embedder.network), tmp_path, "musicnn")
    loaded = mn.MusicnnEmbedder(load_component(tmp_path, "musicnn").network)
    assert loaded.tag_names == embedder.tag_names
    audio = reference["audio"][:16000 * 4]
    np.testing.assert_array_equal(loaded.embed(audio, 16000), embedder.embed(audio, 16000))


def test_errors(embedders, monkeypatch):
    embedder = embedders["MSD_musicnn"]
    with pytest.raises(ValueError, match="shorter than one musicnn patch"):
        embedder.embed(np.zeros(16000, np.float32), 16000)
    with pytest.raises(ValueError, match="unknown musicnn tap"):
        embedder.embed(np.zeros(16000 * 4, np.float32), 16000, tap="logits")
    with pytest.raises(FileNotFoundError, match="MTT_vgg"):
        mn.MusicnnEmbedder.from_package("no_such_model")
    monkeypatch.setattr(mn.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps musicnn"):
        mn.MusicnnEmbedder.from_package("MSD_musicnn")
