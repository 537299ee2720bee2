"""Shared training pieces: overrides (nested configs too), EMA, optimiser groups and schedule,
window-mean and held-out losses, atomic checkpoints, NaN guard."""
import dataclasses
import json
import math
import re

import pytest
import torch

from muvi import training
from muvi.config import Config, ConfigError
from muvi.training import OptimizerConfig


@dataclasses.dataclass
class RecipeConfig(Config):
    lr: float = 1e-4
    steps: int = 10
    data: str = "music"
    sizes: tuple = (1, 2)


def test_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"lr": 0.5, "data": "x"}')
    cfg = training.load_config(RecipeConfig, path, ["steps=3", "data=songs/", "sizes=[4,5]"])
    assert cfg == RecipeConfig(lr=0.5, steps=3, data="songs/", sizes=(4, 5))
    with pytest.raises(ConfigError, match="no field 'stpes'"):
        training.load_config(RecipeConfig, None, ["stpes=3"])
    with pytest.raises(ConfigError, match="field=value"):
        training.load_config(RecipeConfig, None, ["steps"])


@dataclasses.dataclass
class NestedConfig(Config):
    steps: int = 10
    optim: OptimizerConfig = dataclasses.field(default_factory=lambda: OptimizerConfig(lr=1e-3, betas=(0.5, 0.9)))


def test_nested_config_round_trip_keeps_the_fields_defaults():
    cfg = NestedConfig(steps=3, optim=OptimizerConfig(lr=0.5, betas=(0.1, 0.2), grad_clip=1.0))
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["optim"]["betas"] == [0.1, 0.2] and data["optim"]["lr"] == 0.5
    assert NestedConfig.from_dict(data) == cfg
    # Fields a nested dict leaves out keep the recipe's default for that field, not the class's.
    partial = NestedConfig.from_dict({"optim": {"lr": 2e-3}})
    assert partial.optim == OptimizerConfig(lr=2e-3, betas=(0.5, 0.9)) and isinstance(partial.optim.betas, tuple)
    assert NestedConfig.from_dict({}).optim.lr == 1e-3


def test_nested_config_errors_name_the_nested_field():
    with pytest.raises(ConfigError, match=r"c\.json, field 'optim': unknown OptimizerConfig field\(s\) \['lrr'\]"):
        NestedConfig.from_dict({"optim": {"lrr": 1.0}}, source="c.json")
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        NestedConfig.from_dict({"optim": {"schedule": "linear"}})


def test_dotted_overrides_set_one_nested_field(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"steps": 4, "optim": {"lr": 0.5, "weight_decay": 0.1}}')
    cfg = training.load_config(NestedConfig, path, ["optim.lr=1e-4", "optim.betas=[0.8,0.99]"])
    assert cfg.optim == OptimizerConfig(lr=1e-4, betas=(0.8, 0.99), weight_decay=0.1) and cfg.steps == 4
    assert training.load_config(NestedConfig, None, ["optim.grad_clip=2"]).optim == OptimizerConfig(
        lr=1e-3, betas=(0.5, 0.9), grad_clip=2)  # no optim in the file: the field's default, then the override
    with pytest.raises(ConfigError, match="OptimizerConfig has no field 'lrr'"):
        training.load_config(NestedConfig, path, ["optim.lrr=1"])
    with pytest.raises(ConfigError, match="NestedConfig has no nested config 'steps'"):
        training.load_config(NestedConfig, path, ["steps.x=1"])


def test_nested_config_defined_in_a_function():
    """An annotation that cannot be resolved (a local class) falls back on the default's type."""
    @dataclasses.dataclass
    class Inner(Config):
        x: int = 1

    @dataclasses.dataclass
    class Outer(Config):
        inner: Inner = dataclasses.field(default_factory=Inner)

    assert Outer.from_dict({"inner": {"x": 2}}).inner == Inner(2)
    assert Outer(Inner(3)).to_dict() == {"inner": {"x": 3}}


