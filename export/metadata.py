"""metadata.json of a published version: where it came from, its contract, checks and calibration."""
from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

from xray_core.labels import CLASSES
from xray_core.metrics import without_report
from xray_core.package import Metadata, expected_io
from xray_core.training_data import TrainingData


def library_versions() -> dict:
    import onnx
    import onnxruntime
    import tensorflow as tf
    import tf2onnx
    import tf_keras

    return {"python": platform.python_version(), "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
            "tf2onnx": tf2onnx.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def chosen_on(site_dir: str | None, site: dict | None) -> bool:
    """Whether the run's --site-dir, on which it may have picked its model, is the sample calibrated on: decided when
    a version is published (export, --recalibrate), so that its card is a function of its metadata."""
    return bool(site and site_dir and os.path.realpath(site_dir) == os.path.realpath(site["dir"]))


def build_metadata(*, name, version, arch, run_dir, metrics, run_info, parity_result, opset, sha256,
                   export_command, site=None, heat=None, hw=None, dim=None, ref=None,
                   gate=None, heatmap_method=None, comparison=None, train_split_sha256=None,
                   quality_floor=None) -> Metadata:
    config = metrics["preprocessing"]
    io = expected_io(int(config["image_size"]), hw, dim)
    return Metadata(
        name=name,
        version=version,
        architecture=arch,
        source={
            "run_dir": os.path.abspath(run_dir),
            "model_file": os.path.join(os.path.abspath(run_dir), arch, "model.keras"),
            "train_command": run_info.get("command"),
            "export_command": export_command,
            "seed": run_info.get("args", {}).get("seed"),
            "split": run_info.get("args", {}).get("split"),
            "split_counts": run_info.get("split_counts"),
            # how the run chose this model, and on what (the card says when that is the calibration sample too)
            "selected_by": (comparison or {}).get("select_by"),
            "candidates": [r.get("model") for r in (comparison or {}).get("models", [])],
            "site_dir": run_info.get("site_dir"),
            "selected_on_calibration_sample": chosen_on(run_info.get("site_dir"), site),  # the card reads it as is
            "limit_per_class": run_info.get("args", {}).get("limit_per_class"),
        },
        training_data=TrainingData.from_dict({"source": run_info.get("args", {}).get("data_source"),
                                             "data_dir": run_info.get("data_dir"),
                                             "modalities": run_info.get("modalities"),
                                             "train_split_sha256": train_split_sha256}).to_dict(),
        preprocessing=config,
        input=io["input"],
        output=io["output"],
        heatmap_output=io.get("heatmap_output"),
        heatmap=heat if hw else None,
        heatmap_method=heatmap_method,
        embedding_output=io.get("embedding_output"),
        reference=ref if dim else None,
        gate=gate,
        class_names=list(CLASSES),
        decision_threshold=site["threshold"] if site else metrics["chosen_threshold"],
        threshold_source="site calibration sample" if site else "internal validation split",
        validation_threshold=metrics["chosen_threshold"],
        target_recall=site["target_recall"] if site else metrics["target_recall"],
        val_roc_auc=metrics["val_roc_auc"],
        test_metrics={"at_0.5": without_report(metrics["test_at_0.5"]),
                      "at_chosen": without_report(metrics["test_at_chosen"])},
        site_calibration=site,
        quality_floor=quality_floor,
        parity=parity_result,
        versions=library_versions(),
        opset=opset,
        sha256=sha256,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
