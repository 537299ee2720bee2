"""Frozen, pretrained encoders ported to PyTorch (they never learn inside muvi):

- video: :mod:`~muvi.encoders.videomae` (VideoMAE V2, the paper's), :mod:`~muvi.encoders.frame_encoder`
  (ImageNet EfficientNet-Lite0 per frame, package-shipped weights), :mod:`~muvi.encoders.clip`
  (CLIP ViT per frame, the paper's table-1 alternative);
- audio: :mod:`~muvi.encoders.audiomae` (the paper's contrastive audio side),
  :mod:`~muvi.encoders.music_frames` (musicnn features per output frame), :mod:`~muvi.encoders.musicnn`
  (the musicnn port and its TensorFlow checkpoint reader);
- evaluation backbones: :mod:`~muvi.encoders.vggish`, :mod:`~muvi.encoders.panns`;
- :mod:`~muvi.encoders.frames`: running them, the one frame pipeline (resize → standardise → encode).

Specs (package names, checkpoint files, presets) are resolved by :func:`muvi.hub.load_encoder`.
"""
