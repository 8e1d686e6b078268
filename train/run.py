"""Orchestrates one training run: data -> split -> models -> evaluation -> comparison.

Everything is written into a temporary directory beside RUN_DIR and renamed into
place at the end, so a failed or interrupted run leaves no half-written RUN_DIR.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from datetime import datetime, timezone

import numpy as np

from train import plots
from train.data import (
    CLASSES,
    DataError,
    find_examples,
    labels_to_array,
    limit_per_class,
    load_images,
    split_examples,
    write_split_csv,
)
from xray_core.metrics import evaluate
from xray_core.files import publish_dir, temp_dir_beside
from train.models import MODEL_NAMES, WeightsError, build_cnn, resolve_vgg19_weights, vgg19_parts
from xray_core.preprocessing import PreprocessConfig


class UsageError(ValueError):
    """Bad command-line input; the message is one line."""


InputError = (UsageError, DataError, WeightsError)


def _log(msg: str) -> None:
    print(msg, flush=True)


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
    if args.limit_per_class is not None and args.limit_per_class < 3:
        raise UsageError("--limit-per-class must be >= 3")
    if not os.path.isdir(args.data_dir):
        raise DataError(f"data directory not found: {args.data_dir}")
    out = os.path.abspath(args.output_dir)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not args.overwrite:
        raise UsageError(f"output dir {args.output_dir} exists and is not empty (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    existing = parent
    while not os.path.isdir(existing):  # the nearest existing ancestor must be writable
        existing = os.path.dirname(existing)
    if not os.access(existing, os.W_OK):
        raise UsageError(f"cannot write to {existing}")
    return models, fractions  # type: ignore[return-value]


def _split_arrays(images, labels, splits):
    out = {}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(np.asarray(splits) == name)
        out[name] = (images[idx], labels[idx])
    return out


def _check_splits(data) -> None:
    for name, (_, y) in data.items():
        if len(y) == 0 or y.min() == y.max():
            raise DataError(f"the {name} split lacks one of the classes {CLASSES}: add images or change --split")


def _cnn(args, name):
    if args.cnn == "bn_gap":
        return build_cnn(args.image_size, filters=(16, 32, 64, 128), dense=64, dropout=0.5,
                         batch_norm=True, global_pool=True, name=name)
    return build_cnn(args.image_size, name=name)


def train_one(name, args, data, vgg_weights):
    """Train one model -> (full keras model, history, p_val, p_test)."""
    from train import fit
    from train.models import keras

    keras.utils.set_random_seed(args.seed)
    common = dict(name=name, epochs=args.epochs, patience=args.patience, seed=args.seed,
                  batch_size=args.batch_size, learning_rate=args.learning_rate)
    if name in ("baseline_cnn", "augmented_cnn"):
        model = _cnn(args, name)
        history = fit.fit(model, data["train"], data["val"], augment=(name == "augmented_cnn"), **common)
        return model, history, fit.predict(model, data["val"][0]), fit.predict(model, data["test"][0])
    # vgg19: the base is frozen, so compute its features once and train only the head on them.
    model, extractor, head = vgg19_parts(args.image_size, vgg_weights)
    t0 = time.perf_counter()
    feats = {k: extractor.predict(x, batch_size=64, verbose=0) for k, (x, _) in data.items()}
    _log(f"[vgg19] cached frozen-base features for {sum(len(f) for f in feats.values())} images "
         f"in {time.perf_counter() - t0:.1f}s")
    history = fit.fit(head, (feats["train"], data["train"][1]), (feats["val"], data["val"][1]), **common)
    history["feature_seconds"] = time.perf_counter() - t0 - sum(history["seconds"])
    return model, history, fit.predict(head, feats["val"]), fit.predict(head, feats["test"])


def _write_json(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)


def _summary_row(name, m, history) -> dict:
    row = {"model": name, "val_roc_auc": m["val_roc_auc"], "chosen_threshold": m["chosen_threshold"],
           "best_epoch": history["best_epoch"], "epochs_run": len(history["loss"]),
           "seconds_per_epoch": float(np.mean(history["seconds"]))}
    for key in ("pr_auc", "specificity", "f1", "accuracy"):
        row[f"val_{key}"] = m["val_at_chosen"][key]
    for point in ("test_at_0.5", "test_at_chosen"):
        for key in ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc"):
            row[f"{point}.{key}"] = m[point][key]
    return row


def comparison_markdown(rows, best, select_by, skipped) -> str:
    lines = [f"# Model comparison\n\nBest by `{select_by}`: **{best}**\n",
             "| model | val ROC AUC | threshold | point | accuracy | precision | recall | specificity | F1 | ROC AUC | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for point, label in (("test_at_0.5", "0.5"), ("test_at_chosen", "chosen")):
            lines.append(
                f"| {r['model']} | {r['val_roc_auc']:.4f} | {r['chosen_threshold']:.4f} | {label} | "
                + " | ".join(f"{r[f'{point}.{k}']:.4f}" for k in
                             ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc"))
                + f" | {r['seconds_per_epoch']:.1f} |")
    lines.append(f"\nSkipped (undecodable) images: {len(skipped)}")
    lines += [f"- `{p}`: {err}" for p, err in skipped]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    models, fractions = validate(args)
    vgg_weights = resolve_vgg19_weights(args.vgg19_weights) if "vgg19" in models else None
    examples = find_examples(args.data_dir)
    if args.limit_per_class:
        examples = limit_per_class(examples, args.limit_per_class, args.seed)
    config = PreprocessConfig(image_size=args.image_size)
    out = os.path.abspath(args.output_dir)
    try:
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = temp_dir_beside(out)
    except OSError as exc:
        raise UsageError(f"cannot write to {os.path.dirname(out)}: {exc.strerror}") from None
    try:
        _run_into(tmp, args, models, fractions, examples, config, vgg_weights)
        publish_dir(tmp, out, replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"run written to {out}")
    return 0


def _run_into(run_dir, args, models, fractions, examples, config, vgg_weights) -> None:
    t0 = time.perf_counter()
    _log(f"found {len(examples)} images ({', '.join(f'{c} {sum(e.label == c for e in examples)}' for c in CLASSES)})")
    images, ok, failed = load_images([e.path for e in examples], config)
    for path, err in failed:
        _log(f"skipped {path}: {err}")
    examples = [examples[i] for i in ok]
    if not examples:
        raise DataError("no image could be decoded")
    _log(f"decoded {len(examples)} images at {config.image_size}px in {time.perf_counter() - t0:.1f}s, "
         f"skipped {len(failed)}")
    splits = split_examples(examples, fractions, args.seed)
    write_split_csv(os.path.join(run_dir, "split.csv"), examples, splits)
    labels = labels_to_array(e.label for e in examples)
    data = _split_arrays(images, labels, splits)
    _check_splits(data)
    _log("split: " + ", ".join(f"{k} {len(y)} ({int(y.sum())} pneumonia)" for k, (_, y) in data.items()))

    rows, all_metrics = [], {}
    for name in models:
        model_dir = os.path.join(run_dir, name)
        os.makedirs(model_dir)
        model, history, p_val, p_test = train_one(name, args, data, vgg_weights)
        m = evaluate(data["val"][1], p_val, data["test"][1], p_test, args.target_recall)
        m["model"] = name
        m["preprocessing"] = config.to_dict()
        model.save(os.path.join(model_dir, "model.keras"))
        _write_json(os.path.join(model_dir, "history.json"), history)
        _write_json(os.path.join(model_dir, "metrics.json"), m)
        y_test = data["test"][1]
        plots.training_curves(history, os.path.join(model_dir, "training_curves.png"))
        for point, thr in (("0.5", 0.5), ("chosen", m["chosen_threshold"])):
            plots.confusion_matrix(y_test, p_test, thr, os.path.join(model_dir, f"confusion_matrix_{point}.png"),
                                   f"{name} test, threshold {thr:.3f}")
        plots.roc_curve(y_test, p_test, os.path.join(model_dir, "roc_curve.png"), name)
        plots.sample_grid(data["test"][0], y_test, p_test, m["chosen_threshold"],
                          os.path.join(model_dir, "samples.png"), seed=args.seed)
        t = m["test_at_chosen"]
        _log(f"[{name}] test: ROC AUC {t['roc_auc']:.4f}; at threshold {m['chosen_threshold']:.4f} "
             f"recall {t['recall']:.4f} specificity {t['specificity']:.4f}; at 0.5 recall "
             f"{m['test_at_0.5']['recall']:.4f} specificity {m['test_at_0.5']['specificity']:.4f}")
        rows.append(_summary_row(name, m, history))
        all_metrics[name] = m

    best = max(rows, key=lambda r: r[args.select_by])["model"]
    comparison = {"best": best, "select_by": args.select_by, "models": rows,
                  "skipped_images": [{"path": p, "error": e} for p, e in failed]}
    _write_json(os.path.join(run_dir, "comparison.json"), comparison)
    with open(os.path.join(run_dir, "comparison.md"), "w") as f:
        f.write(comparison_markdown(rows, best, args.select_by, failed))
    _write_json(os.path.join(run_dir, "run.json"), {
        "command": "python -m train " + " ".join(getattr(args, "argv", None) or sys.argv[1:]),
        "args": vars(args),
        "data_dir": os.path.abspath(args.data_dir),
        "images_found": len(examples) + len(failed),
        "images_used": len(examples),
        "images_skipped": len(failed),
        "split_counts": {k: {"images": int(len(y)), "pneumonia": int(y.sum())} for k, (_, y) in data.items()},
        "preprocessing": config.to_dict(),
        "seconds": time.perf_counter() - t0,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    })
    _log(f"best model by {args.select_by}: {best}")
