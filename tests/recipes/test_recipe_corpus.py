"""The corpus recipe (recipes/build_corpus.py, muvi/data/corpus.py) on a tiny build.

Material: Bach chorales from the music21 corpus, Big Buck Bunny and photographs from scikit-video,
scikit-image and matplotlib (see the recipe's SOURCES table); scikit-video's bikes.mp4 (licence
unknown, only read here) anchors the cut detector against plain pixel differences.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("music21")
pytest.importorskip("pretty_midi")
pytest.importorskip("tinysoundfont")
pytest.importorskip("skvideo")
pytest.importorskip("skimage")

from muvi.data import corpus as C  # noqa: E402
from muvi.data import footage  # noqa: E402

from conftest import load_recipe  # noqa: E402

ARGS = ["--preset", "tiny", "--seed", "3", "--num-validation", "1", "--no-progress"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    load_recipe("build_corpus").main(["--out", str(out), *ARGS])
    return out


def _records(root: Path, folder: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((root / folder).glob("*.json"))]


def test_layout_and_csv(built):
    from muvi.data.datasets import VideoMusicDataset

    assert len(list((built / "music").glob("music_*.wav"))) == 2
    assert len(list((built / "pairs").glob("pair_*.mp4"))) == 3  # 2 training + 1 validation
    assert len(list((built / "heldout").glob("heldout_*.mp4"))) == 1
    assert (built / "pairs.csv").read_text().splitlines()[1:] == [
        f"pairs/pair_{i:04d}.mp4,pairs/pair_{i:04d}.wav" for i in range(2)]
    assert (built / "validation.csv").read_text().splitlines() == [
        "video,audio", "pairs/pair_0002.mp4,pairs/pair_0002.wav"]
    data = VideoMusicDataset(built / "pairs.csv", min_seconds=1.0, max_seconds=2.0, size=64)
    assert len(data) == 2 and data.durations == pytest.approx([4.0, 4.0], abs=0.05)
    item = data[0]
    assert item["frames"].shape[1:] == (3, 64, 64) and item["audio_path"].endswith(".wav")
    assert item["music"].shape[0] == round((item["end"] - item["start"]) * 24000)


def test_pair_files_decode_with_their_music(built):
    from muvi.data.audio_io import load_audio
    from muvi.video import read_frames

    for folder in ("pairs", "heldout"):
        for rec in _records(built, folder):
            mp4 = built / folder / rec["video"]
            frames = read_frames(mp4, fps=rec["fps"])
            assert frames.shape == (round(rec["duration"] * rec["fps"]), 3, rec["height"], rec["width"])
            wav = load_audio(built / folder / rec["audio"], rec["sample_rate"]).numpy()
            assert wav.shape[0] == round(rec["duration"] * rec["sample_rate"])
            aac = load_audio(mp4, rec["sample_rate"]).numpy()
            # AAC pads its last frame (1024 samples); the music starts at sample 0, unshifted.
            assert wav.shape[0] <= aac.shape[0] <= wav.shape[0] + 1024
            assert np.corrcoef(aac[: wav.shape[0]], wav)[0, 1] > 0.98


def test_cuts_land_on_beats_and_show_in_the_picture(built):
    from muvi.video import read_frames

    total = 0
    for folder in ("pairs", "heldout"):
        for rec in _records(built, folder):
            fps, beats = rec["fps"], np.array(rec["beats"])
            for cut in rec["cuts"]:
                gap = np.min(np.abs(beats - cut["time"]))
                assert cut["time"] == pytest.approx(cut["frame"] / fps)
                if cut["on_beat"]:
                    assert gap <= 0.5 / fps + 1e-6 and abs(cut["time"] - cut["beat"]) <= 0.5 / fps + 1e-6
                else:
                    assert gap >= 1.5 / fps - 1e-6
            frames = read_frames(built / folder / rec["video"], fps=fps).permute(0, 2, 3, 1).numpy()
            found = footage.detect_cuts(frames)
            cuts = [c["frame"] for c in rec["cuts"]]
            zooms = [a["frame"] for a in rec["accents"] if a["kind"] == "zoom"]
            for k in cuts:
                assert min(abs(k - f) for f in found) <= 1, (rec["video"], k, found)
            for f in found:  # nothing else changes the picture abruptly (zoom punches may)
                assert min(abs(k - f) for k in cuts + zooms) <= 1, (rec["video"], f, cuts, zooms)
            total += len(cuts)
    assert total >= 3


def test_cut_schedule_statistics():
    beats = np.arange(0.3, 30.0, 0.5)  # 120 BPM
    cuts = []
    for seed in range(60):
        cuts += C.schedule_cuts(beats, 30.0, 20, np.random.default_rng(seed), offbeat_prob=0.2)
    off = np.array([not c["on_beat"] for c in cuts])
    assert len(cuts) > 500 and abs(off.mean() - 0.2) < 0.04
    gaps = np.array([np.min(np.abs(beats - c["time"])) for c in cuts])
    assert np.all(gaps[~off] <= 0.025 + 1e-9) and np.all(gaps[off] >= 0.075 - 1e-9)


def test_detect_cuts_matches_pixel_differences_on_real_footage():
    skvideo = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0])
    frames, _ = footage.load_footage(skvideo / "datasets" / "data" / "bikes.mp4", 272)
    raw = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    # bikes.mp4 has hard cuts whose plain pixel change is several times any motion in it
    assert footage.detect_cuts(frames) == [k + 1 for k in np.flatnonzero(raw > 40)]


def test_heldout_is_disjoint(built):
    train = _records(built, "pairs")
    music = _records(built, "music")
    held = _records(built, "heldout")
    seen = {r["music"]["piece"] for r in train + music}
    assert not seen & {r["music"]["piece"] for r in held}
    assert not {r["music"]["piece"] for r in train} & {r["music"]["piece"] for r in music}
    for rec in held:
        for shot in rec["shots"]:
            assert shot["source"] in ("coffee.png", "rocket.jpg") or shot["span"][0] >= 99
    for rec in train:
        for shot in rec["shots"]:
            assert shot["source"] not in ("coffee.png", "rocket.jpg") and shot["span"][1] <= 99


def test_beat_grid_matches_the_rendered_drums():
    import music21
    import torch

    from muvi.data.midi import load_midi

    piece = load_midi(Path(music21.__file__).parent / "corpus" / "bach" / "bwv66.6.mxl")
    clip = C.render_clip(piece, 8.0, 24000, np.random.default_rng(0), drums_prob=1.0)
    assert clip.info["drums"] is not None and len(clip.beats) >= 8
    # Spectral flux (5 ms hop): every beat carries a drum hit, a quarter-beat later there is none.
    hop = 120
    spec = torch.stft(torch.from_numpy(clip.waveform), 1024, hop, window=torch.hann_window(1024),
                      return_complex=True).abs()
    flux = torch.relu(torch.diff(torch.log1p(100 * spec), dim=1)).sum(0).numpy()
    times = (np.arange(len(flux)) + 1) * hop / 24000

    def peak(t: float) -> float:
        return float(flux[np.abs(times - t) <= 0.02].max())

    period = float(np.median(np.diff(clip.beats)))
    beats = clip.beats[(clip.beats > 0.05) & (clip.beats + period / 4 < 7.95)]
    on, off = [peak(b) for b in beats], [peak(b + period / 4) for b in beats]
    assert min(on) > 3 * max(off), (on, off)


def test_same_seed_same_bytes(built, tmp_path):
    load_recipe("build_corpus").main(["--out", str(tmp_path), *ARGS])
    names = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for name in names:  # wav, json, csv, md and (deterministic encoder settings) mp4
        assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_validation_pairs_are_the_training_split_continued(built, tmp_path):
    """A validation pair is byte for byte the pair a build with more training pairs would make
    (same pieces, footage and random stream), so choosing settings on it is choosing on clips
    drawn like the training ones but never trained on."""
    load_recipe("build_corpus").main(["--out", str(tmp_path), "--preset", "tiny", "--seed", "3", "--num-pairs", "3",
                                      "--num-music", "0", "--num-heldout", "0", "--no-progress"])
    assert not (tmp_path / "validation.csv").exists()
    assert len((tmp_path / "pairs.csv").read_text().splitlines()) == 4
    for suffix in (".mp4", ".wav", ".json"):
        for i in range(3):
            name = f"pairs/pair_{i:04d}{suffix}"
            assert (built / name).read_bytes() == (tmp_path / name).read_bytes(), name
    sources = (built / "SOURCES.md").read_text()
    assert "| validation pairs |" in sources
    assert json.loads((built / "corpus.json").read_text())["items"]["validation"][0]["file"] == "pair_0002.mp4"


def test_sources_md_lists_every_source(built):
    text = (built / "SOURCES.md").read_text()
    for folder in ("music", "pairs", "heldout"):
        for rec in _records(built, folder):
            assert f"`{rec['music']['piece']}`" in text
            for shot in rec.get("shots", []):
                assert shot["source"] in text
    for needle in ("CC-BY 3.0", "CC0", "TimGM6mb", "bikes.mp4", "not used (licence unknown"):
        assert needle in text


def test_heldout_evaluation_scores_three_conditions(built, tmp_path):
    """recipes/eval_heldout.py on the tiny corpus with a random tiny release and SIM model: the
    three conditions are what they claim (same seed; the next clip's video; no video at all),
    and a second sample per clip is the same with the seed one clip count further on."""
    import soundfile as sf
    import torch

    from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder
    from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
    from muvi.eval.sim import SimilarityScorer
    from muvi.models.contrastive import ContrastiveConfig, ContrastiveModel
    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_presets("tiny")
    pipe.save_pretrained(tmp_path / "release")
    torch.manual_seed(0)
    SimilarityScorer(ContrastiveModel(ContrastiveConfig.preset("tiny")), VideoMAEEncoder(VideoMAEConfig.preset("tiny")),
                     AudioMAEEncoder(AudioMAEConfig.preset("tiny"))).save_pretrained(tmp_path / "sim")
    out = tmp_path / "eval"
    reports = load_recipe("eval_heldout").main([
        "--release", str(tmp_path / "release"), "--pairs", str(built / "pairs.csv"), "--out", str(out),
        "--contrastive", str(tmp_path / "sim"), "--steps", "2", "--bootstrap", "20", "--seed", "5",
        "--samples", "2"])

    videos = [built / "pairs" / f"pair_{i:04d}.mp4" for i in range(2)]
    for folder, seed in ((out, 5), (out / "sample1", 7)):  # sample k of clip 0: seed 5 + 0 + k * 2 clips
        for condition, source, cfg_scale in (("own", videos[0], 4.0), ("shuffled", videos[1], 4.0),
                                             ("null", videos[1], 0.0)):  # null ignores the video
            wave, sr = sf.read(folder / condition / "pair_0000.wav", dtype="float32")
            expected = pipe.generate(str(source), duration=4.0, num_steps=2, seed=seed, cfg_scale=cfg_scale,
                                     progress=False)
            assert sr == 24000 and wave.shape == (96000,)
            np.testing.assert_allclose(wave, expected.waveform.clamp(-1, 1).numpy(), atol=1e-4)  # 16-bit WAV
    assert (out / "sample1" / "report_own.json").is_file()
    for condition in ("own", "shuffled", "null"):
        metrics = reports[condition]["metrics"]
        assert {"bhs", "beat_f1", "event_hit", "event_hit_ceiling", "sim", "sim_floor"} <= set(metrics)
        assert json.loads((out / f"report_{condition}.json").read_text())["metrics"]["bhs"] == metrics["bhs"]
    summary = (out / "summary.md").read_text()
    assert all(f"| {m} |" in summary for m in ("bhs", "event_hit", "sim")) and "own − shuffled" in summary
    assert "each clip's 2 samples averaged" in summary and "sample 1 (seeds 7..)" in summary


def test_paired_table_subtracts_clip_by_clip():
    eval_heldout = load_recipe("eval_heldout")
    own = [{"matched_beats": m, "reference_beats": 10, "event_hits": h, "events": 4, "sim": s}
           for m, h, s in ((5, 2, 10.0), (6, 4, 20.0), (7, 1, 30.0))]
    floor = [dict(c, matched_beats=c["matched_beats"] - 1, event_hits=c["event_hits"] - 1, sim=c["sim"] + 5)
             for c in own]
    table = eval_heldout.paired_table({"own": {"clips": own}, "shuffled": {"clips": floor}, "null": {"clips": own}})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    assert rows["bhs"][0].startswith("+10.0 [+10.0, +10.0]") and rows["bhs"][1] == "3 / 3"
    assert rows["event_hit"][0].startswith("+25.0") and rows["sim"][0].startswith("-5.0") and rows["sim"][1] == "0 / 3"
    assert rows["bhs"][2].startswith("+0.0") and rows["bhs"][3].strip(" |") == "0 / 3"


def test_paired_table_averages_the_samples_of_a_clip_first():
    """Two samples per clip: each condition's per-clip values are averaged before the own −
    floor difference, so a clip whose own samples are 2 and 4 hits against a floor of 3 and 3
    counts as +0, not as one loss and one win."""
    eval_heldout = load_recipe("eval_heldout")

    def reports(own_hits, floor_hits):
        clip = {"matched_beats": 5, "reference_beats": 10, "events": 10, "sim": 0.0}
        return {"own": {"clips": [dict(clip, event_hits=h) for h in own_hits]},
                "shuffled": {"clips": [dict(clip, event_hits=h) for h in floor_hits]},
                "null": {"clips": [dict(clip, event_hits=h) for h in floor_hits]}}

    samples = [reports([2, 6], [3, 5]), reports([4, 6], [3, 3])]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:]
            for line in eval_heldout.paired_table(samples).splitlines()[2:]}
    # clip 0: own (20 + 40) / 2 = 30 against 30 → 0; clip 1: 60 against 40 → +20; mean +10
    assert rows["event_hit"][0].startswith("+10.0") and rows["event_hit"][1] == "1 / 2"
    assert eval_heldout.paired_table(samples[:1]) == eval_heldout.paired_table(samples[0])
