"""Orchestrates one training run: data -> split -> models -> evaluation -> comparison.

Everything is written into a temporary directory beside RUN_DIR and renamed into
place at the end, so a failed or interrupted run leaves no half-written RUN_DIR.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone

import numpy as np

from train import plots
from train.comparison import comparison_markdown, summary_row
from train.data import (
    CLASSES,
    DataError,
    check_patients_per_class,
    find_examples,
    label_conflicts,
    labels_to_array,
    limit_per_class,
    other_folders,
    refuse_site_images,
    split_examples,
    write_split_csv,
)
from train.distill import TeacherError, check_teacher_split
from train.loading import load_images
from train.models import WeightsError, resolve_vgg19_weights
from train.validate import UsageError, preprocess_config, validate
from xray_core.files import (
    hold_lock,
    make_folders,
    publish_dir,
    remove_abandoned,
    remove_dir,
    remove_folders,
    sha256_file,
    temp_dir_beside,
)
from xray_core.interrupts import GATE
from xray_core.metrics import choose_threshold, evaluate, operating_point
from xray_core.plots import confusion_matrix_png, roc_curve_png
from xray_core.preprocessing import OUT_OF_SCOPE

InputError = (UsageError, DataError, WeightsError)


def _log(msg: str) -> None:
    print(msg, flush=True)


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


def _write_json(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)


def killed_runs(out: str) -> re.Pattern:
    """The names of this RUN_DIR's temp folders (temp_dir_beside's), which remove_abandoned takes once their lock is
    free (QA: a SIGKILLed run left RUN_DIR.tmp-XXXXXXXX for good)."""
    return re.compile(re.escape(os.path.basename(out)) + r"\.tmp-[a-z0-9_]{8}\Z")


def run(args) -> int:
    models, fractions = validate(args)
    vgg_weights = resolve_vgg19_weights(args.vgg19_weights) if "vgg19" in models else None
    examples = find_examples(args.data_dir)
    for folder in other_folders(args.data_dir):
        print(f"warning: {folder}: not a NORMAL or PNEUMONIA folder (or train/val/test); nothing read from it",
              file=sys.stderr, flush=True)
    if args.limit_per_class:
        examples = limit_per_class(examples, args.limit_per_class, args.seed)
    config = preprocess_config(args)
    out = os.path.abspath(args.output_dir)
    made: list[str] = []
    tmp = ""
    try:
        made = make_folders(os.path.dirname(out))
        for name in remove_abandoned(os.path.dirname(out), killed_runs(out)):
            _log(f"removed {name}, left by a run killed while writing {out}")
        tmp = temp_dir_beside(out)
        lock = hold_lock(tmp)  # until published or removed: a run killed outright leaves it free (next run: above)
    except OSError as exc:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        remove_folders(made)
        raise UsageError(f"cannot write to {os.path.dirname(out)}: {exc.strerror}") from None
    try:
        with lock:
            _run_into(tmp, args, models, fractions, examples, config, vgg_weights)
            GATE.check()  # a signal TensorFlow swallowed: the run is not published
            with GATE.deferred():  # a signal now waits until RUN_DIR is in place (train/__main__.py says it came)
                publish_dir(tmp, out, replace=True)
                args.written = out
    except BaseException:
        remove_dir(tmp)  # its lock file last
        remove_folders(made)  # the parents this run made, where still empty: a refused run leaves nothing
        raise
    _log(f"run written to {out}")
    return 0


def _load_site(site_dir: str, config, modalities) -> tuple[list, np.ndarray, np.ndarray]:
    """The site sample: ROOT/{NORMAL,PNEUMONIA}/* -> (examples, images, labels). Never trained on."""
    examples = find_examples(site_dir)
    images, ok, failed = load_images([e.path for e in examples], config, modalities=modalities)
    for path, err in failed:
        _log(f"skipped site image {path}: {err}")
    examples = [examples[i] for i in ok]
    labels = labels_to_array(e.label for e in examples)
    if len(labels) == 0 or labels.min() == labels.max():
        raise DataError(f"the site sample {site_dir} needs decodable images of both classes")
    _log(f"site sample: {len(examples)} images ({int(labels.sum())} pneumonia) from {site_dir}")
    return examples, images, labels


def site_metrics(y_site, p_site, chosen: float, target_recall: float) -> dict:
    """The site sample at 0.5, at the validation-chosen threshold, and (optimistic) at its own threshold."""
    own = choose_threshold(y_site, p_site, target_recall)
    return {"site_roc_auc": operating_point(y_site, p_site, 0.5)["roc_auc"],
            "site_at_0.5": operating_point(y_site, p_site, 0.5),
            "site_at_chosen": operating_point(y_site, p_site, chosen),
            "site_at_site_threshold": operating_point(y_site, p_site, own)}


def _member_summary(member, history, data, site, target_recall) -> dict:
    """One ensemble member on its own: how much of the ensemble's result any single seed gives."""
    from train.fit import predict

    y_val, y_test = data["val"][1], data["test"][1]
    row = {"model": member.name, "seconds": float(sum(history["seconds"])),
           "val_roc_auc": operating_point(y_val, predict(member, data["val"][0]), 0.5)["roc_auc"],
           "test_roc_auc": operating_point(y_test, predict(member, data["test"][0]), 0.5)["roc_auc"]}
    if site is not None:
        p_site = predict(member, site[1])
        own = choose_threshold(site[2], p_site, target_recall)
        row["site_roc_auc"] = operating_point(site[2], p_site, 0.5)["roc_auc"]
        row["site_specificity_at_target_recall"] = operating_point(site[2], p_site, own)["specificity"]
    return row


def _write_site_predictions(path, examples, y, p) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "probability"])
        writer.writerows((e.path, e.label, f"{prob:.6f}") for e, prob in zip(examples, p))


def _plots(model_dir, name, m, y, p, images, prefix, seed) -> None:
    for point, thr in (("0.5", 0.5), ("chosen", m["chosen_threshold"])):
        confusion_matrix_png(y, p, thr, os.path.join(model_dir, f"{prefix}confusion_matrix_{point}.png"),
                             f"{name} {prefix.rstrip('_') or 'test'}, threshold {thr:.3f}")
    roc_curve_png(y, p, os.path.join(model_dir, f"{prefix}roc_curve.png"), name,
                  title=f"{name} {prefix.rstrip('_') or 'test'}")
    plots.sample_grid(images, y, p, m["chosen_threshold"], os.path.join(model_dir, f"{prefix}samples.png"), seed=seed)


def _train_and_report(name, args, data, site, run_dir, config, vgg_weights) -> tuple[dict, dict]:
    from train.fit import predict
    from train.trainers import train_one

    model_dir = os.path.join(run_dir, name)
    os.makedirs(model_dir)
    model, history, members, p = train_one(name, args, data, vgg_weights)
    m = evaluate(data["val"][1], p["val"], data["test"][1], p["test"], args.target_recall)
    m["model"] = name
    m["preprocessing"] = config.to_dict()
    if site is not None:
        p_site = predict(model, site[1], batch_size=64)
        m.update(site_metrics(site[2], p_site, m["chosen_threshold"], args.target_recall))
        _write_site_predictions(os.path.join(model_dir, "site_predictions.csv"), site[0], site[2], p_site)
        _plots(model_dir, name, m, site[2], p_site, site[1], "site_", args.seed)
    if members:
        m["members"] = [_member_summary(mem, h, data, site, args.target_recall)
                        for mem, h in zip(members, history["members"])]
    model.save(os.path.join(model_dir, "model.keras"))
    _write_json(os.path.join(model_dir, "history.json"), history)
    _write_json(os.path.join(model_dir, "metrics.json"), m)
    plots.training_curves(history, os.path.join(model_dir, "training_curves.png"))
    _plots(model_dir, name, m, data["test"][1], p["test"], data["test"][0], "", args.seed)
    t = m["test_at_chosen"]
    _log(f"[{name}] test: ROC AUC {t['roc_auc']:.4f}; at threshold {m['chosen_threshold']:.4f} "
         f"recall {t['recall']:.4f} specificity {t['specificity']:.4f}")
    if site is not None:
        sc = m["site_at_chosen"]
        _log(f"[{name}] site: ROC AUC {m['site_roc_auc']:.4f}; at threshold {m['chosen_threshold']:.4f} "
             f"recall {sc['recall']:.4f} specificity {sc['specificity']:.4f}; specificity at recall "
             f"{args.target_recall} on the site itself {m['site_at_site_threshold']['specificity']:.4f}")
    for row in m.get("members", []):
        _log(f"[{name}] member {row['model']}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if k not in ("model", "seconds")))
    return summary_row(name, m, history), m


def _run_into(run_dir, args, models, fractions, examples, config, vgg_weights) -> None:
    t0 = time.perf_counter()
    _log(f"found {len(examples)} images ({', '.join(f'{c} {sum(e.label == c for e in examples)}' for c in CLASSES)})")
    images, ok, failed = load_images([e.path for e in examples], config, modalities=args.modalities)
    for path, err in failed:
        _log(f"skipped {path}: {err}")
    examples = [examples[i] for i in ok]
    if not examples:
        out_of_scope = sum(err.startswith(OUT_OF_SCOPE) for _, err in failed)
        raise DataError(f"no image to train on: {len(failed) - out_of_scope} could not be decoded, {out_of_scope} are "
                        "out of scope (the lines above say why)")
    digests = [sha256_file(e.path) for e in examples]
    if args.site_dir:
        refuse_site_images(args.site_dir, args.data_dir, examples, digests)
    keep, conflicts = label_conflicts(examples, digests)
    for path, why in conflicts:
        _log(f"skipped {path}: {why}")
    failed = failed + conflicts
    examples, digests, images = [examples[i] for i in keep], [digests[i] for i in keep], images[keep]
    _log(f"decoded {len(examples)} images at {config.image_size}px in {time.perf_counter() - t0:.1f}s, "
         f"skipped {len(failed)}")
    check_patients_per_class(examples, bool(args.limit_per_class))
    splits = split_examples(examples, fractions, args.seed, digests)
    if getattr(args, "teacher", None):
        try:
            check_teacher_split(args.teacher, [e.path for e in examples], splits)
        except TeacherError as exc:
            raise UsageError(str(exc)) from None
    write_split_csv(os.path.join(run_dir, "split.csv"), examples, splits, digests)
    labels = labels_to_array(e.label for e in examples)
    data = _split_arrays(images, labels, splits)
    _check_splits(data)
    _log("split: " + ", ".join(f"{k} {len(y)} ({int(y.sum())} pneumonia)" for k, (_, y) in data.items()))
    site = _load_site(args.site_dir, config, args.modalities) if args.site_dir else None

    rows = [_train_and_report(name, args, data, site, run_dir, config, vgg_weights)[0] for name in models]
    best = max(rows, key=lambda r: r[args.select_by])["model"]
    comparison = {"best": best, "select_by": args.select_by, "models": rows,
                  "skipped_images": [{"path": p, "error": e} for p, e in failed]}
    _write_json(os.path.join(run_dir, "comparison.json"), comparison)
    with open(os.path.join(run_dir, "comparison.md"), "w") as f:
        f.write(comparison_markdown(rows, best, args.select_by, failed))
    _write_json(os.path.join(run_dir, "run.json"), {
        "command": "python -m train " + shlex.join(getattr(args, "argv", None) or sys.argv[1:]),  # pastes into a shell
        "args": {k: v for k, v in vars(args).items() if k != "written"},  # main()'s own, not an option
        "data_dir": os.path.abspath(args.data_dir),
        "modalities": list(args.modalities),  # the DICOM modalities read (export's reference and gate follow it)
        "site_dir": os.path.abspath(args.site_dir) if args.site_dir else None,
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
