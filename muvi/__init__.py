"""muvi: music for video, after MuVi (Li et al.).

>>> import muvi
>>> out = muvi.generate("clip.mp4", cfg_scale=4.0, seed=0)   # doctest: +SKIP
>>> out.save("clip.wav")                                       # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

__version__ = "0.1.0"

__all__ = ["generate", "MuviPipeline", "GenerationOutput", "MuviError", "default_model_dir", "bundled_sample_video",
           "__version__"]

from muvi.errors import MuviError  # noqa: E402 (no heavy imports)


def default_model_dir() -> Path:
    """The bundled demo release: ``muvi/checkpoints/muvi-demo`` in an installed package (a
    wheel or ``pip install .``), else ``checkpoints/muvi-demo`` of the source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "checkpoints" / "muvi-demo"
    return installed if (installed / "config.json").is_file() else here.parent / "checkpoints" / "muvi-demo"


def bundled_sample_video() -> Path:
    """The sample clip shipped with muvi (5.28 s of *Big Buck Bunny*, CC BY 3.0)."""
    return Path(__file__).resolve().parent / "assets" / "sample.mp4"


def generate(video, cfg_scale: Optional[float] = None, num_steps: int = 25, seed: Optional[int] = None,
             prompt_audio=None, duration: Optional[float] = None, model=None, *,
             fps: Optional[float] = None, prompt_sample_rate: Optional[int] = None,
             device: Optional[str] = None, method: str = "euler", prompt_scale: Optional[float] = None,
             progress: bool = True):
    """Write music for ``video``.

    Args:
        video: a video file path (decoded at 10 FPS), or a frames tensor (F, 3, H, W) or
            (F, H, W, 3), uint8 or float in [0, 1], with its frame rate in ``fps``; or a list
            of them, scored with one model load and batched through the networks where they
            fit (:meth:`MuviPipeline.run_many`): then a list of outputs is returned.
        cfg_scale: classifier-free guidance scale ``s`` in ``null + s·(cond − null)``; 1 = off.
            Default: the release's ``default_cfg_scale`` (the paper's 4 for the bundled model).
        num_steps: Euler steps from noise (t = 0) to music (t = 1).
        seed: makes the output repeatable (with a list of videos: one seed for each, or a list).
        prompt_audio: optional music (path, or waveform at ``prompt_sample_rate``, default
            the model's own rate: 24 kHz at paper scale, 22.05 kHz for the bundled demo) whose
            style the output follows; it is the clean context of in-context generation and is
            not part of the output.
        prompt_scale: guidance on the style prompt ``p`` (used only with one): the new frames'
            velocity gains ``prompt_scale · (v(c, p) − v(c, ∅))``, the pull of the prompt,
            at the cost of one more (shorter) pass per step; 0 = the prompt as plain context.
            Default: the release's ``default_prompt_scale``.
        duration: seconds of music from the start of the video (default: the whole video, of
            any length: past the model's ``window_seconds`` it is scored window by window,
            each window continuing the music before it; see :mod:`muvi.windows`).
        model: a release folder, a Hugging Face Hub repo id (``owner/name``, fetched into the
            Hub's cache; ``HF_HUB_OFFLINE=1`` uses the cache only), a loaded
            :class:`MuviPipeline`, or None for the bundled model. Pass a loaded pipeline
            (``MuviPipeline.from_pretrained(...)``) to keep the model in memory across calls:
            a folder or repo id is loaded anew on every call.
        device: "cpu", "cuda", "cuda:1", … (default: CUDA when available); with a loaded
            ``model`` its own device is used.
        method: "euler" (the paper's) or any torchdiffeq method name.

    Returns:
        :class:`GenerationOutput` with ``waveform``, ``sample_rate`` and ``save(path)``.

    Raises:
        muvi.errors.InputError: a bad argument or input file, before any model is loaded; the
            one-line message names it.
        muvi.errors.GenerationError: the model produced non-finite audio.
    """
    from muvi.inputs import ModelLimits, check_request

    pipe = _loaded_pipeline(model)
    folder = None
    if pipe is None:
        if model is None:
            folder = default_model_dir()
            if not (folder / "config.json").is_file():
                from muvi.errors import MissingFileError

                raise MissingFileError(f"no bundled model at {folder}; pass model=<release folder>")
        else:
            from muvi.release import locate

            folder = locate(model)
    limits = pipe.limits if pipe is not None else ModelLimits.from_release(folder)
    several = isinstance(video, (list, tuple))
    videos = list(video) if several else [video]
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(videos)
    if len(seeds) != len(videos):
        from muvi.errors import InputError

        raise InputError(f"seed: {len(seeds)} seeds for {len(videos)} videos")
    # Every argument and input file is checked before the model is loaded.
    requests = [check_request(v, cfg_scale=cfg_scale, num_steps=num_steps, seed=s, prompt_audio=prompt_audio,
                              prompt_sample_rate=prompt_sample_rate, prompt_scale=prompt_scale,
                              duration=duration, fps=fps,
                              device=device if pipe is None else str(pipe.device), method=method, limits=limits)
                for v, s in zip(videos, seeds)]
    if pipe is None:
        from muvi.pipeline import MuviPipeline

        pipe = MuviPipeline.from_pretrained(folder, device=requests[0].device)
    if not several:
        return pipe.run(requests[0], progress=progress)
    return pipe.run_many(requests, progress=progress)


def _loaded_pipeline(model):
    """``model`` when it is a loaded MuviPipeline (without importing torch otherwise)."""
    import sys

    pipeline = sys.modules.get("muvi.pipeline")
    return model if pipeline is not None and isinstance(model, pipeline.MuviPipeline) else None


def __getattr__(name: str):
    # Lazy attributes keep `import muvi` light (no torch import until it is needed).
    if name == "MuviPipeline":
        from muvi.pipeline import MuviPipeline

        return MuviPipeline
    if name == "GenerationOutput":
        from muvi.output import GenerationOutput

        return GenerationOutput
    raise AttributeError(f"module 'muvi' has no attribute {name!r}")
