"""muvi.hub: the component format (save_component / load_component / read_component), the
registry (build, type_of), load_init, and load_encoder for every kind of spec.

Weights are randomised before saving so that a load which silently kept the freshly built
module's own initialisation could not pass; every tensor must come back bit-equal."""
import json
import logging
import os
import stat

import pytest
import torch
from torch import nn

from muvi import hub
from muvi.checkpoint import CheckpointError
from muvi.config import ConfigError
from muvi.encoders.audiomae import AudioMAEConfig, AudioMAEEncoder
from muvi.encoders.clip import CLIPEncoderConfig
from muvi.encoders.frame_encoder import FrameEncoder, FrameEncoderConfig, load_frame_encoder
from muvi.encoders.music_frames import MusicnnFrameEncoder
from muvi.encoders.videomae import VideoMAEConfig, VideoMAEEncoder
from muvi.errors import MissingFileError
from muvi.models.adaptor import AdaptorConfig, VisualAdaptor
from muvi.models.contrastive import ContrastiveConfig, ContrastiveModel
from muvi.models.dit import DiTConfig
from muvi.models.hifigan import HiFiGANConfig
from muvi.models.mel import MelConfig
from muvi.models.vae import VAEConfig

from conftest import assert_same

#: every registered type that is cheap to build, with its tiny config
TINY = {
    "dit": DiTConfig.preset("tiny"),
    "vae": VAEConfig.preset("tiny"),
    "hifigan": HiFiGANConfig.preset("tiny"),
    "adaptor": AdaptorConfig.preset("tiny"),
    "mel": MelConfig(),
    "contrastive": ContrastiveConfig.preset("tiny"),
    "videomae": VideoMAEConfig.preset("tiny"),
    "audiomae": AudioMAEConfig.preset("tiny"),
    "efficientnet-lite": FrameEncoderConfig.preset("tiny"),
    "clip": CLIPEncoderConfig.preset("tiny"),
}
FROZEN_TYPES = {"videomae", "audiomae", "efficientnet-lite", "clip", "musicnn"}


@pytest.fixture(autouse=True)
def umask_022():
    """A known umask, so that "0644 less the umask" is 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def randomised(module: nn.Module, seed: int = 1) -> nn.Module:
    """Every tensor of the state dict overwritten with random values (no init value survives)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in module.state_dict().values():
            value.copy_(torch.randn(value.shape, generator=gen).to(value.dtype))
    return module


def as_json(value):
    """What JSON makes of a value (tuples become lists)."""
    return json.loads(json.dumps(value))


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


def test_registry_covers_the_tiny_presets():
    assert set(TINY) | {"musicnn"} == set(hub.TYPES)
    assert {n for n, k in hub.TYPES.items() if k.frozen} == FROZEN_TYPES
    for side, kinds in hub.ENCODER_TYPES.items():
        assert all(hub.TYPES[k].frozen for k in kinds), side


@pytest.mark.parametrize("type_name", sorted(TINY))
def test_round_trip_is_bit_equal(tmp_path, type_name):
    module = randomised(hub.build(type_name, TINY[type_name]))
    assert hub.type_of(module) == type_name
    assert hub.save_component(module, tmp_path / "new" / "sub", "part") == tmp_path / "new" / "sub"
    folder = tmp_path / "new" / "sub"
    has_tensors = bool(module.state_dict())
    expected = {"part.json", "part.safetensors"} if has_tensors else {"part.json"}
    assert {p.name for p in folder.iterdir()} == expected  # no temporary file left behind
    for path in folder.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    record = json.loads((folder / "part.json").read_text())
    assert record == {"type": type_name, "config": as_json(TINY[type_name].to_dict())}
    assert hub.read_component(folder, "part") == record

    loaded = hub.load_component(folder, "part")
    assert type(loaded) is type(module) and loaded.config == module.config
    assert_same(loaded.state_dict(), module.state_dict(), type_name)
    if not has_tensors:
        assert type_name == "mel"


def test_mel_has_no_tensors_and_writes_only_its_json(tmp_path):
    mel = hub.build("mel", MelConfig(n_mels=64))
    assert mel.state_dict() == {}
    hub.save_component(mel, tmp_path, "mel")
    assert [p.name for p in tmp_path.iterdir()] == ["mel.json"]
    assert hub.load_component(tmp_path, "mel").config == MelConfig(n_mels=64)


