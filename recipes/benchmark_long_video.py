"""Long videos: time, peak memory and the joins of ``muvi.generate`` against the video's length.

    python recipes/benchmark_long_video.py [--minutes 1 5 10] [--model DIR] [--clip VIDEO]
                                           [--steps 25] [--workdir DIR]

Each video is the clip (default: the bundled sample, 5.28 s of 720p H.264) looped to at least
the given minutes (packets copied, :func:`muvi.mux.loop_video`). Each generation runs in a fresh
process (bundled demo model by default, CPU, seed 0), which reports its wall time, its peak
resident memory (``ru_maxrss``) while generating and after saving the WAV, the largest resident
memory in each quarter of the generation (read twice a second: flat when memory does not grow
with length) and the output's length; then every join between windows is
measured (:func:`muvi.windows.join_report`: the level across the join and the largest step at
its ends, against the music around it), beside the same measure halfway between joins (the
placebo: a join is clean when its figures lie within the music's own spread).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, os, resource, sys, threading, time
import muvi
samples, done = [], threading.Event()
page = os.sysconf("SC_PAGE_SIZE") / 2 ** 20

def watch():  # resident memory twice a second while generating
    while not done.wait(0.5):
        with open("/proc/self/statm") as f:
            samples.append(int(f.read().split()[1]) * page)

threading.Thread(target=watch, daemon=True).start()
t = time.perf_counter()
out = muvi.generate(sys.argv[1], model=sys.argv[2] or None, num_steps=int(sys.argv[3]), device="cpu", seed=0,
                    progress=False)
seconds = time.perf_counter() - t
done.set()
peak_generate = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
quarters = [max(samples[len(samples) * q // 4:max(len(samples) * (q + 1) // 4, 1)], default=0) for q in range(4)]
out.save(sys.argv[4], overwrite=True)
print(json.dumps({"seconds": seconds, "audio_s": out.duration, "peak_generate_mb": peak_generate,
                  "rss_quarters_mb": quarters,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def joins(wav: Path, model: Path, duration: float) -> tuple[list[dict], list[dict]]:
    """:func:`muvi.windows.join_report` at every join of the windows ``model`` used, and at as
    many places of the same width halfway between joins (the placebo: how much the music's own
    level and steps vary where nothing was joined)."""
    import soundfile as sf
    import torch

    from muvi.config import read_json
    from muvi.pipeline import PipelineConfig
    from muvi.video import duration_frames
    from muvi.windows import join_report, plan_windows

    config = PipelineConfig.from_dict(read_json(model / "config.json")["pipeline"])
    data, rate = sf.read(str(wav), dtype="float32")
    hop = int(round(rate / config.latent_rate))
    plan = plan_windows(duration_frames(duration, config.latent_rate), *config.window_frames())
    wave = torch.from_numpy(data)
    at = [join_report(wave, rate, w.start * hop, (w.start + w.overlap) * hop) for w in plan[1:]]
    halfway = [((a.start + a.overlap + b.start) // 2, b.overlap) for a, b in zip(plan[1:], plan[2:])]
    between = [join_report(wave, rate, s * hop, (s + n) * hop) for s, n in halfway]
    return at, between


def _span(reports: list[dict], key: str) -> str:
    values = [r[key] for r in reports]
    return f"{min(values):+6.2f}..{max(values):+6.2f}" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[1, 5, 10])
    parser.add_argument("--model", type=Path, default=None, help="release folder (default: the bundled demo)")
    parser.add_argument("--clip", type=Path, default=None, help="clip to loop (default: the bundled sample)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the videos here (default: a temporary folder)")
    args = parser.parse_args()

    import muvi
    from muvi import bundled_sample_video
    from muvi.media import probe_video
    from muvi.mux import loop_video

    model = args.model or muvi.default_model_dir()
    clip = args.clip or bundled_sample_video()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"model {model}, clip {clip}, {args.steps} steps, CPU")
        print(f"{'video':>9} {'windows':>7} {'wall s':>8} {'s / video s':>11} {'peak MB':>8} {'+save MB':>8} "
              f"{'RSS by quarter MB':>20} {'output s':>9} {'join level dB':>14} {'placebo dB':>14} "
              f"{'worst click':>11} {'placebo':>7}")
        for minutes in args.minutes:
            video = loop_video(clip, work / f"long_{minutes:g}min.mp4", minutes * 60)
            duration = probe_video(video).duration
            wav = work / f"long_{minutes:g}min.wav"
            done = subprocess.run([sys.executable, "-c", CHILD, str(video), str(model), str(args.steps), str(wav)],
                                  check=True, capture_output=True, text=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            reports, placebo = joins(wav, model, duration)
            click, placebo_click = (max((r["click"] for r in rs), default=float("nan")) for rs in (reports, placebo))
            quarters = "/".join(f"{q:.0f}" for q in figures["rss_quarters_mb"])
            print(f"{duration:>8.1f}s {len(reports) + 1:>7} {figures['seconds']:>8.1f} "
                  f"{figures['seconds'] / duration:>11.3f} {figures['peak_generate_mb']:>8.0f} "
                  f"{figures['peak_rss_mb'] - figures['peak_generate_mb']:>8.0f} {quarters:>20} "
                  f"{figures['audio_s']:>9.2f} {_span(reports, 'level_db'):>14} {_span(placebo, 'level_db'):>14} "
                  f"{click:>11.2f} {placebo_click:>7.2f}", flush=True)


if __name__ == "__main__":
    main()
