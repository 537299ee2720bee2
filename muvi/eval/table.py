"""The report's metric table: what each metric means, the JSON file and the printed table."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

#: name -> (unit, higher is better, description)
METRIC_INFO: dict[str, tuple[str, bool | None, str]] = {
    "bcs": ("percent", None, "beats coverage score: generated / reference beats, per-clip mean (paper)"),
    "bhs": ("percent", True, "beats hit score: matched / reference beats within 100 ms, per-clip mean (paper)"),
    "beat_precision": ("percent", True, "matched / generated beats, pooled over clips"),
    "beat_recall": ("percent", True, "matched / reference beats, pooled over clips"),
    "beat_f1": ("percent", True, "2 matched / (generated + reference beats), pooled over clips"),
    "beat_precision_clip": ("percent", True, "matched / generated beats, per-clip mean"),
    "beat_recall_clip": ("percent", True, "matched / reference beats, per-clip mean"),
    "beat_f1_clip": ("percent", True, "beat F1, per-clip mean"),
    "beat_count_ratio": ("percent", None, "generated / reference beats, pooled over clips"),
    "fd_musicnn": ("distance", False, "Frechet distance of pooled musicnn patch embeddings"),
    "kad_musicnn": ("mmd2", False, "kernel audio distance: unbiased MMD^2, Gaussian kernel (median "
                    "bandwidth), per-clip mean embeddings"),
    "kid_musicnn": ("mmd2", False, "unbiased MMD^2, cubic polynomial kernel (KID), per-clip mean embeddings"),
    "kl_softmax_musicnn": ("nats", False, "paired KL(reference || generated) over softmaxed tag logits "
                           "(audioldm_eval 'KL')"),
    "kl_sigmoid_musicnn": ("nats", False, "paired sum_k p log(p / q) over sigmoid tag probabilities "
                           "(audioldm_eval 'KL_sigmoid')"),
    "kl_bernoulli_musicnn": ("nats", False, "paired sum of per-tag Bernoulli KL(reference || generated)"),
    "is_musicnn": ("score", True, "inception score of generated musicnn tags (softmax over logits)"),
    "fad_vggish": ("distance", False, "Frechet audio distance of pooled VGGish 0.96 s frame embeddings "
                   "(audioldm_eval FAD: last linear layer without ReLU, no PCA)"),
    "fd_panns": ("distance", False, "Frechet distance of per-clip PANNs Cnn14 2048-d embeddings (audioldm_eval FD)"),
    "kl_softmax_panns": ("nats", False, "paired KL(reference || generated) over softmaxed PANNs logits "
                         "(audioldm_eval 'KL')"),
    "kl_sigmoid_panns": ("nats", False, "paired sum_k p log(p / q) over sigmoid PANNs outputs "
                         "(audioldm_eval 'KL_sigmoid')"),
    "is_panns": ("score", True, "inception score of generated PANNs logits (audioldm_eval IS: seed 2020, "
                 "10 splits, or one per clip below 10 clips)"),
    "sim": ("percent", True, "contrastive video-music similarity of (video, generated music)"),
    "sim_ceiling": ("percent", True, "SIM of (video, real soundtrack)"),
    "sim_floor": ("percent", None, "SIM of shuffled (video, another clip's soundtrack) pairs"),
    "event_hit": ("percent", True, "video events (cuts, accents) hit by a generated beat within the "
                  "tolerance, pooled over clips"),
    "event_f1": ("percent", True, "F1 of generated beats against the video's event times, pooled"),
    "event_hit_ceiling": ("percent", True, "video events hit by a beat of the real soundtrack"),
    "event_f1_ceiling": ("percent", True, "F1 of the real soundtrack's beats against the video's event times"),
}


def _clean(obj):
    """JSON-ready copy: numpy to Python, NaN/inf to None, floats to 8 significant digits."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return float(f"{x:.8g}") if math.isfinite(x) else None
    raise TypeError(f"cannot put {type(obj).__name__} in a report")


def write_report(report: dict, path: str | Path) -> Path:
    """Write the report as sorted, indented JSON (byte-identical for identical reports)."""
    from muvi.media import write_atomically

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(report), sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def format_table(report: dict) -> str:
    """A short human-readable table of the report's metrics."""
    def num(x):
        return "n/a" if x is None else f"{x:.4g}" if abs(x) < 1e4 else f"{x:.3e}"

    lines = [f"{'metric':<22} {'value':>10}  {'95% CI':<23} {'n':>5}  unit"]
    for name, m in report["metrics"].items():
        lo, hi = m["ci95"]
        lines.append(f"{name:<22} {num(m['value']):>10}  {'[' + num(lo) + ', ' + num(hi) + ']':<23} "
                     f"{m['n']:>5}  {m['unit']}")
    for name, why in sorted(report.get("unavailable", {}).items()):
        lines.append(f"{name:<22} {'n/a':>10}  {why}")
    return "\n".join(lines)
