"""Distribution distances and tag-based scores between generated and reference audio.

Embeddings come from any backbone (muvi's offline one is the musicnn port,
:mod:`muvi.encoders.musicnn`); all maths here is float64 numpy.

- Fréchet distance ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2). The trace of the
  matrix square root is taken from the eigenvalues of the *symmetric* PSD matrix
  S1^1/2 S2 S1^1/2 (``numpy.linalg.eigh``, negative round-off clipped), which equals
  tr((S1 S2)^1/2) without the complex intermediate results and the "tiny imaginary part"
  handling that ``scipy.linalg.sqrtm(S1 @ S2)`` needs (pytorch-fid's method, used as the test
  reference). With fewer samples than dimensions (singular covariances) the same trace is the
  nuclear norm of a small data matrix, see :func:`frechet_distance_embeddings`.
- Kernel distances: the unbiased MMD^2 estimator (diagonal terms left out, so it can be slightly
  negative and is 0 in expectation for equal distributions). ``kernel="poly"`` is KID's cubic
  polynomial kernel k(x, y) = (x.y / d + 1)^3; ``kernel="rbf"`` is KAD's Gaussian kernel with
  the bandwidth set to the median pairwise distance of the reference set. :func:`kernel_audio_distance`
  is the RBF one (KAD, Chung et al. 2025, without its x1000 display scale).
- Paired KL over tag probabilities, KL(reference || generated) per pair, as in audioldm_eval:
  ``"softmax"`` (its headline KL, AudioGen's formulation: softmax over the classifier logits),
  ``"sigmoid"`` (its second KL: sum_k p_k log(p_k / (q_k + 1e-6)) over sigmoid outputs, which is
  not a true divergence for multi-label outputs), and ``"bernoulli"`` (a proper multi-label KL,
  the sum of per-tag Bernoulli divergences). musicnn outputs sigmoid probabilities; its logits
  are recovered as log(p / (1 - p)).
- Inception score as audioldm_eval computes it: softmax over logits, rows shuffled with a seeded
  ``RandomState``, ``splits`` chunks, exp(mean KL(p(y|x) || p(y))) per chunk, mean and std.

The paper's own FAD (VGGish) and FD/KL/IS (PANNs Cnn14) need those networks' weights, which cannot
be downloaded here: :func:`load_user_backbone` accepts a user-supplied weight file only after its
SHA-256 matches the one the user states, and never downloads anything; :func:`build_user_network`
loads it into muvi's port (:mod:`muvi.encoders.vggish`, :mod:`muvi.encoders.panns`).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


# --- Fréchet distance -------------------------------------------------------------------------
def embedding_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` (unbiased, ddof=1) of ``(N, D)`` embeddings, float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (N >= 2, D) embeddings, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _clip_roundoff(values: np.ndarray) -> np.ndarray:
    """Eigenvalues of a PSD matrix with round-off (below its numerical-rank tolerance) set to 0.

    Without this, the square roots of ~1e-14 round-off eigenvalues of a rank-deficient product
    add up to a visible error (~1e-6) in the trace of its square root.
    """
    tol = values.size * np.finfo(np.float64).eps * max(float(np.abs(values).max(initial=0.0)), 1e-300)
    return np.where(values > tol, values, 0.0)


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(_clip_roundoff(values))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians, float64, via the symmetric square-root form."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = float(np.sqrt(_clip_roundoff(np.linalg.eigvalsh((middle + middle.T) / 2))).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def frechet_distance_embeddings(reference: np.ndarray, generated: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` embedding sets.

    With fewer samples than dimensions the covariances are singular; then the trace term is
    computed exactly from the data: with S1 = A^T A and S2 = B^T B (A, B the centred samples
    over sqrt(N - 1)), tr((S1^1/2 S2 S1^1/2)^1/2) is the nuclear norm (sum of singular values)
    of the small matrix B A^T.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(generated, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(len(x), len(y)) < 2:
        raise ValueError(f"need two (N >= 2, D) embedding sets, got shapes {x.shape} and {y.shape}")
    if min(len(x), len(y)) >= x.shape[1]:
        return frechet_distance(*embedding_stats(x), *embedding_stats(y))
    a = (x - x.mean(0)) / np.sqrt(len(x) - 1)
    b = (y - y.mean(0)) / np.sqrt(len(y) - 1)
    trace_sqrt = float(np.linalg.svd(b @ a.T, compute_uv=False).sum())
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() + (b * b).sum() - 2.0 * trace_sqrt)


# --- kernel distances ---------------------------------------------------------------------------
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """Median pairwise Euclidean distance within ``x`` (distinct pairs), KAD's bandwidth choice."""
    x = np.asarray(x, dtype=np.float64)
    d = np.sqrt(_sq_dists(x, x)[np.triu_indices(len(x), k=1)])
    return float(np.median(d)) if d.size else 1.0


