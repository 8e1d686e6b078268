"""python -m export: publish a trained model as a versioned ONNX serving package, publish a package again with
an input gate or a threshold recalibrated on local images, or --verify one."""
from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import sys
import threading

from xray_core.dicom_header import DEFAULT_MODALITIES, parse_modalities
from xray_core.errors import stopped
from xray_core.interrupts import GATE, Terminated, exit_with
from xray_core.quality_floor import MIN_RECALL

EXIT_CODES = """exit codes:
  0  published (or, with --verify, every check passed)
  1  --verify: a check failed; --run-dir: ONNX and Keras disagree (parity); --run-dir, --recalibrate, --add-gate:
     the model is below the quality floor (ROC AUC 0.95, recall 0.90; docs/export.md): nothing published
  2  bad input (a missing or incomplete run, a run whose images changed or were added since it trained, a --verify
     folder that is not there, a package that does not verify, a calibration folder with too few images, a
     --target-recall below the quality floor's recall, a version that exists or that another export is building):
     one line on stderr, nothing published
  130  Ctrl-C; 143 SIGTERM (129 SIGHUP): the staging folder removed, nothing published (a staging folder left by an
       export killed outright, SIGKILL, is removed by the next export of that model name). One that arrives while the
       version is being published (renamed into place, config.pbtxt rewritten) waits for that: published, exit 0;
       one that comes later says "after <version> was published"

Recalibrate a published package on a labelled local sample (folders NORMAL and PNEUMONIA, >= 30 images each;
JPEG, PNG or DICOM), without retraining or TensorFlow:
  python -m export --recalibrate serving_models/pneumonia/9 --calibrate-dir /data/local_sample
  (the new version goes beside its source and, as the newest, becomes the batch job's default)
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verify", metavar="VERSION_DIR",
                   help="verify serving_models/<name>/<version> and exit 0/1 (2: no such folder)")
    p.add_argument("--run-dir", help="a run directory written by `python -m train`")
    p.add_argument("--add-gate", metavar="VERSION_DIR",
                   help="publish VERSION_DIR again as a new version with an input gate: fitted on the training "
                        "split's embeddings with --training-dir, else derived from the package's own reference "
                        "(same model.onnx; no TensorFlow, no training run)")
    p.add_argument("--training-dir", metavar="DIR",
                   help="with --add-gate: the folder the package was trained from; its images that the package's "
                        "splits.csv does not list are the training split the gate is fitted on")
    p.add_argument("--recalibrate", metavar="VERSION_DIR",
                   help="publish VERSION_DIR again as a new version whose decision threshold is chosen on "
                        "--calibrate-dir (same model.onnx, drift reference and gate; no TensorFlow, no training run)")
    p.add_argument("--serving-dir", default=None,
                   help="where the new version goes (default: serving_models with --run-dir; with --add-gate and "
                        "--recalibrate the serving folder of the source version)")
    p.add_argument("--name", default=None,
                   help="the model's name (default: pneumonia with --run-dir; with --add-gate and --recalibrate the "
                        "source version's)")
    p.add_argument("--model", default="best", help="best (from comparison.json) or a model name of the run")
    p.add_argument("--version", type=int, default=None, help="default: highest existing + 1")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--calibrate-dir", default=None,
                   help="labelled sample of new scans (folders NORMAL/PNEUMONIA at or below it): the decision "
                        "threshold is chosen there, with a 2-fold estimate of what it does on unseen scans")
    p.add_argument("--target-recall", type=float, default=None,
                   help="with --calibrate-dir: the recall the threshold must reach (default: the run's, or with "
                        "--recalibrate the source version's)")
    p.add_argument("--modalities", default=None, metavar="LIST",
                   help="with --calibrate-dir: the DICOM Modality values in scope, as the batch job's --modalities "
                        "(default CR,DX); other DICOM files of the folder are skipped")
    p.add_argument("--publish-below-floor", action="store_true",
                   help="with --run-dir, --recalibrate and --add-gate: publish a model below the quality floor all the "
                        "same (its card and the batch job say so); without it such a model is refused, exit 1")
    p.add_argument("--heatmap-method", default="occlusion:8", metavar="occlusion:K|graph",
                   help="with --run-dir: the maps the batch job shows for the top-N flagged images: occlusion maps "
                        "of a K x K grid (K*K extra network passes per image) or the graph's own class-activation "
                        "map (default: %(default)s)")
    args = p.parse_args(argv)
    try:
        args.heatmap_method = parse_heatmap_method(args.heatmap_method)
    except ValueError:
        p.error(f"--heatmap-method must be graph or occlusion:K with K >= 2, not {args.heatmap_method!r}")
    if sum(bool(a) for a in (args.verify, args.run_dir, args.add_gate, args.recalibrate)) != 1:
        p.error("exactly one of --run-dir, --add-gate, --recalibrate or --verify is required")
    if args.training_dir and not args.add_gate:
        p.error("--training-dir goes with --add-gate")
    if args.recalibrate and not args.calibrate_dir:
        p.error("--recalibrate needs --calibrate-dir (the labelled images to choose the threshold on)")
    if args.calibrate_dir and not (args.run_dir or args.recalibrate):
        p.error("--calibrate-dir goes with --run-dir or --recalibrate")
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        p.error("--target-recall must be in (0, 1]")
    if args.publish_below_floor and args.verify:
        p.error("--publish-below-floor goes with --run-dir, --recalibrate or --add-gate")
    if (args.calibrate_dir and args.target_recall is not None and args.target_recall < MIN_RECALL
            and not args.publish_below_floor):
        p.error(f"--target-recall {args.target_recall:g} is below the quality floor's recall ({MIN_RECALL:.2f}): a "
                "version calibrated for it would usually be refused after all its work; give --publish-below-floor to "
                "publish it all the same")
    if args.modalities is not None and not args.calibrate_dir:
        p.error("--modalities goes with --calibrate-dir")
    try:
        args.modalities = parse_modalities(args.modalities or ",".join(DEFAULT_MODALITIES))
    except ValueError as exc:
        p.error(str(exc))
    if args.name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", args.name):
        p.error(f"--name must be one folder name of letters, digits, '.', '_' and '-', not {args.name!r}")
    return args


def parse_heatmap_method(text: str):
    from xray_core.occlusion import GRAPH, OCCLUSION, HeatmapMethod

    if text == GRAPH:
        return HeatmapMethod()
    name, _, grid = text.partition(":")
    if name != OCCLUSION or not grid.isdigit():
        raise ValueError(text)
    return HeatmapMethod.from_dict({"name": OCCLUSION, "grid": int(grid), "fill": "image mean"})


def verify(version_dir: str) -> int:
    from xray_core.verify import verify_package

    if not os.path.isdir(version_dir):  # QA: it said "metadata.json is missing" of a folder that is not there
        print(f"error: --verify {version_dir}: no such version folder", file=sys.stderr)
        return 2
    checks = verify_package(version_dir)
    for check in checks:
        print(check.line())
    ok = all(c.ok for c in checks)
    print(f"{'OK' if ok else 'FAILED'}: {version_dir}")
    return 0 if ok else 1


def main(argv=None) -> int:
    """The command (`python -m export`, `pneumonia-export`); -> its exit code. Ctrl-C and SIGTERM remove the staging
    folder and publish nothing, except while a version is being published, which they wait for (the handlers,
    xray_core.interrupts, are installed while the command runs in the main thread, then restored); one that comes
    once the version is published says so."""
    from xray_core.staging import PUBLISHED  # light: --verify imports neither train nor TensorFlow

    PUBLISHED.clear()
    previous = GATE.install() if threading.current_thread() is threading.main_thread() else {}
    code = 1
    try:
        code = _main(argv)
    except (KeyboardInterrupt, Exception) as exc:  # Terminated too, and one that TensorFlow's C code turned into
        stopped = GATE.as_interrupt(exc)  # its own error
        if stopped is None:
            raise
        return _stopped(stopped, PUBLISHED)
    finally:
        held = GATE.finish(previous, exiting=code == 0 and argv is None and bool(previous))
    if held and code == 0:
        print(f"warning: {held} arrived while the version was being published; it was published first",
              file=sys.stderr)
    elif held:  # the command failed on its own (its line is out): nothing was published
        return _stopped(KeyboardInterrupt() if held == "Ctrl-C" else Terminated(signal.Signals[held]), PUBLISHED)
    return code


def _stopped(exc: KeyboardInterrupt, published: list[str]) -> int:
    """The last line and exit code of a command stopped by Ctrl-C (130), SIGTERM (143) or SIGHUP (129)."""
    what, code = stopped(exc)
    done = f"after {published[-1]} was published" if published else "nothing published"
    print(f"error: {what}; {done}", file=sys.stderr)
    return code


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify:
        return verify(args.verify)  # no TensorFlow on this path
    command = "python -m export " + shlex.join(sys.argv[1:] if argv is None else argv)  # pastes into a shell
    from export.publish_floor import BelowQualityFloor

    if args.add_gate:
        from export.republish import RepublishError, add_gate  # no TensorFlow on this path either

        try:
            add_gate(args.add_gate, args.serving_dir, args.name, args.version, command, args.training_dir,
                     publish_below_floor=args.publish_below_floor)
        except RepublishError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BelowQualityFloor as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0

    if args.recalibrate:
        from export.republish import RepublishError, recalibrate  # no TensorFlow on this path either

        try:
            recalibrate(args.recalibrate, args.calibrate_dir, args.serving_dir, args.name, args.target_recall,
                        args.version, command, modalities=args.modalities,
                        publish_below_floor=args.publish_below_floor)
        except RepublishError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except BelowQualityFloor as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    from export.convert import ExportInputError, ParityError, export

    try:
        export(args.run_dir, args.serving_dir or "serving_models", args.name or "pneumonia", args.model, args.version,
               args.opset, command,
               calibrate_dir=args.calibrate_dir, target_recall=args.target_recall,
               heatmap_method=args.heatmap_method, modalities=args.modalities,
               publish_below_floor=args.publish_below_floor)
    except ExportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ParityError, BelowQualityFloor) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """`python -m ...` and the console script: main() as the process's exit (xray_core.interrupts.exit_with)."""
    exit_with(main())


if __name__ == "__main__":
    cli()
