"""muvi.inputs called directly: every check passes a valid value through unchanged and refuses a
bad one with the documented error type and a one-line message that names the argument (as the
caller spells it: ``num_steps=0`` from Python, ``--steps 0`` from the command line) or file."""
import json
import math
import os
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from muvi.cli import CLI_NAMES
from muvi.config import RELEASE_FORMAT, ConfigError
from muvi.errors import InputError, InputTypeError, MissingFileError, OutputError, OutputExistsError
from muvi.inputs import (
    API_NAMES,
    MAX_CFG_SCALE,
    MAX_SEED,
    MAX_STEPS,
    ModelLimits,
    Request,
    check_duration,
    check_int,
    check_method,
    check_output,
    check_real,
    check_request,
    frames_tensor,
    load_prompt,
    resolve_device,
)
from muvi.media import VideoError, probe_video

from conftest import make_clip


def message(err) -> str:
    """The error's message, which must be one line."""
    text = str(err.value)
    assert text and "\n" not in text, text
    return text


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_clip(root / "clip.mp4", fps=12, seconds=1.5)                        # 18 frames, 1.5 s
    t = np.arange(24000) / 24000
    sf.write(root / "tone.wav", (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 24000, subtype="FLOAT")
    t48 = np.arange(48000) / 48000
    stereo = np.stack([0.2 * np.sin(2 * np.pi * 300 * t48), 0.4 * np.sin(2 * np.pi * 500 * t48)], 1)
    sf.write(root / "stereo48k.flac", stereo.astype(np.float32), 48000)
    sf.write(root / "long.wav", np.zeros(3 * 24000, np.float32), 24000)
    sf.write(root / "nan.wav", np.full(1000, np.nan, np.float32), 24000, subtype="FLOAT")
    (root / "text.wav").write_text("not audio\n")
    (root / "folder.wav").mkdir()
    return root


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("value, kwargs", [
    (0.0, dict(low=0.0)), (4, dict(low=0.0, high=100.0)), (100.0, dict(high=100.0)),
    (np.float32(2.5), {}), (np.float64(-3.0), {}), (Fraction(1, 4), dict(low=0.0, low_open=True)),
    (np.int64(7), dict(low=7.0)),
])
def test_check_real_passes_valid_numbers(value, kwargs):
    out = check_real(value, "x", **kwargs)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value, kwargs, error, text", [
    ("4", {}, InputTypeError, "cfg_scale='4': must be a number, not str"),
    (True, {}, InputTypeError, "cfg_scale=True: must be a number, not bool"),
    (None, {}, InputTypeError, "cfg_scale=None: must be a number, not NoneType"),
    (torch.tensor(1.0), {}, InputTypeError, "must be a number, not Tensor"),
    (math.nan, {}, InputError, "cfg_scale=nan: must be a finite number"),
    (-math.inf, {}, InputError, "cfg_scale=-inf: must be a finite number"),
    (-1.0, dict(low=0.0), InputError, "cfg_scale=-1.0: must be >= 0"),
    (0.0, dict(low=0.0, low_open=True), InputError, "cfg_scale=0.0: must be > 0"),
    (0, dict(low=0.0, low_open=True), InputError, "cfg_scale=0: must be > 0"),
    (100.5, dict(high=100.0), InputError, "cfg_scale=100.5: must be at most 100"),
])
def test_check_real_refuses(value, kwargs, error, text):
    with pytest.raises(error) as err:
        check_real(value, "cfg_scale", **kwargs)
    assert text in message(err)
    assert isinstance(err.value, ValueError)  # every InputError is a ValueError too


def test_check_real_missing_and_cli_spelling():
    with pytest.raises(InputError) as err:
        check_real(None, "fps", missing="a frames tensor needs its frame rate")
    assert message(err) == "a frames tensor needs its frame rate"
    with pytest.raises(InputError) as err:
        check_real(-2.0, "--cfg-scale", low=0.0)
    assert message(err) == "--cfg-scale -2.0: must be >= 0"


