"""Recipe 2 (HiFi-GAN vocoder with MPD + MSD) on its tiny config with real music: Bach chorales
rendered from MIDI.

A few steps with finite losses; the final file holds plain (weight-norm-folded) weights that
load strictly into a generator built from its JSON and reproduce the trained EMA generator;
exact resume of generator, both discriminators, both optimizers and the EMA; a NaN stops the
run naming the step and leaves the last checkpoint loadable."""
import json
import math
from pathlib import Path

import pytest
import torch

from muvi.checkpoint import load_strict, read_state_dict
from muvi.hub import load_component
from muvi.models.discriminators import HiFiGANDiscriminatorConfig, MultiPeriodDiscriminator, MultiScaleDiscriminator
from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
from muvi.models.mel import MelConfig
from muvi.training import NonFiniteLoss, latest_checkpoint, load_checkpoint

from conftest import assert_same, load_recipe, recipe_runner, render_chorales

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "vocoder_tiny.json"
SR = 24000

recipe = load_recipe("train_vocoder")
run = recipe_runner(recipe, CONFIG, "music")  # run(run_dir, music, *overrides, resume=False)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def music_dir(tmp_path_factory) -> Path:
    return render_chorales(tmp_path_factory.mktemp("music"), SR, [(f"chorale{i}.wav", i, 2.0) for i in range(3)])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, music_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    run(run_dir, music_dir)  # 4 steps, checkpoints at 2 and 4
    return run_dir


def test_runs_with_finite_losses_and_exports_plain_weights(full_run):
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss_g", "loss_d", "mel", "fm", "adv"))
        assert r["loss_g"] == pytest.approx(r["adv"] + 2 * r["fm"] + 45 * r["mel"], rel=1e-5)
        assert r["tokens_per_s"] == pytest.approx(2400 * r["samples_per_s"], rel=1e-6)
    assert rows[-1]["lr"] == pytest.approx(2e-4 * 0.999)  # decayed once by step 4 (every 2 steps)

    final = full_run / "final"
    state = read_state_dict(final / "vocoder.safetensors")
    assert not any("parametrizations" in k or k.endswith(("weight_g", "weight_v")) for k in state)
    plain = load_component(final, "vocoder", types=("hifigan",))
    assert load_component(final, "mel").config == MelConfig()

    # The export is the EMA generator of the last step with weight norm folded: same output.
    ckpt = load_checkpoint(latest_checkpoint(full_run))
    trained = HiFiGANGenerator(HiFiGANConfig.preset("tiny"))
    trained.apply_weight_norm()
    load_strict(trained, ckpt["ema"]["shadow"], source="ema")
    mel = torch.randn(2, 160, 12) - 5.0
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(mel), trained.eval()(mel), rtol=1e-4, atol=1e-6)

    # Both discriminators are checkpointed and load strictly into fresh ones.
    disc_cfg = HiFiGANDiscriminatorConfig.preset("tiny")
    load_strict(MultiPeriodDiscriminator(disc_cfg), ckpt["mpd"], source="mpd")
    load_strict(MultiScaleDiscriminator(disc_cfg), ckpt["msd"], source="msd")
    assert any(k.endswith("parametrizations.weight.0._u") for k in ckpt["msd"])


def test_resume_is_exact(full_run, music_dir, tmp_path):
    run(tmp_path, music_dir, "steps=2")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    run(tmp_path, music_dir, "steps=4", resume=True)
    straight = load_checkpoint(full_run / "checkpoints" / "step_00000004")
    resumed = load_checkpoint(tmp_path / "checkpoints" / "step_00000004")
    assert {"model", "mpd", "msd", "ema", "optimizer", "disc_optimizer", "sampler"} <= set(straight)
    assert_same(straight, resumed)
    assert_same(read_state_dict(full_run / "final" / "vocoder.safetensors"),
                read_state_dict(tmp_path / "final" / "vocoder.safetensors"))


def test_heldout_loss_is_the_mel_error_every_two_steps(full_run, music_dir, tmp_path):
    run(tmp_path, music_dir, f"heldout={music_dir}", "eval_every=2", "optim.lr_decay_every=1")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [("heldout_loss" in r) for r in rows] == [False, True, False, True]
    assert all(math.isfinite(r["heldout_loss"]) and 0 < r["heldout_loss"] < 20 for r in rows[1::2])
    assert rows[-1]["lr"] == pytest.approx(2e-4 * 0.999 ** 3)  # the dotted override reached the generator's
    disc = load_checkpoint(latest_checkpoint(tmp_path))["disc_scheduler"]
    assert disc["_last_lr"][0] == pytest.approx(2e-4 * 0.999 ** 2)  # ... and only the generator's


