"""Recipe 1 (mel VAE) on its tiny config with real music: Bach chorales rendered from MIDI.

A few steps with finite losses (the patch discriminator switches on at step 2); the final file
loads strictly into a VAE built from its JSON and carries latent statistics estimated from the
data; exact resume; a NaN stops the run naming the step and leaves the last checkpoint loadable."""
import json
import math
from pathlib import Path

import pytest
import soundfile as sf
import torch

from muvi.checkpoint import load_strict, read_state_dict
from muvi.hub import load_component
from muvi.models.vae import MelVAE, VAEConfig
from muvi.training import NonFiniteLoss, latest_checkpoint, load_checkpoint

from conftest import assert_same, load_recipe, recipe_runner, render_chorales

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "vae_tiny.json"
SR = 24000

recipe = load_recipe("train_vae")
run = recipe_runner(recipe, CONFIG, "music")  # run(run_dir, music, *overrides, resume=False)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def music_dir(tmp_path_factory) -> Path:
    return render_chorales(tmp_path_factory.mktemp("music"), SR, [(f"chorale{i}.wav", i, 3.0) for i in range(3)])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, music_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    run(run_dir, music_dir)  # 4 steps, checkpoints at 2 and 4
    return run_dir


def test_runs_with_finite_losses_and_exports_with_latent_stats(full_run, music_dir):
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "rec", "kl", "gan", "disc"))
        assert r["samples_per_s"] > 0 and r["rec"] > 0 and r["kl"] > 0
    assert rows[0]["gan"] == 0 and rows[0]["disc"] == 0  # adv_start_step 2
    assert all(r["disc"] > 0 and r["adv_lambda"] > 0 for r in rows[1:])

    final = full_run / "final"
    vae = load_component(final, "vae", types=("vae",))
    state = read_state_dict(final / "vae.safetensors")
    # The exported weights are the EMA of the last step (plus the statistics).
    ema = load_checkpoint(latest_checkpoint(full_run))["ema"]["shadow"]
    for k, v in ema.items():
        if k not in ("latent_mean", "latent_std"):
            assert torch.equal(state[k], v), k

    # Statistics were written, and they normalise this model's latents of the training music.
    mean, std = vae.latent_mean, vae.latent_std
    assert not torch.equal(mean, torch.zeros_like(mean)) and not torch.equal(std, torch.ones_like(std))
    assert torch.all(std > 0)
    melspec = load_component(final, "mel", types=("mel",))
    waves = [torch.from_numpy(sf.read(p, dtype="float32")[0]) for p in sorted(music_dir.glob("*.wav"))]
    with torch.no_grad():
        z = vae.normalize(vae.encode(melspec(torch.stack(waves))).mean)  # (3, Z, L)
    flat = z.transpose(0, 1).reshape(z.shape[1], -1)
    assert flat.mean(dim=1).abs().max() < 0.5, flat.mean(dim=1)
    assert ((flat.std(dim=1) > 0.5) & (flat.std(dim=1) < 2.0)).all(), flat.std(dim=1)


def test_resume_is_exact(full_run, music_dir, tmp_path):
    run(tmp_path, music_dir, "steps=2")
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    run(tmp_path, music_dir, "steps=4", resume=True)
    straight = load_checkpoint(full_run / "checkpoints" / "step_00000004")
    resumed = load_checkpoint(tmp_path / "checkpoints" / "step_00000004")
    assert {"model", "ema", "optimizer", "sampler", "discriminator", "disc_optimizer"} <= set(straight)
    assert_same(straight, resumed)
    assert_same(read_state_dict(full_run / "final" / "vae.safetensors"),
                read_state_dict(tmp_path / "final" / "vae.safetensors"))


def test_logged_losses_are_window_means_and_the_heldout_loss_is_fixed(full_run, music_dir, tmp_path):
    """log_every 2: each row is the mean of the two steps the per-step run logged. The held-out
    loss (every 2 steps) is finite, leaves training exactly as it was, and is the same number
    after a resume."""
    heldout = (f"heldout={music_dir}", "eval_every=2", "log_every=2")
    run(tmp_path / "a", music_dir, *heldout)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    per_step = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for row, pair in zip(rows, (per_step[0:2], per_step[2:4])):
        assert math.isfinite(row["heldout_loss"]) and row["heldout_loss"] > 0
        for key in ("loss", "rec", "kl", "gan", "disc", "adv_lambda"):
            assert row[key] == pytest.approx((pair[0][key] + pair[1][key]) / 2, rel=1e-5), key
    straight = load_checkpoint(full_run / "checkpoints" / "step_00000004")
    with_eval = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000004")
    for part in ("model", "ema", "optimizer", "scheduler", "discriminator", "disc_optimizer", "sampler"):
        assert_same(straight[part], with_eval[part], part)

    run(tmp_path / "b", music_dir, *heldout, "steps=2")
    run(tmp_path / "b", music_dir, *heldout, "steps=4", resume=True)
    resumed = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["heldout_loss"] for r in resumed] == [r["heldout_loss"] for r in rows]