def _no_decay_names(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    return [names[id(p)] for p in groups[1]["params"]], [names[id(p)] for p in groups[0]["params"]]


def test_param_groups_of_a_dit_exempt_norms_biases_and_the_null_embedding():
    from muvi.models.dit import DiT, DiTConfig

    dit = DiT(DiTConfig.preset("tiny"))
    no_decay, decay = _no_decay_names(training.param_groups(dit, weight_decay=0.1), dit)
    assert "null_cond" in no_decay and "norm.weight" in no_decay and "blocks.0.attn_norm.weight" in no_decay
    assert "x_proj.bias" in no_decay and "x_proj.weight" in decay and "blocks.1.ffn.up.weight" in decay
    assert all(p.ndim >= 2 for n, p in dit.named_parameters() if n in decay)
    assert sorted(no_decay + decay) == sorted(n for n, _ in dit.named_parameters())
    order = [n for n, _ in dit.named_parameters()]  # deterministic: the module's own order in each group
    assert decay == [n for n in order if n in decay] and no_decay == [n for n in order if n in no_decay]


def test_param_groups_of_a_vae_decay_only_kernels():
    from muvi.models.vae import MelVAE, VAEConfig

    vae = MelVAE(VAEConfig.preset("tiny"))
    no_decay, decay = _no_decay_names(training.param_groups(vae, weight_decay=0.1), vae)
    params = dict(vae.named_parameters())
    assert no_decay and all(params[n].ndim == 1 for n in no_decay)  # GroupNorm gains/shifts, conv biases
    assert any(".norm" in n and n.endswith(".weight") for n in no_decay) and "decoder.conv_out.bias" in no_decay
    assert "decoder.conv_out.weight" in decay and all(params[n].ndim >= 2 for n in decay)


def test_param_groups_exempt_embeddings_and_no_weight_decay_names_of_submodules():
    class Table(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pos = torch.nn.Parameter(torch.zeros(4, 3))  # a learned 2-D embedding
            self.proj = torch.nn.Linear(3, 3)

        def no_weight_decay(self):
            return {"pos"}

    model = torch.nn.Sequential(torch.nn.Embedding(5, 3), Table())
    model[1].proj.weight.requires_grad_(False)  # frozen: in neither group
    no_decay, decay = _no_decay_names(training.param_groups(model, weight_decay=0.1), model)
    assert no_decay == ["0.weight", "1.pos", "1.proj.bias"] and decay == []
    shared = torch.nn.Linear(2, 2)  # a module passed twice is counted once
    groups = training.param_groups(shared, torch.nn.Sequential(shared), weight_decay=0.1)
    assert [len(g["params"]) for g in groups] == [1, 1]


def test_make_optimizer_and_scheduler():
    model = torch.nn.Linear(2, 2)
    cfg = OptimizerConfig(lr=0.1, betas=(0.5, 0.9), eps=1e-6, weight_decay=0.01, warmup_steps=2,
                          lr_decay=0.5, lr_decay_every=3)
    opt = training.make_optimizer(cfg, model)
    assert [(g["lr"], g["betas"], g["eps"], g["weight_decay"]) for g in opt.param_groups] == [
        (0.1, (0.5, 0.9), 1e-6, 0.01), (0.1, (0.5, 0.9), 1e-6, 0.0)]
    sched = training.make_scheduler(opt, cfg, total_steps=10)
    rates = []
    for _ in range(7):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025])
    # A scheduler rebuilt and loaded from its state continues where it was.
    again = training.make_scheduler(training.make_optimizer(cfg, model), cfg, total_steps=10)
    again.load_state_dict(sched.state_dict())
    assert again.get_last_lr() == sched.get_last_lr() and again.last_epoch == 7


def test_loss_window_means_every_micro_batch_and_starts_again():
    window = training.LossWindow()
    assert window.mean() == {}
    for value in (1.0, 2.0, 6.0):
        window.add({"loss": torch.tensor(value), "rec": value / 2})
    window.add({"sim": 0.0}, weight=0)  # nothing to average: left out
    window.add({"kind": 1.0}, weight=1)
    window.add({"kind": 4.0}, weight=3)
    assert window.mean() == {"loss": 3.0, "rec": 1.5, "kind": pytest.approx(3.25)}
    assert window.mean() == {}
    window.add({"loss": 5.0})
    assert window.mean() == {"loss": 5.0}


