"""Distribution distances and tag scores against independent reference computations."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial.distance
import scipy.stats
import torch

from muvi.checkpoint import sha256_file
from muvi.eval import distances as D


def _gaussians(seed: int, n: int = 400, d: int = 16):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
    b = rng.normal(0.3, 1.0, size=(n, d)) @ rng.normal(size=(d, d))
    return a, b


def test_frechet_distance_matches_sqrtm_reference():
    a, b = _gaussians(0)
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    # pytorch-fid's formula: sqrtm of the non-symmetric product, imaginary round-off dropped.
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert D.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert D.frechet_distance_embeddings(a, b) == pytest.approx(expected, rel=1e-9)
    # Symmetric in its arguments, like the true distance.
    assert D.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rank_deficient_and_identical():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 50))  # fewer samples than dimensions: singular covariance
    assert abs(D.frechet_distance_embeddings(x, x)) < 1e-9 * np.trace(np.cov(x, rowvar=False))
    y = x + 1.0
    assert D.frechet_distance_embeddings(x, y) == pytest.approx(50.0, rel=1e-9)  # pure mean shift
    # The small-sample (nuclear norm) route agrees with the covariance route.
    z = rng.normal(0.2, 1.5, size=(9, 50))
    via_stats = D.frechet_distance(*D.embedding_stats(x), *D.embedding_stats(z))
    assert D.frechet_distance_embeddings(x, z) == pytest.approx(via_stats, rel=1e-9)


def _mmd_loops(x, y, k):
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_unbiased_matches_explicit_sums():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 5)), rng.normal(0.5, 1.0, size=(9, 5))
    poly = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    assert D.mmd2_unbiased(x, y, "poly") == pytest.approx(_mmd_loops(x, y, poly), rel=1e-10)
    h = np.median(scipy.spatial.distance.pdist(x))
    assert D.median_bandwidth(x) == pytest.approx(h, rel=1e-12)
    rbf = lambda a, b: np.exp(-((a - b) ** 2).sum() / (2 * h * h))  # noqa: E731
    assert D.mmd2_unbiased(x, y, "rbf") == pytest.approx(_mmd_loops(x, y, rbf), rel=1e-10)
    assert D.kernel_audio_distance(x, y) == D.mmd2_unbiased(x, y, "rbf")
    # Far apart sets score higher than two draws of one distribution.
    z = rng.normal(size=(12, 5))
    assert D.kernel_audio_distance(x, z) < D.kernel_audio_distance(x, y + 3.0)


def test_paired_kl_matches_torch_audioldm_formulation():
    rng = np.random.default_rng(3)
    ref_logits, gen_logits = rng.normal(size=(7, 50)) * 2, rng.normal(size=(7, 50)) * 2
    r, g = torch.from_numpy(ref_logits), torch.from_numpy(gen_logits)
    eps = 1e-6
    softmax = torch.nn.functional.kl_div((g.softmax(1) + eps).log(), r.softmax(1), reduction="none").sum(1)
    sigmoid = torch.nn.functional.kl_div((g.sigmoid() + eps).log(), r.sigmoid(), reduction="none").sum(1)
    np.testing.assert_allclose(D.paired_kl(ref_logits, gen_logits, "softmax", from_logits=True),
                               softmax.numpy(), rtol=1e-9)
    np.testing.assert_allclose(D.paired_kl(ref_logits, gen_logits, "sigmoid", from_logits=True),
                               sigmoid.numpy(), rtol=1e-9)
    # Probabilities in (musicnn's sigmoid outputs) give the same numbers as their logits.
    p_ref, p_gen = 1 / (1 + np.exp(-ref_logits)), 1 / (1 + np.exp(-gen_logits))
    np.testing.assert_allclose(D.paired_kl(p_ref, p_gen, "softmax"), softmax.numpy(), rtol=1e-6)
    bern = [sum(scipy.stats.entropy([p, 1 - p], [q, 1 - q]) for p, q in zip(pr, pg, strict=True))
            for pr, pg in zip(p_ref, p_gen, strict=True)]
    np.testing.assert_allclose(D.paired_kl(p_ref, p_gen, "bernoulli"), bern, rtol=1e-8)
    assert np.all(D.paired_kl(p_ref, p_ref, "bernoulli") == 0)


def test_inception_score_matches_entropy_reference():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(40, 10)) * 3
    mean, std = D.inception_score(logits, from_logits=True, splits=4, seed=2020)
    p = scipy.special.softmax(logits[np.random.RandomState(2020).permutation(40)], axis=1)
    scores = [np.exp(np.mean([scipy.stats.entropy(row, chunk.mean(0)) for row in chunk]))
              for chunk in np.split(p, 4)]
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)
    one_class = np.tile(np.eye(10)[0] * 20, (20, 1))
    assert D.inception_score(one_class, from_logits=True, splits=2)[0] == pytest.approx(1.0, abs=1e-6)


def test_user_backbone_is_hash_checked_and_never_downloaded(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "vggish.safetensors"
    save_file({"features.0.weight": torch.arange(6.0).reshape(2, 3)}, str(path))
    digest = sha256_file(path)
    backbone = D.load_user_backbone("vggish", path, digest.upper())
    assert backbone.sha256 == digest and list(backbone.state_dict) == ["features.0.weight"]
    with pytest.raises(ValueError, match="does not match"):
        D.load_user_backbone("vggish", path, "0" * 64)
    with pytest.raises(D.BackboneUnavailable, match="--vggish PATH"):
        D.load_user_backbone("vggish", None, None)
    with pytest.raises(D.BackboneUnavailable, match="--panns PATH"):
        D.load_user_backbone("panns_cnn14", path, None)
    from muvi.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="missing keys"):
        D.build_user_network(backbone)
    with pytest.raises(ValueError, match="unknown backbone"):
        D.load_user_backbone("clap", path, digest)


def test_frechet_distance_on_real_music_embeddings():
    pytest.importorskip("tinysoundfont")
    pytest.importorskip("music21")
    musicnn = pytest.importorskip("muvi.encoders.musicnn")
    from muvi.data.midi import corpus_midi_files, render_midi

    try:
        embedder = musicnn.MusicnnEmbedder.from_package()
    except (FileNotFoundError, ImportError) as err:
        pytest.skip(f"musicnn checkpoint unavailable: {err}")
    files = corpus_midi_files("bach")
    chorales = [embedder.embed(render_midi(files[i], duration=9.0)[0], 24000) for i in (0, 50, 100, 150)]
    brass = [embedder.embed(render_midi(files[i], duration=9.0, program=56)[0], 24000) for i in (0, 50, 100, 150)]
    a = np.concatenate(chorales)
    fd_same = D.frechet_distance_embeddings(a, a.copy())
    fd_other = D.frechet_distance_embeddings(a, np.concatenate(brass))  # same notes on trumpets
    assert abs(fd_same) < 1e-8 * fd_other
    assert fd_other > 1.0