def test_resume_is_exact_with_gradient_accumulation(music_dir, tmp_path):
    """Two micro-batches per step (Accelerate's accumulate): a stop at step 1 resumes bit-exactly."""
    run(tmp_path / "straight", music_dir, "grad_accum=2", "steps=2", "ckpt_every=1")
    run(tmp_path / "resumed", music_dir, "grad_accum=2", "steps=1", "ckpt_every=1")
    run(tmp_path / "resumed", music_dir, "grad_accum=2", "steps=2", "ckpt_every=1", resume=True)
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "step_00000002") for d in ("straight", "resumed"))
    assert a["sampler"]["epoch"] == 3  # four batches drawn (3 files, batch 2: one batch per epoch) ...
    assert {float(s["step"]) for s in a["optimizer"]["state"].values()} == {2.0}  # ... for two updates
    assert a["scheduler"]["last_epoch"] == 2
    assert_same(a, b)


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(full_run, music_dir, tmp_path, caplog):
    run(tmp_path, music_dir, "steps=3")  # checkpoints at 2 and 3 (the last step)
    torn = tmp_path / "checkpoints" / "step_00000003" / "state.pt"
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])  # a crash mid-write of step 3
    run(tmp_path, music_dir, "steps=4", resume=True)
    assert "resuming from step_00000002" in caplog.text
    assert_same(load_checkpoint(full_run / "checkpoints" / "step_00000004"),
                load_checkpoint(tmp_path / "checkpoints" / "step_00000004"))