def _two_process_window(rank: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", OMP_NUM_THREADS="1")
    acc = training.make_accelerator(cpu=True)
    window = training.LossWindow()
    for value in ([1.0, 2.0] if rank == 0 else [3.0, 10.0]):  # 2 micro-batches per process
        window.add({"loss": torch.tensor(value)})
    window.add({"only_here": 1.0}, weight=1 if rank == 1 else 0)
    result = window.mean(acc)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    acc.wait_for_everyone()


def test_loss_window_averages_over_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_two_process_window, args=(port, str(tmp_path / "out.json")), nprocs=2)
    assert json.loads((tmp_path / "out.json").read_text()) == {"loss": 4.0, "only_here": 1.0}


def test_heldout_loss_is_fixed_and_restores_the_mode():
    acc = training.make_accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(3, 1), torch.nn.Dropout(0.5))
    batches = [torch.ones(2, 3), torch.full((2, 3), 2.0)]
    seen = []

    def loss_fn(batch, gen):
        seen.append(model.training)
        return (model(batch) + torch.rand((), generator=gen)).square().mean()

    first = training.heldout_loss(loss_fn, batches, [model], acc, seed=0)
    assert model.training and seen == [False, False]  # eval inside (no dropout), train again after
    assert math.isfinite(first) and training.heldout_loss(loss_fn, batches, [model], acc, seed=0) == first
    assert training.heldout_loss(loss_fn, batches, [model], acc, seed=1) != first
    with torch.no_grad():
        model[0].bias.add_(1.0)
    assert training.heldout_loss(loss_fn, batches, [model], acc, seed=0) != first


def test_ema_tracks_the_average():
    model = torch.nn.Linear(2, 1)
    ema = training.EMA(model, decay=0.5)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.shadow.weight, start + 0.5)
    copy = training.EMA(torch.nn.Linear(2, 1))
    copy.load_state_dict(ema.state_dict())
    torch.testing.assert_close(copy.shadow.weight, ema.shadow.weight)


def test_lr_factor():
    assert training.lr_factor(0, 4) == 0.25 and training.lr_factor(3, 4) == 1.0
    assert training.lr_factor(100, 4) == 1.0
    assert training.lr_factor(4, 4, 14, "cosine") == 1.0
    assert training.lr_factor(14, 4, 14, "cosine") == pytest.approx(0.0)
    # HiFi-GAN's step decay multiplies whatever schedule runs (off at lr_decay 1).
    assert training.lr_factor(5, 0, lr_decay=0.5, lr_decay_every=2) == 0.25
    assert training.lr_factor(1, 4, lr_decay=0.5, lr_decay_every=2) == 0.5 * 1


def test_checkpoints_are_atomic_and_pruned(tmp_path, monkeypatch):
    for step in (1, 2, 3):
        training.save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    latest = training.latest_checkpoint(tmp_path)
    assert latest.name == "step_00000003"
    assert training.load_checkpoint(latest)["step"] == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]

    # A crash while writing step 4 leaves step 3 as the latest, readable checkpoint.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(tmp_path, 4, {"step": 4})
    assert training.latest_checkpoint(tmp_path).name == "step_00000003"
    assert training.load_checkpoint(training.latest_checkpoint(tmp_path))["step"] == 3


def test_non_finite_loss_names_step_and_batch():
    training.check_finite(torch.tensor(1.0), 5)
    with pytest.raises(training.NonFiniteLoss, match="step 7 on batch song.wav"):
        training.check_finite(torch.tensor(float("nan")), 7, "song.wav")


def test_step_generators_are_reproducible_and_distinct():
    a = torch.rand(3, generator=training.step_generator(1, 5, 0))
    assert torch.equal(a, torch.rand(3, generator=training.step_generator(1, 5, 0)))
    assert not torch.equal(a, torch.rand(3, generator=training.step_generator(1, 6, 0)))
    assert not torch.equal(a, torch.rand(3, generator=training.step_generator(1, 5, 1)))


def _run_with_checkpoints(tmp_path, steps=(1, 2, 3)):
    from muvi.training import save_checkpoint

    for step in steps:
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=3)
    return tmp_path / "checkpoints"


