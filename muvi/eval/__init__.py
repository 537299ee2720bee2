"""Evaluation of video-to-music output: beat synchronisation, SIM and offline audio-quality metrics.

- :mod:`muvi.eval.beats`: Ellis DP beat tracking with a time-varying tempo, BCS/BHS as the paper
  reports them, and beat precision/recall/F1 (robust mode);
- :mod:`muvi.eval.distances`: Fréchet distance, kernel distances (KAD/KID), paired tag KL,
  inception score, and hash-checked loading of user-supplied VGGish/PANNs weights;
- :mod:`muvi.encoders.musicnn`: the offline embedding/tagging backbone (musicnn port);
- :mod:`muvi.eval.report`: ``evaluate(generated_dir, reference_dir, ...)`` -> JSON report with
  bootstrap CIs; ``python -m muvi.eval GEN_DIR REF_DIR -o report.json`` on the command line;
- :mod:`muvi.eval.plot`: PNG of reference vs generated beats and the video's motion curve.

Submodules are imported on use, so importing :mod:`muvi.eval` loads nothing heavy.
"""
