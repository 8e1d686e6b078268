"""python -m train: build, train and evaluate the study models on a folder of X-rays."""
from __future__ import annotations

import argparse
import sys

DEFAULT_MODELS = "baseline_cnn,augmented_cnn,vgg19,resnet_aug"
SELECT_BY = ("val_roc_auc", "val_pr_auc", "val_specificity", "val_f1", "val_accuracy", "site_roc_auc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    p.add_argument("--data-dir", required=True, help="ROOT/{train,val,test}/{NORMAL,PNEUMONIA} or ROOT/{NORMAL,PNEUMONIA}")
    p.add_argument("--output-dir", required=True, help="run directory to create")
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated subset of {DEFAULT_MODELS}")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=100, help="maximum epochs (early stopping usually ends sooner)")
    p.add_argument("--patience", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--split", default="0.70,0.15,0.15", help="train,val,test fractions")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--select-by", default="val_roc_auc", choices=SELECT_BY)
    p.add_argument("--vgg19-weights", default="imagenet", help="imagenet (Keras cache, no download) | none | PATH")
    p.add_argument("--limit-per-class", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--site-dir", default=None,
                   help="labelled sample of new scans, ROOT/{NORMAL,PNEUMONIA}/*: evaluated, never trained on")
    p.add_argument("--ensemble", type=int, default=1, help="resnet_aug: members (seeds seed, seed+1, ...) averaged in one graph")
    p.add_argument("--mixup", type=float, default=0.0, help="resnet_aug: mixup Beta(a, a) parameter; 0 turns it off")
    p.add_argument("--augment", default="recipe", choices=("recipe", "none"),
                   help="resnet_aug: the recipe's augmentation, or none (an experiment's control)")
    p.add_argument("--last-stride", type=int, default=2, choices=(1, 2),
                   help="resnet_aug: stride of the last stage (1: heatmaps of S/8 instead of S/16 per side)")
    p.add_argument("--crop-min-area", type=float, default=0.5, help="resnet_aug: smallest random-crop area fraction")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty output dir")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in run.json
    from train.run import InputError, run  # heavy imports (TensorFlow) only after argparse

    try:
        return run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
