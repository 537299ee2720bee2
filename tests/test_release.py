"""Releases from the Hugging Face Hub (muvi.release), offline against a cache laid out as the
Hub lays out its own, ``torch_dtype``, ``push_to_hub`` and the generated model card.

No test reaches the network: ``HF_ENDPOINT`` points at a closed local port, so a request that
should not be made fails at once instead of passing by luck.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from muvi import release
from muvi.config import ConfigError
from muvi.errors import MissingFileError, one_line
from muvi.pipeline import MuviPipeline

from conftest import tiny_release

REPO = "muvi-test/tiny"
MAIN = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "89abcdef0123456789abcdef0123456789abcdef"


def hub_cache(root: Path, source: Path) -> Path:
    """A cache holding ``REPO`` as ``snapshot_download`` leaves it: ``refs/<name>`` files naming
    commits, a folder per commit under ``snapshots/`` (files linked from ``blobs/`` on the Hub;
    plain copies serve as well). ``main`` is the release; tag ``v1`` the same with cfg 2.5."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "blobs").mkdir()
    for ref, commit in (("main", MAIN), ("v1", TAGGED)):
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(source, repo / "snapshots" / commit)
    config = repo / "snapshots" / TAGGED / "config.json"
    raw = json.loads(config.read_text())
    raw["pipeline"]["default_cfg_scale"] = 2.5
    config.write_text(json.dumps(raw))
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hub")
    return hub_cache(folder / "cache", tiny_release(folder / "release"))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")


def same_weights(a: MuviPipeline, b: MuviPipeline) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_repo_id_loads_from_the_cache_with_hf_hub_offline(cache, monkeypatch, tiny_pipe):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # set after huggingface_hub was imported: still honoured
    folder = release.locate(REPO, cache_dir=cache)
    assert folder == cache / "models--muvi-test--tiny" / "snapshots" / MAIN
    pipe = MuviPipeline.from_pretrained(REPO, cache_dir=cache)
    assert same_weights(pipe, tiny_pipe) and pipe.config.default_cfg_scale == 4.0


@pytest.mark.parametrize("revision", ["v1", TAGGED])
def test_a_revision_by_tag_or_commit(cache, revision):
    pipe = MuviPipeline.from_pretrained(REPO, cache_dir=cache, revision=revision, local_files_only=True)
    assert pipe.config.default_cfg_scale == 2.5


def test_the_default_cache_is_the_hubs(cache, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert release.locate(REPO) == cache / "models--muvi-test--tiny" / "snapshots" / MAIN


def test_not_in_the_cache_offline_is_one_line(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingFileError) as err:
        release.locate("muvi-test/absent", cache_dir=cache)
    message = one_line(err.value)
    assert message.startswith("model muvi-test/absent: no such folder, and not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message
    with pytest.raises(MissingFileError, match="revision v9 not in the Hugging Face cache"):
        release.locate(REPO, cache_dir=cache, revision="v9", local_files_only=True)


def test_unreachable_hub_without_a_cache_is_one_line(tmp_path):
    with pytest.raises(MissingFileError) as err:
        release.locate("muvi-test/absent", cache_dir=tmp_path)
    assert one_line(err.value).startswith("model muvi-test/absent: no such folder, and ")


def test_folders_win_and_bad_names_are_clear(tmp_path, monkeypatch, tiny_release_dir):
    monkeypatch.chdir(tiny_release_dir.parent)
    assert release.locate(tiny_release_dir.name) == Path(tiny_release_dir.name)
    shutil.copytree(tiny_release_dir, tmp_path / "owner" / "name")
    monkeypatch.chdir(tmp_path)  # "owner/name" exists here: the folder, not the Hub
    assert release.locate("owner/name") == Path("owner/name")
    with pytest.raises(MissingFileError, match=r"^model ./missing: no such model folder \(nor a Hub repo id"):
        release.locate("./missing")
    with pytest.raises(MissingFileError, match="--model a/b/c: no such model folder"):
        release.locate("a/b/c", name="--model")
    assert [release.is_repo_id(n) for n in ("owner/name", "o/n.v2", "/abs", "a/b/c", "x", "o/../n", "o/n.")] == \
        [True, True, False, False, False, False, False]


def test_a_hub_repo_that_is_not_a_release(tmp_path):
    repo = tmp_path / "models--someone--other"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "snapshots" / MAIN).mkdir(parents=True)
    (repo / "snapshots" / MAIN / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="someone/other: the Hub repository is not a muvi release"):
        release.locate("someone/other", cache_dir=tmp_path, local_files_only=True)


def test_generate_and_the_command_line_take_a_repo_id(cache, monkeypatch, tmp_path):
    import huggingface_hub

    import muvi
    from muvi import cli

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    frames = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    out = muvi.generate(frames, fps=10, model=REPO, num_steps=2, seed=0, device="cpu", progress=False)
    assert out.duration == pytest.approx(1.0)
    code = cli.main(["generate", "--model", REPO, "--duration", "1", "--steps", "2", "-o", str(tmp_path / "o.wav"),
                     "--device", "cpu", "-q"])
    assert code == 0 and (tmp_path / "o.wav").is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, "float16"])
