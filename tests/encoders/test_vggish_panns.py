"""muvi's VGGish and PANNs Cnn14 ports against the reference packages, on real music.

References (installed from PyPI, nothing downloaded): ``torchvggish`` 0.2 (harritaylor's port;
built with ``postprocess=False`` so it fetches no PCA file, its PCA postprocessor constructed
without its download), ``panns-inference`` 0.1.1 with ``torchlibrosa`` 0.1.0 (its ``Cnn14``
class built without a checkpoint; the package's import-time label download is pointed at a local
empty label file in a temporary HOME). Both networks get shared random weights, passed to muvi
through a weight file and its SHA-256 as a user would. Music: Mozart K. 525 (conftest).
"""
from __future__ import annotations

import dataclasses
import importlib
import json

import numpy as np
import pytest
import torch

from muvi.checkpoint import CheckpointError, read_state_dict, sha256_file
from muvi.encoders import panns as P
from muvi.encoders import vggish as V
from muvi.eval import distances as D


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return sha256_file(path)


def _he_init(model: torch.nn.Module) -> torch.nn.Module:
    """He-normal weights and small random biases: a random VGGish whose output depends on its
    input (PyTorch's default init shrinks the signal at every layer until the biases dominate)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                torch.nn.init.uniform_(m.bias, -0.1, 0.1)
    return model


def _save_like_panns_release(state: dict, path) -> str:
    """A file laid out like the published PANNs checkpoints: "model" beside the training data
    sampler's numpy state, pickled with numpy 1's module names (as those 2020 files were)."""
    sampler = {"indexes_per_class": [np.arange(7), np.arange(3)], "queue": [4, 1],
               "pointers_of_classes": [np.int64(2), np.int64(0)]}
    torch.save({"iteration": 10, "model": state, "sampler": sampler}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert data.count(b"numpy._core.multiarray") + data.count(b"numpy.core.multiarray") >= 2
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    return sha256_file(path)


def _calibrate_batch_norms(model: torch.nn.Module, waveforms: torch.Tensor, seed: int) -> None:
    """Set every batch norm's running statistics to those of its input on ``waveforms`` (B, L),
    layer by layer, and its affine parameters at random.

    With arbitrary statistics a random Cnn14's output hardly depends on its input (the BN offsets
    swamp a signal that shrinks through twelve random convolutions); calibrated like a trained
    network, its outputs differ between clips, so the comparisons below mean something.
    """
    g = torch.Generator().manual_seed(seed)

    def calibrate(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)))
        module.weight.copy_(0.5 + torch.rand(module.num_features, generator=g))
        module.bias.copy_(torch.rand(module.num_features, generator=g) - 0.5)

    hooks = [m.register_forward_pre_hook(calibrate) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model(waveforms)
    for hook in hooks:
        hook.remove()


def _close(actual, expected, rel: float) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    diff = float(np.abs(actual - expected).max())
    assert diff <= rel * float(np.abs(expected).max()), diff
    return diff


@pytest.fixture(scope="module")
def panns_models(tmp_path_factory):
    """panns_inference.models, imported with its label file supplied locally (no wget)."""
    pytest.importorskip("torchlibrosa")
    if importlib.util.find_spec("panns_inference") is None:
        pytest.skip("panns-inference not installed (pip install --no-deps panns-inference torchlibrosa)")
    home = tmp_path_factory.mktemp("home")
    (home / "panns_data").mkdir()
    (home / "panns_data" / "class_labels_indices.csv").write_text("index,mid,display_name\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        return importlib.import_module("panns_inference.models")


@pytest.fixture(scope="module")
def music_24k(request):
    for package in ("tinysoundfont", "music21", "pretty_midi"):  # what conftest renders with
        pytest.importorskip(package)
    return request.getfixturevalue("real_music_24k")


# --- VGGish -------------------------------------------------------------------------------------
def test_vggish_matches_torchvggish_on_real_music(music_24k, tmp_path):
    pytest.importorskip("resampy")
    tv = pytest.importorskip("torchvggish.torchvggish")
    vggish_input = pytest.importorskip("torchvggish.vggish_input")
    wave, sr = music_24k
    torch.manual_seed(0)
    reference = _he_init(tv.VGG(tv.make_layers(), postprocess=False).eval())
    pca_matrix, pca_means = 0.1 * torch.randn(128, 128), torch.randn(128, 1)
    state = {**reference.state_dict(), "pproc.pca_eigen_vectors": pca_matrix, "pproc.pca_means": pca_means}
    path = tmp_path / "vggish.pth"
    network = V.load_vggish(path, _save(state, path))
    assert network.config == V.VGGishConfig.preset("vggish", pca=True)

    # Front end: 24 kHz -> resampy -> log-mel examples, against torchvggish's numpy pipeline.
    expected = vggish_input.waveform_to_examples(wave.astype(np.float64), sr)
    examples = V.waveform_to_examples(wave, sr, network.config)
    assert examples.shape == expected.shape == (5, 1, 96, 64)
    _close(examples, expected.detach(), rel=1e-6)

    with torch.no_grad():
        # audioldm_eval's FAD: last ReLU removed from `embeddings`, no PCA.
        fad_reference = torch.nn.Sequential(*list(reference.embeddings.children())[:-1])
        full = reference.embeddings
        reference.embeddings = fad_reference
        fad_expected = reference(expected).numpy()
        reference.embeddings = full
        relu_expected = reference(expected)
        postprocessor = tv.Postprocessor.__new__(tv.Postprocessor)  # its __init__ downloads
        postprocessor._pca_matrix, postprocessor._pca_means = pca_matrix, pca_means
        quantised_expected = postprocessor.postprocess(relu_expected).numpy()
    fad = network.embed(wave, sr)
    diff = _close(fad, fad_expected, rel=1e-5)
    assert (fad < 0).any(), "FAD embeddings must be taken before the final ReLU"
    _close(network.embed(wave, sr, activation=True), relu_expected.numpy(), rel=1e-5)
    quantised = network.embed(wave, sr, activation=True, postprocess=True)
    assert np.abs(quantised - quantised_expected).max() <= 1 and (quantised == quantised_expected).mean() > 0.99
    assert 5 < np.unique(quantised).size and quantised.min() >= 0 and quantised.max() <= 255
    print(f"VGGish FAD embedding max |diff| {diff:.2e} (scale {np.abs(fad_expected).max():.3f})")


def test_vggish_reads_files_like_audioldm_fad(music_24k, tmp_path):
    pytest.importorskip("resampy")
    soundfile = pytest.importorskip("soundfile")
    wave, sr = music_24k
    stereo = np.stack([wave, 0.5 * wave], axis=1)
    soundfile.write(tmp_path / "clip.wav", stereo, sr, subtype="PCM_16")
    int16, _ = soundfile.read(tmp_path / "clip.wav", dtype="int16")
    import resampy

    expected = resampy.resample((int16 / 32768.0).mean(axis=1), sr, 16000)
    np.testing.assert_array_equal(V.read_fad_waveform(tmp_path / "clip.wav"), expected)


# --- PANNs Cnn14 --------------------------------------------------------------------------------
def test_cnn14_matches_panns_inference_on_real_music(music_24k, panns_models):
    import torchaudio.functional as AF

    wave, sr = music_24k
    # audioldm_eval's input: mean removed, torchaudio resampling to 16 kHz (no padding at 5 s).
    x = P.prepare_waveform(wave, sr, P.Cnn14Config.preset("16k"))
    expected_x = AF.resample(torch.from_numpy(wave - wave.mean())[None], orig_freq=sr, new_freq=16000)[0]
    np.testing.assert_allclose(x.numpy(), expected_x.numpy(), atol=1e-6)

    torch.manual_seed(1)
    reference = panns_models.Cnn14(sample_rate=16000, window_size=512, hop_size=160, mel_bins=64, fmin=50,
                                   fmax=8000, classes_num=527).eval()
    _calibrate_batch_norms(reference, x[None], seed=1)
    # (Loading from a file in the published {"model": ...} layout is tested on a tiny network below.)
    network = P.cnn14_from_state_dict(reference.state_dict(), source="panns_inference")
    assert network.config == P.Cnn14Config.preset("16k")
    with torch.no_grad():
        out = reference(x[None])
        logits = reference.fc_audioset(out["embedding"])  # audioldm_eval's "logits"
        ours = network(x[None])
    assert ours.embedding.shape == (1, 2048) and ours.logits.shape == (1, 527)
    diffs = [_close(ours.clipwise_output, out["clipwise_output"], rel=1e-5),
             _close(ours.embedding, out["embedding"], rel=1e-5),
             _close(ours.logits, logits, rel=1e-5)]
    assert float(ours.embedding.std()) > 1e-3 and float(ours.clipwise_output.std()) > 1e-3  # not degenerate
    print("Cnn14 max |diff| clipwise/embedding/logits: " + " ".join(f"{d:.2e}" for d in diffs))


@pytest.mark.parametrize("preset", ["16k", "32k"])
def test_cnn14_front_end_matches_torchlibrosa(music_24k, preset):
    stft = pytest.importorskip("torchlibrosa.stft")
    import torchaudio.functional as AF

    config = P.Cnn14Config.preset(preset)
    spectrogram = stft.Spectrogram(n_fft=config.window_size, hop_length=config.hop_size,
                                   win_length=config.window_size, window="hann", center=True,
                                   pad_mode="reflect", freeze_parameters=True)
    logmel = stft.LogmelFilterBank(sr=config.sample_rate, n_fft=config.window_size, n_mels=config.mel_bins,
                                   fmin=config.fmin, fmax=config.fmax, ref=1.0, amin=1e-10, top_db=None,
                                   freeze_parameters=True)
    network = P.Cnn14(dataclasses.replace(config, channels=(2,) * 6, embedding_dim=4))  # fresh buffers
    real, imag = P.stft_kernels(config.window_size)
    _close(real, spectrogram.stft.conv_real.weight.detach(), rel=1e-7)
    _close(imag, spectrogram.stft.conv_imag.weight.detach(), rel=1e-7)
    torch.testing.assert_close(network.logmel_extractor.melW, logmel.melW.detach(), rtol=0, atol=0)
    wave, sr = music_24k
    x = AF.resample(torch.from_numpy(wave)[None], orig_freq=sr, new_freq=config.sample_rate)
    with torch.no_grad():
        expected = logmel(spectrogram(x))
        ours = network.logmel_extractor(network.spectrogram_extractor(x))
    assert ours.shape == expected.shape == (1, 1, 1 + x.shape[-1] // config.hop_size, 64)
    np.testing.assert_allclose(ours.numpy(), expected.numpy(), atol=1e-3)  # dB, from 1-ulp kernel rounding


# --- loading: sizes, hashes, mismatches ----------------------------------------------------------
TINY_VGGISH = dict(blocks=((4,), (8,), (8, 8), (16, 16)), hidden=(32, 32), embedding_dim=16)
TINY_CNN14 = dict(channels=(4, 8, 8, 16, 16, 32), embedding_dim=32)


def test_loaders_infer_sizes_check_hashes_and_report_missing_layers(tmp_path):
    torch.manual_seed(2)
    vggish_config = V.VGGishConfig.preset("vggish", **TINY_VGGISH)
    state = V.VGGish(vggish_config).state_dict()
    path = tmp_path / "vggish_tiny.pth"
    digest = _save(state, path)
    assert V.load_vggish(path, digest.upper()).config == vggish_config
    with pytest.raises(ValueError, match=f"{path}.*does not match"):
        V.load_vggish(path, "0" * 64)
    del state["features.13.weight"]
    _save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): features\.13\.weight"):
        V.load_vggish(path)

    cnn_config = P.Cnn14Config.preset("32k", **TINY_CNN14)
    network = P.Cnn14(cnn_config)
    state = network.state_dict()
    path = tmp_path / "cnn14_tiny.pth"
    digest = _save_like_panns_release(state, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        read_state_dict(path)  # plain weights-only reading rejects the sampler's numpy arrays
    loaded = P.load_panns(path, digest)
    assert loaded.config == cnn_config and not loaded.training
    torch.testing.assert_close(loaded.state_dict(), state, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{path}.*does not match"):
        P.load_panns(path, digest[::-1])
    del state["conv_block6.conv2.weight"]
    _save({"model": state}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): conv_block6\.conv2\.weight"):
        P.load_panns(path)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        P.cnn14_from_state_dict({**network.state_dict(), "extra.weight": torch.zeros(1)})


# --- the evaluation report and CLI ---------------------------------------------------------------
def test_cli_reports_fad_fd_kl_is_from_user_weights(music_24k, tmp_path, capsys):
    """Random tiny networks: the numbers mean nothing, but equal sets must give 0 and the report
    must match the metrics computed directly from the networks' outputs."""
    pytest.importorskip("resampy")
    soundfile = pytest.importorskip("soundfile")
    from muvi.eval.__main__ import main

    wave, sr = music_24k
    torch.manual_seed(3)
    vggish_path, panns_path = tmp_path / "vggish.pth", tmp_path / "cnn14.pth"
    vggish_sha = _save(_he_init(V.VGGish(V.VGGishConfig.preset("vggish", **TINY_VGGISH))).state_dict(), vggish_path)
    segment = int(1.6 * sr)
    clips = [wave[i * segment:(i + 1) * segment] for i in range(3)]
    cnn = P.Cnn14(P.Cnn14Config.preset("16k", **TINY_CNN14))
    _calibrate_batch_norms(cnn, torch.stack([P.prepare_waveform(c, sr, cnn.config) for c in clips]), seed=3)
    panns_sha = _save_like_panns_release(cnn.state_dict(), panns_path)
    rng = np.random.default_rng(0)
    dirs = {name: tmp_path / name for name in ("ref", "rotated", "noisy")}
    for d in dirs.values():
        d.mkdir()
    for i, clip in enumerate(clips):
        soundfile.write(dirs["ref"] / f"c{i}.wav", clip, sr, subtype="FLOAT")
        soundfile.write(dirs["rotated"] / f"c{i}.wav", clips[(i + 1) % 3], sr, subtype="FLOAT")
        noisy = clip + 0.05 * rng.standard_normal(len(clip)).astype(np.float32)
        soundfile.write(dirs["noisy"] / f"c{i}.wav", noisy, sr, subtype="FLOAT")
    flags = ["--no-musicnn", "--bootstrap", "20", "-q", "--vggish", str(vggish_path), "--vggish-sha256",
             vggish_sha, "--panns", str(panns_path), "--panns-sha256", panns_sha]
    reports = {}
    for name in ("rotated", "noisy"):
        out = tmp_path / f"{name}.json"
        assert main([str(dirs[name]), str(dirs["ref"]), "-o", str(out), *flags]) == 0
        reports[name] = json.loads(out.read_text())
    assert "fad_vggish" in capsys.readouterr().out
    names = ("fad_vggish", "fd_panns", "kl_softmax_panns", "kl_sigmoid_panns", "is_panns")
    for report in reports.values():
        assert set(names) <= set(report["metrics"]) and not set(report["unavailable"]) & {"vggish", "panns_cnn14"}
        assert report["weights_sha256"]["vggish"] == vggish_sha
        assert report["weights_sha256"]["panns_cnn14"] == panns_sha
    rotated, noisy = reports["rotated"]["metrics"], reports["noisy"]["metrics"]
    # The reference clips in another order: the set distances are 0, the paired KLs are not
    # (identical pairs would give about -527e-6, from audioldm_eval's eps).
    assert abs(rotated["fad_vggish"]["value"]) < 1e-9 and abs(rotated["fd_panns"]["value"]) < 1e-9
    assert rotated["kl_softmax_panns"]["value"] > 1e-3 and rotated["kl_sigmoid_panns"]["value"] > 1e-3
    assert noisy["fad_vggish"]["value"] > 1e-6 and noisy["fd_panns"]["value"] > 1e-6

    # The report's numbers are the metrics of the networks' own outputs on the files.
    vggish = V.load_vggish(vggish_path, vggish_sha)
    panns = P.load_panns(panns_path, panns_sha)
    frames = {d: np.concatenate([vggish.embed_file(dirs[d] / f"c{i}.wav") for i in range(3)])
              for d in ("ref", "noisy")}
    assert frames["ref"].shape == (3, 16)  # one 0.96 s example per 1.6 s clip
    assert noisy["fad_vggish"]["value"] == pytest.approx(
        D.frechet_distance_embeddings(frames["ref"], frames["noisy"]), rel=1e-6)
    outputs = {d: [P.clip_outputs(panns, dirs[d] / f"c{i}.wav") for i in range(3)] for d in ("ref", "noisy")}
    emb = {d: np.concatenate([o.embedding.numpy() for o in v]) for d, v in outputs.items()}
    logits = {d: np.concatenate([o.logits.numpy() for o in v]) for d, v in outputs.items()}
    assert noisy["fd_panns"]["value"] == pytest.approx(
        D.frechet_distance_embeddings(emb["ref"], emb["noisy"]), rel=1e-6)
    kl = torch.nn.functional.kl_div((torch.from_numpy(logits["noisy"]).double().softmax(1) + 1e-6).log(),
                                    torch.from_numpy(logits["ref"]).double().softmax(1), reduction="sum") / 3
    assert noisy["kl_softmax_panns"]["value"] == pytest.approx(float(kl), rel=1e-5, abs=1e-9)
    assert noisy["is_panns"]["value"] == pytest.approx(D.inception_score(logits["noisy"], from_logits=True,
                                                                         splits=3)[0], rel=1e-6)
