"""The checks of train's arguments before any work: one line each (UsageError, DataError), nothing written."""
from __future__ import annotations

import os

from train.data import DataError
from train.distill import TeacherError, check_teacher
from train.models import MODEL_NAMES
from xray_core.files import blocking_ancestor, inside
from xray_core.preprocessing import PreprocessConfig


def preprocess_config(args) -> PreprocessConfig:
    """The run's preprocessing, from its arguments: what it trains, validates and is distilled with (review: the
    teacher's probabilities were computed without --crop-bands when the run had it)."""
    return PreprocessConfig(image_size=args.image_size, crop_bands=args.crop_bands)

MAX_SOURCE = 300  # --data-source: one line of the model card and of every report


class UsageError(ValueError):
    """Bad command-line input; the message is one line."""


def validate(args) -> tuple[list[str], tuple[float, float, float]]:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODEL_NAMES]
    if unknown or not models:
        raise UsageError(f"unknown model(s) {unknown or models}; choose from {','.join(MODEL_NAMES)}")
    try:
        fractions = tuple(float(v) for v in args.split.split(","))
    except ValueError:
        raise UsageError(f"--split must be three numbers like 0.70,0.15,0.15, got {args.split!r}") from None
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise UsageError(f"--split must be three positive fractions summing to 1, got {args.split!r}")
    if not 0 < args.target_recall <= 1:
        raise UsageError("--target-recall must be in (0, 1]")
    if args.epochs < 1 or args.patience < 0 or args.image_size < 32:
        raise UsageError("--epochs must be >= 1, --patience >= 0, --image-size >= 32")
    if args.batch_size < 1 or not 0 < args.learning_rate < float("inf"):
        raise UsageError("--batch-size must be >= 1 and --learning-rate > 0")
    if args.limit_per_class is not None and args.limit_per_class < 3:
        raise UsageError("--limit-per-class must be >= 3")
    if args.ensemble < 1 or args.mixup < 0 or not 0 < args.crop_min_area <= 1:
        raise UsageError("--ensemble must be >= 1, --mixup >= 0, --crop-min-area in (0, 1]")
    if not (0 <= args.frame_prob <= 1 and 0 <= args.frame_max <= 0.5):
        raise UsageError("--frame-prob must be in [0, 1] and --frame-max in [0, 0.5]")
    if not (0 <= args.artefact_prob <= 1 and 0 < args.gamma_range[0] <= args.gamma_range[1] <= 5):
        raise UsageError("--artefact-prob must be in [0, 1] and --gamma-range two numbers in (0, 5], low first")
    if getattr(args, "teacher", None):
        if models != ["resnet_aug"]:
            raise UsageError("--teacher distils into resnet_aug only: pass --models resnet_aug")
        try:
            check_teacher(args.teacher, args.teacher_weight, preprocess_config(args))
        except TeacherError as exc:
            raise UsageError(str(exc)) from None
    source = getattr(args, "data_source", None)
    if source is not None and not (source.strip() and source.isprintable() and len(source) <= MAX_SOURCE):
        raise UsageError(f"--data-source must be one line of at most {MAX_SOURCE} printable characters")
    if args.select_by.startswith("site_") and not args.site_dir:
        raise UsageError(f"--select-by {args.select_by} needs --site-dir")
    if not os.path.isdir(args.data_dir):
        raise DataError(f"data directory not found: {args.data_dir}")
    if args.site_dir and not os.path.isdir(args.site_dir):
        raise DataError(f"site directory not found: {args.site_dir}")
    if args.site_dir and _same_or_inside(args.site_dir, args.data_dir):
        raise UsageError("--site-dir must not overlap --data-dir: the site sample is never trained on")
    out = os.path.abspath(args.output_dir)
    inputs = (("--data-dir", args.data_dir), ("--site-dir", args.site_dir),
              ("--teacher", getattr(args, "teacher", None)), ("the working directory", os.getcwd()))
    for flag, folder in inputs:  # --overwrite would delete them; inside the data, the next run would train on it
        if folder and (_same_or_inside(out, folder) if flag != "the working directory" else inside(folder, out)):
            raise UsageError(f"--output-dir must not overlap {flag}: {args.output_dir} and {folder}")
    if os.path.lexists(out) and (os.path.islink(out) or not os.path.isdir(out)):
        raise UsageError(f"output dir {args.output_dir} exists and is not a folder; it is never replaced")
    if os.path.exists(out) and os.listdir(out) and not args.overwrite:
        raise UsageError(f"output dir {args.output_dir} exists and is not empty (pass --overwrite to replace it)")
    blocked = blocking_ancestor(out)
    if blocked:
        raise UsageError(f"cannot write to {blocked}")
    return models, fractions  # type: ignore[return-value]


def _same_or_inside(a: str, b: str) -> bool:
    """True when one of the two folders is the other or lies inside it (xray_core.files.inside)."""
    return inside(a, b) or inside(b, a)
