"""Peak memory of ``muvi.generate`` against the source video's resolution and length.

    python recipes/benchmark_video_memory.py [--model DIR] [--clips 4000x3000x5,1920x1080x60]
                                             [--pythonpath OTHER_CHECKOUT]

Each clip (WIDTHxHEIGHTxSECONDS at 30 fps, H.264) is made once in a temporary folder; then
each generation runs in a fresh process (bundled demo model by default, 25 steps, CPU) and
its peak resident memory (``ru_maxrss``) is printed beside the wall time. ``--pythonpath``
runs another checkout's muvi on the same clips (for before/after figures).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

CHILD = """
import json, resource, sys, time
import muvi
t = time.perf_counter()
out = muvi.generate(sys.argv[1], model=sys.argv[2] or None, device="cpu", seed=0, progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "audio_s": out.duration,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_clip(path: Path, width: int, height: int, seconds: float, fps: int = 30) -> Path:
    """A moving gradient with cuts every second, encoded fast (H.264 ultrafast)."""
    import av
    import numpy as np

    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(fps), options={"preset": "ultrafast", "crf": "28"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(int(seconds * fps)):
            shade = ((x + 7 * i) % 256 if (i // fps) % 2 else (y + 5 * i) % 256).astype(np.uint8)
            image = np.stack([shade, np.full_like(shade, (40 * (i // fps)) % 256), 255 - shade], axis=-1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="release folder (default: the bundled demo)")
    parser.add_argument("--clips", default="4000x3000x5,1920x1080x60",
                        help="comma-separated WIDTHxHEIGHTxSECONDS (30 fps)")
    parser.add_argument("--pythonpath", default=None, help="put this checkout first on PYTHONPATH")
    parser.add_argument("--workdir", default=None, help="keep the clips here (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="muvi-mem-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    print(f"{'clip':>16} {'source MB/frame':>15} {'peak RSS MB':>11} {'wall s':>7} {'music s':>7}")
    for spec in args.clips.split(","):
        width, height, seconds = (float(v) for v in spec.split("x"))
        clip = work / f"{int(width)}x{int(height)}x{seconds:g}.mp4"
        if not clip.is_file():
            start = time.perf_counter()
            make_clip(clip, int(width), int(height), seconds)
            print(f"  (made {clip.name} in {time.perf_counter() - start:.0f} s)", file=sys.stderr)
        # cwd = the clip folder, so `import muvi` finds the installed (or --pythonpath) copy
        proc = subprocess.run([sys.executable, "-c", CHILD, str(clip), args.model], capture_output=True,
                              text=True, env=env, cwd=work)
        if proc.returncode:
            reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode
            print(f"{spec:>16} failed: {reason}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{spec:>16} {width * height * 3 / 2 ** 20:>15.1f} {row['peak_rss_mb']:>11.0f} "
              f"{row['seconds']:>7.1f} {row['audio_s']:>7.2f}")


if __name__ == "__main__":
    main()
