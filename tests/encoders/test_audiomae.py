"""AudioMAE encoder: equivalence with timm's ViT, the release's fbank, windowing, loading."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from einops import rearrange

from muvi.checkpoint import CheckpointError
from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder, fbank, load_audiomae_encoder, patch_starts

timm_vit = pytest.importorskip("timm.models.vision_transformer")


def _timm_model(cfg: AudioMAEConfig, seed: int = 0) -> torch.nn.Module:
    """timm ViT in the AudioMAE layout, every tensor (norms and pos_embed included) random."""
    torch.manual_seed(seed)
    model = timm_vit.VisionTransformer(
        img_size=(cfg.target_length, cfg.num_mel_bins), patch_size=cfg.patch_size, in_chans=1,
        embed_dim=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True, num_classes=0, global_pool="avg" if cfg.global_pool else "token")
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn_like(t) * 0.2 + (1.0 if t.dim() == 1 and t.shape[0] == cfg.hidden_size else 0.0))
    return model.eval()


def _timm_tokens(model: torch.nn.Module, cfg: AudioMAEConfig, feats: torch.Tensor) -> torch.Tensor:
    out = model.forward_features(feats.unsqueeze(1))[:, 1:]  # timm applies `norm` here (Identity for avg)
    if cfg.global_pool:
        out = model.fc_norm(out)
    n_t, n_f = cfg.grid
    return rearrange(out, "b (t f) d -> b t f d", t=n_t, f=n_f)


def _release_file(tmp_path, model: torch.nn.Module, cfg: AudioMAEConfig, name: str = "ckpt.pth"):
    """A .pth shaped like the release: {"model": ...} with decoder and head tensors we must drop."""
    state = dict(model.state_dict())
    state.update({"decoder_embed.weight": torch.randn(8, cfg.hidden_size), "decoder_pos_embed": torch.randn(1, 3, 8),
                  "mask_token": torch.randn(1, 1, 8), "head.weight": torch.randn(5, cfg.hidden_size),
                  "head.bias": torch.randn(5)})
    path = tmp_path / name
    torch.save({"model": state, "epoch": 3}, path)
    return path


@pytest.mark.parametrize("global_pool", [True, False])
def test_matches_timm_vit(tmp_path, caplog, global_pool):
    cfg = AudioMAEConfig.preset("tiny", global_pool=global_pool)
    ref = _timm_model(cfg)
    with caplog.at_level(logging.INFO, logger="muvi.encoders.audiomae"):
        ours = load_audiomae_encoder(_release_file(tmp_path, ref, cfg), cfg)
    assert "decoder_embed.weight" in caplog.text and "head.bias" in caplog.text
    feats = torch.randn(2, cfg.target_length, cfg.num_mel_bins)
    with torch.no_grad():
        got, want = ours(feats), _timm_tokens(ref, cfg, feats)
    assert got.shape == (2, cfg.target_length // 16, cfg.num_mel_bins // 16, cfg.hidden_size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_grid_axes_are_time_then_frequency():
    """With no blocks and zero pos/bias, a tone in time patch 3 / freq patch 1 lights only that token."""
    cfg = AudioMAEConfig.preset("tiny", depth=0)
    model = AudioMAEEncoder(cfg)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.patch_embed.proj.bias.zero_()
        model.fc_norm.bias.zero_()
    feats = torch.zeros(1, cfg.target_length, cfg.num_mel_bins)
    feats[0, 3 * 16:4 * 16, 16:32] = torch.randn(16, 16)
    nonzero = model(feats).abs().sum(-1)[0] > 0
    expected = torch.zeros(cfg.grid, dtype=torch.bool)
    expected[3, 1] = True
    assert torch.equal(nonzero, expected)


def test_fresh_pos_table_is_the_releases():
    """The release's table: 1D sin-cos of the two meshgrid coordinates of a (M/16 rows, T/16 columns) grid."""
    cfg = AudioMAEConfig.preset("tiny")
    n_t, n_f = cfg.grid
    cols, rows = np.meshgrid(np.arange(n_t, dtype=np.float64), np.arange(n_f, dtype=np.float64))

    def sincos(dim, pos):
        freqs = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
        ang = pos.reshape(-1)[:, None] * freqs
        return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)

    half = cfg.hidden_size // 2
    table = np.concatenate([sincos(half, cols), sincos(half, rows)], axis=1)
    table = np.concatenate([np.zeros((1, cfg.hidden_size)), table])[None]
    torch.testing.assert_close(AudioMAEEncoder(cfg).pos_embed, torch.tensor(table, dtype=torch.float32))


