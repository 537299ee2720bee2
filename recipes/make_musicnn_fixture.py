"""Make ``tests/fixtures/musicnn_reference.npz``: the ORIGINAL musicnn (TensorFlow) on real music.

muvi's PyTorch port (``muvi.encoders.musicnn``) is tested against this file, so the tests need neither
TensorFlow nor a MIDI renderer. TensorFlow is only needed here, in an environment of its own:

    python -m venv --system-site-packages /tmp/tfenv
    /tmp/tfenv/bin/pip install tensorflow-cpu==2.21.0 tf_keras==2.21.0 "numpy==1.26.4" \
        pretty_midi tinysoundfont music21
    /tmp/tfenv/bin/pip install --no-deps musicnn==0.1.0
    /tmp/tfenv/bin/python recipes/make_musicnn_fixture.py

musicnn 0.1.0 is TF-1 code (``tf.compat.v1.layers``, graph mode). It runs unchanged on TF 2.21
once the legacy Keras 2 implementation of those layers is selected (``TF_USE_LEGACY_KERAS=1``,
set below before TensorFlow is imported); musicnn itself disables eager execution.

NumPy must be 1.x (musicnn pins numpy<1.17). musicnn rounds the mel power to float16 and then
computes ``log10(10000 * mel + 1)``; NumPy 1.x promotes ``10000 * float16`` to float32 (value-based
casting), which is what the models were trained on, while NumPy 2 (NEP 50) keeps float16, which
overflows to inf at ordinary loudness (mel power > 6.55) and turns the network's outputs into NaN.

The music: the first movement of Mozart's K. 525 as the MIDI file that music21 ships
(``music21/omr/k525MIDIMvt1.mid``), rendered at 16 kHz with the General MIDI soundfont that
pretty_midi ships (TimGM6mb.sf2) through tinysoundfont, 10 s from 20 s in, peak-normalised to
-6 dBFS and stored as 16-bit integers. The original extractor reads exactly those samples (a
float WAV at 16 kHz, so librosa does not resample).

The fixture holds: the audio; the extractor's log-mel spectrogram; for MSD_musicnn (non-overlapping
3 s patches) and MTT_musicnn (3 s patches every 1 s) the tag probabilities and the 'penultimate',
'mean_pool' and 'max_pool' features; and a fingerprint (shape, float64 sum and sum of absolute
values) of every tensor of both checkpoints as TensorFlow's own reader returns them. The script
also checks muvi's pure-Python checkpoint reader against TensorFlow's, tensor by tensor, exactly.

musicnn 0.1.0's ``extractor`` has a bug: for every patch after the first it appends the FIRST
patch's 'penultimate' (and 'cnn1'-'cnn3') again (it unpacks the new values under other names).
So the features are also computed by running musicnn's own graph (``musicnn.models.define_model``
restored from the same checkpoint) on the extractor's own patches, all at once; the script checks
that this agrees with the extractor wherever the extractor is right (tags, pools, the first
patch's 'penultimate') and stores the graph's 'penultimate'.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # before any TensorFlow import
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SAMPLE_RATE = 16000
MIDI_START_S, DURATION_S = 20.0, 10.0
RUNS = {  # model -> musicnn extractor's input_overlap (seconds; False = non-overlapping patches)
    "MSD_musicnn": False,
    "MTT_musicnn": 1.0,
}
FEATURES = ("penultimate", "mean_pool", "max_pool")


def render_music() -> np.ndarray:
    """10 s of K. 525 rendered from MIDI, as int16 samples at 16 kHz."""
    import music21
    import pretty_midi
    import tinysoundfont

    midi = Path(music21.__file__).parent / "omr" / "k525MIDIMvt1.mid"
    soundfont = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
    synth = tinysoundfont.Synth(samplerate=SAMPLE_RATE)
    synth.sfload(str(soundfont))
    sequencer = tinysoundfont.Sequencer(synth)
    sequencer.midi_load(str(midi))
    total = int((MIDI_START_S + DURATION_S) * SAMPLE_RATE)
    stereo = np.frombuffer(synth.generate(total), dtype=np.float32).reshape(-1, 2)
    audio = stereo.mean(axis=1)[int(MIDI_START_S * SAMPLE_RATE):]
    audio = 0.5 * audio / np.abs(audio).max()
    return np.round(audio * 32767).astype(np.int16)


def checkpoint_dir(model: str) -> str:
    spec = importlib.util.find_spec("musicnn")
    return os.path.join(spec.submodule_search_locations[0], model) + os.sep


def check_reader_and_fingerprint(models) -> dict:
    """Compare muvi's reader with TensorFlow's on every tensor; return TF's fingerprints."""
    import tensorflow as tf

    from muvi.encoders._tf_checkpoint import read_tf_checkpoint

    fingerprints = {}
    for model in models:
        prefix = checkpoint_dir(model)
        reader = tf.compat.v1.train.NewCheckpointReader(prefix)
        names = sorted(reader.get_variable_to_shape_map())
        ours = read_tf_checkpoint(prefix)
        assert sorted(ours) == names, f"{model}: tensor names differ"
        prints = {}
        for name in names:
            theirs = np.asarray(reader.get_tensor(name))
            assert ours[name].dtype == theirs.dtype and ours[name].shape == theirs.shape, name
            assert np.array_equal(ours[name], theirs), f"{model}/{name}: values differ"
            prints[name] = [list(theirs.shape), float(theirs.astype(np.float64).sum()),
                            float(np.abs(theirs.astype(np.float64)).sum())]
        fingerprints[model] = prints
        print(f"{model}: reader equals tf.compat.v1.train.NewCheckpointReader on {len(names)} tensors")
    return fingerprints


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to float32 summation order: 1e-5 of the array's scale."""
    return bool(np.abs(a - b).max() <= 1e-5 * np.abs(b).max() + 1e-7)


