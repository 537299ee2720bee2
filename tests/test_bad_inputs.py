"""Bad input, through ``muvi.generate``, ``muvi generate`` and ``python -m muvi.eval``.

Every case must: fail with a muvi error (API) or exit status 2 (command line), say so in one
line that names the argument or file at fault, print no traceback, never reach the model
(loading it is made to fail loudly), and leave every input file byte-identical (SHA-256).
"""
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import muvi
from muvi import cli
from muvi.errors import MuviError
from muvi.pipeline import MuviPipeline

from conftest import make_clip, tiny_release


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs of every kind, good and bad, in one folder."""
    root = tmp_path_factory.mktemp("inputs")
    make_clip(root / "clip.mp4", fps=12, seconds=1.5)
    (root / "folder.mp4").mkdir()
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n")
    sf.write(root / "tone.wav", 0.1 * np.sin(np.arange(24000) / 7.0), 24000)
    sf.write(root / "nan.wav", np.full(12000, np.nan, np.float32), 24000, subtype="FLOAT")
    sf.write(root / "long.wav", np.zeros(3 * 24000, np.float32), 24000)
    sf.write(root / "short.wav", 0.1 * np.sin(np.arange(12000) / 5.0), 24000)
    tiny_release(root / "release")
    (root / "no_config").mkdir()
    # gen / ref folders for muvi.eval
    for name in ("gen", "ref"):
        (root / name).mkdir()
        for i in range(2):
            sf.write(root / name / f"a{i}.wav", 0.1 * np.sin(np.arange(24000) * (i + 1) / 9.0), 24000)
    (root / "bad_gen").mkdir()
    sf.write(root / "bad_gen" / "a0.wav", np.zeros(24000), 24000)
    (root / "bad_gen" / "a1.wav").write_bytes(b"RIFF....garbage")
    (root / "report.json").write_text("{}\n")
    (root / "weights.pth").write_bytes(b"\0" * 64)
    return root


def digests(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def no_model_load(monkeypatch):
    """Reaching the model is a failure of the input checks."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was caught")

    monkeypatch.setattr(MuviPipeline, "from_pretrained", classmethod(refuse))


NAN_FRAMES = torch.full((12, 3, 32, 32), float("nan"))
NAN_PROMPT = torch.full((24000,), float("nan"))

# (case id, keyword arguments of muvi.generate beyond the video, video, text the message must hold)
API_CASES = [
    ("cfg-nan", dict(cfg_scale=math.nan), "clip.mp4", "cfg_scale=nan"),
    ("cfg-inf", dict(cfg_scale=math.inf), "clip.mp4", "cfg_scale=inf"),
    ("cfg-negative", dict(cfg_scale=-1.0), "clip.mp4", "cfg_scale=-1.0"),
    ("cfg-absurd", dict(cfg_scale=1e9), "clip.mp4", "cfg_scale=1000000000.0"),
    ("cfg-string", dict(cfg_scale="4"), "clip.mp4", "cfg_scale='4'"),
    ("cfg-bool", dict(cfg_scale=True), "clip.mp4", "cfg_scale=True"),
    ("prompt-scale-negative", dict(prompt_scale=-0.5), "clip.mp4", "prompt_scale=-0.5"),
    ("prompt-scale-nan", dict(prompt_scale=math.nan), "clip.mp4", "prompt_scale=nan"),
    ("steps-zero", dict(num_steps=0), "clip.mp4", "num_steps=0"),
    ("steps-bool", dict(num_steps=True), "clip.mp4", "num_steps=True"),
    ("steps-float", dict(num_steps=2.5), "clip.mp4", "num_steps=2.5"),
    ("steps-string", dict(num_steps="25"), "clip.mp4", "num_steps='25'"),
    ("steps-huge", dict(num_steps=10 ** 9), "clip.mp4", "num_steps=1000000000"),
    ("seed-negative", dict(seed=-1), "clip.mp4", "seed=-1"),
    ("seed-too-big", dict(seed=2 ** 63), "clip.mp4", "seed=9223372036854775808"),
    ("seed-float", dict(seed=1.5), "clip.mp4", "seed=1.5"),
    ("duration-nan", dict(duration=math.nan), "clip.mp4", "duration=nan"),
    ("duration-negative", dict(duration=-1.0), "clip.mp4", "duration=-1.0"),
    ("duration-zero", dict(duration=0), "clip.mp4", "duration=0"),
    ("duration-past-end", dict(duration=9.0), "clip.mp4", "duration=9.0"),
    ("video-missing", {}, "missing.mp4", "missing.mp4"),
    ("video-folder", {}, "folder.mp4", "folder.mp4"),
    ("video-empty", {}, "empty.mp4", "empty.mp4"),
    ("video-text", {}, "text.mp4", "text.mp4"),
    ("video-audio-only", {}, "tone.wav", "tone.wav: no video stream"),
    ("frames-nan", dict(fps=12), NAN_FRAMES, "NaN"),
    ("frames-no-fps", {}, torch.zeros(12, 3, 32, 32, dtype=torch.uint8), "fps="),
    ("frames-fps-nan", dict(fps=math.nan), torch.zeros(12, 3, 32, 32, dtype=torch.uint8), "fps=nan"),
    ("frames-bad-shape", dict(fps=12), torch.zeros(12, 32, 32), "shape"),
    ("prompt-missing", dict(prompt_audio="missing.wav"), "clip.mp4", "missing.wav"),
    ("prompt-nan-file", dict(prompt_audio="nan.wav"), "clip.mp4", "nan.wav"),
    ("prompt-too-long", dict(prompt_audio="long.wav"), "clip.mp4", "long.wav"),
    ("prompt-no-audio", dict(prompt_audio="clip.mp4"), "clip.mp4", "clip.mp4"),
    ("prompt-nan-tensor", dict(prompt_audio=NAN_PROMPT), "clip.mp4", "prompt_audio"),
    ("prompt-int-tensor", dict(prompt_audio=torch.zeros(100, dtype=torch.int16)), "clip.mp4", "prompt_audio"),
    ("device-unknown", dict(device="foo"), "clip.mp4", "device='foo'"),
    ("device-cuda-index", dict(device="cuda:7"), "clip.mp4", "device='cuda:7'"),
    ("method-unknown", dict(method="leapfrog"), "clip.mp4", "method='leapfrog'"),
    ("model-missing", dict(model="nowhere"), "clip.mp4", "nowhere"),
    ("model-no-config", dict(model="no_config"), "clip.mp4", "no_config"),
]
if not torch.cuda.is_available():
    API_CASES.append(("device-cuda", dict(device="cuda"), "clip.mp4", "device='cuda'"))


