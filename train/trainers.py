"""Train one named model on the split arrays -> (keras model, history, ensemble members, val/test predictions)."""
from __future__ import annotations

import time

import numpy as np

from train import fit
from train.augment import AugmentConfig
from train.distill import soft_labels, teacher_probabilities
from train.models import build_cnn, build_resnet, ensemble, keras, vgg19_parts
from train.validate import preprocess_config

# The shift-robust recipe (train/EXPERIMENTS.md): augmentation, label smoothing, cosine decay.
RECIPE_LABEL_SMOOTHING = 0.05


def _log(msg: str) -> None:
    print(msg, flush=True)


def recipe_augment(args) -> AugmentConfig | None:
    if args.augment == "none":
        return None
    return AugmentConfig(crop_area=(args.crop_min_area, 1.0), mixup_alpha=args.mixup, frame_prob=args.frame_prob,
                         frame_max=args.frame_max, artefact_prob=args.artefact_prob, gamma=tuple(args.gamma_range))


def _common(name, args, seed):
    return dict(name=name, epochs=args.epochs, patience=args.patience, seed=seed,
                batch_size=args.batch_size, learning_rate=args.learning_rate)


def train_resnet(name, args, data):
    """`args.ensemble` members with seeds seed, seed+1, ...; one averaged graph.

    history holds the members' histories under `members`; member models are returned too,
    so each can be evaluated on its own (spread over seeds)."""
    members, histories = [], []
    train_xy, class_labels = data["train"], None
    if getattr(args, "teacher", None):
        train_xy, class_labels = distilled(args, data["train"]), data["train"][1]
    for i in range(args.ensemble):
        seed = args.seed + i
        keras.utils.set_random_seed(seed)
        member_name = name if args.ensemble == 1 else f"{name}_m{i}"
        member = build_resnet(args.image_size, name=member_name, last_stride=args.last_stride,
                              pool=args.pool, pointwise_stages=args.pointwise_stages)
        histories.append(fit.fit(member, train_xy, data["val"], augment=recipe_augment(args),
                                 label_smoothing=RECIPE_LABEL_SMOOTHING, cosine=True, class_labels=class_labels,
                                 **_common(member_name, args, seed)))
        members.append(member)
    model = ensemble(members, name)
    history = histories[0] if args.ensemble == 1 else _merge_histories(histories)
    return model, history, members if args.ensemble > 1 else [], _predict_splits(model, data)


def distilled(args, train_xy):
    """The training split with the teacher package's probabilities mixed into its labels (train/distill.py)."""
    x, y = train_xy
    t0 = time.perf_counter()
    teacher = teacher_probabilities(args.teacher, x, preprocess_config(args))
    _log(f"[teacher] {args.teacher}: {len(x)} training images scored in {time.perf_counter() - t0:.1f}s; "
         f"mean |teacher - label| {np.abs(teacher - y).mean():.3f}; weight {args.teacher_weight}")
    return x, soft_labels(y, teacher, args.teacher_weight)


def _predict_splits(model, data) -> dict:
    return {split: fit.predict(model, data[split][0]) for split in ("val", "test")}


def _merge_histories(histories: list[dict]) -> dict:
    """Per-epoch curves of the first member (for the plot), all members' seconds, and each member's history."""
    merged = {k: v for k, v in histories[0].items() if isinstance(v, list)}
    merged["seconds"] = [s for h in histories for s in h["seconds"]]
    merged["best_epoch"] = histories[0]["best_epoch"]
    merged["members"] = histories
    return merged


def train_one(name, args, data, vgg_weights):
    """-> (full keras model, history, ensemble members ([] if one), {"val": p, "test": p})."""
    keras.utils.set_random_seed(args.seed)
    if name == "resnet_aug":
        return train_resnet(name, args, data)
    if name in ("baseline_cnn", "augmented_cnn"):
        model = build_cnn(args.image_size, name=name)
        augment = AugmentConfig() if name == "augmented_cnn" else None
        history = fit.fit(model, data["train"], data["val"], augment=augment, **_common(name, args, args.seed))
        return model, history, [], _predict_splits(model, data)
    # vgg19: the base is frozen, so compute its features once and train only the head on them.
    model, extractor, head = vgg19_parts(args.image_size, vgg_weights)
    t0 = time.perf_counter()
    feats = {k: extractor.predict(x, batch_size=64, verbose=0) for k, (x, _) in data.items()}
    _log(f"[vgg19] cached frozen-base features for {sum(len(f) for f in feats.values())} images "
         f"in {time.perf_counter() - t0:.1f}s")
    history = fit.fit(head, (feats["train"], data["train"][1]), (feats["val"], data["val"][1]),
                      **_common(name, args, args.seed))
    history["feature_seconds"] = time.perf_counter() - t0 - sum(history["seconds"])
    return model, history, [], {split: fit.predict(head, feats[split]) for split in ("val", "test")}
