"""Each component's config travels in its safetensors metadata; an edited config is refused.

num_heads, rope_base or norm_eps change the music without changing any tensor's shape, so
strict loading alone cannot see the edit."""
import json

import pytest
import torch

from muvi import cli
from muvi.checkpoint import CheckpointError, load_weights, save_weights, stored_config
from muvi.models.dit import DiT, DiTConfig
from muvi.pipeline import MuviPipeline

from conftest import edit_component, tiny_release


@pytest.mark.parametrize("field,value", [("num_heads", 2), ("rope_base", 500.0), ("norm_eps", 1e-3)])
def test_edited_release_config_is_refused(tmp_path, field, value):
    folder = tiny_release(tmp_path / "release")
    config = json.loads((folder / "dit.json").read_text())["config"]
    assert stored_config(folder / "dit.safetensors") == config
    assert config[field] != value
    edit_component(folder, "dit", **{field: value})
    expected = rf"dit.safetensors: .*{field} = {value!r} but the weights were saved with"
    with pytest.raises(CheckpointError, match=expected):
        MuviPipeline.from_pretrained(folder)


def test_cli_names_the_edit(tmp_path, capsys):
    folder = tiny_release(tmp_path / "release")
    edit_component(folder, "dit", num_heads=2)
    code = cli.main(["generate", "-o", str(tmp_path / "x.wav"), "--model", str(folder), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "num_heads = 2 but the weights were saved with 4" in err and "Traceback" not in err


def test_recipe_component_json_is_checked_too(tmp_path):
    from muvi.hub import load_component, save_component

    dit = DiT(DiTConfig.preset("tiny"))
    save_component(dit, tmp_path, "dit")
    torch.testing.assert_close(load_component(tmp_path, "dit").null_cond.data, dit.null_cond.data)
    edit_component(tmp_path, "dit", num_heads=2)
    with pytest.raises(CheckpointError, match="dit.json does not match"):
        load_component(tmp_path, "dit")


def test_files_without_stored_config_load_as_before(tmp_path):
    from safetensors.torch import save_file

    dit = DiT(DiTConfig.preset("tiny"))
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    assert stored_config(tmp_path / "plain.safetensors") is None
    load_weights(DiT(DiTConfig.preset("tiny", num_heads=2)), tmp_path / "plain.safetensors")  # cannot tell
    save_weights(dit, tmp_path / "own.safetensors")
    with pytest.raises(CheckpointError, match="num_heads"):
        load_weights(DiT(DiTConfig.preset("tiny", num_heads=2)), tmp_path / "own.safetensors")


def test_bundled_release_carries_its_configs():
    import muvi

    folder = muvi.default_model_dir()
    for name in ("video_encoder", "adaptor", "dit", "vae", "vocoder"):
        config = json.loads((folder / f"{name}.json").read_text())["config"]
        assert stored_config(folder / f"{name}.safetensors") == config, name
