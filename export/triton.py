"""config.pbtxt for Triton's onnxruntime backend: one config for every version of a model name."""
from __future__ import annotations

from xray_core.package import EMBEDDING_NAME, HEATMAP_NAME, INPUT_NAME, MAX_BATCH_SIZE, OUTPUT_NAME


def triton_config(name: str, image_size: int, max_batch_size: int = MAX_BATCH_SIZE,
                  heatmap: tuple[int, int] | None = None, embedding: int | None = None) -> str:
    """config.pbtxt for Triton's onnxruntime backend (dims exclude the batch dimension).

    One config serves every version of a name, and versions differ in input size and outputs, so Triton
    loads only the newest version (`version_policy`), the one this config describes."""
    heat = (f',\n  {{ name: "{HEATMAP_NAME}" data_type: TYPE_FP32 dims: [ {heatmap[0]}, {heatmap[1]} ] }}'
            if heatmap else "")
    if embedding:
        heat += f',\n  {{ name: "{EMBEDDING_NAME}" data_type: TYPE_FP32 dims: [ {embedding} ] }}'
    return (
        f'name: "{name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n"
        f'  {{ name: "{INPUT_NAME}" data_type: TYPE_FP32 dims: [ {image_size}, {image_size}, 1 ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ 1 ] }}{heat}\n'
        "]\n"
        "version_policy: { latest { num_versions: 1 } }\n"
    )

