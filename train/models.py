"""The study's three models and the shift-robust recipe, built with tf-keras (Keras 2 API), which tf2onnx converts.

Every model takes (N, S, S, 1) float32 in [0, 1] and returns (N, 1) P(pneumonia).
No Lambda layers: saved models load without pickled code.
"""
from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tf_keras as keras  # noqa: E402

MODEL_NAMES = ("baseline_cnn", "augmented_cnn", "vgg19", "resnet_aug")
VGG19_WEIGHTS_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG19_WEIGHTS_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg19/" + VGG19_WEIGHTS_FILE
)
# VGG's "caffe" preprocessing on [0, 255] BGR input; channels are equal for grayscale.
_VGG_MEAN_BGR = (103.939, 116.779, 123.68)


class WeightsError(ValueError):
    """VGG19 weights cannot be found; the message is one line for the user."""


def build_cnn(
    image_size: int,
    filters: tuple[int, ...] = (32, 64, 128),
    dense: int = 128,
    dropout: float = 0.5,
    name: str = "baseline_cnn",
) -> keras.Model:
    """The study's CNN: conv/relu/max-pool blocks, flatten, a dense layer, dropout, one sigmoid unit."""
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = inputs
    for i, n in enumerate(filters):
        x = keras.layers.Conv2D(n, 3, padding="same", activation="relu", name=f"conv{i}")(x)
        x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


def _conv_bn(x, filters: int, stride: int, name: str, relu: bool = True, kernel: int = 3):
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.Activation("relu", name=f"{name}_relu")(x) if relu else x


def _residual_block(x, filters: int, stride: int, name: str, kernel: int = 3):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = keras.layers.BatchNormalization(name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn(x, filters, stride, f"{name}_a", kernel=kernel)
    y = _conv_bn(y, filters, 1, f"{name}_b", relu=False, kernel=kernel)
    y = keras.layers.Add(name=f"{name}_add")([shortcut, y])
    return keras.layers.Activation("relu", name=f"{name}_out")(y)


POOLS = ("avg", "softmax")
# softmax pooling's inverse temperature on the logit map: 0 would be the plain mean, large values the max.
SOFTMAX_POOL_SCALE = 1.0


def build_resnet(
    image_size: int,
    stem: int = 32,
    stages: tuple[int, ...] = (32, 64, 128, 256),
    dropout: float = 0.3,
    name: str = "resnet_aug",
    last_stride: int = 2,
    pool: str = "avg",
    pointwise_stages: int = 0,
) -> keras.Model:
    """A small ResNet: a stride-2 stem, one residual block per stage (stride 2 from the second; the last
    stage's stride is `last_stride`: 1 doubles the heatmap's resolution), batch norm, then a head over the last
    block (layer `last_block`) whose heatmap is exact:
    - pool "avg", the class-activation-map head: global average pooling (`gap`), dropout, one linear unit
      `logit`, a sigmoid `probability`; the map is the features weighted by `logit`'s weights.
    The last `pointwise_stages` stages use 1x1 convolutions (as BagNet does): the receptive field stops growing,
    so each cell of the map sees only a patch of the image and the map is where the evidence lies in the input.
    - pool "softmax", the logit-map head: dropout, a 1x1 convolution to one logit per cell (`logit_map`, the
      heatmap itself), pooled by a softmax-weighted mean (weights softmax(SOFTMAX_POOL_SCALE * map)) into
      `logit`, then `probability`. The decision rests on the image's own hottest cells, so blanking them
      lowers the score; the average pool lets evidence spread over every cell alike.
    """
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, not {pool!r}")
    inputs = keras.Input((image_size, image_size, 1), name="image")
    x = _conv_bn(inputs, stem, 2, "stem")
    for i, filters in enumerate(stages):
        stride = 1 if i == 0 else (last_stride if i == len(stages) - 1 else 2)
        kernel = 1 if i >= len(stages) - pointwise_stages else 3
        x = _residual_block(x, filters, stride, f"stage{i}", kernel=kernel)
    x = keras.layers.Activation("linear", name="last_block")(x)
    if pool == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
        x = keras.layers.Dense(1, name="logit")(x)
    else:
        h, w = int(x.shape[1]), int(x.shape[2])
        x = keras.layers.Dropout(dropout, name="dropout")(x)
        cells = keras.layers.Conv2D(1, 1, name="logit_map")(x)
        cells = keras.layers.Reshape((h * w,), name="cells")(cells)
        weights = keras.layers.Softmax(name="cell_weights")(
            keras.layers.Rescaling(SOFTMAX_POOL_SCALE, name="cell_scale")(cells))
        x = keras.layers.Dot(axes=1, name="logit")([weights, cells])
    outputs = keras.layers.Activation("sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name=name)


def ensemble(members: list[keras.Model], name: str) -> keras.Model:
    """One graph that averages its members' probabilities (a single member is returned as is)."""
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(members[0].input_shape[1:], name="image")
    outputs = keras.layers.Average(name="probability")([m(inputs) for m in members])
    return keras.Model(inputs, outputs, name=name)


def resolve_vgg19_weights(weights: str) -> str | None:
    """'imagenet' -> the cached file (never a download), 'none' -> None, else a path."""
    if weights.lower() == "none":
        return None
    if weights.lower() == "imagenet":
        cache = os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "models")
        path = os.path.join(cache, VGG19_WEIGHTS_FILE)
        if not os.path.isfile(path):
            raise WeightsError(
                f"VGG19 ImageNet weights not found at {path}: download {VGG19_WEIGHTS_URL} there, "
                "pass --vgg19-weights PATH, or pass --vgg19-weights none"
            )
        return path
    if not os.path.isfile(weights):
        raise WeightsError(f"VGG19 weights file not found: {weights}")
    return weights


def vgg19_parts(image_size: int, weights: str | None, head_units=(512, 256, 128, 64), dropout=0.3):
    """-> (full model, frozen feature extractor, head).

    The full model is feature_extractor followed by head, so the head can be trained
    on features computed once per image and the full model saved afterwards.
    """
    inputs = keras.Input((image_size, image_size, 1), name="image")
    rgb = keras.layers.Concatenate(name="gray_to_rgb")([inputs, inputs, inputs])
    # [0, 1] gray -> VGG's input: x * 255 - mean (BGR order; channels are equal).
    x = keras.layers.Rescaling(255.0, offset=[-m for m in _VGG_MEAN_BGR], name="vgg_preprocess")(rgb)
    base = keras.applications.VGG19(
        include_top=False, weights=weights, input_shape=(image_size, image_size, 3)
    )
    base.trainable = False
    features = base(x, training=False)
    extractor = keras.Model(inputs, features, name="vgg19_features")

    head_in = keras.Input(features.shape[1:], name="features")
    h = keras.layers.Flatten(name="flatten")(head_in)
    for i, units in enumerate(head_units):
        h = keras.layers.Dense(units, activation="relu", name=f"dense{i}")(h)
        h = keras.layers.Dropout(dropout, name=f"dropout{i}")(h)
    out = keras.layers.Dense(1, activation="sigmoid", name="probability")(h)
    head = keras.Model(head_in, out, name="vgg19_head")

    full = keras.Model(inputs, head(extractor(inputs)), name="vgg19")
    return full, extractor, head


def load_model(path: str) -> keras.Model:
    """Load a saved .keras model (safe mode: no pickled code)."""
    return keras.models.load_model(path, compile=False, safe_mode=True)
