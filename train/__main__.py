"""python -m train: split a folder of chest X-rays by patient, train and evaluate models, pick the best.

With only the folders given it trains the recipe that ships (docs/training.md): resnet_aug, an ensemble of 2
seeds at 64 px, 24 epochs, the last stage at stride 1 with 1x1 convolutions, seed 1 (about 15 minutes on 2 cores);
with --site-dir the best model is picked by its
ROC AUC on the site sample. --study trains the original study's three models instead (baseline_cnn,
augmented_cnn, vgg19 at 128 px, at most 100 epochs with early stopping (patience 20), seed 42). Options
given explicitly win over both.
"""
from __future__ import annotations

import argparse
import sys
import threading

from xray_core.dicom_header import parse_modalities
from xray_core.errors import stopped as stopped_words
from xray_core.files import private_umask
from xray_core.interrupts import GATE, exit_with

MODEL_CHOICES = "baseline_cnn,augmented_cnn,vgg19,resnet_aug"
SELECT_BY = ("val_roc_auc", "val_pr_auc", "val_specificity", "val_f1", "val_accuracy", "site_roc_auc")

# The shipped model's training settings: the defaults.
RECIPE = {"models": "resnet_aug", "image_size": 64, "epochs": 24, "patience": 20, "seed": 1, "ensemble": 2,
          "last_stride": 1, "pool": "avg", "pointwise_stages": 1}
# --study: the original study's models and settings; the options it does not name keep the defaults.
STUDY = {"models": "baseline_cnn,augmented_cnn,vgg19", "image_size": 128, "epochs": 100, "patience": 20, "seed": 42}


EXIT_CODES = """\
exit codes:
  0    trained; RUN_DIR published (built beside its final place and renamed when complete)
  1    an unexpected failure (a Python traceback): RUN_DIR not published, the partial run removed
  2    refused with one line, nothing written: a missing data or site folder, a site folder overlapping the data,
       an output folder overlapping either or naming a file (even with --overwrite), no images or an empty
       class, an unknown model, --split not summing to 1, --batch-size < 1 or --learning-rate <= 0,
       --select-by site_roc_auc without --site-dir, a non-empty RUN_DIR without --overwrite, VGG19 weights not
       in the Keras cache
  130  Ctrl-C: RUN_DIR not published, the partial run removed; one while RUN_DIR is renamed into place waits for
       it (exit 0, with a warning); one after that says "after RUN_DIR <path> was written"
  143  SIGTERM (kill, docker stop, systemd): the same (129: SIGHUP, a closed terminal)
"""


