"""The evaluation runner on real music: pairing, metrics, SIM lines, plots and reproducible JSON.

Music: Bach chorales from the music21 corpus rendered from MIDI (see muvi.data.midi).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tinysoundfont")
pytest.importorskip("music21")
pytest.importorskip("matplotlib")
soundfile = pytest.importorskip("soundfile")

from muvi.data.midi import corpus_midi_files, render_midi  # noqa: E402
from muvi.eval.__main__ import main  # noqa: E402
from muvi.eval.plot import motion_curve, plot_beats  # noqa: E402
from muvi.eval.report import PairingError, SimilarityModel, evaluate, pair_files  # noqa: E402

SR = 24000
PIECES = ("bwv154.8.mxl", "bwv24.6.mxl", "bwv3.6.mxl")  # steady 120 BPM chorales
SECONDS = 8.0


def _write_video(path: Path, seconds: float, cuts: tuple[float, ...], fps: int = 10) -> None:
    """A small MPEG-4 video: a slowly moving bar on a background that flips shade at each cut."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for k in range(int(seconds * fps)):
            shade = 60 + 120 * (sum(k / fps >= c for c in cuts) % 2)
            img = np.full((48, 64, 3), shade, np.uint8)
            img[:, k % 60:k % 60 + 4] = 255 - shade
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """ref/, same/ (identical music), shifted/ (half a beat late): float wavs; videos/ (mp4)."""
    root = tmp_path_factory.mktemp("eval")
    files = {p.name: p for p in corpus_midi_files("bach")}
    for sub in ("ref", "same", "shifted", "videos"):
        (root / sub).mkdir()
    for i, name in enumerate(PIECES):
        audio, grid = render_midi(files[name], sample_rate=SR, duration=SECONDS)
        half = int(round(np.median(np.diff(grid)) / 2 * SR))
        stem = f"clip{i}"
        shifted = np.concatenate([np.zeros(half, np.float32), audio])[:len(audio)]
        for sub, wave in (("ref", audio), ("same", audio), ("shifted", shifted)):
            soundfile.write(root / sub / f"{stem}.wav", wave, SR, subtype="FLOAT")
        _write_video(root / "videos" / f"{stem}.mp4", SECONDS, cuts=(2.0 + i, 5.0))
    return root


@pytest.fixture(scope="module")
def embedder():
    musicnn = pytest.importorskip("muvi.encoders.musicnn")
    try:
        return musicnn.MusicnnEmbedder.from_package()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"musicnn checkpoint unavailable: {err}")


class ChromaSimilarity:
    """Stub contrastive model: position-aware similarity with the video's own soundtrack.

    The per-frame cosine similarity of 10 Hz chroma vectors, averaged over time (the shape of
    MuVi's SIM, with chroma standing in for the learned embeddings).
    """

    weights_sha256 = "stub"

    def __init__(self, soundtrack_dir: Path):
        self.soundtrack_dir = soundtrack_dir

    @staticmethod
    def _chroma(wave: np.ndarray, sr: int) -> np.ndarray:
        import librosa

        return librosa.feature.chroma_stft(y=wave, sr=sr, hop_length=sr // 10, n_fft=4096, tuning=0.0)

    def similarity(self, video_path: str, waveform: np.ndarray, sample_rate: int) -> float:
        target, sr = soundfile.read(self.soundtrack_dir / f"{Path(video_path).stem}.wav", dtype="float32")
        a, b = self._chroma(waveform, sample_rate), self._chroma(target, sr)
        n = min(a.shape[1], b.shape[1])
        a, b = a[:, :n], b[:, :n]
        return float(np.mean((a * b).sum(0) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0) + 1e-9)))


def test_pairing_errors_name_every_unmatched_file(tmp_path):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir(), ref.mkdir()
    for p in (gen / "a.wav", gen / "b.wav", gen / "only_gen.wav", ref / "a.flac", ref / "b.wav", ref / "only_ref.wav"):
        soundfile.write(p, np.zeros(100, np.float32), SR)
    with pytest.raises(PairingError) as err:
        pair_files(gen, ref)
    message = str(err.value)
    assert "'only_gen'" in message and "'only_ref'" in message and "'a'" not in message
    (ref / "only_ref.wav").unlink()
    (gen / "only_gen.wav").unlink()
    pairs = pair_files(gen, ref)
    assert [(p.name, p.reference.suffix) for p in pairs] == [("a", ".flac"), ("b", ".wav")]
    soundfile.write(gen / "a.flac", np.zeros(100, np.float32), SR)
    with pytest.raises(PairingError, match="share a name"):
        pair_files(gen, ref)
    (gen / "a.flac").unlink()
    (tmp_path / "vid").mkdir()
    (tmp_path / "vid" / "a.mp4").write_bytes(b"")
    with pytest.raises(PairingError, match="have no video.*'b'"):
        pair_files(gen, ref, tmp_path / "vid")
    with pytest.raises(PairingError, match="not found"):
        pair_files(tmp_path / "missing", ref)


