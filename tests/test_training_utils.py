"""Shared training pieces: overrides, EMA, schedule, atomic checkpoints, NaN guard."""
import dataclasses

import pytest
import torch

from muvi.config import Config, ConfigError
from muvi import training


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

    monkeypatch.setattr(training.torch, "save", crash)
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
    """Each recipe resumes with training.resume (tested above; end to end in test_recipe_vae) and
    its script turns a MuviError such as ResumeError into one line (muvi.cli.run_script)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py").read_text()
    assert "training.resume(run_dir)" in text and "run_script(main)" in text
    assert "latest_checkpoint(" not in text


def test_run_script_prints_one_line(capsys):
    from muvi.cli import run_script

    def main():
        raise training.ResumeError("--resume: no checkpoint in runs/x/checkpoints")

    with pytest.raises(SystemExit) as info:
        run_script(main)
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: --resume: no checkpoint in runs/x/checkpoints\n"