@pytest.mark.parametrize("value", [1, 25, MAX_STEPS, np.int32(3), np.int64(MAX_STEPS)])
def test_check_int_passes_valid_integers(value):
    out = check_int(value, "num_steps", low=1, high=MAX_STEPS)
    assert type(out) is int and out == int(value)


@pytest.mark.parametrize("value, error, text", [
    (0, InputError, "num_steps=0: must be between 1 and 10000"),
    (MAX_STEPS + 1, InputError, "num_steps=10001: must be between 1 and 10000"),
    (2.0, InputTypeError, "num_steps=2.0: must be an integer, not float"),
    (True, InputTypeError, "num_steps=True: must be an integer, not bool"),
    ("25", InputTypeError, "num_steps='25': must be an integer, not str"),
    (np.float64(3.0), InputTypeError, "must be an integer, not float64"),
])
def test_check_int_refuses(value, error, text):
    with pytest.raises(error) as err:
        check_int(value, "num_steps", low=1, high=MAX_STEPS)
    assert text in message(err)


def test_check_int_seed_range():
    assert check_int(MAX_SEED, "seed", low=0, high=MAX_SEED) == 2 ** 63 - 1
    with pytest.raises(InputError) as err:
        check_int(2 ** 63, "--seed", low=0, high=MAX_SEED)
    assert message(err) == f"--seed {2 ** 63}: must be between 0 and {MAX_SEED}"


def test_check_method():
    from muvi.flow import ADAPTIVE_METHODS, FIXED_STEP_METHODS

    for method in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
        assert check_method(method, "method") == method
    for bad in ("leapfrog", "Euler", None, 3):
        with pytest.raises(InputError) as err:
            check_method(bad, "method")
        assert message(err).startswith(f"method={bad!r}: unknown ODE method; choose from euler, midpoint")
    with pytest.raises(InputError) as err:
        check_method("leapfrog", "--method")
    assert message(err).startswith("--method leapfrog: unknown ODE method")


def test_check_duration():
    assert check_duration(None, 12.5, 120.0, "v.mp4") == 12.5          # the whole video
    assert check_duration(3.0, 12.5, 120.0, "v.mp4") == 3.0
    assert check_duration(12.5, 12.5, 120.0, "v.mp4") == 12.5          # to the very end
    with pytest.raises(InputError) as err:
        check_duration(None, 130.0, 120.0, "v.mp4")
    assert message(err) == ("v.mp4: the video lasts 130.0 s, longer than this model's limit of 120 s; "
                            "pass duration=… to score a part of it")
    with pytest.raises(InputError) as err:
        check_duration(None, 130.0, 120.0, "v.mp4", "--duration")
    assert "pass --duration to score a part of it" in message(err)
    with pytest.raises(InputError) as err:
        check_duration(121.0, 300.0, 120.0, "v.mp4")
    assert message(err) == "duration=121.0: longer than this model's limit of 120 s"
    with pytest.raises(InputError) as err:
        check_duration(13.0, 12.5, 120.0, "v.mp4")
    assert message(err) == "duration=13.0: longer than the video v.mp4 (12.50 s)"


# ----------------------------------------------------------------------------- device

def test_resolve_device():
    assert resolve_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert resolve_device(torch.device("cpu")) == "cpu"
    cases = [(3, "device=3: must be a device name such as cpu or cuda"),
             ("foo", "device='foo': unknown device; use cpu, cuda or cuda:N"),
             ("meta", "device='meta': unsupported device type; use cpu, cuda or mps")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "device='cuda': CUDA is not available on this machine (no GPU found); use cpu"))
        cases.append(("cuda:1", "device='cuda:1': CUDA is not available"))
    else:
        count = torch.cuda.device_count()
        assert resolve_device("cuda:0") == "cuda:0"
        cases.append((f"cuda:{count}", f"device='cuda:{count}': this machine has {count} CUDA device(s)"))
    if not torch.backends.mps.is_available():
        cases.append(("mps", "device='mps': MPS is not available on this machine; use cpu"))
    for device, text in cases:
        with pytest.raises(InputError) as err:
            resolve_device(device)
        assert message(err).startswith(text), device
    with pytest.raises(InputError) as err:
        resolve_device("foo", "--device")
    assert message(err).startswith("--device foo: unknown device")


