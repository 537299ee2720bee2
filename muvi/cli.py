"""The muvi command.

    muvi generate [VIDEO|FOLDER ...] [-o OUT|FOLDER] [--audio-out] [--cfg-scale 4] [--steps 25]
                  [--seed N] [--duration S] [--prompt STYLE.wav] [--prompt-scale S] [--model DIR|OWNER/NAME]
                  [--device cpu|cuda|cuda:N] [--method euler] [--mel-noise S] [--loudness LUFS|off]
                  [--overwrite] [-q]

    muvi demo [--model DIR] [--port 7860]          (the web page; see muvi demo --help)
    muvi --version

With no VIDEO, the sample clip bundled with muvi is used; with no model, the bundled demo
model. A video of any length is scored: past the model's window (10 s for the bundled demo)
window by window, each continuing the one before. A progress bar follows each video's stages
(encoding the video, sampling, decoding), or its windows, and the videos of a batch.

Several videos, or a FOLDER (its videos: mp4, mkv, mov, avi, webm, mpg, ...), are scored in one
call with one model load; OUT is then a folder (default: the current one) that gets
<video name>_muvi.mp4 for each. A video OUT gets the input's picture (copied packet for packet
when the container can hold its codec, else transcoded to H.264, which a log line says) with
the music as its audio; an audio OUT (.wav, .flac, .ogg) gets the music alone; --audio-out also
writes the music as a WAV beside each video OUT. With --duration shorter than the video, the
picture is cut there too.

Every argument and input is checked before the model loads; a problem is one line on stderr
and exit status 2. Nothing existing is overwritten without --overwrite, and no input ever.
If a video cannot be written after its music is made, the music is saved beside OUT as
OUT.wav (exit status 1, after the other videos of a batch) and the message says where.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import Optional

from muvi import bundled_sample_video
from muvi.errors import MuviError, one_line
from muvi.memory import return_large_blocks

#: how this command spells the arguments of muvi.generate in its messages
CLI_NAMES = {"video": "VIDEO", "cfg_scale": "--cfg-scale", "num_steps": "--steps", "seed": "--seed",
             "duration": "--duration", "prompt_audio": "--prompt", "prompt_sample_rate": "--prompt-rate",
             "prompt_scale": "--prompt-scale", "fps": "--fps", "device": "--device", "method": "--method",
             "model": "--model"}

#: videos sampled together at most (muvi.pipeline.MuviPipeline.run_many)
BATCH = 8

#: what a FOLDER argument contributes: its files with these suffixes (any case), sorted by name
VIDEO_SUFFIXES = (".mp4", ".m4v", ".mkv", ".mov", ".avi", ".webm", ".mpg", ".mpeg", ".ogv", ".flv", ".wmv",
                  ".ts", ".3gp")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``muvi: error: …``, status 2), no usage block."""

    def error(self, message: str):
        self.exit(2, f"muvi: error: {message} (see {self.prog} --help)\n")


