"""A web page for muvi: upload a video, get it back with music (Gradio, on localhost).

    muvi demo [--model DIR] [--host 127.0.0.1] [--port 7860]      (or: python -m muvi.app)

The page takes a video (or uses the bundled sample clip), an optional style prompt, the
guidance scale, steps, seed and duration; it shows the video with the music muxed in, the music
alone, and a beat plot: the generated music's beats (muvi's tracker) against the video's cuts,
over its motion curve. Generation shows its progress; a bad file or value is one line in the
page, the same message ``muvi generate`` prints. The model is loaded once, at start.

Gradio is an optional dependency: ``pip install "muvi-v2m[demo]"``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from muvi.errors import MuviError, one_line

logger = logging.getLogger(__name__)

#: seconds of video the beat plot and cut detection read at most (the plot stays legible)
PLOT_SECONDS = 120.0


def beat_plot(waveform: np.ndarray, sample_rate: int, video: Path, out_png: Path, *,
              duration: Optional[float] = None) -> Path:
    """The generated beats against the video's cuts, over its motion curve (PNG)."""
    from muvi.data.footage import detect_cuts
    from muvi.eval.beats import track_beats
    from muvi.eval.plot import motion_curve, plot_beats
    from muvi.video import read_frames

    seconds = min(duration or len(waveform) / sample_rate, PLOT_SECONDS)
    fps = 10.0
    frames = read_frames(video, fps, duration=seconds, size=64).permute(0, 2, 3, 1).numpy()
    cuts = np.asarray(detect_cuts(frames), dtype=np.float64) / fps
    beats = track_beats(waveform[:int(seconds * sample_rate)], sample_rate)
    times, energy = motion_curve(video, fps)
    keep = times <= seconds
    return plot_beats(cuts, beats, out_png, duration=seconds, motion=(times[keep], energy[keep]),
                      reference_name="video cuts")


class Demo:
    """The page's work, apart from Gradio: one loaded model, outputs in ``workdir``."""

    def __init__(self, model: Optional[Path] = None, workdir: Optional[Path] = None, device: Optional[str] = None):
        from muvi import default_model_dir
        from muvi.inputs import ModelLimits, resolve_device

        self.model_dir = Path(model) if model else default_model_dir()
        self.limits = ModelLimits.from_release(self.model_dir, name="--model")
        from muvi.pipeline import MuviPipeline

        self.pipe = MuviPipeline.from_pretrained(self.model_dir, device=resolve_device(device, "--device"))
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="muvi-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def generate(self, video: Optional[str], prompt: Optional[str] = None, cfg_scale: Optional[float] = None,
                 steps: float = 25, seed: Optional[float] = 0, duration: Optional[float] = None,
                 stage: Callable[[str], object] = lambda name: None) -> tuple[str, str, str, str]:
        """(video with music .mp4, music .wav, beat plot .png, a line of figures). Raises
        :class:`~muvi.errors.MuviError` for bad input, before any heavy work. ``stage(name)``
        is called as each stage starts (the page's progress text)."""
        from muvi import bundled_sample_video
        from muvi.inputs import check_request
        from muvi.mux import mux_audio

        source = Path(video) if video else bundled_sample_video()
        request = check_request(source, cfg_scale=_number(cfg_scale), num_steps=_integer(steps, "steps"),
                                seed=_integer(seed, "seed"), duration=_number(duration) or None,
                                prompt_audio=prompt or None, device=str(self.pipe.device), limits=self.limits,
                                names=PAGE_NAMES)
        stage("generating")
        result = self.pipe.run(request, progress=True)
        self._count += 1
        stem = self.workdir / f"{self._count:04d}_{_safe_stem(source)}"
        wav = result.save(stem.with_suffix(".wav"), overwrite=True)
        stage("putting the music into the video")
        cut = request.duration if request.duration < request.info.duration - 1e-6 else None
        mp4 = mux_audio(source, result.numpy(), result.sample_rate, stem.with_suffix(".mp4"), duration=cut,
                        info=request.info)
        stage("plotting the beats")
        png = beat_plot(result.numpy(), result.sample_rate, source, stem.with_suffix(".png"),
                        duration=request.duration)
        summary = (f"{result.duration:.1f} s of music for {source.name}: cfg {request.cfg_scale:g}, "
                   f"{request.num_steps} steps, seed {request.seed}")
        return str(mp4), str(wav), str(png), summary


