"""One evaluation run: pair files by name, compute every metric with a bootstrap CI, write JSON.

The report is reproducible: the same inputs and seed give a byte-identical JSON file (keys
sorted, floats rounded to 8 significant digits, no timestamps or host names). Each metric carries
a seeded percentile-bootstrap 95% interval over clips (pairs are resampled together, so paired
metrics keep their pairing), the sample count, and its unit. The file also records durations,
package versions and SHA-256 hashes of every set of weights used.

Metrics (see :mod:`muvi.eval.beats` and :mod:`muvi.eval.distances` for the definitions):
beat metrics on the Ellis DP tracker's beats (literal BCS/BHS and robust P/R/F1); with an
embedder (default: muvi's musicnn port, ``MusicnnEmbedder.from_package()``) the Fréchet distance
over pooled 3 s patch embeddings (as FAD pools VGGish frames), KAD/KID (unbiased MMD^2) over
per-clip mean embeddings, paired KL over per-clip mean tag probabilities, and the inception
score of the generated tags; with a :class:`SimilarityModel` and videos, SIM for the generated
music with the real soundtrack's SIM (ceiling) and shuffled video-music pairs (floor).
With user-supplied VGGish / PANNs Cnn14 weight files (hash-checked, see
:func:`muvi.eval.distances.load_user_backbone`), the paper's FAD and FD/KL/IS as audioldm_eval
computes them (:mod:`muvi.encoders.vggish`, :mod:`muvi.encoders.panns`; each file re-read as audioldm_eval
reads it for that network).
For the kernel distances the bootstrap interval is approximate (a resample repeats clips, and
repeated clips act as near-duplicate pairs in the estimator).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from muvi.eval import distances as D
from muvi.eval.beats import BEAT_METRICS, BeatTrackerConfig, beat_counts, beat_metrics, track_beats
from muvi.eval.pairing import PairingError, check_audio_file, load_audio, load_events, pair_files  # noqa: F401 (API)
from muvi.eval.table import METRIC_INFO, _clean, format_table, write_report  # noqa: F401  (the report's API)

logger = logging.getLogger(__name__)

REPORT_FORMAT = 1
_VERSION_PACKAGES = ("muvi-v2m", "numpy", "scipy", "librosa", "soundfile", "torch", "decord", "matplotlib")

@runtime_checkable
class SimilarityModel(Protocol):
    """What SIM needs from a contrastive model: a position-aware similarity as a float in [-1, 1]."""

    def similarity(self, video_path: str, waveform: np.ndarray, sample_rate: int) -> float:
        ...


def _weights_hash(obj) -> str | None:
    if obj is None:
        return None
    if getattr(obj, "weights_sha256", None):
        return str(obj.weights_sha256)
    network = getattr(obj, "network", obj)
    from muvi.checkpoint import state_hash

    return state_hash(network) if hasattr(network, "state_dict") else None


def _versions() -> dict[str, str | None]:
    import platform
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _ci(samples: np.ndarray) -> list[float | None]:
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return [None, None]
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])]


def _entry(name: str, value: float, replicates: np.ndarray, n: int) -> dict:
    unit, better, description = METRIC_INFO[name]
    return {"value": float(value), "ci95": _ci(replicates), "n": int(n), "unit": unit,
            "higher_is_better": better, "description": description}


def _set_metric(name: str, fn: Callable[[np.ndarray], float], index: np.ndarray, n: int) -> dict:
    """A metric of the whole set, recomputed on each bootstrap resample of clip indices."""
    value = fn(np.arange(n))
    replicates = np.array([fn(idx) for idx in index])
    return _entry(name, value, replicates, n)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def _durations(seconds: Sequence[float]) -> dict:
    s = np.asarray(seconds, dtype=np.float64)
    return {"total_s": s.sum(), "mean_s": s.mean(), "min_s": s.min(), "max_s": s.max()}


def _default_embedder():
    from muvi.encoders.musicnn import MusicnnEmbedder

    return MusicnnEmbedder.from_package()


def evaluate(generated_dir: str | Path, reference_dir: str | Path, videos_dir: str | Path | None = None,
             out_json: str | Path | None = None, seed: int = 0, *, n_bootstrap: int = 1000,
             tolerance: float = 0.1, beat_config: BeatTrackerConfig | None = None,
             embedder="musicnn", similarity_model: SimilarityModel | None = None,
             plots_dir: str | Path | None = None, vggish: str | Path | None = None,
             vggish_sha256: str | None = None, panns: str | Path | None = None,
             panns_sha256: str | None = None, events_dir: str | Path | None = None,
             progress: bool = True) -> dict:
    """Evaluate generated audio against reference audio (and videos) and return the report dict.

    Args:
        generated_dir, reference_dir: folders of audio files paired by file stem.
        videos_dir: folder of videos paired by stem; needed for SIM and motion curves in plots.
        out_json: where to write the JSON report (nothing written if None).
        seed: seeds the bootstrap and the shuffled SIM floor; same seed, same bytes.
        n_bootstrap: bootstrap replicates per metric.
        tolerance: beat matching window in seconds (paper: 100 ms).
        beat_config: beat tracker settings (default: the paper's, see :mod:`muvi.eval.beats`).
        embedder: "musicnn" (muvi's port from the installed ``musicnn`` package), None to skip
            the embedding metrics, or any object with ``embed(waveform, sr) -> (N, D)`` and
            ``tag_probabilities(waveform, sr) -> (N, C)``.
        similarity_model: a :class:`SimilarityModel`; SIM is reported when given with videos.
        plots_dir: write one beat-alignment PNG per clip there.
        vggish, vggish_sha256, panns, panns_sha256: user-supplied weight files for the paper's
            audioldm_eval metrics, checked by hash (see :func:`muvi.eval.distances.load_user_backbone`).
        events_dir: folder of ``<stem>.json`` event times of each video (cuts, motion accents;
            see :func:`load_events`): beats are then also scored against the picture's own
            events, for the generated music and for the real soundtrack (ceiling).
        progress: show a tqdm progress bar.
    """
    from tqdm import tqdm

    pairs = pair_files(generated_dir, reference_dir, videos_dir)
    for pair in pairs:  # every file's header before any heavy work, so a bad one fails at once
        check_audio_file(pair.generated)
        check_audio_file(pair.reference)
    n = len(pairs)
    events = None
    if events_dir is not None:
        missing = [p.name for p in pairs if not (Path(events_dir) / f"{p.name}.json").is_file()]
        if missing:
            raise PairingError(f"{events_dir}: no event file for {len(missing)} clip(s): "
                               + ", ".join(f"{m}.json" for m in missing))
        events = [load_events(Path(events_dir) / f"{p.name}.json") for p in pairs]
    event_counts = np.zeros((2, n, 3), dtype=np.int64)  # generated, real soundtrack
    beat_config = beat_config or BeatTrackerConfig()
    unavailable: dict[str, str] = {}
    weights: dict[str, str | None] = {}

    if isinstance(embedder, str):
        if embedder != "musicnn":
            raise ValueError(f"unknown embedder {embedder!r}; use 'musicnn', None or an embedder object")
        try:
            embedder = _default_embedder()
        except Exception as err:  # missing package or checkpoint: report, do not fail the run
            logger.warning("musicnn embedder unavailable: %s", err)
            unavailable["musicnn"] = f"musicnn embedder unavailable: {err}"
            embedder = None
    elif embedder is None:
        unavailable["musicnn"] = "embedding metrics not requested (embedder=None)"
    if embedder is not None:
        weights["musicnn"] = _weights_hash(embedder)
    networks = {}  # the paper's audioldm_eval backbones, when the user supplies their weights
    for kind, path, digest in (("vggish", vggish, vggish_sha256), ("panns_cnn14", panns, panns_sha256)):
        try:
            backbone = D.load_user_backbone(kind, path, digest)
            weights[kind] = backbone.sha256
            networks[kind] = D.build_user_network(backbone)
        except D.BackboneUnavailable as err:
            unavailable[kind] = str(err)
    use_sim = similarity_model is not None and videos_dir is not None
    if similarity_model is not None and not use_sim:
        unavailable["sim"] = "SIM needs videos: pass videos_dir / --videos"
    elif similarity_model is None:
        unavailable["sim"] = "no contrastive similarity model supplied"
    if use_sim:
        if not isinstance(similarity_model, SimilarityModel):
            raise TypeError("similarity_model must have similarity(video_path, waveform, sample_rate) -> float")
        weights["similarity_model"] = _weights_hash(similarity_model)

    counts = np.zeros((n, 3), dtype=np.int64)
    clips, gen_emb, ref_emb, gen_tags, ref_tags = [], [], [], [], []
    gen_user, ref_user = [], []  # per clip: {"vggish": (N, 128), "panns_embedding": ..., "panns_logits": ...}
    sim = np.full((3, n), np.nan)  # generated, ceiling, floor
    floor_partner = _derangement(n, np.random.default_rng([seed, 1])) if use_sim and n > 1 else None
    ref_audio = {}
    for i, pair in enumerate(tqdm(pairs, desc="evaluating", unit="clip", disable=not progress)):
        gen_wave, gen_sr = load_audio(pair.generated)
        ref_wave, ref_sr = load_audio(pair.reference)
        gen_beats = track_beats(gen_wave, gen_sr, beat_config)
        ref_beats = track_beats(ref_wave, ref_sr, beat_config)
        counts[i] = beat_counts(ref_beats, gen_beats, tolerance)
        if events is not None:
            event_counts[0, i] = beat_counts(events[i], gen_beats, tolerance)
            event_counts[1, i] = beat_counts(events[i], ref_beats, tolerance)
        gen_s, ref_s = len(gen_wave) / gen_sr, len(ref_wave) / ref_sr
        if abs(gen_s - ref_s) > 1.0:
            logger.warning("%s: generated %.2f s vs reference %.2f s", pair.name, gen_s, ref_s)
        clip = {"name": pair.name, "generated_s": gen_s, "reference_s": ref_s,
                "reference_beats": int(counts[i, 0]), "generated_beats": int(counts[i, 1]),
                "matched_beats": int(counts[i, 2])}
        if embedder is not None:
            try:
                gen_emb.append(np.asarray(embedder.embed(gen_wave, gen_sr), dtype=np.float64))
                ref_emb.append(np.asarray(embedder.embed(ref_wave, ref_sr), dtype=np.float64))
                gen_tags.append(np.asarray(embedder.tag_probabilities(gen_wave, gen_sr), np.float64).mean(0))
                ref_tags.append(np.asarray(embedder.tag_probabilities(ref_wave, ref_sr), np.float64).mean(0))
            except ValueError as err:
                raise ValueError(f"{pair.name}: {err}") from None
        if networks:
            gen_user.append(_user_features(networks, pair.generated))
            ref_user.append(_user_features(networks, pair.reference))
        if use_sim:
            sim[0, i] = similarity_model.similarity(str(pair.video), gen_wave, gen_sr)
            sim[1, i] = similarity_model.similarity(str(pair.video), ref_wave, ref_sr)
            clip["sim"], clip["sim_ceiling"] = 100 * sim[0, i], 100 * sim[1, i]
            ref_audio[i] = (ref_wave, ref_sr) if n <= 64 else None
        if plots_dir is not None:
            from muvi.eval.plot import motion_curve, plot_beats

            motion = motion_curve(pair.video) if pair.video is not None else None
            plot_beats(ref_beats, gen_beats, Path(plots_dir) / f"{pair.name}.png",
                       duration=max(gen_s, ref_s), motion=motion, tolerance=tolerance, label=pair.name)
        clips.append(clip)
    if floor_partner is not None:
        for i, pair in enumerate(pairs):
            j = int(floor_partner[i])
            wave, sr = ref_audio.get(j) or load_audio(pairs[j].reference)
            sim[2, i] = similarity_model.similarity(str(pair.video), wave, sr)
            clips[i]["sim_floor"] = 100 * sim[2, i]

    index = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    metrics = {}
    values, replicates = beat_metrics(counts), beat_metrics(counts[index])
    for name in BEAT_METRICS:
        metrics[name] = _entry(name, values[name], replicates[name], n)
    if events is not None:
        for row, suffix in ((0, ""), (1, "_ceiling")):
            values, replicates = beat_metrics(event_counts[row]), beat_metrics(event_counts[row][index])
            for name, source in (("event_hit", "beat_recall"), ("event_f1", "beat_f1")):
                metrics[name + suffix] = _entry(name + suffix, values[source], replicates[source], n)
        for i, clip in enumerate(clips):
            clip["events"], clip["event_hits"] = int(event_counts[0, i, 0]), int(event_counts[0, i, 2])
    else:
        unavailable["event_hit"] = "no video event times supplied (events_dir / --events)"

    if embedder is not None:
        _embedding_metrics(metrics, unavailable, clips, gen_emb, ref_emb, np.array(gen_tags),
                           np.array(ref_tags), index)
    if networks:
        _audioldm_metrics(metrics, unavailable, clips, gen_user, ref_user, index)
    if use_sim:
        for row, name in enumerate(("sim", "sim_ceiling", "sim_floor")):
            if np.isfinite(sim[row]).all():
                metrics[name] = _entry(name, 100 * sim[row].mean(), 100 * sim[row][index].mean(axis=1), n)
            else:
                unavailable[name] = "needs at least two clips" if name == "sim_floor" else "similarity failed"

    report = {
        "format": REPORT_FORMAT,
        "config": {"generated_dir": str(generated_dir), "reference_dir": str(reference_dir),
                   "videos_dir": None if videos_dir is None else str(videos_dir),
                   "events_dir": None if events_dir is None else str(events_dir), "seed": seed,
                   "n_bootstrap": n_bootstrap, "ci": "percentile bootstrap over clips, 95%",
                   "beat_tolerance_s": tolerance, "beat_tracker": beat_config.to_dict()},
        "samples": {"count": n, "names": [p.name for p in pairs]},
        "durations": {"generated": _durations([c["generated_s"] for c in clips]),
                      "reference": _durations([c["reference_s"] for c in clips])},
        "metrics": metrics,
        "unavailable": unavailable,
        "clips": clips,
        "versions": _versions(),
        "weights_sha256": weights,
    }
    report = _clean(report)
    text = format_table(report)
    logger.info("evaluation of %d clips:\n%s", n, text)
    if out_json is not None:
        write_report(report, out_json)
    return report


def _embedding_metrics(metrics: dict, unavailable: dict, clips: list, gen_emb: list, ref_emb: list,
                       gen_tags: np.ndarray, ref_tags: np.ndarray, index: np.ndarray) -> None:
    n = len(gen_emb)
    pool = lambda arrays, idx: np.concatenate([arrays[i] for i in idx])  # noqa: E731
    try:
        metrics["fd_musicnn"] = _set_metric(
            "fd_musicnn", lambda idx: D.frechet_distance_embeddings(pool(ref_emb, idx), pool(gen_emb, idx)), index, n)
    except ValueError as err:
        unavailable["fd_musicnn"] = str(err)
    gen_mean = np.stack([e.mean(0) for e in gen_emb])
    ref_mean = np.stack([e.mean(0) for e in ref_emb])
    if n >= 2:
        bandwidth = D.median_bandwidth(ref_mean)  # fixed, so the CI reflects the data, not the bandwidth
        metrics["kad_musicnn"] = _set_metric(
            "kad_musicnn", lambda idx: D.mmd2_unbiased(ref_mean[idx], gen_mean[idx], "rbf", bandwidth), index, n)
        metrics["kid_musicnn"] = _set_metric(
            "kid_musicnn", lambda idx: D.mmd2_unbiased(ref_mean[idx], gen_mean[idx], "poly"), index, n)
    else:
        unavailable["kad_musicnn"] = unavailable["kid_musicnn"] = "needs at least two clips"
    for mode in ("softmax", "sigmoid", "bernoulli"):
        per_pair = D.paired_kl(ref_tags, gen_tags, mode=mode)
        name = f"kl_{mode}_musicnn"
        metrics[name] = _entry(name, per_pair.mean(), per_pair[index].mean(axis=1), n)
        for clip, value in zip(clips, per_pair, strict=True):
            clip[name] = value
    splits = max(1, min(10, n // 10))  # audioldm_eval uses 10 splits; keep >= 10 clips per split
    metrics["is_musicnn"] = _set_metric(
        "is_musicnn", lambda idx: D.inception_score(gen_tags[idx], splits=splits)[0], index, n)


def _user_features(networks: dict, path: Path) -> dict[str, np.ndarray]:
    """One file's VGGish frames and PANNs clip outputs, each read as audioldm_eval reads it."""
    out = {}
    if "vggish" in networks:
        out["vggish"] = np.asarray(networks["vggish"].embed_file(path), dtype=np.float64)
    if "panns_cnn14" in networks:
        from muvi.encoders.panns import clip_outputs

        outputs = clip_outputs(networks["panns_cnn14"], path)
        out["panns_embedding"] = outputs.embedding[0].double().numpy()
        out["panns_logits"] = outputs.logits[0].double().numpy()
    return out


def _audioldm_metrics(metrics: dict, unavailable: dict, clips: list, gen: list, ref: list,
                      index: np.ndarray) -> None:
    """FAD (VGGish) and FD/KL/IS (PANNs) as audioldm_eval computes them, with bootstrap CIs."""
    n = len(gen)
    if "vggish" in gen[0]:
        pool = lambda side, idx: np.concatenate([side[i]["vggish"] for i in idx])  # noqa: E731
        try:
            metrics["fad_vggish"] = _set_metric(
                "fad_vggish", lambda idx: D.frechet_distance_embeddings(pool(ref, idx), pool(gen, idx)), index, n)
        except ValueError as err:  # fewer than two 0.96 s frames in a set
            unavailable["fad_vggish"] = str(err)
    if "panns_logits" not in gen[0]:
        return
    gen_emb, ref_emb = (np.stack([c["panns_embedding"] for c in side]) for side in (gen, ref))
    gen_logits, ref_logits = (np.stack([c["panns_logits"] for c in side]) for side in (gen, ref))
    if n >= 2:
        metrics["fd_panns"] = _set_metric(
            "fd_panns", lambda idx: D.frechet_distance_embeddings(ref_emb[idx], gen_emb[idx]), index, n)
    else:
        unavailable["fd_panns"] = "needs at least two clips"
    for mode in ("softmax", "sigmoid"):
        name = f"kl_{mode}_panns"
        per_pair = D.paired_kl(ref_logits, gen_logits, mode=mode, from_logits=True)
        metrics[name] = _entry(name, per_pair.mean(), per_pair[index].mean(axis=1), n)
        for clip, value in zip(clips, per_pair, strict=True):
            clip[name] = value
    splits = min(10, n)  # audioldm_eval: 10 splits
    metrics["is_panns"] = _set_metric(
        "is_panns", lambda idx: D.inception_score(gen_logits[idx], from_logits=True, splits=splits)[0], index, n)
