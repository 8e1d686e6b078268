"""TensorFlow loaded, and its devices looked for, once and quietly: train and export call start() before any
module that imports TensorFlow, so that its start-up lines (xray_core/native_stderr.py) stay off their stderr."""
from __future__ import annotations

import os

from xray_core.native_stderr import held_back


def start() -> None:
    """Load TensorFlow (tf-keras as Keras) and look for its devices, holding back the lines it prints on the way."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with held_back():
        import tensorflow as tf
        import tf_keras  # noqa: F401 - loaded here too: the Keras the models are built with

        tf.config.list_physical_devices()