#: how the page names the arguments in its messages
PAGE_NAMES = {"video": "video", "cfg_scale": "cfg scale", "num_steps": "steps", "seed": "seed",
              "duration": "duration", "prompt_audio": "style prompt", "prompt_sample_rate": "prompt rate",
              "prompt_scale": "prompt scale", "fps": "fps", "device": "device", "method": "method",
              "model": "model"}


def _number(value) -> Optional[float]:
    return None if value is None or value == "" else float(value)


def _integer(value, name: str) -> Optional[int]:
    """A whole number from the page (Gradio numbers are floats) or None."""
    from muvi.errors import InputError

    if value is None or value == "":
        return None
    if float(value) != int(float(value)):
        raise InputError(f"{name} {value}: must be a whole number")
    return int(float(value))


def _safe_stem(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in path.stem)
    return stem[:60] or "video"


def build(demo: Demo):
    """The Gradio page (``gr.Blocks``) around ``demo``."""
    import gradio as gr

    from muvi import bundled_sample_video

    def run(video, prompt, cfg_scale, steps, seed, duration,
            progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (Gradio finds its tracker by this default)
        progress(0, desc="checking the input")
        try:
            return demo.generate(video, prompt, cfg_scale, steps, seed, duration,
                                 stage=lambda name: progress(None, desc=name))
        except MuviError as err:  # uploads sit in Gradio's own folder: name them as the user did
            message = one_line(err)
            if video:
                message = message.replace(str(Path(video).parent) + os.sep, "")
            raise gr.Error(message, print_exception=False) from None

    with gr.Blocks(title="muvi: music for video") as page:
        gr.Markdown("# muvi: music for video\nUpload a video (or keep the sample clip), optionally a piece of "
                    "music whose style to follow, and press **Generate**.")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label=f"video (none: the sample clip, {bundled_sample_video().name})",
                                 sources=["upload"], elem_id="muvi-input")
                prompt = gr.Audio(label="style prompt (optional)", type="filepath", sources=["upload"],
                                  elem_id="muvi-prompt")
                with gr.Row():
                    cfg = gr.Number(value=demo.limits.default_cfg_scale, label="cfg scale", elem_id="muvi-cfg")
                    steps = gr.Number(value=25, label="steps", elem_id="muvi-steps")
                with gr.Row():
                    seed = gr.Number(value=0, label="seed", elem_id="muvi-seed")
                    duration = gr.Number(value=None, label="duration in s (0: the whole video)",
                                         elem_id="muvi-duration")
                button = gr.Button("Generate", variant="primary", elem_id="muvi-generate")
            with gr.Column():
                out_video = gr.Video(label="video with music", interactive=False, elem_id="muvi-output")
                out_audio = gr.Audio(label="music", type="filepath", interactive=False, elem_id="muvi-audio")
                out_plot = gr.Image(label="beats", type="filepath", interactive=False, elem_id="muvi-plot")
                status = gr.Markdown(elem_id="muvi-status")
        button.click(run, [video, prompt, cfg, steps, seed, duration], [out_video, out_audio, out_plot, status])
    return page


def options(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The page's command-line options (``muvi demo`` and ``python -m muvi.app``)."""
    parser.add_argument("--model", type=Path, default=None, help="release folder (default: the bundled demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, … (default: cuda if available)")
    parser.add_argument("--workdir", type=Path, default=None, help="where outputs go (default: a temporary folder)")
    return parser


def run_args(args: argparse.Namespace) -> int:
    """Load the model and serve the page until interrupted; 2 for a bad model or no Gradio."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('muvi: error: the web page needs Gradio: pip install "muvi-v2m[demo]"', file=sys.stderr)
        return 2
    try:
        demo = Demo(args.model, args.workdir, args.device)
    except MuviError as err:
        print(f"muvi: error: {one_line(err)}", file=sys.stderr)
        return 2
    serve(demo, args.host, args.port)
    return 0


def serve(demo: Demo, host: str = "127.0.0.1", port: Optional[int] = 7860, *, block: bool = True):
    """Start the page; returns its local URL (with ``block=False``, while it serves in a thread)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build(demo)
    page.queue()
    _, url, _ = page.launch(server_name=host, server_port=port, prevent_thread_lock=not block, share=False,
                            allowed_paths=[str(demo.workdir)], quiet=not block, footer_links=[])
    return page, url


def main(argv: Optional[list[str]] = None) -> int:
    parser = options(argparse.ArgumentParser(prog="python -m muvi.app", description=__doc__.splitlines()[0],
                                             formatter_class=argparse.RawDescriptionHelpFormatter))
    logging.basicConfig(level=logging.WARNING, format="muvi: %(message)s")
    return run_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
