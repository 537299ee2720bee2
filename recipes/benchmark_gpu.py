"""The accelerator benchmark: inference latency per stage and DiT training throughput (MFU).

    python recipes/benchmark_gpu.py                      # on a GPU: bf16, 10 s and 30 s, base preset
    python recipes/benchmark_gpu.py --device cpu --preset tiny --durations 2 --batch 2 --train-steps 2

(a) Inference: one warm-up generation, then a timed one, per duration, stage by stage
(:func:`muvi.profiling.generation_stages`) with the networks' weights in ``--dtype`` (bf16 by
default on CUDA, fp32 on CPU) under autocast, as ``MuviPipeline.run`` does. The DiT's attention
runs flash-attn when it is installed (``pip install flash-attn``), torch SDPA otherwise; the
script says which. Peak CUDA memory per stage is printed beside the time.

(b) Training: the base DiT with the visual adaptor's output as its condition, rectified-flow
loss, AdamW, at the paper's V2M batch (32 clips of 30 s = 300 latent frames), bf16 autocast;
steps per second, latent frames per second, and model FLOP utilisation = FLOPs of a step
(counted once by ``torch.utils.flop_counter``: forward and backward) × steps per second ÷ the
device's peak (``--peak-tflops``; default: the dense bf16 peak of known GPUs, or the measured
fp32 matmul rate on a CPU).

Weights are random (a preset): speed does not depend on them.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from muvi import flow
from muvi.memory import return_large_blocks
from muvi.pipeline import PRESETS, MuviPipeline
from muvi.profiling import Stages, count_cpu_attention, generation_stages, matmul_rate, synchronize

#: dense bf16 tensor-core peaks (TFLOP/s, no sparsity) of GPUs this may run on
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "4090": 165.2}


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return "torch SDPA (flash-attn not installed)"
        return "flash-attn"
    return "torch SDPA"


def peak_flops(device: torch.device, given: float | None) -> tuple[float, str]:
    if given:
        return given * 1e12, "given"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12, f"{name} dense bf16"
        raise SystemExit(f"unknown peak for {name!r}: pass --peak-tflops")
    return matmul_rate(device), "measured fp32 matmul"


def inference(pipe: MuviPipeline, device: torch.device, dtype: torch.dtype, video: Path,
              durations: list[float], num_steps: int) -> list[dict]:
    results = []
    for duration in durations:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            generation_stages(pipe, Stages(device, count_flops=False), video, duration, num_steps=num_steps)
            stages = Stages(device, count_flops=False)
            generation_stages(pipe, stages, video, duration, num_steps=num_steps)
        results.append({"duration": duration, "total_s": stages.total_seconds,
                        "stages": {r.name: {"seconds": r.seconds, "peak_cuda_mb": r.peak_cuda_mb,
                                            "peak_rss_mb": r.peak_rss_mb} for r in stages.rows}})
        print(f"\ninference, {duration:g} s of video, {dtype}:")
        for r in stages.rows:
            cuda = f", peak CUDA {r.peak_cuda_mb:.0f} MB" if r.peak_cuda_mb is not None else ""
            print(f"  {r.name:<14}{r.seconds:>9.3f} s{cuda}")
        print(f"  {'total':<14}{stages.total_seconds:>9.3f} s (real-time factor {stages.total_seconds / duration:.3f})")
    return results


def training(pipe: MuviPipeline, device: torch.device, dtype: torch.dtype, batch: int, seconds: float,
             steps: int, peak: float) -> dict:
    dit = pipe.dit.float().train().requires_grad_(True)
    cfg = dit.config
    frames = int(round(seconds * pipe.config.latent_rate))
    optimizer = torch.optim.AdamW(dit.parameters(), lr=5e-5, fused=device.type == "cuda")
    x1 = torch.randn(batch, frames, cfg.latent_channels, device=device)
    cond = torch.randn(batch, frames, cfg.cond_dim or cfg.width, device=device)

    def step() -> None:
        t = flow.sample_time(batch, device=device)
        x_t, t_frames, target = flow.training_pair(x1, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = flow.flow_loss(dit(x_t, t_frames, cond), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    count_cpu_attention()
    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up
    flops = counter.get_total_flops()
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    per_step = (time.perf_counter() - start) / steps
    result = {"batch": batch, "frames": frames, "step_s": per_step, "steps_per_s": 1 / per_step,
              "latent_frames_per_s": batch * frames / per_step, "tflop_per_step": flops / 1e12,
              "mfu": flops / per_step / peak}
    print(f"\nDiT training ({cfg.width} wide, {cfg.depth} blocks), batch {batch} × {frames} latent frames, {dtype}:")
    print(f"  {per_step:.3f} s/step, {batch * frames / per_step:,.0f} latent frames/s, "
          f"{flops / 1e12:.2f} TFLOP/step, MFU {100 * result['mfu']:.1f}%")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--batch", type=int, default=32, help="training batch (paper's V2M: 32)")
    parser.add_argument("--train-seconds", type=float, default=30.0, help="training clip length (paper: up to 30 s)")
    parser.add_argument("--train-steps", type=int, default=10, help="timed training steps")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--video", type=Path, default=None,
                        help="default: the bundled sample, looped to the longest duration")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    return_large_blocks()  # as muvi generate does (muvi.memory)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.video is None:
            from muvi import bundled_sample_video
            from muvi.mux import loop_video

            args.video = loop_video(bundled_sample_video(), Path(tmp) / "sample_looped.mp4", max(args.durations) + 1)
        _run(args, device, dtype)


def _run(args, device: torch.device, dtype: torch.dtype) -> None:
    peak, peak_source = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}; attention: {attention_backend(device, dtype)}; "
          f"peak {peak / 1e12:.1f} TFLOP/s ({peak_source})")
    pipe = MuviPipeline.from_presets(args.preset).to(device).eval()
    if dtype != torch.float32:
        pipe.to_dtype(dtype)
    report = {"device": name, "preset": args.preset, "dtype": str(dtype),
              "attention": attention_backend(device, dtype),
              "inference": inference(pipe, device, dtype, args.video, args.durations, args.num_steps)}
    report["training"] = training(pipe, device, dtype, args.batch, args.train_seconds, args.train_steps, peak)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
