"""Real recorded music from Debian's game-music packages, for the corpus.

The packages (``apt-get download NAME`` then ``dpkg -x NAME_*.deb DIR``; nothing is installed)::

    nexuiz-music warzone2100-music ufoai-music asc-music drascula-music fb-music-high

:func:`unpack_debian_music` does both steps for every ``.deb`` in a folder (and takes the
``.ogg`` files out of the two ``.pk3`` archives, which are zip files), :func:`find_recordings`
lists the tracks of an unpacked folder with each one's licence read from the package's
``copyright`` file (per file where the file is machine-readable, DEP-5), and
:func:`recording_split` sends each *track* (never a window of it) to one split, by a hash of its
name, so that held-out music is music no training clip contains.

These recordings carry no beat grid: the corpus takes their beats from the beat tracker
(:func:`muvi.data.beats.track_beats`).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import re
import shutil
import subprocess
import zipfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from muvi.errors import MissingFileError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MusicPackage:
    """Where a Debian game-music package keeps its tracks (globs under the unpack root)."""

    name: str
    globs: tuple[str, ...]
    #: a licence summary for packages whose copyright file is not machine-readable
    licence: str = ""


DEBIAN_MUSIC = (
    MusicPackage("nexuiz-music", ("pk3/nexuiz-music/**/*.ogg",),
                 "GPL-2+ (Nexuiz (c) 2002-2009 Alientrap, Lee Vermeulen; debian/copyright)"),
    MusicPackage("warzone2100-music", ("usr/share/games/warzone2100/music/**/*.opus",)),
    MusicPackage("ufoai-music", ("pk3/ufoai-music/**/*.ogg",)),
    MusicPackage("asc-music", ("usr/share/games/asc/music/*.mp3",)),
    MusicPackage("drascula-music", ("usr/share/scummvm/drascula/audio/*.ogg",)),
    MusicPackage("fb-music-high", ("usr/share/games/frozen-bubble/snd/*.xm",),
                 "GPL-2+ (Frozen-Bubble, Matthias Le Bidan; debian/copyright)"),
)
#: the archives (zip files) whose .ogg members are taken out: package -> path under the root
PK3 = {"nexuiz-music": "usr/share/games/nexuiz/data/music.pk3",
       "ufoai-music": "usr/share/games/ufoai/base/0music.pk3"}


@dataclasses.dataclass(frozen=True)
class Recording:
    """One track: its file, the package it came from, its path there, and its licence."""

    path: Path
    package: str
    name: str       # the path in the package, e.g. "usr/share/games/asc/music/frontiers.mp3"
    licence: str

    @property
    def split(self) -> str:
        return recording_split(f"{self.package}/{self.name}")


def recording_split(track: str) -> str:
    """'heldout', 'pairs' or 'music' from a hash of the track's name (as pieces are split)."""
    from muvi.data.corpus import hash_split

    return hash_split(track)


def unpack_debian_music(debs: Path, root: Path) -> list[str]:
    """``dpkg -x`` every ``.deb`` in ``debs`` into ``root`` and take the ``.ogg`` members of
    the packages' ``.pk3`` archives out to ``root/pk3/<package>/``. Returns the packages."""
    if shutil.which("dpkg") is None:
        raise MissingFileError("dpkg is needed to unpack .deb files (Debian/Ubuntu)")
    debs, root = Path(debs), Path(root)
    files = sorted(debs.glob("*.deb"))
    if not files:
        raise MissingFileError(f"{debs}: no .deb files (apt-get download {' '.join(p.name for p in DEBIAN_MUSIC)})")
    root.mkdir(parents=True, exist_ok=True)
    packages = []
    for deb in files:
        subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        packages.append(deb.name.split("_")[0])
    for package, archive in PK3.items():
        if (root / archive).is_file():
            with zipfile.ZipFile(root / archive) as z:
                for member in z.namelist():
                    if member.lower().endswith(".ogg"):
                        z.extract(member, root / "pk3" / package)
    return packages