# ----------------------------------------------------------------------------- tensors

def test_frames_tensor_layouts_and_dtypes():
    gen = torch.Generator().manual_seed(0)
    chw = torch.randint(0, 256, (5, 3, 8, 10), dtype=torch.uint8, generator=gen)
    assert frames_tensor(chw) is chw or torch.equal(frames_tensor(chw), chw)
    hwc = chw.permute(0, 2, 3, 1).contiguous()
    out = frames_tensor(hwc)
    assert out.shape == (5, 3, 8, 10) and out.is_contiguous() and torch.equal(out, chw)
    assert torch.equal(frames_tensor(hwc.numpy()), chw)  # numpy (F, H, W, 3)
    # float in [0, 1] → round(x · 255), computed independently with numpy
    floats = torch.rand((4, 3, 6, 7), generator=gen)
    floats[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    expected = np.rint(floats.numpy() * 255).astype(np.uint8)
    out = frames_tensor(floats)
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), expected)
    assert torch.equal(frames_tensor(floats.double()), out)


@pytest.mark.parametrize("video, error, text", [
    ([1, 2, 3], InputTypeError, "video: must be a file path or a frames tensor, not list"),
    (torch.zeros(5, 8, 8), InputError, "got shape (5, 8, 8)"),
    (torch.zeros(5, 4, 8, 8), InputError,
     "(frames, 3, height, width) or (frames, height, width, 3); got shape (5, 4, 8, 8)"),
    (torch.zeros(0, 3, 8, 8, dtype=torch.uint8), InputError, "video: the frames tensor has zero frames"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.int64), InputError, "video: frames must be uint8 or float, not torch.int64"),
    (torch.full((2, 3, 8, 8), math.nan), InputError, "video: the frames tensor holds NaN or infinite values"),
    (torch.full((2, 3, 8, 8), math.inf), InputError, "NaN or infinite"),
    (torch.full((2, 3, 8, 8), 1.5), InputError, "video: float frames must lie in [0, 1]"),
    (torch.full((2, 3, 8, 8), -0.1), InputError, "float frames must lie in [0, 1]"),
])
def test_frames_tensor_refuses(video, error, text):
    with pytest.raises(error) as err:
        frames_tensor(video)
    assert text in message(err)


def test_load_prompt_from_tensors():
    gen = torch.Generator().manual_seed(0)
    wave = 0.1 * torch.randn(2400, generator=gen)
    out = load_prompt(wave, None, 24000)
    assert out.dtype == torch.float32 and torch.equal(out, wave)
    assert torch.equal(load_prompt(wave[None], 24000, 24000), wave)          # (1, N)
    assert torch.equal(load_prompt(wave[:, None].numpy(), None, 24000), wave)  # (N, 1) numpy
    assert torch.equal(load_prompt(wave.double(), None, 24000), wave.double().float())


def test_load_prompt_resamples_to_the_model_rate():
    # a 300 Hz sine at 48 kHz must come out as the same sine at 24 kHz (half the samples)
    t48 = np.arange(48000) / 48000
    out = load_prompt(torch.from_numpy(np.sin(2 * np.pi * 300 * t48)).float(), 48000, 24000)
    assert out.shape == (24000,) and out.dtype == torch.float32
    t24 = np.arange(24000) / 24000
    inner = slice(500, -500)  # away from the edges, where the resampling filter sees zeros
    np.testing.assert_allclose(out.numpy()[inner], np.sin(2 * np.pi * 300 * t24)[inner], atol=2e-3)