@pytest.mark.parametrize("case,kwargs,video,expected", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_rejects(files, no_model_load, monkeypatch, case, kwargs, video, expected):
    monkeypatch.chdir(files)
    before = digests(files)
    kwargs = {"model": "release", "progress": False, **kwargs}
    with pytest.raises(MuviError) as info:
        muvi.generate(video, **kwargs)
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    assert digests(files) == before


# (case id, arguments after `muvi generate`, text the message must hold); --model release is added
CLI_CASES = [
    ("cfg-nan", ["clip.mp4", "--cfg-scale", "nan"], "--cfg-scale nan"),
    ("cfg-word", ["clip.mp4", "--cfg-scale", "four"], "--cfg-scale four"),
    ("cfg-negative", ["clip.mp4", "--cfg-scale", "-2"], "--cfg-scale -2.0"),
    ("prompt-scale-word", ["clip.mp4", "--prompt-scale", "lots"], "--prompt-scale lots"),
    ("prompt-scale-negative", ["clip.mp4", "--prompt-scale", "-1"], "--prompt-scale -1.0"),
    ("mel-noise-word", ["clip.mp4", "--mel-noise", "some"], "--mel-noise some"),
    ("mel-noise-negative", ["clip.mp4", "--mel-noise", "-0.5"], "--mel-noise -0.5"),
    ("mel-noise-nan", ["clip.mp4", "--mel-noise", "nan"], "--mel-noise nan"),
    ("loudness-word", ["clip.mp4", "--loudness", "loud"], "--loudness loud"),
    ("loudness-positive", ["clip.mp4", "--loudness", "3"], "--loudness 3"),
    ("loudness-nan", ["clip.mp4", "--loudness", "nan"], "--loudness nan"),
    ("steps-zero", ["clip.mp4", "--steps", "0"], "--steps 0"),
    ("steps-float", ["clip.mp4", "--steps", "2.5"], "--steps 2.5"),
    ("seed-negative", ["clip.mp4", "--seed", "-1"], "--seed -1"),
    ("seed-too-big", ["clip.mp4", "--seed", str(2 ** 63)], "--seed 9223372036854775808"),
    ("duration-inf", ["clip.mp4", "--duration", "inf"], "--duration inf"),
    ("duration-past-end", ["clip.mp4", "--duration", "30"], "--duration 30.0"),
    ("device-unknown", ["clip.mp4", "--device", "foo"], "--device foo"),
    ("method-unknown", ["clip.mp4", "--method", "leapfrog"], "--method leapfrog"),
    ("output-suffix", ["clip.mp4", "-o", "out.xyz"], "-o out.xyz"),
    ("output-is-input", ["clip.mp4", "-o", "clip.mp4", "--overwrite"], "-o clip.mp4"),
    ("output-is-prompt", ["clip.mp4", "--prompt", "short.wav", "-o", "short.wav", "--overwrite"], "-o short.wav"),
    ("output-exists", ["clip.mp4", "-o", "report.json.mp4"], "report.json.mp4 exists"),
    ("output-folder-is-file", ["clip.mp4", "-o", "tone.wav/out.mp4"], "-o tone.wav/out.mp4"),
    ("output-in-model", ["clip.mp4", "-o", "release/out.wav"], "-o release/out.wav"),
    ("prompt-missing", ["clip.mp4", "--prompt", "missing.wav"], "--prompt missing.wav"),
    ("prompt-nan", ["clip.mp4", "--prompt", "nan.wav"], "nan.wav"),
    ("video-missing", ["missing.mp4"], "missing.mp4"),
    ("video-audio-only", ["tone.wav"], "tone.wav"),
    ("model-missing", ["clip.mp4", "--model", "nowhere"], "--model nowhere"),
    ("unknown-option", ["clip.mp4", "--cfg", "4"], "--cfg"),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("device-cuda", ["clip.mp4", "--device", "cuda"], "--device cuda"))


@pytest.mark.parametrize("case,argv,expected", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_rejects(files, no_model_load, monkeypatch, capsys, case, argv, expected):
    monkeypatch.chdir(files)
    (files / "report.json.mp4").write_bytes(b"an existing output")
    before = digests(files)
    argv = ["generate", *argv] + ([] if "--model" in argv else ["--model", "release"]) + ["-q"]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert code == 2, err
    assert err.startswith("muvi: error:") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert captured.out == ""
    assert digests(files) == before


def test_cli_rejects_in_a_real_process(files):
    """As a user runs it: one line on stderr, status 2, no traceback, before torch is imported."""
    code = ("import sys, muvi.cli as c; r = c.main(sys.argv[1:]); "
            "print('torch' in sys.modules, file=sys.stderr); sys.exit(r)")
    proc = subprocess.run([sys.executable, "-c", code, "generate", "clip.mp4", "--cfg-scale", "nan",
                           "--model", "release"], capture_output=True, text=True, cwd=files)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines == ["muvi: error: --cfg-scale nan: must be a finite number", "False"]


# (case id, arguments of python -m muvi.eval, text the message must hold)
EVAL_CASES = [
    ("output-is-generated", ["gen", "ref", "-o", "gen/a0.wav", "--overwrite"], "gen/a0.wav"),
    ("output-is-reference", ["gen", "ref", "-o", "ref/a1.wav", "--overwrite"], "ref/a1.wav"),
    ("output-would-be-read", ["gen", "ref", "-o", "gen/new.wav"], "gen/new.wav"),
    ("output-is-weights", ["gen", "ref", "--vggish", "weights.pth", "-o", "weights.pth", "--overwrite"],
     "weights.pth"),
    ("output-exists", ["gen", "ref", "-o", "report.json"], "report.json exists"),
    ("unreadable-audio", ["bad_gen", "ref", "-o", "new_report.json"], "bad_gen/a1.wav"),
    ("missing-folder", ["nowhere", "ref", "-o", "new_report.json"], "nowhere"),
]


@pytest.mark.parametrize("case,argv,expected", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_eval_rejects(files, monkeypatch, capsys, case, argv, expected):
    from muvi.eval.__main__ import main

    monkeypatch.chdir(files)
    before = digests(files)
    code = main([*argv, "--no-musicnn", "-q", "--bootstrap", "10"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err and expected in err, err
    assert digests(files) == before
    assert not (files / "new_report.json").exists()


def test_eval_writes_a_new_report_and_replaces_only_with_overwrite(files, monkeypatch, capsys):
    from muvi.eval.__main__ import main

    monkeypatch.chdir(files)
    out = files / "fresh.json"
    assert main(["gen", "ref", "-o", str(out), "--no-musicnn", "-q", "--bootstrap", "10"]) == 0
    first = json.loads(out.read_text())
    assert main(["gen", "ref", "-o", str(out), "--no-musicnn", "-q", "--bootstrap", "10"]) == 2
    assert main(["gen", "ref", "-o", str(out), "--no-musicnn", "-q", "--bootstrap", "10", "--overwrite"]) == 0
    assert json.loads(out.read_text()) == first
    out.unlink()