def test_nan_stops_at_its_step_and_keeps_the_last_checkpoint(music_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = recipe.feature_matching_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(recipe, "feature_matching_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"at step 3 on batch chorale\d\.wav@"):
        run(tmp_path, music_dir)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000002"
    assert not (tmp_path / "final").exists()
    state = load_checkpoint(latest)
    assert state["step"] == 2
    generator = HiFiGANGenerator(HiFiGANConfig.preset("tiny"))
    generator.apply_weight_norm()
    load_strict(generator, state["model"], source=str(latest))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_audio_samples_and_tensorboard_leave_training_as_it_was(full_run, music_dir, tmp_path):
    """Every 2 steps the EMA generator resynthesises the first second of the first file into
    RUN/samples (beside the clip itself); TensorBoard holds the rows and the audio; the weights
    are those of the run without samples."""
    import numpy as np
    import soundfile as sf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from muvi.data.audio_io import load_audio

    run(tmp_path, music_dir, "sample_every=2", "sample_seconds=1", "log_with=tensorboard")
    samples = tmp_path / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "reference.wav", "step_00000002_vocoder.wav", "step_00000004_vocoder.wav"]
    for path in samples.iterdir():
        wave, rate = sf.read(path, dtype="float32")
        assert rate == SR and wave.shape == (SR,) and np.isfinite(wave).all() and np.abs(wave).max() > 0
    clip = load_audio(music_dir / "chorale0.wav", SR, duration=1.0).numpy()
    np.testing.assert_allclose(sf.read(samples / "reference.wav", dtype="float32")[0], clip, atol=1 / 2**14)

    events = EventAccumulator(str(tmp_path / "muvi"))
    events.Reload()
    assert {"loss_g", "loss_d", "mel", "lr", "samples_per_s"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("mel")] == [1, 2, 3, 4]
    assert {"samples/vocoder", "samples/reference"} <= set(events.Tags()["audio"])
    straight, sampled = (load_checkpoint(d / "checkpoints" / "step_00000004") for d in (full_run, tmp_path))
    assert straight.pop("config")["sample_every"] == 0 and sampled.pop("config")["sample_every"] == 2
    assert_same(straight, sampled)


@pytest.fixture(scope="module")
def release_parts(tmp_path_factory) -> Path:
    """A folder with a vocoder (the tiny preset, random) and a VAE on the run's mel, as a
    release holds them."""
    from muvi.hub import save_component
    from muvi.models.mel import MelSpectrogram
    from muvi.models.vae import MelVAE, VAEConfig

    folder = tmp_path_factory.mktemp("release")
    torch.manual_seed(3)
    save_component(HiFiGANGenerator(HiFiGANConfig.preset("tiny")), folder, "vocoder")
    save_component(MelVAE(VAEConfig.preset("tiny")), folder, "vae")
    save_component(MelSpectrogram(MelConfig()), folder, "mel")
    return folder


def test_fine_tune_starts_from_the_given_vocoder_and_hears_the_vae_reconstruction(
        music_dir, release_parts, tmp_path, monkeypatch):
    """``init``: the generator starts from the folder's vocoder (with a zero learning rate the
    export is those weights); ``input_vae``: every generator pass is given the VAE's
    reconstruction of the mel, which is not the mel itself."""
    from muvi.models.vae import MelVAE

    seen = []
    real = MelVAE.reconstruct

    def spy(vae, mel):
        out = real(vae, mel)
        seen.append((mel.shape, out.shape, (out - mel).abs().mean().item()))
        return out

    monkeypatch.setattr(MelVAE, "reconstruct", spy)
    final = run(tmp_path, music_dir, f"init={release_parts}", f"input_vae={release_parts}", "steps=2",
                "optim.lr=0.0", "ema_decay=0.0")
    assert len(seen) == 2 and all(a == b for a, b, _ in seen) and all(d > 0.1 for *_, d in seen)
    start = read_state_dict(release_parts / "vocoder.safetensors")
    tuned = read_state_dict(final / "vocoder.safetensors")
    assert start.keys() == tuned.keys()
    for k in start:
        torch.testing.assert_close(tuned[k], start[k], rtol=1e-5, atol=1e-6)


def test_fine_tune_refuses_a_vae_on_another_mel(music_dir, tmp_path):
    from muvi.config import ConfigError
    from muvi.hub import save_component
    from muvi.models.mel import MelSpectrogram
    from muvi.models.vae import MelVAE, VAEConfig

    other = tmp_path / "other"
    save_component(MelVAE(VAEConfig.preset("tiny", mel_channels=80)), other, "vae")
    save_component(MelSpectrogram(MelConfig(n_mels=80)), other, "mel")
    with pytest.raises(ConfigError, match="another mel"):
        run(tmp_path / "run", music_dir, f"input_vae={other}")


def test_stft_loss_without_discriminators(music_dir, tmp_path):
    """``adversarial: false`` with ``stft_weight``: the generator's loss is exactly mel ×45 +
    STFT × weight, and the discriminators and their optimizer never step (equal at steps 2 and 4)
    while the generator does; a malformed resolution is refused before training."""
    from muvi.config import ConfigError

    run(tmp_path, music_dir, "adversarial=false", "stft_weight=2.5")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["loss_d"] == r["adv"] == r["fm"] == 0.0 and r["stft"] > 0
        assert r["loss_g"] == pytest.approx(45 * r["mel"] + 2.5 * r["stft"], rel=1e-5)
    early, late = (load_checkpoint(tmp_path / "checkpoints" / f"step_0000000{s}") for s in (2, 4))
    assert_same(early["mpd"], late["mpd"])
    assert_same(early["msd"], late["msd"])
    assert not early["disc_optimizer"]["state"]
    assert not torch.equal(early["model"]["conv_pre.bias"], late["model"]["conv_pre.bias"])
    with pytest.raises(ConfigError, match="stft_resolutions"):
        run(tmp_path / "bad", music_dir, "stft_weight=1", "stft_resolutions=[[256,64,512]]")
