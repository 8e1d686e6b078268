"""TensorFlow loaded, and its devices looked for, once and quietly: train and export call start() before any
module that imports TensorFlow, so that its start-up lines (xray_core/native_stderr.py) stay off their stderr."""
from __future__ import annotations

import os

from xray_core.native_stderr import dropped

# What TensorFlow 2.21 prints as it loads on a machine without a GPU, whatever TF_CPP_MIN_LOG_LEVEL says (absl's
# log lines start with the level, the date and the thread id): nothing else is dropped, a fatal error ("F...")
# or any other line still shows.
START_UP_LINES = (r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"
                  r"|^[IWE]\d{4} [\d:.]+ +\d+ "
                  r"(port|cudart_stub|cuda_platform|cuda_executor|cpu_feature_guard)\.cc:\d+\] "
                  r"|^To enable the following instructions: .* in other operations, rebuild TensorFlow")


def start() -> None:
    """Load TensorFlow (tf-keras as Keras) and look for its devices, dropping the start-up lines it prints."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with dropped(START_UP_LINES):
        import tensorflow as tf
        import tf_keras  # noqa: F401 - loaded here too: the Keras the models are built with

        tf.config.list_physical_devices()
