"""Training-time augmentation in the tf.data input pipeline (never in the saved graph).

The shift-robust recipe: a random resized crop (area 0.5-1, aspect 3/4-4/3) and per-image
gamma, contrast and brightness jitter; optionally a random black frame (a scan exported inside a border), the marks
real films carry (a collimator's band at one edge, a lead marker) and mixup. Batched tensors (B, S, S, 1) in [0, 1].
"""
from __future__ import annotations

import dataclasses
import math

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    crop_area: tuple[float, float] = (0.5, 1.0)
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.15  # added: U(-b, b)
    contrast: tuple[float, float] = (0.7, 1.3)  # around each image's mean
    gamma: tuple[float, float] = (0.7, 1.4)
    mixup_alpha: float = 0.0  # 0: no mixup
    frame_prob: float = 0.0  # share of images put inside a black frame (0: none)
    frame_max: float = 0.1  # each side's border: U(0, frame_max) of the side
    artefact_prob: float = 0.0  # share of images given an edge band, and (independently) a marker (0: none)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _uniform(shape, bounds, seed):
    return tf.random.uniform(shape, bounds[0], bounds[1], seed=seed)


def random_resized_crop(x: tf.Tensor, area, aspect, seed: int) -> tf.Tensor:
    """Each image: a random box of `area` of the image at `aspect` (w/h), resized back to S x S."""
    n = tf.shape(x)[0]
    size = tf.shape(x)[1:3]
    s = _uniform([n], area, seed)
    r = tf.exp(_uniform([n], (math.log(aspect[0]), math.log(aspect[1])), seed + 1))
    h = tf.minimum(tf.sqrt(s / r), 1.0)
    w = tf.minimum(tf.sqrt(s * r), 1.0)
    y0 = tf.random.uniform([n], seed=seed + 2) * (1.0 - h)
    x0 = tf.random.uniform([n], seed=seed + 3) * (1.0 - w)
    boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
    return tf.image.crop_and_resize(x, boxes, tf.range(n), size)


def random_frame(x: tf.Tensor, prob: float, max_border: float, seed: int) -> tf.Tensor:
    """Each image with probability `prob`: shrunk inside a black border (a scan padded by its export: a frame, or
    bands on two sides), resized back to S x S. Each side adds U(0, max_border) of the image's side before the
    resize, so a border is at most max_border / (1 + max_border) of the result (0.091 for 0.1). The photometric
    jitter after it turns the black a uniform grey at times, as exports do."""
    n = tf.shape(x)[0]
    framed = tf.cast(tf.random.uniform([n], seed=seed) < prob, tf.float32)
    t, left, b, r = (framed * _uniform([n], (0.0, max_border), seed + 1 + i) for i in range(4))
    boxes = tf.stack([-t, -left, 1.0 + b, 1.0 + r], axis=1)
    return tf.image.crop_and_resize(x, boxes, tf.range(n), tf.shape(x)[1:3], extrapolation_value=0.0)


BAND = (0.02, 0.15)  # an edge band's share of the side: a collimator's shadow, a scanner's edge
MARKER = (0.04, 0.08)  # a lead marker's side, as a share of the image's
BRIGHT, DARK = (0.85, 1.0), (0.0, 0.1)


def _per_image(n, bounds, seed: int) -> tf.Tensor:
    """(n, 1, 1, 1) uniform draws in bounds, one per image."""
    return tf.reshape(_uniform([n], bounds, seed), (-1, 1, 1, 1))


def random_artefacts(x: tf.Tensor, prob: float, seed: int) -> tf.Tensor:
    """Each image with probability `prob`: a constant band at one edge (top, bottom, left or right; BAND of the side;
    bright or dark, half each), and independently with probability `prob` a bright square (a lead marker; MARKER of
    the side) anywhere. Drawn on the cropped image, before the photometric jitter."""
    n, size = tf.shape(x)[0], tf.shape(x)[1]
    grid = (tf.cast(tf.range(size), tf.float32) + 0.5) / tf.cast(size, tf.float32)
    yy, xx = tf.reshape(grid, (1, -1, 1, 1)), tf.reshape(grid, (1, 1, -1, 1))
    banded = _per_image(n, (0.0, 1.0), seed) < prob
    width = _per_image(n, BAND, seed + 1)
    edge = tf.reshape(tf.random.uniform([n], 0, 4, tf.int32, seed=seed + 2), (-1, 1, 1, 1))
    band = tf.where(edge == 0, yy < width, tf.where(edge == 1, yy > 1 - width,
                                                   tf.where(edge == 2, xx < width, xx > 1 - width)))
    value = tf.where(_per_image(n, (0.0, 1.0), seed + 3) < 0.5, _per_image(n, BRIGHT, seed + 4),
                     _per_image(n, DARK, seed + 5))
    x = tf.where(banded & band, value, x)
    marked, side = _per_image(n, (0.0, 1.0), seed + 6) < prob, _per_image(n, MARKER, seed + 7)
    y0 = _per_image(n, (0.0, 1.0), seed + 8) * (1 - side)
    x0 = _per_image(n, (0.0, 1.0), seed + 9) * (1 - side)
    marker = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)
    return tf.where(marked & marker, _per_image(n, BRIGHT, seed + 10), x)


def photometric(x: tf.Tensor, cfg: AugmentConfig, seed: int) -> tf.Tensor:
    """Gamma, then contrast around each image's mean, then brightness; clipped to [0, 1]."""
    n = tf.shape(x)[0]
    gamma = tf.reshape(_uniform([n], cfg.gamma, seed), (-1, 1, 1, 1))
    x = tf.pow(tf.clip_by_value(x, 0.0, 1.0), gamma)
    contrast = tf.reshape(_uniform([n], cfg.contrast, seed + 1), (-1, 1, 1, 1))
    mean = tf.reduce_mean(x, axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast + mean
    x = x + tf.reshape(_uniform([n], (-cfg.brightness, cfg.brightness), seed + 2), (-1, 1, 1, 1))
    return tf.clip_by_value(x, 0.0, 1.0)


def mixup(x: tf.Tensor, y: tf.Tensor, alpha: float, seed: int):
    """Mix each example with another of the batch: lam ~ Beta(alpha, alpha)."""
    n = tf.shape(x)[0]
    a = tf.random.gamma([n], alpha, seed=seed)
    b = tf.random.gamma([n], alpha, seed=seed + 1)
    lam = a / (a + b)
    perm = tf.random.shuffle(tf.range(n), seed=seed + 2)
    x = tf.reshape(lam, (-1, 1, 1, 1)) * x + tf.reshape(1 - lam, (-1, 1, 1, 1)) * tf.gather(x, perm)
    y = lam * tf.cast(y, tf.float32) + (1 - lam) * tf.gather(tf.cast(y, tf.float32), perm)
    return x, y


def augment_batch(x: tf.Tensor, y: tf.Tensor, cfg: AugmentConfig, seed: int):
    x = random_resized_crop(x, cfg.crop_area, cfg.crop_aspect, seed)
    if cfg.frame_prob > 0:
        x = random_frame(x, cfg.frame_prob, cfg.frame_max, seed + 30)
    if cfg.artefact_prob > 0:
        x = random_artefacts(x, cfg.artefact_prob, seed + 40)
    x = photometric(x, cfg, seed + 10)
    if cfg.mixup_alpha > 0:
        x, y = mixup(x, y, cfg.mixup_alpha, seed + 20)
    return x, y
