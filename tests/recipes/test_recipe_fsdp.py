"""The DiT recipe sharded with torch FSDP2 (``shard=fsdp``): 2 processes on CPU (gloo).

Each process holds half the weights, gradients, AdamW moments and EMA; checkpoints and final/
hold whole tensors, in the format of an unsharded run, and a resumed run is bit-identical.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from muvi import training
from muvi.hub import load_component, save_component
from muvi.models.mel import MelConfig, MelSpectrogram
from muvi.models.vae import MelVAE, VAEConfig

from conftest import assert_same, load_recipe, recipe_argv, render_chorales

ROOT = Path(__file__).resolve().parents[2]
UNCOND = ROOT / "recipes" / "configs" / "dit_uncond_tiny.json"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A music feature cache of three rendered chorales, from the extraction recipe."""
    root = tmp_path_factory.mktemp("fsdp")
    music = root / "music"
    music.mkdir()
    render_chorales(music, 24000, [(f"piece{i}.wav", index, 6.0, 1.0) for i, index in enumerate((0, 3, 5))])
    torch.manual_seed(0)
    vae = MelVAE(VAEConfig.preset("tiny"))
    vae.set_latent_stats(torch.full((8,), 0.1), torch.full((8,), 0.5))
    save_component(vae, root / "vae", "vae")
    save_component(MelSpectrogram(MelConfig(n_mels=vae.config.mel_channels)), root / "vae", "mel")
    load_recipe("extract_features").main(["--music", str(music), "--vae", str(root / "vae"),
                                          "--out", str(root / "cache"), "--device", "cpu", "--no-progress"])
    return root / "cache"


def launch(run_dir: Path, cache: Path, *settings: str, resume: bool = False, shard: str = "fsdp") -> str:
    """The README's command: ``accelerate launch --multi_gpu --num_processes 2`` (a CPU world
    without CUDA) with ``--set shard=fsdp``; returns the processes' stderr."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(ROOT / "recipes" / "train_dit.py"),
           *recipe_argv(UNCOND, run_dir, f"cache={cache}", f"shard={shard}", "log_with=none", "log_every=1",
                        "ckpt_every=2", *settings, resume=resume)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def shapes(tree):
    """The structure of a checkpoint: keys, tensor shapes and dtypes (values left out)."""
    if isinstance(tree, torch.Tensor):
        return tree.shape, tree.dtype
    if isinstance(tree, dict):
        return {k: shapes(v) for k, v in tree.items() if k not in ("step", "config", "sampler", "last_epoch")}
    if isinstance(tree, (list, tuple)):
        return [shapes(v) for v in tree]
    return type(tree)


@pytest.fixture(scope="module")
def straight(cache, tmp_path_factory) -> tuple[Path, str]:
    """An uninterrupted 4-step FSDP run: its folder and stderr."""
    run = tmp_path_factory.mktemp("fsdp_runs") / "straight"
    return run, launch(run, cache, "steps=4")


def test_fsdp_trains_sharded_and_resumes_bit_for_bit(cache, straight, tmp_path):
    run, log = straight
    held, total = map(int, re.search(r"this process holds (\d+) of (\d+) parameter values", log).groups())
    assert 0 < held < total and held <= total // 2 + 1000  # dim-0 shards: about half each
    losses = [float(x) for x in re.findall(r"loss[=: ]+([-\d.e]+)", log)]
    assert losses and all(torch.isfinite(torch.tensor(losses)))

    # final/ is what an unsharded run writes: the EMA DiT, loaded by muvi.hub like one.
    single = load_recipe("train_dit").main(recipe_argv(UNCOND, tmp_path / "single", f"cache={cache}", "steps=1",
                                                      "log_with=none"))
    sharded_dit = load_component(run / "final", "dit", types=("dit",))
    plain_dit = load_component(single, "dit", types=("dit",))
    assert {k: v.shape for k, v in sharded_dit.state_dict().items()} == \
        {k: v.shape for k, v in plain_dit.state_dict().items()}
    assert sorted(p.name for p in (run / "final").iterdir()) == sorted(p.name for p in single.iterdir())

    # Checkpoints hold whole tensors in the unsharded format (AdamW's moments of every parameter).
    state = training.load_checkpoint(training.latest_checkpoint(run))
    plain = training.load_checkpoint(training.latest_checkpoint(tmp_path / "single"))
    assert state["step"] == 4 and shapes(state) == shapes(plain)
    assert sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values()) == total

    launch(tmp_path / "resumed", cache, "steps=2")
    launch(tmp_path / "resumed", cache, "steps=4", resume=True)
    assert_same(load_file(str(run / "final" / "dit.safetensors")),
                load_file(str(tmp_path / "resumed" / "final" / "dit.safetensors")))
    resumed = training.load_checkpoint(training.latest_checkpoint(tmp_path / "resumed"))
    for key in ("model", "ema", "optimizer", "scheduler", "sampler"):
        assert_same(state[key], resumed[key], key)


@pytest.mark.slow
def test_fsdp_matches_ddp(cache, straight, tmp_path):
    """The same 4 steps under DDP: the same weights and AdamW moments up to float rounding
    (the gradient all-reduce and the global clipping norm sum in another order), with gradient
    clipping engaged (the tiny config's grad_clip 1 is below its gradient norms)."""
    run, _ = straight
    launch(tmp_path / "ddp", cache, "steps=4", shard="none")
    a, b = (training.load_checkpoint(training.latest_checkpoint(r)) for r in (run, tmp_path / "ddp"))
    for key in ("model", "ema"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["optimizer"], b["optimizer"], rtol=1e-4, atol=1e-8)
