"""``python -m muvi.eval GEN_DIR REF_DIR [--videos DIR] -o report.json``: evaluate and print a table.

SIM needs a SIM model folder (``--contrastive PATH``: a contrastive run's ``final/``), loaded with
:meth:`muvi.eval.sim.SimilarityScorer.from_pretrained`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from muvi.errors import MuviError, one_line
from muvi.eval.report import PairingError, evaluate, format_table


def _similarity_model(path: str):
    from muvi.eval.sim import SimilarityScorer

    return SimilarityScorer.from_pretrained(path)


def check_report_path(args: argparse.Namespace) -> Path:
    """``-o`` must not be any file the evaluation reads, nor an audio/video file inside a folder
    it scans (the next run would read it), and may replace an existing file only with
    ``--overwrite``."""
    from muvi.errors import OutputError
    from muvi.eval.pairing import AUDIO_SUFFIXES, VIDEO_SUFFIXES
    from muvi.inputs import check_output

    out = Path(args.output)
    folders = [(args.generated_dir, AUDIO_SUFFIXES), (args.reference_dir, AUDIO_SUFFIXES),
               (args.videos, VIDEO_SUFFIXES), (args.events, (".json",))]
    read = [p for p in (args.contrastive, args.vggish, args.panns) if p]
    for folder, suffixes in folders:
        if folder is None or not Path(folder).is_dir():
            continue
        read += [p for p in Path(folder).iterdir() if p.suffix.lower() in suffixes]
        if out.parent.resolve() == Path(folder).resolve() and out.suffix.lower() in suffixes:
            raise OutputError(f"-o {out}: would be read as input from {folder} on the next run; "
                              f"write the report elsewhere")
    return check_output(out, inputs=read, overwrite=args.overwrite, name="-o")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m muvi.eval", description=__doc__.splitlines()[0])
    parser.add_argument("generated_dir", help="folder of generated audio (.wav/.flac/.ogg/.mp3)")
    parser.add_argument("reference_dir", help="folder of reference audio with the same file stems")
    parser.add_argument("--videos", help="folder of videos with the same stems (SIM, motion curves)")
    parser.add_argument("-o", "--output", default="report.json", help="JSON report path (default: report.json); "
                        "never a file the evaluation reads, and an existing one only with --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace the report if it exists")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap / shuffle seed (default 0)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000)")
    parser.add_argument("--tolerance", type=float, default=0.1, help="beat matching window in s (default 0.1)")
    parser.add_argument("--plots", help="folder for one beat-alignment PNG per clip")
    parser.add_argument("--events", help="folder of <stem>.json video event times (cuts, accents), e.g. "
                        "the sidecars of recipes/build_corpus.py: beats are also scored against them")
    parser.add_argument("--no-musicnn", action="store_true", help="skip the musicnn embedding metrics")
    parser.add_argument("--contrastive", help="contrastive checkpoint for SIM")
    parser.add_argument("--vggish", help="VGGish weight file for FAD (never downloaded)")
    parser.add_argument("--vggish-sha256", help="expected SHA-256 of --vggish")
    parser.add_argument("--panns", help="PANNs Cnn14 (16 kHz) weight file for FD/KL/IS (never downloaded)")
    parser.add_argument("--panns-sha256", help="expected SHA-256 of --panns")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    try:
        check_report_path(args)
        model = _similarity_model(args.contrastive) if args.contrastive else None
        report = evaluate(args.generated_dir, args.reference_dir, args.videos, out_json=args.output,
                          seed=args.seed, n_bootstrap=args.bootstrap, tolerance=args.tolerance,
                          embedder=None if args.no_musicnn else "musicnn", similarity_model=model,
                          plots_dir=args.plots, vggish=args.vggish, vggish_sha256=args.vggish_sha256,
                          panns=args.panns, panns_sha256=args.panns_sha256, events_dir=args.events,
                          progress=not args.quiet)
    except PairingError as err:  # lists every unmatched name, one line per side
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (MuviError, FileNotFoundError, ValueError) as err:  # bad weight files, unreadable audio, -o
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    print(format_table(report))
    print(f"report written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
