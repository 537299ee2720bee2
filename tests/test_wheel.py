"""The wheel: built from a clean copy of the source tree, it holds the package, the bundled
demo release and the sample clip, and installed into a fresh virtual environment (not
editable) it runs the README's main command from an unrelated folder."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def source_files() -> list[str]:
    """The files a fresh clone has (tracked, plus new files git does not ignore)."""
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout to know the source files")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    return [f for f in listed if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tree, dist = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("dist")
    for name in source_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(dist)], check=True, capture_output=True, text=True)
    (built,) = dist.glob("muvi_v2m-*.whl")
    return built


def test_the_wheel_holds_the_package_the_bundled_model_and_the_sample(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"muvi/checkpoints/{f.removeprefix('checkpoints/')}" for f in source_files()
                if f.startswith("checkpoints/muvi-demo/")}
    expected |= {f for f in source_files() if f.startswith("muvi/") and f.endswith(".py")}
    assert {"muvi/checkpoints/muvi-demo/config.json", "muvi/checkpoints/muvi-demo/dit.safetensors",
            "muvi/checkpoints/muvi-demo/sim/contrastive.safetensors", "muvi/assets/sample.mp4"} <= expected | names
    assert expected <= names, sorted(expected - names)
    assert "muvi/assets/sample.mp4" in names
    assert not any(n.startswith(("tests/", "recipes/", "checkpoints/")) for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "muvi = muvi.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    size = sum(i.file_size for i in zipfile.ZipFile(wheel).infolist())
    assert size < 100 * 2**20  # the release stays under ~100 MB (issue 12)


def test_installed_from_the_wheel_the_main_command_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    # the machine's packages (torch and the rest) are visible; muvi itself comes from the wheel
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import muvi; print(muvi.__file__); print(muvi.default_model_dir())"],
                           cwd=work, env=env, check=True, capture_output=True, text=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where
    # the README's main command, word for word
    done = subprocess.run([str(venv / "bin" / "muvi"), "generate", "-o", "bunny_with_music.mp4"], cwd=work,
                          env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    import av

    with av.open(str(work / "bunny_with_music.mp4")) as c:
        assert c.streams.audio and c.streams.video
        assert float(c.duration / 1e6) == pytest.approx(5.28, abs=0.1)