def plain(text: str) -> str:
    """A docstring as help text: Sphinx roles and double backquotes removed."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    return text.replace("``", "")


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("muvi-v2m")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="muvi", description="Music for video (MuVi).")
    parser.add_argument("--version", action="version", version=f"muvi {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    gen = sub.add_parser("generate", help="write music for a video (or several)", allow_abbrev=False,
                         description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    # Numbers are taken as text and checked by muvi.inputs, so that every bad value gets the
    # same message from the command line as from Python.
    gen.add_argument("video", nargs="*", type=Path, metavar="VIDEO", help="input videos or folders of videos "
                     "(default: the bundled sample clip)")
    gen.add_argument("-o", "--output", type=Path, metavar="OUT", help="OUT.mp4/.mkv/.mov/.m4v (video with music) or "
                     "OUT.wav/.flac/.ogg (music alone); for several videos a folder (default: "
                     "<video name>_muvi.mp4 in the current folder)")
    gen.add_argument("--audio-out", action="store_true", help="also write the music as a WAV beside each video "
                     "OUT (OUT with .wav)")
    gen.add_argument("--cfg-scale", metavar="S", help="classifier-free guidance scale, 0 to 100 (default: the model's, "
                     "4 for the bundled demo)")
    gen.add_argument("--steps", default="25", metavar="N", help="sampling steps, a positive integer (default 25)")
    gen.add_argument("--seed", metavar="N", help="an integer from 0 to 2**63-1; the same seed gives the same music "
                     "(default: a random one)")
    gen.add_argument("--duration", metavar="SECONDS", help="seconds from the start of each video (default: all of it)")
    gen.add_argument("--prompt", type=Path, default=None, metavar="STYLE",
                     help="music whose style to follow (an audio file); "
                     "it is the clean context of the first window, not part of the output")
    gen.add_argument("--prompt-scale", metavar="S", help="guidance on the --prompt, 0 to 100: how hard the music "
                     "is pulled toward the prompt's style; 0 = the prompt as plain context "
                     "(default: the model's)")
    gen.add_argument("--mel-noise", metavar="S", help="how far the VAE's mel is drawn around its mean, 0 to 4 "
                     "(the model's mel_noise_scale; 0 = the mean, the paper's decode; no effect for a VAE "
                     "without mel noise) (default: the model's)")
    gen.add_argument("--loudness", metavar="LUFS", help="bring the music to this integrated loudness, -70 to 0 LUFS "
                     "(ITU-R BS.1770; one gain, sample peak at most -1 dBFS), or off for the level as the "
                     "vocoder makes it (default: the model's loudness_lufs)")
    gen.add_argument("--model", default=None, metavar="MODEL",
                     help="release folder or Hugging Face Hub repo id OWNER/NAME "
                     "(downloaded once into the Hub cache; HF_HUB_OFFLINE=1: from the cache only) "
                     "(default: the bundled demo)")
    gen.add_argument("--device", default=None, metavar="DEVICE",
                     help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    gen.add_argument("--method", default="euler", metavar="METHOD",
                     help="ODE solver: euler (the paper's) or any torchdiffeq "
                     "method: fixed-step midpoint, rk4, heun2, heun3, explicit_adams, implicit_adams, "
                     "fixed_adams (taking --steps steps) or adaptive dopri5, dopri8, bosh3, fehlberg2, "
                     "adaptive_heun, scipy_solver (default euler)")
    gen.add_argument("--overwrite", action="store_true", help="replace outputs that exist (never an input)")
    gen.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    from muvi import app

    app.options(sub.add_parser("demo", help="start the web page (Gradio) on this machine", allow_abbrev=False,
                               description=plain(app.__doc__), formatter_class=argparse.RawDescriptionHelpFormatter))
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


def videos_of(arguments: list[Path]) -> tuple[list[Path], bool]:
    """The videos the VIDEO arguments name (a folder: its videos, sorted) and whether they
    are a batch (several videos, or any folder)."""
    from muvi.errors import MissingFileError

    if not arguments:
        return [bundled_sample_video()], False
    videos = []
    for arg in arguments:
        if arg.is_dir():
            found = sorted(p for p in arg.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
            if not found:
                raise MissingFileError(f"{arg}: no videos in this folder (looked for {', '.join(VIDEO_SUFFIXES)})")
            videos += found
        else:
            videos.append(arg)  # a missing or unreadable file is named by check_request
    return videos, len(arguments) > 1 or arguments[0].is_dir()


def outputs_for(videos: list[Path], output: Optional[Path], batch: bool) -> list[Path]:
    """Where each video's result goes: ``output`` for one video, else ``<stem>_muvi.mp4`` in
    ``output`` (a folder; default the current one)."""
    from muvi.errors import InputError
    from muvi.media import AUDIO_FORMATS, VIDEO_FORMATS

    if not batch:
        out = output or Path.cwd() / f"{videos[0].stem}_muvi.mp4"
        if out.suffix.lower() not in VIDEO_FORMATS and out.suffix.lower() not in AUDIO_FORMATS:
            raise InputError(f"-o {out}: unknown output type {out.suffix or '(none)'!r}; use one of "
                             f"{', '.join(sorted({*VIDEO_FORMATS, *AUDIO_FORMATS}))}")
        return [out]
    folder = output or Path.cwd()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"-o {folder}: with several videos, -o is a folder (this is a file)")
    if output is not None and not folder.exists() and folder.suffix.lower() in {*VIDEO_FORMATS, *AUDIO_FORMATS}:
        raise InputError(f"-o {folder}: with several videos, -o is a folder, not a {folder.suffix} file")
    outs, seen = [], {}
    for video in videos:
        out = folder / f"{video.stem}_muvi.mp4"
        if out in seen:
            raise InputError(f"{seen[out]} and {video} would both be written to {out}; score them in separate calls")
        seen[out] = video
        outs.append(out)
    return outs


def generate_command(args: argparse.Namespace) -> list[Path]:
    from muvi import default_model_dir
    from muvi.errors import InputError
    from muvi.inputs import ModelLimits, check_output, check_request
    from muvi.loudness import TARGET_RANGE, is_target
    from muvi.media import VIDEO_FORMATS

    videos, batch = videos_of(args.video)
    outs = outputs_for(videos, args.output, batch)
    audio_outs = [out.with_suffix(".wav") if args.audio_out else None for out in outs]
    if args.audio_out and outs[0].suffix.lower() not in VIDEO_FORMATS:
        raise InputError(f"--audio-out: -o {outs[0]} is audio already")
    inputs = videos + ([args.prompt] if args.prompt else [])
    for out in outs + [a for a in audio_outs if a is not None]:
        check_output(out, inputs=inputs, overwrite=args.overwrite, name="-o")
    numbers = dict(cfg_scale=_number(args.cfg_scale, "--cfg-scale", float),
                   num_steps=_number(args.steps, "--steps", int), seed=_number(args.seed, "--seed", int),
                   duration=_number(args.duration, "--duration", float),
                   prompt_scale=_number(args.prompt_scale, "--prompt-scale", float))
    mel_noise = _number(args.mel_noise, "--mel-noise", float)
    if mel_noise is not None and not 0 <= mel_noise <= 4:  # NaN fails both
        raise InputError(f"--mel-noise {mel_noise}: must be a number from 0 to 4")
    loudness = None if args.loudness is None or args.loudness.lower() == "off" else \
        _number(args.loudness, "--loudness", float)
    if loudness is not None and not is_target(loudness):
        raise InputError(f"--loudness {args.loudness}: must be a loudness {TARGET_RANGE}, or off")
    if args.model:
        from muvi.release import locate

        model = locate(args.model, name="--model")
    else:
        model = default_model_dir()
    for out in outs + [a for a in audio_outs if a is not None]:  # never into the model's folder either
        check_output(out, inputs=[model], overwrite=args.overwrite, name="-o")
    limits = ModelLimits.from_release(model, name="--model")
    requests = [check_request(video, **numbers, prompt_audio=args.prompt, device=args.device, method=args.method,
                              limits=limits, names=CLI_NAMES) for video in videos]  # all before the model loads

    from tqdm.auto import tqdm

    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_pretrained(model, device=requests[0].device)
    if mel_noise is not None:
        pipe.config.mel_noise_scale = mel_noise
    if args.loudness is not None:  # a number, or off (None)
        pipe.config.loudness_lufs = loudness
    failures, jobs = [], list(zip(videos, requests, outs, audio_outs))
    bar = tqdm(total=len(jobs), desc="videos", unit="video", disable=args.quiet or len(jobs) == 1)
    for start in range(0, len(jobs), BATCH):  # batched through the networks where they fit; each
        chunk = jobs[start:start + BATCH]     # chunk is written before the next is made
        results = pipe.run_many([job[1] for job in chunk], progress=not args.quiet and len(jobs) == 1)
        for (video, request, out, audio_out), result in zip(chunk, results):
            try:
                _write(result, video, request, out, audio_out)
            except Exception as err:  # the music is made: never lose it to a failure writing the file
                failures.append(_saved_elsewhere(result, out, inputs, err))
                continue
            if batch:
                bar.write(str(out))
        bar.update(len(chunk))
    bar.close()
    if failures:
        raise SavedElsewhere("; ".join(str(f) for f in failures), failures[0].path)
    return outs


def _write(result, video: Path, request, out: Path, audio_out: Optional[Path]) -> None:
    from muvi.media import VIDEO_FORMATS

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in VIDEO_FORMATS:
        from muvi.mux import mux_audio

        cut = request.duration if request.duration < request.info.duration - 1e-6 else None
        mux_audio(video, result.numpy(), result.sample_rate, out, duration=cut, info=request.info)
        if audio_out is not None:
            result.save(audio_out, overwrite=True)
    else:
        result.save(out, overwrite=True)


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
    return_large_blocks()  # this process is ours: let freed activations go back (muvi.memory)
    if args.command == "demo":
        from muvi.app import run_args

        return run_args(args)
    try:
        outs = generate_command(args)
    except SavedElsewhere as err:
        print(f"muvi: error: {err}", file=sys.stderr)
        return 1
    except (MuviError, FileNotFoundError) as err:
        # The user's input problems: one line naming the file or argument (a checkpoint's
        # mismatch list keeps one line per mismatch).
        print(f"muvi: error: {str(err).strip() or type(err).__name__}", file=sys.stderr)
        return 2
    if len(outs) == 1:
        print(outs[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