@pytest.mark.parametrize("prompt, rate, error, text", [
    ("wave", None, InputTypeError, "prompt_audio: must be an audio file path or a float waveform, not str"),
    (torch.zeros(100, dtype=torch.int16), None, InputTypeError, "not Tensor"),
    ([0.0, 0.1], None, InputTypeError, "not list"),
    (torch.zeros(2, 100), None, InputError, "prompt_audio: the prompt waveform must be mono (N,), got shape (2, 100)"),
    (torch.zeros(0), None, InputError, "prompt_audio: the style prompt is empty"),
    (torch.full((100,), math.nan), None, InputError, "prompt_audio: the style prompt holds NaN or infinite samples"),
    (torch.full((100,), math.inf), 48000, InputError, "prompt_audio: the style prompt holds NaN or infinite samples"),
])
def test_load_prompt_refuses_tensors(prompt, rate, error, text):
    if prompt == "wave":
        prompt = object()
        text = text.replace("not str", "not object")
    with pytest.raises(error) as err:
        load_prompt(prompt, rate, 24000)
    assert text in message(err)


def test_load_prompt_from_files(media):
    tone, _ = sf.read(media / "tone.wav", dtype="float32")
    out = load_prompt(media / "tone.wav", None, 24000)
    assert out.dtype == torch.float32 and np.array_equal(out.numpy(), tone)
    assert np.array_equal(load_prompt(str(media / "tone.wav"), 16000, 24000).numpy(), tone)  # rate ignored
    # stereo 48 kHz FLAC → mono (channel mean) at 24 kHz
    stereo, _ = sf.read(media / "stereo48k.flac", dtype="float32")
    out = load_prompt(media / "stereo48k.flac", None, 24000)
    assert out.shape == (24000,)
    t24 = np.arange(24000) / 24000
    mono = 0.1 * np.sin(2 * np.pi * 300 * t24) + 0.2 * np.sin(2 * np.pi * 500 * t24)
    np.testing.assert_allclose(out.numpy()[500:-500], mono[500:-500], atol=3e-3)


def test_load_prompt_refuses_files(media):
    cases = [(media / "missing.wav", MissingFileError, f"prompt_audio={media / 'missing.wav'}: style prompt not found"),
             (media / "folder.wav", InputError, f"{media / 'folder.wav'}: the style prompt is not a readable file"),
             (media / "text.wav", InputError, f"{media / 'text.wav'}: not a decodable audio file ("),
             (media / "clip.mp4", InputError, f"{media / 'clip.mp4'}: not a decodable audio file ("),
             (media / "nan.wav", InputError, f"{media / 'nan.wav'}: the style prompt holds NaN or infinite samples")]
    for path, error, text in cases:
        with pytest.raises(error) as err:
            load_prompt(path, None, 24000)
        assert message(err).startswith(text), path
    with pytest.raises(MissingFileError) as err:
        load_prompt(media / "missing.wav", None, 24000, "--prompt")
    assert message(err).startswith("--prompt ")


# ----------------------------------------------------------------------------- outputs

def test_check_output_accepts_new_paths(media, tmp_path):
    assert check_output(tmp_path / "out.wav", inputs=[media / "clip.mp4"], overwrite=False) == tmp_path / "out.wav"
    deep = tmp_path / "a" / "b" / "out.mp4"  # folders that do not exist yet but can be made
    assert check_output(str(deep), inputs=[], overwrite=False) == deep
    assert not (tmp_path / "a").exists()  # checking creates nothing
    (tmp_path / "old.wav").write_bytes(b"x")
    assert check_output(tmp_path / "old.wav", inputs=[], overwrite=True) == tmp_path / "old.wav"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.wav"]  # the write probe left nothing