def run_graph(model: str, batch: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """musicnn's own TF graph and checkpoint on a batch of patches: tags and feature taps."""
    import tensorflow as tf
    from musicnn import models

    tf.compat.v1.reset_default_graph()
    x = tf.compat.v1.placeholder(tf.float32, [None, batch.shape[1], batch.shape[2]])
    is_training = tf.compat.v1.placeholder(tf.bool)
    logits, *_, mean_pool, max_pool, penultimate = models.define_model(x, is_training, model, num_classes)
    with tf.compat.v1.Session() as sess:
        tf.compat.v1.train.Saver().restore(sess, checkpoint_dir(model))
        values = sess.run([tf.nn.sigmoid(logits), penultimate, mean_pool, max_pool],
                          feed_dict={x: batch, is_training: False})
    return dict(zip(("tags",) + FEATURES, values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "musicnn_reference.npz")
    args = parser.parse_args()

    if int(np.__version__.split(".")[0]) >= 2:
        raise SystemExit("run this with numpy 1.x (see the module docstring): NumPy 2 changes "
                         "musicnn's front end")
    import librosa
    import soundfile as sf
    from musicnn import extractor as musicnn_extractor  # imports TensorFlow

    audio = render_music()
    arrays = {"audio_int16": audio, "sample_rate": np.int64(SAMPLE_RATE)}
    fingerprints = check_reader_and_fingerprint(RUNS)
    with tempfile.TemporaryDirectory() as tmp:
        wav = os.path.join(tmp, "k525.wav")
        sf.write(wav, audio.astype(np.float32) / 32768.0, SAMPLE_RATE, subtype="FLOAT")
        _, mel = musicnn_extractor.batch_data(wav, 187, 187)
        arrays["mel"] = mel.astype(np.float32)
        if not np.isfinite(mel).all():
            raise RuntimeError("musicnn's float16 log-mel overflowed; lower the level")
        tag_names = {}
        for model, overlap in RUNS.items():
            taggram, labels, features = musicnn_extractor.extractor(
                wav, model=model, input_length=3, input_overlap=overlap, extract_features=True)
            tag_names[model] = list(labels)
            n_frames = librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1  # as musicnn
            step = n_frames if not overlap else librosa.time_to_frames(overlap, sr=16000, n_fft=512,
                                                                      hop_length=256)
            batch, _ = musicnn_extractor.batch_data(wav, n_frames, step)
            graph = run_graph(model, batch, len(labels))
            for key in ("tags", "mean_pool", "max_pool"):
                reference = taggram if key == "tags" else features[key]
                # batch 1 (extractor) vs one batch (here): oneDNN may sum in another order
                assert close(graph[key], reference), f"{model} {key}"
            assert close(graph["penultimate"][0], features["penultimate"][0]), f"{model} penultimate"
            arrays[f"{model}/tags"] = taggram.astype(np.float32)
            for key in ("mean_pool", "max_pool"):
                arrays[f"{model}/{key}"] = np.asarray(features[key], dtype=np.float32)
            arrays[f"{model}/penultimate"] = graph["penultimate"].astype(np.float32)
            top = np.argsort(-taggram.mean(axis=0))[:5]
            print(f"{model}: {taggram.shape[0]} patches, top tags {[labels[i] for i in top]}")
    arrays["meta"] = np.array(json.dumps({
        "input_overlap": RUNS, "tag_names": tag_names, "checkpoint_fingerprints": fingerprints,
        "source": "music21 omr/k525MIDIMvt1.mid rendered with pretty_midi TimGM6mb.sf2 via tinysoundfont",
        "start_s": MIDI_START_S, "duration_s": DURATION_S,
    }, sort_keys=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