@functools.lru_cache(maxsize=None)
def _dep5_licences(copyright_file: Path) -> list[tuple[list[str], str]]:
    """(file patterns, licence) of each ``Files:`` stanza of a DEP-5 copyright file, in order."""
    stanzas, text = [], copyright_file.read_text("utf8", "ignore")
    for block in re.split(r"\n\s*\n", text):
        files = re.search(r"^Files:\s*(.*(?:\n[ \t]+.*)*)", block, re.M)
        licence = re.search(r"^License:\s*(.+)", block, re.M)
        if files and licence:
            stanzas.append((files.group(1).split(), licence.group(1).strip()))
    return stanzas


def licence_of(root: Path, package: MusicPackage, name: str) -> str:
    """The licence of file ``name`` of ``package``: the last matching DEP-5 stanza of
    ``usr/share/doc/<package>/copyright`` (as Debian reads it), else the package's summary."""
    copyright_file = root / "usr/share/doc" / package.name / "copyright"
    if copyright_file.is_file():
        # a file taken out of a .pk3 is named in the stanzas by its upstream path (base/music/x.ogg)
        member = name.split("/", 2)[-1] if name.startswith("pk3/") else name
        found = ""
        for patterns, licence in _dep5_licences(copyright_file):
            tails = ["/".join(p.split("/")[i:]) for p in patterns for i in range(p.count("/") + 1)]
            if any(fnmatch.fnmatch(member, tail) for tail in tails):
                found = licence
        if found:
            return f"{found} (usr/share/doc/{package.name}/copyright)"
    return package.licence or f"see usr/share/doc/{package.name}/copyright"


def find_recordings(root: Path, packages: Optional[Sequence[str]] = None) -> list[Recording]:
    """The tracks under an unpacked ``root`` (see :func:`unpack_debian_music`), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"{root}: no such folder of unpacked music packages")
    out = []
    for package in DEBIAN_MUSIC:
        if packages is not None and package.name not in packages:
            continue
        for pattern in package.globs:
            for path in sorted(root.glob(pattern)):
                name = path.relative_to(root).as_posix()
                out.append(Recording(path, package.name, name, licence_of(root, package, name)))
    if not out:
        raise MissingFileError(f"{root}: none of the music packages' tracks found (unpack them with "
                               "muvi.data.recordings.unpack_debian_music)")
    return out


def readable_recordings(root: Path, split: str) -> list[Recording]:
    """The tracks of ``split`` under ``root`` whose audio header can be read (a tracker module
    such as fb-music-high's ``.xm`` cannot: it is logged and left out)."""
    from muvi.data.audio_io import audio_duration

    out = []
    for track in find_recordings(root):
        if track.split != split:
            continue
        try:
            audio_duration(track.path)
        except Exception as err:  # noqa: BLE001 - any reader failure means: not usable here
            logger.info("skipping %s: %s", track.name, err)
            continue
        out.append(track)
    return out


def recording_clip(recording: Recording, seconds: float, sample_rate: int, rng,
                   margin: float = 5.0, min_beats: int = 4, peak: float = 0.9):
    """A :class:`muvi.data.corpus.MusicClip` of ``seconds`` from a random point of
    ``recording`` (``margin`` seconds from either end where the track allows), peak-normalised
    like the MIDI renders, its beats from the tracker. None when the window is near-silent or
    gives fewer than ``min_beats`` beats (the caller draws again)."""
    from muvi.data.audio_io import audio_duration, load_audio
    from muvi.data.beats import track_beats
    from muvi.data.corpus import MusicClip

    total = audio_duration(recording.path)
    room = total - seconds
    if room < 0:
        return None
    lo, hi = (margin, room - margin) if room > 2 * margin else (0.0, room)
    offset = float(rng.uniform(lo, hi)) if hi > lo else lo
    wave = load_audio(recording.path, sample_rate, offset=offset, duration=seconds).numpy()
    count = int(round(seconds * sample_rate))
    if wave.shape[0] < count or float(np.sqrt(np.mean(wave ** 2))) < 1e-3:
        return None
    wave = (wave[:count] * (peak / float(np.abs(wave[:count]).max()))).astype(np.float32)
    beats = track_beats(wave, sample_rate)
    if len(beats) < min_beats:
        return None
    info = {"piece": f"debian:{recording.package}/{recording.name}", "package": recording.package,
            "licence": recording.licence, "beats_from": "tracker (muvi.data.beats)",
            "bpm": round(float(60.0 / np.median(np.diff(beats))), 3), "offset": round(offset, 6),
            "ensemble": "recording", "drums": None}
    return MusicClip(wave, beats, info)