def test_check_output_refuses(media, tmp_path):
    clip = media / "clip.mp4"
    (tmp_path / "old.wav").write_bytes(b"x")
    os.link(clip, tmp_path / "hardlink.mp4")
    (tmp_path / "symlink.mp4").symlink_to(clip)
    (tmp_path / "file").write_bytes(b"")
    cases = [
        (clip, [clip], OutputError, f"output={clip}: is an input ({clip}); choose another output"),
        (tmp_path / "hardlink.mp4", [clip], OutputError, f"output={tmp_path / 'hardlink.mp4'}: is an input ({clip})"),
        (tmp_path / "symlink.mp4", [clip], OutputError, f"output={tmp_path / 'symlink.mp4'}: is an input ({clip})"),
        (media / "sub" / "out.wav", [media], OutputError, f"output={media / 'sub' / 'out.wav'}: lies inside the "
                                                          f"input folder {media}"),
        (tmp_path, [], OutputError, f"output={tmp_path}: is a folder; give a file name"),
        (tmp_path / "old.wav", [], OutputExistsError,
         f"{tmp_path / 'old.wav'} exists; pass overwrite=True to replace it"),
        (tmp_path / "file" / "out.wav", [], OutputError,
         f"output={tmp_path / 'file' / 'out.wav'}: {tmp_path / 'file'} is not a folder"),
    ]
    if Path("/proc/self").is_dir():  # Linux: a folder no file can be made in, even by root
        cases.append((Path("/proc/muvi-out/out.wav"), [], OutputError,
                      "output=/proc/muvi-out/out.wav: the folder /proc is not writable"))
    for path, inputs, error, text in cases:
        with pytest.raises(error) as err:
            check_output(path, inputs=inputs, overwrite=False)
        assert message(err).startswith(text), path
    with pytest.raises(OutputExistsError) as err:
        check_output(tmp_path / "old.wav", inputs=[], overwrite=False, name="--output")
    assert message(err) == f"{tmp_path / 'old.wav'} exists; pass --overwrite to replace it"
    assert isinstance(err.value, FileExistsError)


# ----------------------------------------------------------------------------- releases

def test_model_limits_from_a_release(tiny_release_dir, tiny_pipe):
    limits = ModelLimits.from_release(tiny_release_dir)
    raw = json.loads((tiny_release_dir / "config.json").read_text())
    mel = json.loads((tiny_release_dir / "mel.json").read_text())["config"]
    assert raw["format_version"] == RELEASE_FORMAT
    assert limits == ModelLimits(sample_rate=mel["sample_rate"], max_duration=raw["pipeline"]["max_duration"],
                                 video_fps=raw["pipeline"]["video_fps"],
                                 default_cfg_scale=raw["pipeline"]["default_cfg_scale"])
    assert limits == tiny_pipe.limits  # what the loaded model says of itself


def test_model_limits_refuses(tmp_path, tiny_release_dir):
    with pytest.raises(MissingFileError) as err:
        ModelLimits.from_release(tmp_path / "nowhere")
    assert message(err) == f"model={tmp_path / 'nowhere'}: no such model folder"
    with pytest.raises(MissingFileError) as err:
        ModelLimits.from_release(tmp_path, name="--model")
    assert message(err) == f"--model {tmp_path}: not a muvi model folder (no config.json)"

    old = shutil.copytree(tiny_release_dir, tmp_path / "old")
    raw = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**raw, "format_version": 1}))
    with pytest.raises(ConfigError) as err:
        ModelLimits.from_release(old)
    assert message(err).startswith(f"{old / 'config.json'}: not a readable muvi config")
    assert "release format 1, but this muvi reads format 2" in message(err)
    assert "export the release again" in message(err)

    (old / "config.json").write_text("{broken")
    with pytest.raises(ConfigError) as err:
        ModelLimits.from_release(old)
    assert message(err).startswith(f"{old / 'config.json'}: not a readable muvi config (JSONDecodeError")

    (old / "config.json").write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ConfigError) as err:
        ModelLimits.from_release(old)
    assert "KeyError: 'pipeline'" in message(err)


# ----------------------------------------------------------------------------- check_request

def test_check_request_file(media):
    clip = media / "clip.mp4"
    info = probe_video(clip)
    request = check_request(clip, seed=5, num_steps=3, device="cpu")
    assert isinstance(request, Request)
    assert request.video == clip and request.source == str(clip) and request.info == info
    assert request.duration == info.duration == pytest.approx(1.5)
    assert request.cfg_scale == ModelLimits().default_cfg_scale and request.num_steps == 3 and request.seed == 5
    assert request.method == "euler" and request.device == "cpu" and request.fps is None and request.prompt is None

    request = check_request(str(clip), cfg_scale=2, duration=1.0, method="rk4", prompt_audio=media / "tone.wav",
                            limits=ModelLimits(default_cfg_scale=7.0), check_device=False)
    assert request.cfg_scale == 2.0 and type(request.cfg_scale) is float and request.duration == 1.0
    assert request.method == "rk4" and request.device == "cpu" and request.video == clip
    tone, _ = sf.read(media / "tone.wav", dtype="float32")
    assert np.array_equal(request.prompt.numpy(), tone)