def test_identical_and_shifted_sets(dirs, embedder):
    same = evaluate(dirs / "same", dirs / "ref", seed=0, n_bootstrap=50, embedder=embedder, progress=False)
    m = same["metrics"]
    assert m["bhs"]["value"] == 100.0 and m["bcs"]["value"] == 100.0 and m["beat_f1"]["value"] == 100.0
    assert m["bhs"]["ci95"] == [100.0, 100.0] and m["bhs"]["n"] == 3
    assert abs(m["fd_musicnn"]["value"]) < 1e-6
    # audioldm_eval's eps on the generated side puts identical pairs at about -50 tags x 1e-6.
    assert m["kl_softmax_musicnn"]["value"] == pytest.approx(-50e-6, abs=1e-6)
    assert abs(m["kl_bernoulli_musicnn"]["value"]) < 1e-9
    assert same["samples"]["count"] == 3
    assert same["durations"]["generated"]["total_s"] == pytest.approx(3 * SECONDS)
    assert len(same["weights_sha256"]["musicnn"]) == 64

    shifted = evaluate(dirs / "shifted", dirs / "ref", seed=0, n_bootstrap=50, embedder=embedder, progress=False)
    s = shifted["metrics"]
    assert s["bhs"]["value"] < 40.0 and s["bhs"]["ci95"][1] < 60.0
    assert s["fd_musicnn"]["value"] > m["fd_musicnn"]["value"]


def test_report_is_byte_identical_for_a_seed(dirs, embedder, tmp_path):
    kwargs = {"n_bootstrap": 100, "embedder": embedder, "progress": False}
    evaluate(dirs / "shifted", dirs / "ref", out_json=tmp_path / "a.json", seed=3, **kwargs)
    evaluate(dirs / "shifted", dirs / "ref", out_json=tmp_path / "b.json", seed=3, **kwargs)
    evaluate(dirs / "shifted", dirs / "ref", out_json=tmp_path / "c.json", seed=4, **kwargs)
    a, b, c = ((tmp_path / f"{x}.json").read_bytes() for x in "abc")
    assert a == b
    ra, rc = json.loads(a), json.loads(c)
    assert ra["metrics"]["fd_musicnn"]["value"] == rc["metrics"]["fd_musicnn"]["value"]
    assert ra["metrics"]["fd_musicnn"]["ci95"] != rc["metrics"]["fd_musicnn"]["ci95"]  # the seed drives the CI
    assert ra["versions"]["numpy"] == np.__version__ and ra["config"]["seed"] == 3
    assert "vggish" in ra["unavailable"] and "--vggish PATH" in ra["unavailable"]["vggish"]


def test_sim_ceiling_floor_and_plots(dirs, tmp_path):
    model = ChromaSimilarity(dirs / "ref")
    assert isinstance(model, SimilarityModel)
    report = evaluate(dirs / "shifted", dirs / "ref", dirs / "videos", seed=0, n_bootstrap=50, embedder=None,
                      similarity_model=model, plots_dir=tmp_path / "plots", progress=False)
    m = report["metrics"]
    assert m["sim_ceiling"]["value"] == pytest.approx(100.0)  # the real soundtrack is its own target
    assert m["sim_floor"]["value"] < 70.0  # other pieces' soundtracks
    assert m["sim_floor"]["value"] < m["sim"]["value"] < m["sim_ceiling"]["value"]
    assert report["weights_sha256"]["similarity_model"] == "stub"
    assert "fd_musicnn" not in m and "musicnn" in report["unavailable"]
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["clip0.png", "clip1.png", "clip2.png"]


def test_motion_curve_finds_cuts_and_plot_is_written(dirs, tmp_path):
    import matplotlib.image

    times, energy = motion_curve(dirs / "videos" / "clip0.mp4", fps=10.0)
    assert len(times) == int(SECONDS * 10) and times[1] == pytest.approx(0.1)
    peaks = sorted(times[np.argsort(energy)[-2:]])
    np.testing.assert_allclose(peaks, [2.0, 5.0], atol=0.11)  # the two cuts
    png = plot_beats(np.arange(0, 8, 0.5), np.arange(0.03, 8, 0.25), tmp_path / "beats.png",
                     duration=SECONDS, motion=(times, energy))
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300


def test_cli_writes_report_and_reports_pairing_errors(dirs, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main([str(dirs / "same"), str(dirs / "ref"), "-o", str(out), "--no-musicnn", "--bootstrap", "20", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "bhs" in printed and "95% CI" in printed and str(out) in printed
    assert json.loads(out.read_text())["metrics"]["bhs"]["value"] == 100.0
    empty = tmp_path / "empty"
    empty.mkdir()
    soundfile.write(empty / "other.wav", np.zeros(100, np.float32), SR)
    assert main([str(empty), str(dirs / "ref"), "-o", str(tmp_path / "x.json"), "--no-musicnn", "-q"]) == 2
    err = capsys.readouterr().err
    assert "'other'" in err and "'clip0'" in err
