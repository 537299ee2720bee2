"""The ``muvi`` command.

    muvi generate [VIDEO] [-o OUT.mp4|OUT.mkv|OUT.mov|OUT.wav|OUT.flac] [--cfg-scale 4]
                  [--steps 25] [--seed N] [--duration S] [--prompt STYLE.wav] [--model DIR]
                  [--device cpu|cuda|cuda:N] [--method euler] [--overwrite]

    muvi demo [--model DIR] [--port 7860]          (the web page; see muvi demo --help)

With no VIDEO, the sample clip bundled with muvi is used; with no model, the bundled demo
model. A video of any length is scored: past the model's window (10 s for the bundled demo)
window by window, each continuing the one before, with a progress bar over the windows.

A video OUT gets the input's picture (copied packet for packet when the container can hold its
codec, else transcoded to H.264, which a log line says) with the music as its audio; an audio
OUT gets the music alone. With --duration shorter than the video, the picture is cut
there too.

Every argument and input is checked before the model loads; a problem is one line on stderr
and exit status 2. Nothing existing is overwritten without --overwrite, and no input ever.
If the video cannot be written after the music is made, the music is saved beside OUT as
OUT.wav (exit status 1) and the message says where.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from muvi import bundled_sample_video
from muvi.errors import MuviError, one_line

#: how this command spells the arguments of muvi.generate in its messages
CLI_NAMES = {"video": "VIDEO", "cfg_scale": "--cfg-scale", "num_steps": "--steps", "seed": "--seed",
             "duration": "--duration", "prompt_audio": "--prompt", "prompt_sample_rate": "--prompt-rate",
             "fps": "--fps", "device": "--device", "method": "--method", "model": "--model"}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``muvi: error: …``, status 2), no usage block."""

    def error(self, message: str):
        self.exit(2, f"muvi: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="muvi", description="Music for video (MuVi).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="write music for a video", allow_abbrev=False,
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Numbers are taken as text and checked by muvi.inputs, so that every bad value gets the
    # same message from the command line as from Python.
    gen.add_argument("video", nargs="?", type=Path, help="input video (default: the bundled sample clip)")
    gen.add_argument("-o", "--output", type=Path, help="OUT.mp4/.mkv/.mov (video with music) or OUT.wav/.flac/.ogg "
                     "(default: <video name>_muvi.mp4 in the current folder)")
    gen.add_argument("--cfg-scale", help="classifier-free guidance scale, 0 to 100 (default: the model's, "
                     "4 for the bundled demo)")
    gen.add_argument("--steps", default="25", help="sampling steps, a positive integer (default 25)")
    gen.add_argument("--seed", help="an integer from 0 to 2**63-1; the same seed gives the same music")
    gen.add_argument("--duration", help="seconds from the start of the video (default: all of it)")
    gen.add_argument("--prompt", type=Path, default=None, help="music whose style to follow (audio file)")
    gen.add_argument("--model", default=None, help="release folder or Hugging Face Hub repo id OWNER/NAME "
                     "(cached; HF_HUB_OFFLINE=1: from the cache only) (default: the bundled demo)")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)")
    gen.add_argument("--method", default="euler", help="ODE solver: euler (the paper's) or a torchdiffeq "
                     "method such as midpoint, rk4, dopri5 (default euler)")
    gen.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never an input)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    from muvi import app

    app.options(sub.add_parser("demo", help="start the web page (Gradio) on this machine", allow_abbrev=False,
                               description=app.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def _number(text: Optional[str], name: str, kind: type):
    """Command-line text → int or float; the range is checked by muvi.inputs."""
    from muvi.errors import InputError

    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InputError(f"{name} {text}: must be {what}") from None


def generate_command(args: argparse.Namespace) -> Path:
    from muvi import default_model_dir
    from muvi.errors import InputError
    from muvi.inputs import ModelLimits, check_output, check_request
    from muvi.media import AUDIO_FORMATS as AUDIO_SUFFIXES
    from muvi.media import VIDEO_FORMATS as VIDEO_SUFFIXES

    video = args.video or bundled_sample_video()
    if args.model:
        from muvi.release import locate

        model = locate(args.model, name="--model")
    else:
        model = default_model_dir()
    out = args.output or Path.cwd() / f"{video.stem}_muvi.mp4"
    suffix = out.suffix.lower()
    if suffix not in VIDEO_SUFFIXES and suffix not in AUDIO_SUFFIXES:
        raise InputError(f"-o {out}: unknown output type {out.suffix or '(none)'!r}; use one of "
                         f"{', '.join(sorted({*VIDEO_SUFFIXES, *AUDIO_SUFFIXES}))}")
    inputs = [video, model] + ([args.prompt] if args.prompt else [])
    check_output(out, inputs=inputs, overwrite=args.overwrite, name="-o")
    numbers = dict(cfg_scale=_number(args.cfg_scale, "--cfg-scale", float),
                   num_steps=_number(args.steps, "--steps", int), seed=_number(args.seed, "--seed", int),
                   duration=_number(args.duration, "--duration", float))
    limits = ModelLimits.from_release(model, name="--model")
    request = check_request(video, **numbers, prompt_audio=args.prompt, device=args.device,
                            method=args.method, limits=limits, names=CLI_NAMES)

    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_pretrained(model, device=request.device)
    result = pipe.run(request, progress=not args.quiet)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix in VIDEO_SUFFIXES:
            from muvi.mux import mux_audio

            cut = request.duration if request.duration < request.info.duration - 1e-6 else None
            mux_audio(video, result.numpy(), result.sample_rate, out, duration=cut, info=request.info)
        else:
            result.save(out, overwrite=True)
    except Exception as err:  # the music is made: never lose it to a failure writing the file
        raise _saved_elsewhere(result, out, inputs, err) from None
    return out


class SavedElsewhere(MuviError):
    """The requested output could not be written; the music was saved at ``path`` instead."""

    def __init__(self, message: str, path: Optional[Path]):
        super().__init__(message)
        self.path = path


def _saved_elsewhere(result, out: Path, inputs: list[Path], err: Exception) -> SavedElsewhere:
    """Save the music as WAV beside ``out`` (else in the current folder, else the temporary
    folder), never over an existing file, and say where."""
    import tempfile

    from muvi.media import unused_path

    reason = one_line(err).removeprefix(f"{out}: ")
    name = f"{out.stem}.wav" if out.suffix.lower() != ".wav" else f"{out.stem}.muvi.wav"
    failures = []
    for folder in (out.parent, Path.cwd(), Path(tempfile.gettempdir())):
        fallback = unused_path(folder / name)
        if any(fallback.resolve() == Path(p).resolve() for p in inputs):
            continue
        try:
            result.save(fallback)
        except Exception as second:  # noqa: BLE001 (try the next folder; report them all)
            failures.append(f"{folder}: {second}")
            continue
        return SavedElsewhere(f"{out}: {reason}; the music is saved in {fallback}", fallback)
    return SavedElsewhere(f"{out}: {reason}; saving the music as WAV failed too ({'; '.join(failures)})", None)


def run_script(main) -> None:
    """Entry point of muvi's other command-line scripts (the training recipes): a
    :class:`~muvi.errors.MuviError` (a bad config, no checkpoint to resume) is one line on
    stderr and exit status 2, not a traceback."""
    try:
        main()
    except MuviError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="muvi: %(message)s")
    if args.command == "demo":
        from muvi.app import run_args

        return run_args(args)
    try:
        out = generate_command(args)
    except SavedElsewhere as err:
        print(f"muvi: error: {err}", file=sys.stderr)
        return 1
    except (MuviError, FileNotFoundError) as err:
        # The user's input problems: one line naming the file or argument (a checkpoint's
        # mismatch list keeps one line per mismatch).
        print(f"muvi: error: {str(err).strip() or type(err).__name__}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