def test_check_request_frames():
    frames = torch.randint(0, 256, (12, 24, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    prompt = torch.zeros(12000)
    request = check_request(frames, fps=12, prompt_audio=prompt, prompt_sample_rate=24000, device="cpu")
    assert request.source == "<tensor>" and request.info is None and request.fps == 12.0
    assert torch.equal(request.video, frames.permute(0, 3, 1, 2)) and request.duration == 1.0
    assert torch.equal(request.prompt, prompt)


@pytest.mark.parametrize("kwargs, error, text", [
    (dict(cfg_scale=MAX_CFG_SCALE * 2), InputError, "cfg_scale=200.0: must be at most 100"),
    (dict(num_steps=0), InputError, "num_steps=0: must be between"),
    (dict(seed=-1), InputError, "seed=-1: must be between 0 and"),
    (dict(duration=0.0), InputError, "duration=0.0: must be > 0"),
    (dict(duration=2.0), InputError, "duration=2.0: longer than the video"),
    (dict(prompt_sample_rate=0), InputError, "prompt_sample_rate=0: must be between 1 and 1000000"),
    (dict(method="leapfrog"), InputError, "method='leapfrog': unknown ODE method"),
    (dict(device="foo"), InputError, "device='foo': unknown device"),
    (dict(prompt_audio="LONG"), InputError, "long.wav: the style prompt lasts 3.00 s, longer than the output (1.50 s)"),
    (dict(prompt_audio=torch.zeros(48000)), InputError, "prompt_audio: the style prompt lasts 2.00 s"),
])
def test_check_request_refuses(media, kwargs, error, text):
    if kwargs.get("prompt_audio") == "LONG":
        kwargs = dict(prompt_audio=media / "long.wav")
    with pytest.raises(error) as err:
        check_request(media / "clip.mp4", **kwargs)
    assert text in message(err)


def test_check_request_refuses_files_and_frames(media):
    with pytest.raises(MissingFileError) as err:
        check_request(media / "missing.mp4")
    assert str(media / "missing.mp4") in message(err)
    with pytest.raises(VideoError) as err:
        check_request(media / "tone.wav")
    assert message(err).startswith(f"{media / 'tone.wav'}: no video stream")
    frames = torch.zeros(12, 3, 16, 16, dtype=torch.uint8)
    with pytest.raises(InputError) as err:
        check_request(frames)
    assert message(err) == "a frames tensor needs its frame rate: pass fps=… (frames per second)"
    with pytest.raises(InputError) as err:
        check_request(frames, fps=12, duration=200.0, limits=ModelLimits(max_duration=120.0))
    assert message(err) == "duration=200.0: longer than this model's limit of 120 s"
    with pytest.raises(InputError) as err:
        check_request(frames, fps=0.05, limits=ModelLimits(max_duration=120.0))  # 240 s of frames
    assert message(err).startswith("<tensor>: the video lasts 240.0 s, longer than this model's limit")


def test_check_request_spells_arguments_as_the_cli(media):
    for kwargs, text in [(dict(num_steps=0), "--steps 0: must be between"),
                         (dict(cfg_scale=-1.0), "--cfg-scale -1.0: must be >= 0"),
                         (dict(duration=5.0), "--duration 5.0: longer than the video"),
                         (dict(method="x"), "--method x: unknown ODE method"),
                         (dict(prompt_audio=media / "missing.wav"), f"--prompt {media / 'missing.wav'}: style prompt")]:
        with pytest.raises(InputError) as err:
            check_request(media / "clip.mp4", names=CLI_NAMES, **kwargs)
        assert message(err).startswith(text)
    assert set(API_NAMES) == set(CLI_NAMES)