def _kaldi_fbank_numpy(x: np.ndarray, sr: int, num_bins: int) -> np.ndarray:
    """Independent float64 Kaldi fbank with the release's settings (25 ms Hanning frames, 10 ms hop,
    per-frame DC removal, pre-emphasis 0.97, 512-point power spectrum, HTK mel, 20 Hz to Nyquist)."""
    win, hop, nfft = int(0.025 * sr), int(0.010 * sr), 512
    x = x.astype(np.float64) - x.mean()
    n = 1 + (len(x) - win) // hop
    frames = np.stack([x[i * hop:i * hop + win] for i in range(n)])
    frames -= frames.mean(axis=1, keepdims=True)
    prev = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * prev
    frames *= 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    power = np.abs(np.fft.rfft(frames, n=nfft)) ** 2  # (n, 257)

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(sr / 2)
    delta = (hi - lo) / (num_bins + 1)
    fft_mel = mel(np.arange(nfft // 2) * sr / nfft)
    left = lo + np.arange(num_bins)[:, None] * delta
    up = (fft_mel - left) / delta
    down = (left + 2 * delta - fft_mel) / delta
    banks = np.maximum(0.0, np.minimum(up, down))  # (bins, 256); the Nyquist bin gets weight 0
    energies = power[:, :nfft // 2] @ banks.T
    return np.log(np.maximum(energies, np.finfo(np.float32).eps))


def test_fbank_matches_kaldi_reference(real_music_24k):
    import torchaudio.compliance.kaldi as kaldi
    import torchaudio.functional as AF

    wave, sr = real_music_24k
    cfg = AudioMAEConfig()
    wav16 = AF.resample(torch.from_numpy(wave), sr, cfg.sample_rate)
    got = fbank(wav16, cfg)
    assert got.shape == (1 + (wav16.shape[0] - 400) // 160, 128)
    # torchaudio with the release's call, then its normalisation
    want = kaldi.fbank((wav16 - wav16.mean())[None], htk_compat=True, sample_frequency=16000, use_energy=False,
                       window_type="hanning", num_mel_bins=128, dither=0.0, frame_shift=10)
    torch.testing.assert_close(got, (want + 4.2677393) / (2 * 4.5689974))
    # an independent implementation of the same maths
    ref = _kaldi_fbank_numpy(wav16.double().numpy(), 16000, 128)
    np.testing.assert_allclose(fbank(wav16, cfg, normalize=False).numpy(), ref, atol=1e-3, rtol=0)


def test_patch_starts():
    cfg = AudioMAEConfig.preset("tiny")  # windows of 128 frames = 8 patches
    assert patch_starts(50, cfg).tolist() == [0, 16, 32, 48]
    assert patch_starts(256, cfg).tolist() == list(range(0, 256, 16))
    assert patch_starts(300, cfg).tolist() == list(range(0, 256, 16)) + [300 - 48, 300 - 32, 300 - 16]


def test_windowing_25s_and_frame_features():
    cfg = AudioMAEConfig.preset("tiny")
    torch.manual_seed(0)
    model = AudioMAEEncoder(cfg).eval()
    sr = cfg.sample_rate
    wav = torch.randn(2, 25 * sr) * 0.1
    num_frames = 1 + (wav.shape[1] - 400) // 160  # 2498
    L = cfg.target_length
    with torch.no_grad():
        out = model.encode(wav, sr, window_batch=7)  # 2 clips x 20 windows, in uneven chunks
        assert out.shape == (2, math.ceil(num_frames / 16), cfg.num_mel_bins // 16, cfg.hidden_size)
        # the tail comes from the last L frames alone, i.e. the samples behind them
        last = num_frames - L
        alone = model.encode(wav[:, last * 160:(num_frames - 1) * 160 + 400], sr)
        n_tail = out.shape[1] - (num_frames // L) * (L // 16)
        assert 0 < n_tail < L // 16
        torch.testing.assert_close(out[:, -n_tail:], alone[:, -n_tail:], rtol=1e-4, atol=1e-4)
        # a full window in the middle equals encoding its own samples
        k = 5
        mid = model.encode(wav[:, k * L * 160:((k + 1) * L - 1) * 160 + 400], sr)
        torch.testing.assert_close(out[:, k * 8:(k + 1) * 8], mid, rtol=1e-4, atol=1e-4)
        # shorter than one window: zero-padded log-mel, cropped to the patches over real frames
        short = model.encode(wav[:, :sr], sr)
        assert short.shape[1] == math.ceil((1 + (sr - 400) // 160) / 16)

        # frame features: mean over frequency, linear in time at the video frame rate
        fps, n_video = 10.0, 250
        feats = model.frame_features(wav, sr, fps, n_video)
    assert feats.shape == (2, n_video, cfg.hidden_size)
    src = model.patch_times(wav.shape[1]).numpy()
    assert np.all(np.diff(src) > 0)
    per_patch = out.mean(2).numpy()
    dst = np.arange(n_video) / fps
    ref = np.stack([np.stack([np.interp(dst, src, per_patch[b, :, c]) for c in range(cfg.hidden_size)], -1)
                    for b in range(2)])
    np.testing.assert_allclose(feats.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_resamples_input():
    import torchaudio.functional as AF

    cfg = AudioMAEConfig.preset("tiny")
    model = AudioMAEEncoder(cfg).eval()
    wav = torch.randn(24000 * 3) * 0.1
    with torch.no_grad():
        torch.testing.assert_close(model.encode(wav, 24000), model.encode(AF.resample(wav, 24000, 16000), 16000))


def test_infers_config_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    cfg = AudioMAEConfig(target_length=32, hidden_size=128, depth=1, num_heads=2, global_pool=False)
    ref = _timm_model(cfg, seed=1)
    path = tmp_path / "enc.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_audiomae_encoder(path)
    assert ours.config == cfg
    feats = torch.randn(1, 32, 128)
    with torch.no_grad():
        torch.testing.assert_close(ours(feats), _timm_tokens(ref, cfg, feats), rtol=1e-5, atol=1e-5)


def test_bad_checkpoints(tmp_path):
    cfg = AudioMAEConfig.preset("tiny")
    ref = _timm_model(cfg)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_audiomae_encoder(garbage, cfg)
    with pytest.raises(CheckpointError, match="pos_embed holds 32 patches"):
        load_audiomae_encoder(_release_file(tmp_path, ref, cfg), AudioMAEConfig.preset("tiny", target_length=256))
    state = {k: v for k, v in ref.state_dict().items() if k != "blocks.1.mlp.fc2.bias"}
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc2.bias"):
        load_audiomae_encoder(tmp_path / "missing.pth", cfg)
    with pytest.raises(CheckpointError, match="norm"):  # fine-tuned layout into a pre-trained config
        load_audiomae_encoder(_release_file(tmp_path, ref, cfg), AudioMAEConfig.preset("tiny", global_pool=False))