@pytest.mark.parametrize("type_name", sorted(TINY))
def test_frozen_defaults(tmp_path, type_name):
    hub.save_component(hub.build(type_name, TINY[type_name]), tmp_path, "c")
    frozen = type_name in FROZEN_TYPES
    for module, want in ((hub.load_component(tmp_path, "c"), frozen),
                         (hub.load_component(tmp_path, "c", frozen=True), True),
                         (hub.load_component(tmp_path, "c", frozen=False), False)):
        assert module.training is not want, type_name
        params = list(module.parameters())
        assert all(p.requires_grad is not want for p in params), type_name


def test_build_freezes_the_frozen_ports_and_takes_a_dict():
    enc = hub.build("videomae", TINY["videomae"].to_dict())
    assert isinstance(enc, VideoMAEEncoder) and not enc.training
    assert not any(p.requires_grad for p in enc.parameters())
    dit = hub.build("dit", TINY["dit"])
    assert dit.training and all(p.requires_grad for p in dit.parameters())
    with pytest.raises(ConfigError) as err:
        hub.build("dit", {"no_such_field": 1}, source="where.json")
    assert "where.json" in one_line(err) and "no_such_field" in one_line(err)
    with pytest.raises(ConfigError) as err:
        hub.build("transformer", {})
    assert "'transformer'" in one_line(err) and "dit" in one_line(err)


def test_type_of_an_unknown_module():
    with pytest.raises(TypeError) as err:
        hub.type_of(nn.Linear(2, 2))
    assert one_line(err).startswith("Linear is not a muvi component type") and "'dit'" in one_line(err)
    # a subclass of a registered module is not that component type either
    class MyDiT(hub.TYPES["dit"].module):
        pass
    with pytest.raises(TypeError, match="MyDiT"):
        hub.type_of(MyDiT(TINY["dit"]))


def test_types_refusal_names_both_types(tmp_path):
    hub.save_component(hub.build("dit", TINY["dit"]), tmp_path, "model")
    with pytest.raises(ConfigError) as err:
        hub.load_component(tmp_path, "model", types=("vae", "hifigan"))
    msg = one_line(err)
    assert str(tmp_path / "model.json") in msg and "'dit'" in msg and "'vae' or 'hifigan'" in msg
    assert isinstance(hub.load_component(tmp_path, "model", types=("vae", "dit")), hub.TYPES["dit"].module)


def test_unknown_type_in_the_json(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"type": "transformer", "config": {}}))
    for call in (lambda: hub.read_component(tmp_path, "x"), lambda: hub.load_component(tmp_path, "x")):
        with pytest.raises(ConfigError) as err:
            call()
        msg = one_line(err)
        assert str(tmp_path / "x.json") in msg and "'transformer'" in msg and "'dit'" in msg


def test_old_format_json_is_refused(tmp_path):
    # a muvi < 0.2 folder held the bare config in <name>.json
    (tmp_path / "dit.json").write_text(json.dumps(TINY["dit"].to_dict()))
    with pytest.raises(ConfigError) as err:
        hub.load_component(tmp_path, "dit")
    msg = one_line(err)
    assert str(tmp_path / "dit.json") in msg and "not a muvi component" in msg and "exported again" in msg
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json: expected a JSON object, got a list"):
        hub.read_component(tmp_path, "list")