def test_resume_skips_a_truncated_latest_checkpoint(tmp_path, caplog):
    from muvi.training import resume

    root = _run_with_checkpoints(tmp_path)
    newest = root / "step_00000003" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # torn write, as after a crash or a full disk
    folder, state = resume(tmp_path)
    assert folder.name == "step_00000002" and state["step"] == 2 and torch.equal(state["w"], torch.full((3,), 2.0))
    assert "step_00000003 does not load" in caplog.text and "resuming from step_00000002" in caplog.text


def test_resume_when_latest_names_a_missing_folder(tmp_path, caplog):
    import shutil

    from muvi.training import resume

    root = _run_with_checkpoints(tmp_path)
    shutil.rmtree(root / "step_00000003")
    folder, state = resume(tmp_path)
    assert folder.name == "step_00000002" and state["step"] == 2
    assert "names step_00000003, which holds no state.pt" in caplog.text


def test_resume_errors_in_one_line_when_nothing_loads(tmp_path):
    from muvi.errors import MuviError
    from muvi.training import ResumeError, resume

    with pytest.raises(ResumeError, match=r"^--resume: no checkpoint in .*; run without --resume") as info:
        resume(tmp_path)
    assert isinstance(info.value, MuviError) and "\n" not in str(info.value)
    assert resume(tmp_path, required=False) == (None, None)
    root = _run_with_checkpoints(tmp_path, steps=(1, 2))
    for state in root.glob("step_*/state.pt"):
        state.write_bytes(b"garbage")
    with pytest.raises(ResumeError, match=r"no checkpoint in .* loads: step_00000002 \(.*\); step_00000001") as info:
        resume(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["train_vae", "train_vocoder", "train_dit", "train_contrastive"])
