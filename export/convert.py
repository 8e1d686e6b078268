"""Convert a trained tf-keras model to ONNX, prove parity, and publish atomically."""
from __future__ import annotations

import os
import time

import numpy as np

from export.gate_fit import GateFitError, UnreadableTrainingSplit, split_digest, training_paths, write_gate
from export.heatmap import PARITY_RELATIVE, embedding_dim, heatmap_checks, heatmap_hw, with_heatmap
from export.metadata import build_metadata
from export.publish_floor import checked
from export.republish import publish_version, write_description
from export.run_dir import ExportInputError, changed_since_training, read_run
from train.data import read_split_csv
from train.loading import load_images
from xray_core import reference
from xray_core.dicom_header import DEFAULT_MODALITIES
from xray_core.errors import one_line
from xray_core.files import sha256_file
from xray_core.interrupts import GATE
from xray_core.occlusion import OCCLUSION, HeatmapMethod
from xray_core.package import (
    EMBEDDING_NAME,
    HEATMAP_NAME,
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAME,
    PackageError,
    new_version_dir,
    open_session,
    score,
)
from xray_core.preprocessing import ImageError, PreprocessConfig, read_model_input
from xray_core.quality_floor import measured
from xray_core.staging import discard_staging, refuse_live_staging, staging_dir

PARITY_TOLERANCE = 1e-5
# What the batch job shows for the top-N flagged images: 8x8 occlusion maps. On the site sample's flagged images,
# for version 5's network, they beat the average map for 82% (4x4: 64%, at a quarter of the passes); its
# class-activation map for 37%.
DEFAULT_HEATMAP_METHOD = HeatmapMethod(OCCLUSION, 8, "image mean")
MIN_PARITY_IMAGES = 64


class ParityError(RuntimeError):
    """ONNX and Keras disagree (exit 1)."""


def load_keras(path: str):
    if not os.path.isfile(path):
        raise ExportInputError(f"model file not found: {path}")
    from train import tf_start

    tf_start.start()  # TensorFlow's start-up lines dropped: a refusal after it loads is still one line
    from train.models import load_model

    try:
        return load_model(path)
    except Exception as exc:  # noqa: BLE001 - any load failure means a bad model file
        raise ExportInputError(f"cannot load {path}: {one_line(exc, 150)}") from None


def to_onnx(keras_model, image_size: int, opset: int, path: str) -> None:
    """tf2onnx.from_keras with a dynamic batch; input `image`; outputs renamed, in order, `probability`,
    `heatmap` and `embedding` (as many as the model has)."""
    import tensorflow as tf
    import tf2onnx

    spec = [tf.TensorSpec((None, image_size, image_size, 1), tf.float32, name=INPUT_NAME)]
    model_proto, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=opset)
    rename = dict(zip([o.name for o in model_proto.graph.output], (OUTPUT_NAME, HEATMAP_NAME, EMBEDDING_NAME)))
    for node in model_proto.graph.node:
        node.output[:] = [rename.get(o, o) for o in node.output]
        node.input[:] = [rename.get(i, i) for i in node.input]
    for output in model_proto.graph.output:
        output.name = rename[output.name]
        output.type.tensor_type.shape.dim[0].dim_param = "N"
    model_proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    with open(path, "wb") as f:
        f.write(model_proto.SerializeToString())


