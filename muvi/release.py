"""Where a release lives: a local folder, or a Hugging Face Hub repository.

:func:`locate` turns what a user passed as ``model`` (``"path/to/release"``, or a Hub repo id
such as ``"someone/muvi-base"``) into a local folder. A repo id is fetched with
``huggingface_hub.snapshot_download`` into the Hub's own cache (``~/.cache/huggingface/hub``,
``HF_HUB_CACHE``, or ``cache_dir``), only the files a release holds (JSON, safetensors, the model
card). With ``local_files_only`` or ``HF_HUB_OFFLINE=1`` nothing is downloaded: the cached
snapshot of the revision is used, and a repo that is not in the cache is a one-line error.
A path that exists always wins over a repo id of the same spelling.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Optional, Union

from muvi.config import ConfigError
from muvi.errors import MissingFileError

#: the files of a release (muvi.hub components, config.json, the model card)
RELEASE_FILES = ["*.json", "*.safetensors", "*.md"]

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")


def is_repo_id(name: str) -> bool:
    """``owner/name`` as the Hub spells repositories (not ``./x``, ``/x``, ``a/b/c``, ``x.json``)."""
    return bool(_REPO_ID.fullmatch(name)) and not name.endswith((".", "-")) and ".." not in name


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it, read at call time (so that setting it
    after import still turns downloads off)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def locate(model: Union[str, Path], *, revision: Optional[str] = None, cache_dir: Union[str, Path, None] = None,
           local_files_only: bool = False, token: Union[str, bool, None] = None, name: str = "model") -> Path:
    """The local folder of ``model``: the folder itself, or the Hub snapshot of the repo id at
    ``revision`` (a branch, tag or commit; default ``main``). ``name`` is how the caller spells
    the argument in messages (``--model`` on the command line)."""
    path = Path(model).expanduser()
    if path.exists() or isinstance(model, Path) or not is_repo_id(str(model)):
        if not path.is_dir():
            raise MissingFileError(f"{name} {model}: no such model folder"
                                   + ("" if is_repo_id(str(model)) else " (nor a Hub repo id, owner/name)"))
        return path
    return _snapshot(str(model), revision, cache_dir, local_files_only or offline(), token, name)


def _snapshot(repo: str, revision, cache_dir, local_only: bool, token, name: str) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise MissingFileError(f"{name} {repo}: no such folder, and loading from the Hub needs huggingface_hub "
                               f"(pip install huggingface_hub)") from None
    where = f"{repo}: no such folder, and " + (f"revision {revision} " if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                                   local_files_only=local_only, token=token,
                                                   allow_patterns=RELEASE_FILES, library_name="muvi")
    except errors.LocalEntryNotFoundError:
        cache = cache_dir or huggingface_hub.constants.HF_HUB_CACHE
        why = "downloads are off (HF_HUB_OFFLINE / local_files_only)" if local_only else "the Hub could not be reached"
        raise MissingFileError(f"{name} {where}not in the Hugging Face cache ({cache}), and {why}; "
                               f"download it once online, or give a release folder") from None
    except errors.RevisionNotFoundError:
        raise MissingFileError(f"{name} {repo}: no such folder, and no revision {revision!r} on the Hub") from None
    except errors.GatedRepoError:
        raise MissingFileError(f"{name} {repo}: a gated Hub repository; accept its terms on the Hub and log in "
                               f"(hf auth login) or pass token=") from None
    except errors.RepositoryNotFoundError:
        raise MissingFileError(f"{name} {repo}: no such folder, and no such Hub repository (or it is private: "
                               f"log in with hf auth login or pass token=)") from None
    except (errors.HfHubHTTPError, OSError) as err:
        reason = " ".join(str(err).split())
        raise MissingFileError(f"{name} {where}could not be downloaded from the Hub ({reason})") from None
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{name} {repo}: the Hub repository is not a muvi release (no config.json)")
    return folder


# ----------------------------------------------------------------------------- publishing

def push_folder(folder: Union[str, Path], repo_id: str, *, private: Optional[bool] = None,
                token: Union[str, bool, None] = None, commit_message: str = "Upload muvi release") -> str:
    """Upload a release folder to the Hub model repo ``repo_id`` (created if it does not exist):
    only the files a release holds (:data:`RELEASE_FILES`). Returns the commit's URL."""
    import huggingface_hub

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MissingFileError(f"{folder}: not a muvi model folder (no config.json); nothing was uploaded")
    api = huggingface_hub.HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                               allow_patterns=RELEASE_FILES, commit_message=commit_message)
    return str(getattr(commit, "commit_url", commit))