def default_select_by(site_dir: str | None) -> str:
    """The site sample's ROC AUC when there is a site sample, else the validation split's."""
    return "site_roc_auc" if site_dir else "val_roc_auc"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__, epilog=EXIT_CODES,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True,
                   help="ROOT/{train,val,test}/{NORMAL,PNEUMONIA} or ROOT/{NORMAL,PNEUMONIA}")
    p.add_argument("--output-dir", required=True, help="run directory to create")
    p.add_argument("--site-dir", default=None,
                   help="labelled sample of new scans, ROOT/{NORMAL,PNEUMONIA}/*: evaluated, never trained on")
    p.add_argument("--study", action="store_true",
                   help=f"the original study: --models {STUDY['models']} --image-size {STUDY['image_size']} "
                        f"--epochs {STUDY['epochs']} --patience {STUDY['patience']} --seed {STUDY['seed']} "
                        "(options given explicitly win)")
    p.add_argument("--models", help=f"comma-separated subset of {MODEL_CHOICES} (default: %(default)s)")
    p.add_argument("--image-size", type=int, help="pixels per side (default: %(default)s)")
    p.add_argument("--epochs", type=int,
                   help="epochs; the study's models stop early, resnet_aug runs all of them (default: %(default)s)")
    p.add_argument("--patience", type=int,
                   help="early-stopping patience of the study's models; resnet_aug has none (default: %(default)s)")
    p.add_argument("--seed", type=int, help="split and training seed (default: %(default)s)")
    p.add_argument("--split", default="0.70,0.15,0.15", help="train,val,test fractions (default: %(default)s)")
    p.add_argument("--target-recall", type=float, default=0.95,
                   help="the validation-chosen threshold is the most specific one reaching this recall "
                        "(default: %(default)s)")
    p.add_argument("--select-by", default=None, choices=SELECT_BY,
                   help="metric that picks the best model (default: site_roc_auc with --site-dir, else val_roc_auc)")
    p.add_argument("--vgg19-weights", default="imagenet",
                   help="imagenet (Keras cache, no download) | none | PATH (default: %(default)s)")
    p.add_argument("--limit-per-class", type=int, default=None, help="at most N images per class (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--learning-rate", type=float, default=1e-3,
                   help="Adam's rate; resnet_aug decays it to 0 (cosine) over --epochs (default: %(default)s)")
    p.add_argument("--ensemble", type=int,
                   help="resnet_aug: members (seeds seed, seed+1, ...) averaged in one graph (default: %(default)s)")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="resnet_aug: mixup Beta(a, a) parameter; 0 turns it off (default: %(default)s)")
    p.add_argument("--augment", default="recipe", choices=("recipe", "none"),
                   help="resnet_aug: the recipe's augmentation, or none (an experiment's control) "
                        "(default: %(default)s)")
    p.add_argument("--last-stride", type=int, choices=(1, 2),
                   help="resnet_aug: stride of the last stage (1: heatmaps of S/8 instead of S/16 per side) "
                        "(default: %(default)s)")
    p.add_argument("--pool", choices=("avg", "softmax"),
                   help="resnet_aug: head over the last block: avg (class-activation map) or softmax (a logit per "
                        "cell, softmax-weighted; the heatmap is that map) (default: %(default)s)")
    p.add_argument("--pointwise-stages", type=int, choices=(0, 1, 2, 3),
                   help="resnet_aug: the last N stages use 1x1 convolutions, so each heatmap cell sees only a "
                        "patch of the image (default: %(default)s)")
    p.add_argument("--teacher", default=None, metavar="PACKAGE",
                   help="resnet_aug: distil a published package (serving_models/<name>/<version>, same --image-size): "
                        "its probabilities on the training split are mixed into the labels (default: none)")
    p.add_argument("--teacher-weight", type=float, default=0.5,
                   help="with --teacher: label = (1 - w) * folder label + w * teacher probability "
                        "(default: %(default)s)")
    p.add_argument("--crop-min-area", type=float, default=0.5,
                   help="resnet_aug: smallest random-crop area fraction (default: %(default)s)")
    p.add_argument("--frame-prob", type=float, default=0.0,
                   help="resnet_aug: share of training images put inside a random black frame, each side adding up to "
                        "--frame-max of the side (scans exported inside a border) (default: %(default)s)")
    p.add_argument("--frame-max", type=float, default=0.1,
                   help="resnet_aug: the largest border of --frame-prob, per side (default: %(default)s)")
    p.add_argument("--artefact-prob", type=float, default=0.0,
                   help="resnet_aug: share of training images given a constant band at one edge (2-15%% of the side, "
                        "bright or dark: a collimator's shadow), and, independently, of images given a bright "
                        "square (a lead marker) (default: %(default)s)")
    p.add_argument("--gamma-range", type=float, nargs=2, default=(0.7, 1.4), metavar=("LO", "HI"),
                   help="resnet_aug: the range of the per-image gamma jitter (default: 0.7 1.4)")
    p.add_argument("--crop-bands", action="store_true",
                   help="cut each image's edge bands of constant grey (a border, a pillarbox, a scanner's black edge) "
                        "before the resize, here and wherever the model is used (preprocessing `crop_bands`)")
    p.add_argument("--data-source", default=None, metavar="TEXT",
                   help="where the training images come from (population, site, licence), as the exported model card "
                        "and the job's report state it; 'kermany2018' for the Kaggle chest-xray-pneumonia set the "
                        "shipped models were trained on (default: not recorded, and they say so)")
    p.add_argument("--modalities", default="CR,DX", metavar="LIST",
                   help="DICOM Modality values read, as the batch job's --modalities (default CR,DX); other DICOM "
                        "files of the folders are skipped, with the reason")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output dir")
    p.set_defaults(**RECIPE)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options, with --study's settings where it is given and an option is not, and --select-by resolved."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.study:
        p.set_defaults(**STUDY)
        args = p.parse_args(argv)
    if args.select_by is None:
        args.select_by = default_select_by(args.site_dir)
    try:
        args.modalities = parse_modalities(args.modalities)
    except ValueError as exc:
        p.error(str(exc))
    return args


def main(argv=None) -> int:
    """The command; -> its exit code. Ctrl-C and SIGTERM (xray_core.interrupts, installed while it runs in the main
    thread) remove the partial run and publish nothing: 130, 143."""
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run.json
    args.written = ""  # RUN_DIR once run() has published it
    previous = GATE.install() if threading.current_thread() is threading.main_thread() else {}
    code = 1
    try:
        from train import tf_start

        tf_start.start()  # heavy imports (TensorFlow) only after argparse, their start-up lines dropped
        from train.run import InputError, run

        try:
            with private_umask():  # split.csv and the predictions name patients' files (and DICOM PatientIDs)
                code = run(args)
        except InputError as exc:
            print(f"error: {exc}", file=sys.stderr)
            code = 2
    except (KeyboardInterrupt, Exception) as exc:  # Terminated too; run() removed its partial run
        interrupt = GATE.as_interrupt(exc)  # a SIGTERM inside TensorFlow's C code comes out as its TypeError
        if interrupt is None:
            raise
        done = f"after RUN_DIR {args.written} was written" if args.written else "RUN_DIR not published"
        what, code = stopped_words(interrupt)
        print(f"error: {what}; {done}", file=sys.stderr)
    finally:
        held = GATE.finish(previous, exiting=code == 0 and argv is None and bool(previous))
    if held and code == 0:
        print(f"warning: {held} arrived while RUN_DIR was being published; it was published first", file=sys.stderr)
    return code


def cli() -> None:
    """`python -m ...` and the console script: main() as the process's exit (xray_core.interrupts.exit_with)."""
    exit_with(main())


if __name__ == "__main__":
    cli()