def parity_images(run_dir: str, config: PreprocessConfig, n: int = MIN_PARITY_IMAGES,
                  modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> tuple[np.ndarray, int]:
    """>= n images from the run's test split (then val, then train if test is small), plus all-zeros and all-ones.

    ExportInputError (exit 2: an incomplete run, not a disagreement) when the split lists no image, or fewer than
    min(n, images in the split) can be read (e.g. the data moved).
    """
    rows = read_split_csv(os.path.join(run_dir, "split.csv"))
    order = {"test": 0, "val": 1, "train": 2}
    rows.sort(key=lambda r: order[r[1]])
    images = []
    for ex, _split in rows:
        if len(images) >= n:
            break
        try:
            images.append(read_model_input(ex.path, config, modalities))
        except ImageError:
            continue
    if not images or len(images) < min(n, len(rows)):
        raise ExportInputError(f"parity needs {max(1, min(n, len(rows)))} images of the run's split "
                               f"({len(rows)} listed in split.csv) but only {len(images)} could be read (moved data? "
                               "an incomplete run?); nothing published")
    size = config.image_size
    edges = [np.zeros((size, size, 1), np.float32), np.ones((size, size, 1), np.float32)]
    return np.stack(images + edges), len(images)


def parity(keras_model, session, x: np.ndarray, threshold: float) -> dict:
    p_keras = keras_model.predict(x, batch_size=64, verbose=0).reshape(-1)
    p_onnx = score(session, x).probability
    diff = np.abs(p_keras.astype(np.float64) - p_onnx.astype(np.float64))
    return {
        "images": int(len(x)),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "decisions_equal": bool(np.array_equal(p_keras >= threshold, p_onnx >= threshold)),
        "tolerance": PARITY_TOLERANCE,
    }


def build_reference(run_dir: str, config: PreprocessConfig, export_model, session, x: np.ndarray, staging: str,
                    modalities: tuple[str, ...],
                    log=print) -> dict:
    """reference.npz (the validation split's probabilities and embeddings) and splits.csv in `staging`, after
    checking the ONNX embedding against Keras on the parity images x; -> metadata.json's `reference`."""
    keras_emb = export_model.predict(x, batch_size=64, verbose=0)[2]
    onnx_emb = score(session, x, embedding=True).embedding
    diff = float(np.abs(keras_emb.astype(np.float64) - onnx_emb).max())
    span = float(keras_emb.max() - keras_emb.min())
    if diff > PARITY_RELATIVE * max(span, 1e-6):  # the heatmap's rule: 1e-4 of the range
        raise ParityError(f"embedding parity failed: max |Δ| {diff:.3e} > {PARITY_RELATIVE:g} of its range "
                          f"{span:.3e}; nothing published")
    rows = read_split_csv(os.path.join(run_dir, "split.csv"))
    val = [ex.path for ex, split in rows if split == "val"]
    images, ok, _failed = load_images(val, config, modalities=modalities)
    if not ok:
        raise ExportInputError("no image of the run's validation split could be read (moved data?); nothing published")
    ref = reference.compute(session, images)
    path = os.path.join(staging, reference.REFERENCE_FILE)
    reference.write(path, ref)
    counts = reference.write_splits(os.path.join(staging, reference.SPLITS_FILE),
                                    [(ex.path, split) for ex, split in rows],
                                    reference.training_folder([ex.path for ex, _ in rows]))
    log(f"drift reference: {len(ok)} validation images ({len(val) - len(ok)} unreadable), embeddings "
        f"{ref.embeddings.shape}, embedding parity max |Δ| {diff:.2e}; {reference.SPLITS_FILE}: "
        f"{counts['val']} val, {counts['test']} test")
    return {**reference.summary(path, ref, counts, len(val) - len(ok)), "embedding_parity_max_abs_diff": diff}


def training_digest(data_dir: str | None, staging: str, verified: dict[str, str]) -> str | None:
    """The training split's digest as `--add-gate --training-dir` will compute it from the folder (gate_fit
    split_digest), recorded in training_data, from the contents changed_since_training verified (the rest read);
    None where the folder cannot be listed."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    try:
        return split_digest(training_paths(data_dir, os.path.join(staging, reference.SPLITS_FILE)), data_dir,
                            verified)
    except GateFitError:
        return None


def fit_gate(run_dir: str, staging: str, session, config: PreprocessConfig, modalities: tuple[str, ...],
             log=print) -> dict | None:
    """The input gate fitted on the run's training split (export/gate_fit.py); None, said, when it cannot be."""
    rows = read_split_csv(os.path.join(run_dir, "split.csv"))
    train = [ex.path for ex, split in rows if split == "train"]
    try:
        return write_gate(staging, session, train, config, len(train), log, modalities,
                          [ex.path for ex, split in rows if split == "val"])
    except UnreadableTrainingSplit as exc:
        raise ExportInputError(f"input gate: {exc}; nothing published") from None
    except GateFitError as exc:  # too few rows for a covariance: the package goes without a content check, said
        log(f"warning: no input gate ({exc}): the batch job will score photographs and other non-X-rays with this "
            "version like X-rays")
        return None


def export(run_dir: str, serving_dir: str, name: str, model: str = "best", version: int | None = None,
           opset: int = 17, export_command: str = "", calibrate_dir: str | None = None,
           target_recall: float | None = None, heatmap_method: HeatmapMethod = DEFAULT_HEATMAP_METHOD,
           log=print, modalities: tuple[str, ...] = DEFAULT_MODALITIES, publish_below_floor: bool = False) -> str:
    """Convert, [calibrate,] check the quality floor and parity, publish serving_dir/name/version atomically; returns
    the version dir. BelowQualityFloor (export/publish_floor.py) for a model below the floor, unless
    publish_below_floor."""
    from export.calibrate import MIN_PER_CLASS, CalibrationError, calibrate, list_labelled, refuse_training_folder

    arch, metrics, comparison, run_info = read_run(run_dir, model)
    if model not in ("best", comparison.get("best")):  # named by the user, not the one the run's --select-by picked
        comparison = dict(comparison, select_by="named by --model")
    target_recall = metrics["target_recall"] if target_recall is None else target_recall
    if calibrate_dir is not None:
        try:
            list_labelled(calibrate_dir, MIN_PER_CLASS)  # refuse a bad folder before any work
            refuse_training_folder(calibrate_dir, run_info.get("data_dir"))
        except CalibrationError as exc:
            raise ExportInputError(str(exc)) from None
    else:  # judged on the internal test split before any work (with a sample: once it is scored, below)
        estimate = measured(None, {"at_chosen": metrics["test_at_chosen"]}, metrics.get("site_at_chosen"))
        if estimate is None:  # review: a test_at_chosen without figures skipped the floor
            raise ExportInputError(f"{run_dir}/{arch}/metrics.json records no ROC AUC and recall at the validation "
                                   "threshold (test_at_chosen): the quality floor cannot be judged; nothing published")
        floor = checked(estimate, publish_below_floor, log)
    try:
        final = new_version_dir(serving_dir, name, version)
        refuse_live_staging(final)  # before TensorFlow loads the model (staging_dir checks again)
    except PackageError as exc:
        raise ExportInputError(str(exc)) from None
    verified = changed_since_training(run_dir, run_info, comparison, log)  # path -> sha256, read once
    version = int(os.path.basename(final))
    keras_model = load_keras(os.path.join(run_dir, arch, "model.keras"))
    export_model = with_heatmap(keras_model) or keras_model  # a `heatmap` output where the head allows one
    hw, dim = heatmap_hw(export_model), embedding_dim(export_model)
    if hw is None:
        log(f"{arch} has no class-activation-map head: exporting `probability` only, no heatmaps, no drift reference")
    staging = ""
    try:
        try:
            with GATE.held():  # a signal as the folder is made: raised once `staging` names it for the cleanup
                staging = staging_dir(final, serving_dir)
        except PackageError as exc:
            raise ExportInputError(str(exc)) from None
        config = PreprocessConfig.from_dict(metrics["preprocessing"])
        onnx_path = os.path.join(staging, MODEL_FILE)
        t0 = time.perf_counter()
        try:
            to_onnx(export_model, config.image_size, opset, onnx_path)
        except ValueError as exc:  # tf2onnx: an opset it cannot convert to
            raise ExportInputError(f"conversion to ONNX opset {opset} failed: {one_line(exc, 200)}") from None
        seconds = time.perf_counter() - t0
        log(f"converted {arch} to ONNX opset {opset} in {seconds:.1f}s ({os.path.getsize(onnx_path) / 1e6:.2f} MB)")
        session = open_session(onnx_path)  # one session for calibration, parity and the heatmap checks
        site = site_images = None
        if calibrate_dir is not None:
            try:
                site, site_images = calibrate(session, calibrate_dir, config, metrics["chosen_threshold"],
                                              target_recall, log=log, min_per_class=MIN_PER_CLASS,
                                              modalities=modalities)
            except CalibrationError as exc:
                raise ExportInputError(f"{exc}; nothing published") from None
            floor = checked(measured(site, None), publish_below_floor, log)
        threshold = site["threshold"] if site else metrics["chosen_threshold"]
        trained = tuple(run_info.get("modalities") or DEFAULT_MODALITIES)  # the DICOM the run read (train --modalities)
        x, n_images = parity_images(run_dir, config, modalities=trained)
        result = parity(keras_model, session, x, threshold)
        result.update(split_images=n_images, edge_inputs=2, conversion_seconds=round(seconds, 2))
        log(f"parity on {n_images} split images + zeros + ones: max |Δp| {result['max_abs_diff']:.2e}, "
            f"decisions equal: {result['decisions_equal']}")
        if result["max_abs_diff"] > PARITY_TOLERANCE or not result["decisions_equal"]:
            raise ParityError(f"parity failed: max |Δp| {result['max_abs_diff']:.3e} (limit {PARITY_TOLERANCE:g}), "
                              f"decisions equal: {result['decisions_equal']}; nothing published")
        heat = None
        if hw is not None:
            faith_images, source = (site_images, "site calibration") if site else (x[:n_images], "test split")
            heat = heatmap_checks(keras_model, session, x, threshold, faith_images, source, heatmap_method, log=log)
            if not heat["parity"]["passed"]:
                raise ParityError(f"heatmap parity failed: max |Δ| {heat['parity']['max_abs_diff']:.3e} > "
                                  f"{heat['parity']['tolerance']:.3e}; nothing published")
        ref = build_reference(run_dir, config, export_model, session, x, staging, trained, log) if dim else None
        gate_spec = fit_gate(run_dir, staging, session, config, trained, log) if dim else None
        meta = build_metadata(name=name, version=version, arch=arch, run_dir=run_dir, metrics=metrics,
                              run_info=run_info, parity_result=result, opset=opset,
                              sha256=sha256_file(onnx_path), export_command=export_command, site=site, heat=heat, hw=hw,
                              dim=dim, ref=ref, gate=gate_spec,
                              heatmap_method=heatmap_method.to_dict() if hw else None, comparison=comparison,
                              quality_floor=floor,
                              train_split_sha256=(training_digest(run_info.get("data_dir"), staging, verified)
                                                  if ref else None))
        write_description(staging, meta)
        try:  # atomic publish: the version appears complete or not at all
            publish_version(staging, final)
        except OSError:
            raise ExportInputError(f"{final} appeared while exporting; versions are never overwritten") from None
    except BaseException:
        if staging:
            discard_staging(staging)
        raise
    log(f"published {final}")
    return final