def model_card(folder: Union[str, Path], *, repo_id: Optional[str] = None, license: Optional[str] = None,
               notes: str = "") -> str:
    """A Hub model card (README.md with YAML metadata) for a release folder: what each
    component is and how large, the pipeline's rates and windows, and how to load it. Read
    from the folder's JSON and the safetensors headers only (no weights are loaded)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    pipeline = config.get("pipeline", {})
    rows, total = [], 0
    for path in sorted(folder.glob("*.json")):
        if path.name == "config.json":
            continue
        record = json.loads(path.read_text(encoding="utf-8"))
        weights = path.with_suffix(".safetensors")
        count = _parameter_count(weights) if weights.is_file() else 0
        total += count
        stored = (f"{count / 1e6:.2f}M ({weights.stat().st_size / 2**20:.1f} MB)" if weights.is_file()
                  else f"rebuilt from `{record['source']}`" if "source" in record else "no weights")
        rows.append(f"| `{path.stem}` | {record.get('type', '?')} | {stored} |")
    name = repo_id or folder.name
    meta = ["---", "library_name: muvi", *([f"license: {license}"] if license else []),
            "tags:", "- video-to-music", "- music-generation", "- rectified-flow", "- muvi", "---"]
    windows = (f"{pipeline.get('window_seconds', 30):g} s windows, each continuing the last "
               f"{pipeline.get('context_seconds', 10):g} s of the one before and crossfaded over "
               f"{pipeline.get('crossfade_seconds', 1):g} s")
    longest = pipeline.get("max_duration")
    body = f"""# {name}

A muvi release: music for video after *MuVi: Video-to-Music Generation with
Semantic Alignment and Rhythmic Synchronization* (Li et al.). Video frames at
{pipeline.get('video_fps', 10):g} FPS go through the frozen video encoder and the visual adaptor
into a condition at {pipeline.get('latent_rate', 10):g} latent frames per second; the DiT samples
a latent by rectified flow with classifier-free guidance (default scale
{pipeline.get('default_cfg_scale', 4):g}; on a style prompt {pipeline.get('default_prompt_scale', 0):g});
the VAE decodes it to a mel spectrogram and the
HiFi-GAN vocoder to a waveform. Videos of {'any length' if longest is None else f'up to {longest:g} s'} are
scored in {windows}.

| component | type | parameters |
|---|---|---|
{chr(10).join(rows)}

{total / 1e6:.1f}M parameters in all (release format {config.get('format_version')}).

## Use

```python
import muvi
from muvi.pipeline import MuviPipeline

pipe = MuviPipeline.from_pretrained("{name}")        # HF_HUB_OFFLINE=1: from the cache only
muvi.generate("clip.mp4", model=pipe, cfg_scale={pipeline.get('default_cfg_scale', 4):g}).save("clip.wav")
```

or on the command line: `muvi generate clip.mp4 --model {name} -o clip_with_music.mp4`.
"""
    return "\n".join(meta) + "\n\n" + body + (f"\n{notes.strip()}\n" if notes.strip() else "")


def _parameter_count(path: Path) -> int:
    """Elements stored in a safetensors file, from its JSON header."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(math.prod(entry["shape"]) for key, entry in header.items() if key != "__metadata__")
