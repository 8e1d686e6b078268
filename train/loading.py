"""The images of a training run (or of export's reference and gate fit) read as the batch job reads them, in parallel
worker processes that die with the process that started them."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Sequence

import numpy as np

from xray_core.dicom_header import DEFAULT_MODALITIES
from xray_core.preprocessing import ImageError, PreprocessConfig, read_model_input

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _load_one(args):
    path, config, modalities = args
    try:
        return read_model_input(path, config, modalities), None
    except ImageError as exc:
        return None, str(exc)


def die_with_parent(parent: int) -> None:
    """A decode worker's initializer: the kernel kills it when the process that started it dies (prctl
    PR_SET_PDEATHSIG; QA: a training or export killed outright, by SIGKILL or the out-of-memory killer, left its
    decode workers waiting for work for good). Linux only; elsewhere nothing happens."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (AttributeError, OSError):  # not Linux
        return
    if os.getppid() != parent:  # the parent died before the line above: nobody will send the signal
        os._exit(1)


def load_images(
    paths: Sequence[str], config: PreprocessConfig, workers: int | None = None,
    modalities: Sequence[str] = DEFAULT_MODALITIES,
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Read images as the batch job does with `--modalities` (read_model_input), in parallel -> (array (n_ok, S, S,
    1), ok indices, [(path, error)]): an error for each that cannot be decoded or that the job leaves out of scope."""
    workers = workers or os.cpu_count() or 1
    jobs = [(p, config, tuple(modalities)) for p in paths]
    if workers > 1 and len(paths) > 64:
        # spawn, not fork: the caller may already run TensorFlow's threads
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            results = list(pool.map(_load_one, jobs, chunksize=64))
    else:
        results = [_load_one(j) for j in jobs]
    ok = [i for i, (arr, _) in enumerate(results) if arr is not None]
    failed = [(paths[i], err) for i, (arr, err) in enumerate(results) if arr is None]
    size = config.image_size
    images = np.stack([results[i][0] for i in ok]) if ok else np.zeros((0, size, size, 1), np.float32)
    return images, ok, failed