def test_broken_and_missing_json(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        hub.load_component(tmp_path, "bad")
    assert str(tmp_path / "bad.json") in one_line(err) and "not valid JSON" in one_line(err)
    with pytest.raises(MissingFileError) as err:
        hub.load_component(tmp_path, "absent")
    assert "'absent'" in one_line(err) and "absent.json" in one_line(err) and str(tmp_path) in one_line(err)
    assert isinstance(err.value, FileNotFoundError)


def test_missing_weights_file(tmp_path):
    hub.save_component(hub.build("adaptor", TINY["adaptor"]), tmp_path, "adaptor")
    (tmp_path / "adaptor.safetensors").unlink()
    with pytest.raises(MissingFileError, match="adaptor.safetensors"):
        hub.load_component(tmp_path, "adaptor")


def test_edited_config_is_checked_against_the_weights(tmp_path):
    hub.save_component(hub.build("adaptor", TINY["adaptor"]), tmp_path, "adaptor")
    record = json.loads((tmp_path / "adaptor.json").read_text())
    record["config"]["num_heads"] = 2  # same shapes, different model
    (tmp_path / "adaptor.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as err:
        hub.load_component(tmp_path, "adaptor")
    assert "num_heads = 2" in one_line(err) and "4" in one_line(err)


def test_a_failed_save_leaves_the_old_component_and_no_temporary_file(tmp_path, monkeypatch):
    old = randomised(hub.build("adaptor", TINY["adaptor"]), seed=1)
    hub.save_component(old, tmp_path, "adaptor")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_written(module, path, config=None, **kwargs):
        path.write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_weights", half_written)
    with pytest.raises(OSError, match="disk full"):
        hub.save_component(randomised(hub.build("adaptor", TINY["adaptor"]), seed=2), tmp_path, "adaptor")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert_same(hub.load_component(tmp_path, "adaptor").state_dict(), old.state_dict())


# ----------------------------------------------------------------------------- source records

def test_source_record_writes_only_the_json_and_loads_back_equal(tmp_path):
    spec = "efficientnet-lite0:tubelet_size=1"
    encoder, source = hub.load_encoder(spec, "video")
    assert source == spec
    hub.save_component(encoder, tmp_path, "video_encoder", source=source)
    assert [p.name for p in tmp_path.iterdir()] == ["video_encoder.json"]
    record = json.loads((tmp_path / "video_encoder.json").read_text())
    assert record == {"type": "efficientnet-lite", "config": as_json(encoder.config.to_dict()),
                      "source": spec}
    loaded = hub.load_component(tmp_path, "video_encoder")
    assert isinstance(loaded, FrameEncoder) and loaded.config.tubelet_size == 1
    assert not loaded.training
    assert_same(loaded.state_dict(), encoder.state_dict())


def test_source_record_whose_config_differs_is_refused(tmp_path):
    encoder, source = hub.load_encoder("efficientnet-lite0:tubelet_size=1", "video")
    hub.save_component(encoder, tmp_path, "video_encoder", source=source)
    record = json.loads((tmp_path / "video_encoder.json").read_text())
    record["config"]["tubelet_size"] = 3
    (tmp_path / "video_encoder.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError) as err:
        hub.load_component(tmp_path, "video_encoder")
    assert str(tmp_path / "video_encoder.json") in one_line(err) and "different config" in one_line(err)


def test_musicnn_source_round_trip(tmp_path):
    encoder, source = hub.load_encoder("musicnn", "audio")
    assert isinstance(encoder, MusicnnFrameEncoder) and source == "musicnn:MSD_musicnn"
    hub.save_component(encoder, tmp_path, "audio_encoder", source=source)
    assert [p.name for p in tmp_path.iterdir()] == ["audio_encoder.json"]
    assert_same(hub.load_component(tmp_path, "audio_encoder").state_dict(), encoder.state_dict())


# ----------------------------------------------------------------------------- load_encoder

def test_packaged_efficientnet_with_overrides():
    plain, source = hub.load_encoder("efficientnet-lite0", "video")
    assert source == "efficientnet-lite0"
    assert plain.config == FrameEncoderConfig.preset("efficientnet-lite0")
    reference = load_frame_encoder()  # the package's ImageNet weights, read directly
    assert_same(plain.state_dict(), reference.state_dict())

    tuned, source = hub.load_encoder('efficientnet-lite0:tubelet_size=1,feature="stage4"', "video")
    assert source == 'efficientnet-lite0:tubelet_size=1,feature="stage4"'
    assert tuned.config == FrameEncoderConfig.preset("efficientnet-lite0", tubelet_size=1, feature="stage4")
    assert not tuned.training and not any(p.requires_grad for p in tuned.parameters())
    # a prefix of the same network: the stage-4 blocks are the packaged ones
    for key, value in tuned.state_dict().items():
        assert torch.equal(value, reference.state_dict()[key]), key
    # an unquoted value that is not JSON stays a string
    assert hub.load_encoder("efficientnet-lite0:feature=stage3", "video")[0].config.feature == "stage3"


def test_packaged_musicnn_names():
    mtt, source = hub.load_encoder("musicnn:MTT_musicnn", "audio")
    assert source == "musicnn:MTT_musicnn"
    msd, source = hub.load_encoder("musicnn", "audio")
    assert source == "musicnn:MSD_musicnn"
    assert mtt.config.tag_names != msd.config.tag_names  # two different taggers
    assert hub.state_hash(mtt) != hub.state_hash(msd)
    assert_same(msd.state_dict(), hub.load_encoder("musicnn:MSD_musicnn", "audio")[0].state_dict())


@pytest.mark.parametrize("spec, message", [
    ("efficientnet-lite0:tubelet_size", "override 'tubelet_size' is not of the form key=value"),
    ("efficientnet-lite0:=1", "override '=1' is not of the form key=value"),
    ("efficientnet-lite0:depth=3", "unknown FrameEncoderConfig field(s) ['depth']"),
])
def test_bad_overrides(spec, message):
    with pytest.raises(ConfigError) as err:
        hub.load_encoder(spec, "video")
    assert message in one_line(err) and spec.split(":")[0] in one_line(err)


@pytest.mark.parametrize("side, cls, config_cls", [("video", VideoMAEEncoder, VideoMAEConfig),
                                                   ("audio", AudioMAEEncoder, AudioMAEConfig)])
def test_preset_gives_random_weights_with_a_warning(caplog, side, cls, config_cls):
    with caplog.at_level(logging.WARNING, logger="muvi.hub"):
        encoder, source = hub.load_encoder("tiny", side)
    assert source is None and type(encoder) is cls and encoder.config == config_cls.preset("tiny")
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "muvi.hub"]
    assert len(warnings) == 1 and "RANDOM WEIGHTS" in warnings[0].getMessage()
    assert side.upper() in warnings[0].getMessage()
    # seeded with 0: the same weights every time
    torch.manual_seed(123)
    again, _ = hub.load_encoder("tiny", side)
    assert_same(again.state_dict(), encoder.state_dict())
    torch.manual_seed(0)
    assert_same(cls(config_cls.preset("tiny")).state_dict(), encoder.state_dict())


@pytest.mark.parametrize("type_name, side", [("videomae", "video"), ("efficientnet-lite", "video"),
                                             ("clip", "video"), ("audiomae", "audio")])
def test_component_json_path(tmp_path, type_name, side):
    module = randomised(hub.build(type_name, TINY[type_name]))
    hub.save_component(module, tmp_path, "enc")
    encoder, source = hub.load_encoder(tmp_path / "enc.json", side)
    assert source == str((tmp_path / "enc.json").resolve())
    assert type(encoder) is type(module) and not encoder.training
    assert_same(encoder.state_dict(), module.state_dict())
    other = "audio" if side == "video" else "video"
    with pytest.raises(ConfigError) as err:
        hub.load_encoder(str(tmp_path / "enc.json"), other)
    assert f"'{type_name}' component" in one_line(err)


def test_component_json_of_a_trained_network_is_not_an_encoder(tmp_path):
    hub.save_component(hub.build("adaptor", TINY["adaptor"]), tmp_path, "adaptor")
    with pytest.raises(ConfigError) as err:
        hub.load_encoder(tmp_path / "adaptor.json", "video")
    assert "'adaptor' component where 'videomae' or 'efficientnet-lite' or 'clip' is expected" in one_line(err)


def test_published_checkpoint_file(tmp_path):
    # VideoMAE V2 key names in a .pth; the sizes are inferred (heads = width / 64)
    config = VideoMAEConfig(hidden_size=64, num_heads=1, depth=1)
    module = randomised(VideoMAEEncoder(config))
    torch.save({"model": module.state_dict()}, tmp_path / "vit.pth")
    encoder, source = hub.load_encoder(str(tmp_path / "vit.pth"), "video")
    assert source == str((tmp_path / "vit.pth").resolve())
    assert type(encoder) is VideoMAEEncoder and encoder.config == config and not encoder.training
    assert_same(encoder.state_dict(), module.state_dict())


def test_missing_file_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "vit.pth"
    with pytest.raises(MissingFileError) as err:
        hub.load_encoder(missing, "video")
    msg = one_line(err)
    assert repr(str(missing)) in msg and "['efficientnet-lite0']" in msg and "'tiny'" in msg
    with pytest.raises(MissingFileError) as err:
        hub.load_encoder("musicnn_typo", "audio")
    assert "'musicnn_typo'" in one_line(err) and "['musicnn']" in one_line(err)


@pytest.mark.parametrize("spec, side, message", [
    ("musicnn", "video", "'musicnn' is an audio encoder, not a video one"),
    ("efficientnet-lite0:tubelet_size=1", "audio", "'efficientnet-lite0' is an video encoder, not a audio one"),
])
def test_wrong_side(spec, side, message):
    with pytest.raises(ConfigError) as err:
        hub.load_encoder(spec, side)
    assert one_line(err) == message


def test_bad_side():
    with pytest.raises(ValueError) as err:
        hub.load_encoder("tiny", "text")
    assert one_line(err) == "side must be 'video' or 'audio', got 'text'"


# ----------------------------------------------------------------------------- load_init

def test_load_init_without_prefix_takes_the_first_name_found(tmp_path):
    saved = randomised(VisualAdaptor(TINY["adaptor"]))
    hub.save_component(saved, tmp_path, "adaptor")
    target = VisualAdaptor(TINY["adaptor"])
    assert hub.load_init(target, tmp_path, ("pretrained_adaptor", "adaptor")) == "adaptor"
    assert_same(target.state_dict(), saved.state_dict())
    # the first name present wins
    first = randomised(VisualAdaptor(TINY["adaptor"]), seed=7)
    hub.save_component(first, tmp_path, "pretrained_adaptor")
    assert hub.load_init(target, tmp_path, ("pretrained_adaptor", "adaptor")) == "pretrained_adaptor"
    assert_same(target.state_dict(), first.state_dict())


def test_load_init_with_prefix_reads_the_sub_tree(tmp_path):
    model = randomised(ContrastiveModel(TINY["contrastive"]))
    hub.save_component(model, tmp_path, "contrastive")
    adaptor = VisualAdaptor(model.config.adaptor_config())
    assert hub.load_init(adaptor, tmp_path, ("adaptor", "contrastive"), prefix="adaptor.") == "contrastive"
    assert_same(adaptor.state_dict(), model.adaptor.state_dict())


def test_load_init_refuses_a_different_sub_config(tmp_path):
    model = ContrastiveModel(TINY["contrastive"])
    hub.save_component(model, tmp_path, "contrastive")
    other = AdaptorConfig.from_dict({**model.config.adaptor_config().to_dict(), "num_heads": 2})
    adaptor = VisualAdaptor(other)
    before = {k: v.clone() for k, v in adaptor.state_dict().items()}
    with pytest.raises(ConfigError) as err:
        hub.load_init(adaptor, tmp_path, ("contrastive",), prefix="adaptor.")
    msg = one_line(err)
    assert str(tmp_path / "contrastive.json") in msg and "its adaptor was trained with" in msg
    assert "'num_heads': 4" in msg and "'num_heads': 2" in msg
    assert_same(adaptor.state_dict(), before)  # untouched


def test_load_init_refuses_a_different_config_without_prefix(tmp_path):
    hub.save_component(VisualAdaptor(TINY["adaptor"]), tmp_path, "adaptor")
    adaptor = VisualAdaptor(AdaptorConfig.preset("tiny", num_heads=2))
    with pytest.raises(CheckpointError, match="num_heads"):
        hub.load_init(adaptor, tmp_path, ("adaptor",))


def test_load_init_with_nothing_there(tmp_path):
    with pytest.raises(MissingFileError) as err:
        hub.load_init(VisualAdaptor(TINY["adaptor"]), tmp_path, ("a", "b"))
    assert one_line(err) == f"{tmp_path}: none of the components ['a', 'b'] is there"


def test_saving_over_a_component_with_weights_leaves_a_loadable_component(tmp_path):
    hub.save_component(hub.build("dit", TINY["dit"]), tmp_path, "x")
    hub.save_component(hub.build("mel", MelConfig()), tmp_path, "x")
    assert {p.name for p in tmp_path.iterdir()} == {"x.json"}
    assert hub.load_component(tmp_path, "x").config == MelConfig()