def test_every_recipe_resumes_through_the_same_function(name):
    """Each recipe resumes with training.resume (tested above; end to end in test_recipe_vae),
    which requires a checkpoint, and its script turns a MuviError such as ResumeError into one
    line (muvi.cli.run_script)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py").read_text()
    assert re.search(r"training\.resume\(run_dir(, required=True)?\)", text) and "run_script(main)" in text
    assert "latest_checkpoint(" not in text


@pytest.mark.parametrize("name", ["train_vae", "train_vocoder", "train_contrastive", "train_dit"])
def test_recipes_share_one_loop_shape(name):
    """Gradient accumulation through accelerator.accumulate, AdamW groups and schedule from
    OptimizerConfig, the logged loss from a LossWindow, every row through one RunLog (trackers
    from the config's log_with, a bar over the steps), end_training last (behaviour: the recipe tests)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py").read_text()
    for piece in ("acc.accumulate(", "training.make_optimizer(", "training.make_scheduler(", "training.LossWindow()",
                  "training.heldout_loss(", "if acc.sync_gradients", "log_with=cfg.log_with, run_dir=run_dir",
                  "training.RunLog(acc, run_dir, cfg,", "progress=args.progress", "log.step_done(step, window,",
                  "acc.end_training()\n    return final"):
        assert piece in text, piece
    for gone in ("no_sync", "set_lr", "training.adamw", "torch.optim.AdamW"):
        assert gone not in text, gone


def test_run_script_prints_one_line(capsys):
    from muvi.cli import run_script

    def main():
        raise training.ResumeError("--resume: no checkpoint in runs/x/checkpoints")

    with pytest.raises(SystemExit) as info:
        run_script(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --resume: no checkpoint in runs/x/checkpoints\n"


def test_log_with_names_the_trackers():
    from accelerate.utils import is_tensorboard_available

    assert training.trackers("none") == []
    assert training.trackers("auto") == (["tensorboard"] if is_tensorboard_available() else [])
    with pytest.raises(ConfigError, match=r"unknown tracker\(s\) \['tb'\]; use 'auto', 'none'"):
        training.trackers("tb")
    with pytest.raises(ConfigError, match="log_with"):
        training.make_accelerator(cpu=True, log_with="tensorboard,nope")


def test_flat_config_is_scalars_under_dotted_keys():
    flat = training.flat_config(NestedConfig(optim=OptimizerConfig(lr=0.5, betas=(0.1, 0.2))))
    assert flat["steps"] == 10 and flat["optim.lr"] == 0.5 and flat["optim.betas"] == "[0.1, 0.2]"
    assert training.flat_config({"model": {"preset": "tiny"}, "extra": {}, "none": None}) == {
        "model.preset": "tiny", "extra": "{}", "none": "null"}


def test_run_log_rows_bar_and_samples(tmp_path, capsys):
    """Rows go to metrics.jsonl with their rates; the bar starts at a resumed step and shows the
    latest row's loss; a sample is a 16-bit WAV under samples/ (no trackers: accelerator None)."""
    import soundfile as sf

    with training.RunLog(None, tmp_path, name="demo", step=3, total=6, progress=True) as log:
        for step in (4, 5, 6):
            log.add(samples=2, tokens=20)
            log.advance()
            log.row(step, loss=1.0 / step, lr=0.1)
        path = log.audio(6, "tone", 0.5 * torch.sin(torch.arange(2400) / 4.0), 24000)
        with log.paused():
            pass
    err = capsys.readouterr().err
    assert "3/6" in err and "6/6" in err and "loss=0.1667" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5, 6] and all(r["samples_per_s"] > 0 for r in rows)
    assert path == tmp_path / "samples" / "step_00000006_tone.wav"
    info = sf.info(path)
    assert (info.samplerate, info.frames, info.subtype) == (24000, 2400, "PCM_16")
    assert log.sample_path(None, "reference") == tmp_path / "samples" / "reference.wav"
    quiet = training.RunLog(None, tmp_path / "quiet", progress=False)
    assert quiet.bar is None
    quiet.close()


@pytest.mark.usefixtures("one_thread")
def test_griffin_lim_inverts_a_mel_roughly():
    """Griffin-Lim (the samples' stand-in for a vocoder) gives back audio whose mel is close to
    the one it was given: far closer than silence's, and the same every time."""
    from muvi.models.mel import MelConfig, MelSpectrogram

    melspec = MelSpectrogram(MelConfig())
    t = torch.arange(24000) / 24000
    wave = sum(0.2 * torch.sin(2 * math.pi * f * t) for f in (220.0, 330.0, 440.0)) * (1 + torch.sin(6 * t)) / 2
    mel = melspec(wave)
    out = training.griffin_lim(mel, melspec)
    assert out.shape == wave.shape and torch.isfinite(out).all()
    error = (melspec(out) - mel).abs().mean()
    assert error < 0.3 * (melspec(torch.zeros_like(wave)) - mel).abs().mean(), error
    assert torch.equal(out, training.griffin_lim(mel, melspec))


def test_sample_vocoder_must_take_the_recipes_mels(tmp_path):
    from muvi.hub import save_component
    from muvi.models.hifigan import HiFiGANConfig, HiFiGANGenerator
    from muvi.models.mel import MelConfig, MelSpectrogram

    save_component(HiFiGANGenerator(HiFiGANConfig.preset("tiny")), tmp_path, "vocoder")
    save_component(MelSpectrogram(MelConfig(f_max=8000.0)), tmp_path, "mel")
    with pytest.raises(ConfigError, match=r"trained on other mels than these \(differs in \['f_max'\]\)"):
        training.load_vocoder(tmp_path, MelConfig())
    vocoder = training.load_vocoder(tmp_path, MelConfig(f_max=8000.0))
    mel = torch.randn(160, 10) - 5.0
    assert training.mel_to_audio(mel, MelSpectrogram(MelConfig()), vocoder).shape == (3000,)


@pytest.mark.parametrize("flag", ["fsdp", "deepspeed"])
def test_sharded_launches_are_refused_in_one_line(monkeypatch, flag):
    """The loop needs whole parameters on every process (EMA, checkpoints): `accelerate launch
    --use_fsdp` (which Accelerate itself turns into DDP on a CPU-only world) is an error."""
    monkeypatch.setenv(f"ACCELERATE_USE_{flag.upper()}", "true")
    with pytest.raises(ConfigError, match=rf"^accelerate launch --use_{flag}: the recipes train data-parallel only"
                                          r" .*launch with --multi_gpu") as info:
        training.make_accelerator(cpu=True)
    assert "\n" not in str(info.value)