def test_torch_dtype(tiny_release_dir, dtype, tiny_pipe):
    pipe = MuviPipeline.from_pretrained(tiny_release_dir, torch_dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert pipe.dtype == expected and pipe.vocoder.conv_pre.weight.dtype == expected
    assert all(b.dtype == torch.float32 for b in pipe.mel.buffers())  # the STFT stays float32
    frames = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=pipe.dtype):
        cond = pipe.condition(pipe.encode_video(frames), 20).float()
    reference = tiny_pipe.condition(tiny_pipe.encode_video(frames), 20)
    assert torch.corrcoef(torch.stack([cond.flatten(), reference.flatten()]))[0, 1] > 0.999
    half = pipe.generate(frames, fps=10, num_steps=4, seed=0, progress=False).waveform
    full = tiny_pipe.generate(frames, fps=10, num_steps=4, seed=0, progress=False).waveform
    assert half.dtype == torch.float32 and half.shape == full.shape and torch.isfinite(half).all()
    if expected == torch.float16:  # 11 bits of mantissa: the same waveform (bf16's 8 drift further
        # on this random model, whose near-silent output is a difference of large numbers)
        assert torch.corrcoef(torch.stack([half, full]))[0, 1] > 0.9


def test_torch_dtype_must_be_floating(tiny_release_dir):
    with pytest.raises(ConfigError, match="torch_dtype 'int8': not a floating-point torch dtype"):
        MuviPipeline.from_pretrained(tiny_release_dir, torch_dtype="int8")


class FakeApi:
    """huggingface_hub.HfApi as far as push_folder uses it: what it was asked, and a check
    that the uploaded folder is a release that loads."""

    calls: list = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        FakeApi.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id, folder_path, allow_patterns, **kwargs):
        folder = Path(folder_path)
        files = sorted(p.name for p in folder.iterdir())
        FakeApi.calls.append(("upload_folder", repo_id, files, allow_patterns))
        FakeApi.loaded = MuviPipeline.from_pretrained(folder)
        FakeApi.card = (folder / "README.md").read_text()
        return type("CommitInfo", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()


def test_push_to_hub_uploads_a_release_with_its_card(monkeypatch, tiny_pipe):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    url = tiny_pipe.push_to_hub("someone/muvi-tiny", private=True)
    assert url == "https://hub.example/someone/muvi-tiny/commit/1"
    (create, repo, kwargs), (upload, repo2, files, patterns) = FakeApi.calls
    assert (create, repo, kwargs["private"], kwargs["exist_ok"]) == ("create_repo", "someone/muvi-tiny", True, True)
    assert repo2 == "someone/muvi-tiny" and patterns == release.RELEASE_FILES
    assert {"README.md", "config.json", "dit.safetensors", "vocoder.json", "mel.json"} <= set(files)
    assert same_weights(FakeApi.loaded, tiny_pipe)
    card = FakeApi.card
    assert card.startswith("---\nlibrary_name: muvi\n") and "# someone/muvi-tiny" in card
    assert 'MuviPipeline.from_pretrained("someone/muvi-tiny")' in card
    dit_params = sum(p.numel() for p in tiny_pipe.dit.parameters()) + sum(b.numel() for b in tiny_pipe.dit.buffers())
    assert f"| `dit` | dit | {dit_params / 1e6:.2f}M" in card


def test_push_refuses_a_folder_that_is_not_a_release(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    FakeApi.calls = []
    with pytest.raises(MissingFileError, match="not a muvi model folder"):
        release.push_folder(tmp_path, "someone/x")
    assert FakeApi.calls == []
