"""Training loops: tf.data input pipelines, class weights, early stopping, epoch log."""
from __future__ import annotations

import time

import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from train.augment import AugmentConfig, augment_batch
from train.models import keras
from xray_core.interrupts import GATE


def class_weights(y: np.ndarray) -> dict[int, float]:
    classes = np.unique(y.astype(int))
    weights = compute_class_weight("balanced", classes=classes, y=y.astype(int))
    return {int(c): float(w) for c, w in zip(classes, weights)}


def sample_weights(labels: np.ndarray) -> np.ndarray:
    """Each image's class weight (class_weights of its 0/1 label), float32: for soft (distilled) labels, whose
    class Keras's class_weight would pick by rounding the soft label."""
    by_class = class_weights(labels)
    return np.asarray([by_class[int(c)] for c in labels], np.float32)


def make_dataset(x, y, batch_size: int, shuffle: bool, seed: int, augment: AugmentConfig | None = None,
                 weights: np.ndarray | None = None):
    """Batches of (x, y), or (x, y, sample weight) with `weights` (one per image)."""
    ds = tf.data.Dataset.from_tensor_slices((x, y) if weights is None else (x, y, weights)).cache()
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if augment is not None:
        ds = ds.map(lambda xb, yb, *wb: (*augment_batch(xb, yb, augment, seed), *wb),
                    num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


class StopOnSignal(keras.callbacks.Callback):
    """After each batch: a Ctrl-C or SIGTERM that TensorFlow's C code swallowed is raised again
    (xray_core.interrupts)."""

    def on_train_batch_end(self, batch, logs=None):
        GATE.check()


class EpochLog(keras.callbacks.Callback):
    """One console line per epoch: loss, val loss, val AUC, seconds."""

    def __init__(self, name: str, epochs: int, log=print):
        super().__init__()
        self.name, self.epochs, self.log = name, epochs, log
        self.seconds: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.seconds.append(time.perf_counter() - self._t0)
        self.log(
            f"[{self.name}] epoch {epoch + 1}/{self.epochs}  loss {logs.get('loss', float('nan')):.4f}  "
            f"val_loss {logs.get('val_loss', float('nan')):.4f}  val_auc {logs.get('val_auc', float('nan')):.4f}  "
            f"{self.seconds[-1]:.1f}s"
        )


def fit(
    model: keras.Model,
    train_xy: tuple[np.ndarray, np.ndarray],
    val_xy: tuple[np.ndarray, np.ndarray],
    *,
    name: str,
    epochs: int,
    patience: int,
    seed: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    augment: AugmentConfig | None = None,
    label_smoothing: float = 0.0,
    cosine: bool = False,
    class_labels: np.ndarray | None = None,
    log=print,
) -> dict:
    """Adam + BCE + class weights, then one of two schedules:

    - constant learning rate with early stopping on val loss (best weights restored): the study's;
    - `cosine`: the learning rate decays to 0 over `epochs` and the last epoch's weights are kept
      (the internal validation split cannot tell shift-robust weights from the rest).

    Class weights come from `class_labels` (the folder labels) when the training labels are soft (distillation).
    Returns the history dict (per-epoch lists) with `seconds` and `best_epoch` added.
    """
    keras.utils.set_random_seed(seed)
    steps = int(np.ceil(len(train_xy[0]) / batch_size))
    lr = keras.optimizers.schedules.CosineDecay(learning_rate, epochs * steps) if cosine else learning_rate
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing),
        metrics=[keras.metrics.AUC(name="auc")],
    )
    # soft (distilled) labels: per-image weights from their folder labels; hard labels: Keras's class_weight below
    weights = None if class_labels is None else sample_weights(class_labels)
    train_ds = make_dataset(*train_xy, batch_size, True, seed, augment, weights)
    val_ds = make_dataset(*val_xy, batch_size, False, seed)
    epoch_log = EpochLog(name, epochs, log)
    callbacks = [epoch_log, StopOnSignal()]
    if not cosine:
        stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
        callbacks.insert(0, stop)
    hist = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=epochs,
        class_weight=class_weights(train_xy[1]) if class_labels is None else None,
        callbacks=callbacks,
        verbose=0,
    )
    history = {k: [float(v) for v in vals] for k, vals in hist.history.items()}
    history["seconds"] = epoch_log.seconds
    history["best_epoch"] = len(history["loss"]) if cosine else int(stop.best_epoch) + 1
    return history


def predict(model: keras.Model, x: np.ndarray, batch_size: int = 128) -> np.ndarray:
    return model.predict(x, batch_size=batch_size, verbose=0).reshape(-1).astype(np.float64)
