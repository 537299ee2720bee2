"""The ``muvi`` command.

    muvi generate [VIDEO] [-o OUT.mp4|OUT.wav|OUT.flac] [--cfg-scale 4] [--steps 25] [--seed N]
                  [--duration S] [--prompt STYLE.wav] [--model DIR] [--device cpu|cuda]

With no VIDEO, the sample clip bundled with muvi is used; with no model, the bundled demo
model. An .mp4/.mov/.mkv OUT gets the original video stream copied untouched plus the music;
an audio OUT gets the music alone. Nothing existing is overwritten without --overwrite, and
the input never.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".m4v"}


def bundled_sample_video() -> Path:
    return Path(__file__).resolve().parent / "assets" / "sample.mp4"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="muvi", description="Music for video (MuVi).")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write music for a video",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("video", nargs="?", type=Path, help="input video (default: the bundled sample clip)")
    gen.add_argument("-o", "--output", type=Path, help="OUT.mp4 (video with music) or OUT.wav/.flac "
                     "(default: <video name>_muvi.mp4 in the current folder)")
    gen.add_argument("--cfg-scale", type=float, default=None,
                     help="classifier-free guidance scale (default: the model's, 4 for the bundled demo)")
    gen.add_argument("--steps", type=int, default=25, help="Euler steps (default 25)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--duration", type=float, default=None, help="seconds from the start (default: all)")
    gen.add_argument("--prompt", type=Path, default=None, help="music whose style to follow")
    gen.add_argument("--model", type=Path, default=None, help="release folder (default: bundled demo)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)")
    gen.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def generate_command(args: argparse.Namespace) -> Path:
    import muvi
    from muvi.mux import mux_audio
    from muvi.output import AUDIO_SUFFIXES

    video = args.video or bundled_sample_video()
    out = args.output or Path.cwd() / f"{video.stem}_muvi.mp4"
    suffix = out.suffix.lower()
    if suffix not in VIDEO_SUFFIXES and suffix not in AUDIO_SUFFIXES:
        raise ValueError(f"{out}: unknown output type {out.suffix!r}; use one of "
                         f"{sorted(VIDEO_SUFFIXES | set(AUDIO_SUFFIXES))}")
    if out.exists() and out.resolve() == Path(video).resolve():
        raise ValueError(f"{out}: the output would overwrite the input video")
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    result = muvi.generate(video, cfg_scale=args.cfg_scale, num_steps=args.steps, seed=args.seed,
                           prompt_audio=args.prompt, duration=args.duration, model=args.model,
                           device=args.device, progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix in VIDEO_SUFFIXES:
        mux_audio(video, result.numpy(), result.sample_rate, out)
    else:
        result.save(out, overwrite=True)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from muvi.data.audio_io import MediaReadError

    try:
        out = generate_command(args)
    except (FileNotFoundError, FileExistsError, ValueError, TypeError, MediaReadError) as err:
        # One line, no traceback: these are the user's input problems, each naming its file.
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"muvi: error: {message}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