def test_killed_run_resumes_bit_exactly(full_run, music_dir, tmp_path):
    """SIGKILL mid-run (no handler runs), then --resume: the same weights as a straight run."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import recipe_argv

    argv = [sys.executable, str(ROOT / "recipes" / "train_vae.py"),
            *recipe_argv(CONFIG, tmp_path, f"music={music_dir}", "steps=400", "ckpt_every=1")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while latest_checkpoint(tmp_path) is None or latest_checkpoint(tmp_path).name < "step_00000002":
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it was killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest_checkpoint(tmp_path).name.split("_")[1])
    assert 2 <= killed_at < 400
    until = f"steps={killed_at + 1}"
    run(tmp_path, music_dir, until, "ckpt_every=1", resume=True)
    straight = tmp_path.parent / f"{tmp_path.name}_straight"
    run(straight, music_dir, until, "ckpt_every=1")
    name = f"step_{killed_at + 1:08d}"
    assert_same(load_checkpoint(straight / "checkpoints" / name), load_checkpoint(tmp_path / "checkpoints" / name))


def test_nan_stops_at_its_step_and_keeps_the_last_checkpoint(music_dir, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = recipe.vae_losses

    def poisoned(*args, **kwargs):
        rec, kl, mask = real(*args, **kwargs)
        calls["n"] += 1
        return (rec * float("nan") if calls["n"] == 3 else rec), kl, mask

    monkeypatch.setattr(recipe, "vae_losses", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"at step 3 on batch chorale\d\.wav@"):
        run(tmp_path, music_dir)
    latest = latest_checkpoint(tmp_path)
    assert latest.name == "step_00000002"
    assert not (tmp_path / "final").exists()
    state = load_checkpoint(latest)
    assert state["step"] == 2
    vae = MelVAE(VAEConfig.preset("tiny"))
    load_strict(vae, state["model"], source=str(latest))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_audio_samples_without_a_vocoder_are_griffin_lim(full_run, music_dir, tmp_path):
    """Every 2 steps the EMA VAE reconstructs the first second of the first file, made audible by
    Griffin-Lim (no sample_vocoder), beside the clip's own mel through Griffin-Lim; TensorBoard
    holds the audio; the weights are those of the run without samples."""
    import numpy as np
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, music_dir, "sample_every=2", "sample_seconds=1", "log_with=tensorboard")
    samples = tmp_path / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["reference.wav", "step_00000002_vae.wav",
                                                         "step_00000004_vae.wav"]
    for path in samples.iterdir():
        wave, rate = sf.read(path, dtype="float32")
        assert rate == SR and wave.shape == (SR,) and np.isfinite(wave).all() and np.abs(wave).max() > 0
    reference = sf.read(samples / "reference.wav", dtype="float32")[0]
    assert np.sqrt(np.mean(reference ** 2)) > 1e-2  # the true mel's Griffin-Lim is the music, audibly

    events = EventAccumulator(str(tmp_path / "muvi"))
    events.Reload()
    assert {"samples/vae", "samples/reference"} <= set(events.Tags()["audio"])
    assert [e.step for e in events.Scalars("rec")] == [1, 2, 3, 4]
    straight, sampled = (load_checkpoint(d / "checkpoints" / "step_00000004") for d in (full_run, tmp_path))
    assert straight.pop("config")["sample_every"] == 0 and sampled.pop("config")["sample_every"] == 2
    assert_same(straight, sampled)


def test_decoder_fine_tune_keeps_the_encoder_and_its_latent_statistics(full_run, music_dir, tmp_path):
    """init + freeze_encoder (an adversarial decoder fine-tune): the latents a DiT was trained on
    stay exactly the init's (encoder weights and latent statistics), the decoder moves."""
    init = full_run / "final"
    final = run(tmp_path, music_dir, f"init={init}", "freeze_encoder=true")
    before, after = read_state_dict(init / "vae.safetensors"), read_state_dict(final / "vae.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        if k.startswith("encoder.") or k in ("latent_mean", "latent_std"):
            assert torch.equal(before[k], after[k]), k
    moved = [k for k in before if k.startswith("decoder.") and not torch.equal(before[k], after[k])]
    assert "decoder.conv_out.weight" in moved and len(moved) > len([k for k in before if k.startswith("decoder.")]) // 2


def test_fresh_wider_decoder_against_the_frozen_encoder(full_run, music_dir, tmp_path):
    """init_decoder false with a wider decoder (model.decoder_channels): the encoder and the latent
    statistics are the init's, bit for bit, the decoder is a new, wider one; a stored config
    records its width and loads back."""
    init = full_run / "final"
    final = run(tmp_path, music_dir, f"init={init}", "freeze_encoder=true", "init_decoder=false",
                'model={"decoder_channels": 24}')
    before, after = read_state_dict(init / "vae.safetensors"), read_state_dict(final / "vae.safetensors")
    for k in before:
        if k.startswith("encoder.") or k in ("latent_mean", "latent_std"):
            assert torch.equal(before[k], after[k]), k
    assert after["decoder.conv_in.weight"].shape[0] == 24 * VAEConfig.preset("tiny").channel_mult[-1]
    assert before["decoder.conv_in.weight"].shape[0] == 16 * VAEConfig.preset("tiny").channel_mult[-1]
    vae = load_component(final, "vae", types=("vae",))
    assert vae.config.decoder_channels == 24 and vae.decode(torch.randn(1, 8, 3)).shape == (1, 160, 24)
    from muvi.config import ConfigError

    with pytest.raises(ConfigError, match="init_decoder false needs freeze_encoder"):
        run(tmp_path / "a", music_dir, f"init={init}", "init_decoder=false")
    with pytest.raises(ConfigError, match=r"its encoder was built with channels = 16"):
        run(tmp_path / "b", music_dir, f"init={init}", "freeze_encoder=true", "init_decoder=false",
            'model={"channels": 8, "norm_groups": 4}')


def test_decoder_fine_tune_refuses_a_missing_init_and_another_mel(full_run, music_dir, tmp_path):
    from muvi.config import ConfigError

    with pytest.raises(ConfigError, match="freeze_encoder needs init"):
        run(tmp_path / "a", music_dir, "freeze_encoder=true")
    other_mel = r"init .*: trained on other mels than these \(differs in \['n_fft', 'win_length'\]\)"
    with pytest.raises(ConfigError, match=other_mel):
        run(tmp_path / "b", music_dir, f"init={full_run / 'final'}", 'mel={"n_fft": 512, "win_length": 512}')


def test_fixed_adversarial_weight(full_run, music_dir, tmp_path):
    """adv_adaptive=false: the adversarial term weighs exactly adv_weight from its first step;
    by default LDM's adaptive factor scales it (the tiny config's adv_weight is 0.5)."""
    adaptive = [json.loads(line)["adv_lambda"] for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert all(w not in (0.0, 0.5) for w in adaptive[1:])
    run(tmp_path, music_dir, "adv_adaptive=false", "adv_weight=0.25")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["adv_lambda"] for r in rows] == [0.0, 0.25, 0.25, 0.25]  # adv_start_step 2
    assert all(r["disc"] > 0 for r in rows[1:])