def mmd2_unbiased(reference: np.ndarray, generated: np.ndarray, kernel: str = "poly",
                  bandwidth: float | None = None) -> float:
    """Unbiased MMD^2 between ``(N, D)`` and ``(M, D)`` samples (N, M >= 2).

    ``kernel="poly"``: (x.y / D + 1)^3 (KID). ``kernel="rbf"``: exp(-|x - y|^2 / (2 h^2)) with
    ``h = bandwidth`` or, if None, the median pairwise distance of ``reference``.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(generated, dtype=np.float64)
    n, m = len(x), len(y)
    if n < 2 or m < 2:
        raise ValueError(f"need at least 2 samples per set, got {n} and {m}")
    if kernel == "poly":
        dim = x.shape[1]

        def k(a, b):
            return (a @ b.T / dim + 1.0) ** 3
    elif kernel == "rbf":
        h = bandwidth if bandwidth is not None else median_bandwidth(x)
        h = h if h > 0 else 1.0

        def k(a, b):
            return np.exp(-_sq_dists(a, b) / (2.0 * h * h))
    else:
        raise ValueError(f"unknown kernel {kernel!r}; use 'poly' or 'rbf'")
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    term_x = (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
    term_y = (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())


def kernel_audio_distance(reference: np.ndarray, generated: np.ndarray, bandwidth: float | None = None) -> float:
    """KAD: unbiased MMD^2 with a Gaussian kernel, median-distance bandwidth of the reference."""
    return mmd2_unbiased(reference, generated, kernel="rbf", bandwidth=bandwidth)


# --- tag-probability scores ---------------------------------------------------------------------
def _logits(scores: np.ndarray, from_logits: bool) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if from_logits:
        return s
    p = np.clip(s, 1e-7, 1.0 - 1e-7)
    return np.log(p) - np.log1p(-p)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def paired_kl(reference: np.ndarray, generated: np.ndarray, mode: str = "softmax",
              from_logits: bool = False, eps: float = 1e-6) -> np.ndarray:
    """KL(reference_i || generated_i) for each pair of ``(N, C)`` tag scores, shape ``(N,)``.

    ``reference``/``generated`` are sigmoid probabilities, or logits with ``from_logits=True``.
    Modes (see module docstring): ``"softmax"`` and ``"sigmoid"`` follow audioldm_eval (``eps``
    is added to the generated probabilities only, as there); ``"bernoulli"`` is the sum of
    per-class Bernoulli KLs. The mean over pairs is audioldm_eval's reported number. Because
    of ``eps``, identical pairs score about ``-C * eps`` (-5e-5 for 50 tags) in those two modes.
    """
    ref_z, gen_z = _logits(reference, from_logits), _logits(generated, from_logits)
    if ref_z.shape != gen_z.shape or ref_z.ndim != 2:
        raise ValueError(f"need two (N, C) arrays of equal shape, got {ref_z.shape} and {gen_z.shape}")
    if mode == "softmax":
        p = np.exp(_log_softmax(ref_z))
        log_q = np.log(np.exp(_log_softmax(gen_z)) + eps)
        return (p * (np.log(np.where(p > 0, p, 1.0)) - log_q)).sum(axis=1)
    p, q = 1.0 / (1.0 + np.exp(-ref_z)), 1.0 / (1.0 + np.exp(-gen_z))
    if mode == "sigmoid":
        return (p * (np.log(p) - np.log(q + eps))).sum(axis=1)
    if mode == "bernoulli":
        return (p * (np.log(p) - np.log(q)) + (1 - p) * (np.log1p(-p) - np.log1p(-q))).sum(axis=1)
    raise ValueError(f"unknown KL mode {mode!r}; use 'softmax', 'sigmoid' or 'bernoulli'")


def inception_score(scores: np.ndarray, from_logits: bool = False, splits: int = 10,
                    seed: int = 2020) -> tuple[float, float]:
    """Inception score (mean, std over ``splits``) of ``(N, C)`` tag scores, audioldm_eval style."""
    z = _logits(scores, from_logits)
    n = len(z)
    if n < splits or splits < 1:
        raise ValueError(f"need at least splits={splits} samples, got {n}")
    z = z[np.random.RandomState(seed).permutation(n)]
    log_p = _log_softmax(z)
    p = np.exp(log_p)
    values = []
    for i in range(splits):
        chunk, log_chunk = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(chunk.mean(axis=0, keepdims=True))
        values.append(float(np.exp((chunk * (log_chunk - log_marginal)).sum(axis=1).mean())))
    return float(np.mean(values)), float(np.std(values))


# --- user-supplied backbones --------------------------------------------------------------------
class BackboneUnavailable(RuntimeError):
    """A metric needs a network or weight file muvi does not have; the message says what to supply."""


#: Backbones of the paper's audioldm_eval metrics, and what each one computes.
USER_BACKBONES = {
    "vggish": "FAD (VGGish embeddings, 16 kHz, torchvggish layout)",
    "panns_cnn14": "FD, KL and IS (PANNs Cnn14, 16 kHz checkpoint 'Cnn14_16k_mAP=0.438.pth')",
}


@dataclasses.dataclass
class UserBackbone:
    """A verified user-supplied weight file: its kind, path, SHA-256 and state dict."""

    kind: str
    path: str
    sha256: str
    state_dict: dict


def load_user_backbone(kind: str, path: str | Path | None, sha256: str | None) -> UserBackbone:
    """Read a user-supplied VGGish/PANNs weight file after checking its SHA-256. Never downloads.

    Raises:
        BackboneUnavailable: no path or no expected hash given, or the file is missing.
        ValueError: unknown ``kind``, or the file's hash differs from ``sha256``.
    """
    if kind not in USER_BACKBONES:
        raise ValueError(f"unknown backbone {kind!r}; known: {sorted(USER_BACKBONES)}")
    flag = kind.split("_")[0]
    if path is None or not sha256:
        raise BackboneUnavailable(
            f"{USER_BACKBONES[kind]} not available: supply --{flag} PATH and --{flag}-sha256 HEX "
            "(weights are never downloaded)")
    path = Path(path)
    if not path.is_file():
        raise BackboneUnavailable(f"{kind} weight file not found: {path}")
    from muvi.checkpoint import check_sha256

    actual = check_sha256(path, sha256)
    import importlib

    module, function = _USER_WEIGHT_READERS[kind]
    return UserBackbone(kind, str(path), actual, getattr(importlib.import_module(module), function)(path))


#: kind -> (module, function) reading a weight file (weights-only): the PANNs files also hold
#: numpy arrays (their data sampler's state), which muvi.encoders.panns allows.
_USER_WEIGHT_READERS = {
    "vggish": ("muvi.checkpoint", "read_state_dict"),
    "panns_cnn14": ("muvi.encoders.panns", "read_panns_checkpoint"),
}

#: kind -> (module, function) building the network from a verified state dict; imported on use.
_USER_NETWORK_BUILDERS = {
    "vggish": ("muvi.encoders.vggish", "vggish_from_state_dict"),
    "panns_cnn14": ("muvi.encoders.panns", "cnn14_from_state_dict"),
}


def build_user_network(backbone: UserBackbone):
    """The network (eval mode) for a verified backbone: :class:`muvi.encoders.vggish.VGGish` or
    :class:`muvi.encoders.panns.Cnn14`, its state dict loaded strictly.

    Raises:
        muvi.checkpoint.CheckpointError: the file does not fit the network (the message lists
            missing, unexpected and mis-shaped keys).
    """
    import importlib

    module, function = _USER_NETWORK_BUILDERS[backbone.kind]
    return getattr(importlib.import_module(module), function)(backbone.state_dict, source=backbone.path)
