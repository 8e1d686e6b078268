"""The heatmap as a second graph output (TensorFlow side of export).

train.models.build_resnet's two heads both have an exact map of shape (N, h, w) over the layer `last_block`:
- the class-activation-map head (global average pooling `gap`, one linear unit `logit`): the feature maps
  weighted by `logit`'s weights; their spatial mean plus the unit's bias is the logit.
- the logit-map head: its layer `logit_map` itself, one logit per cell; the model's logit is their
  softmax-weighted mean.
An ensemble's map is the average of its members' maps, as its probability is the average of theirs.

The same graph gets a third output, `embedding` (N, D): the global average of `last_block` (for the first head,
the `gap` features that feed `logit`), the members' concatenated. The batch job's drift check and input gate
compare it with the package's reference (xray_core/reference.py).
"""
from __future__ import annotations

import numpy as np

from export.faithfulness import faithfulness
from xray_core.occlusion import OCCLUSION, HeatmapMethod
from xray_core.package import EMBEDDING_NAME, HEATMAP_NAME, score

PARITY_RELATIVE = 1e-4  # max |Δ| allowed, as a fraction of the reference maps' range


def _is_cam_member(model) -> bool:
    names = {layer.name for layer in model.layers}
    return {"last_block", "gap", "logit"} <= names and getattr(model.get_layer("logit"), "units", None) == 1


def _is_map_member(model) -> bool:
    return {"last_block", "logit_map"} <= {layer.name for layer in model.layers}


def _has_map(model) -> bool:
    return _is_cam_member(model) or _is_map_member(model)


def cam_members(model) -> list:
    """The model itself when it has a heatmap head, else its nested members that all have one, else []."""
    if _has_map(model):
        return [model]
    nested = [layer for layer in model.layers if hasattr(layer, "layers") and hasattr(layer, "get_layer")]
    return nested if nested and all(_has_map(m) for m in nested) else []


def _member_outputs(member, inputs, i: int):
    """-> (probability, map (N, h, w, 1), pooled features) of one member, on `inputs`."""
    from train.models import keras

    if _is_map_member(member):
        both = keras.Model(member.input, [member.output, member.get_layer("logit_map").output,
                                          member.get_layer("last_block").output], name=f"{member.name}_with_map")
        p, m, features = both(inputs)
        return p, m, keras.layers.GlobalAveragePooling2D(name=f"pooled{i}")(features)
    both = keras.Model(member.input, [member.output, member.get_layer("last_block").output,
                                      member.get_layer("gap").output], name=f"{member.name}_with_features")
    p, features, g = both(inputs)
    w = member.get_layer("logit").get_weights()[0]  # (C, 1)
    cam = keras.layers.Conv2D(1, 1, use_bias=False, trainable=False, name=f"cam{i}")
    m = cam(features)
    cam.set_weights([w.reshape(1, 1, -1, 1)])
    return p, m, g


def with_heatmap(model):
    """A model with outputs [probability, heatmap, embedding] sharing `model`'s weights, or None without a CAM
    head."""
    from train.models import keras

    members = cam_members(model)
    if not members:
        return None
    inputs = keras.Input(model.input_shape[1:], name="image")
    probs, maps, pooled = [], [], []
    for i, member in enumerate(members):
        p, m, g = _member_outputs(member, inputs, i)
        probs.append(p)
        maps.append(m)
        pooled.append(g)
    prob = probs[0] if len(probs) == 1 else keras.layers.Average()(probs)
    heat = maps[0] if len(maps) == 1 else keras.layers.Average()(maps)
    prob = keras.layers.Activation("linear", name="probability")(prob)
    heat = keras.layers.Reshape(tuple(heat.shape[1:3]), name=HEATMAP_NAME)(heat)
    embedding = pooled[0] if len(pooled) == 1 else keras.layers.Concatenate()(pooled)
    embedding = keras.layers.Activation("linear", name=EMBEDDING_NAME)(embedding)
    return keras.Model(inputs, [prob, heat, embedding], name=f"{model.name}_with_heatmap")


def reference_heatmaps(model, x: np.ndarray) -> np.ndarray:
    """The maps computed from Keras feature maps and weights in numpy (the parity reference)."""
    from train.models import keras

    maps = []
    for member in cam_members(model):
        if _is_map_member(member):
            maps.append(keras.Model(member.input, member.get_layer("logit_map").output).predict(x, verbose=0)[..., 0])
            continue
        features = keras.Model(member.input, member.get_layer("last_block").output).predict(x, verbose=0)
        maps.append(np.einsum("nhwc,c->nhw", features, member.get_layer("logit").get_weights()[0][:, 0]))
    return np.mean(maps, axis=0)


def heatmap_hw(export_model) -> tuple[int, int] | None:
    """(h, w) of a model's heatmap output; None for a one-output model."""
    return tuple(int(d) for d in export_model.output_shape[1][1:3]) if len(export_model.outputs) >= 2 else None


def embedding_dim(export_model) -> int | None:
    """D of a model's embedding output (N, D); None for a model without one."""
    return int(export_model.output_shape[2][1]) if len(export_model.outputs) >= 3 else None


def heatmap_checks(keras_model, session, x: np.ndarray, threshold: float, faith_images: np.ndarray,
                   faith_source: str, method: HeatmapMethod = HeatmapMethod(), log=print) -> dict:
    """Parity of the ONNX heatmap (onnxruntime `session`) with the Keras reference on x, and the faithfulness
    check on faith_images."""
    ref = reference_heatmaps(keras_model, x)
    got = score(session, x, heatmap=True).heatmap
    span = float(ref.max() - ref.min())
    diff = float(np.abs(got.astype(np.float64) - ref).max())
    parity = {"images": int(len(x)), "max_abs_diff": diff, "map_range": span,
              "tolerance": PARITY_RELATIVE * span, "passed": diff <= PARITY_RELATIVE * span}
    log(f"heatmap parity: max |Δ| {diff:.2e} (limit {PARITY_RELATIVE * span:.2e} = 1e-4 of the maps' range)")
    faith = faithfulness(session, faith_images, threshold, faith_source, method)
    if faith["flagged"]:
        maps = f"{method.grid}x{method.grid} occlusion maps" if method.name == OCCLUSION else "maps"
        log(f"faithfulness of the {maps} on {faith['flagged']} flagged {faith_source} images: blanking the hottest "
            f"10% lowered P(pneumonia) more than a random 10% for {faith['share_top_beats_random']:.1%} "
            f"({'passed' if faith['passed'] else 'FAILED'}: needs {faith['required_share']:.0%}) and more than the "
            f"average map's hottest 10% for {faith['share_own_beats_average']:.1%} (about each image: "
            f"{'yes' if faith['about_each_image'] else 'no'}: needs {faith['required_share_vs_average']:.0%})")
    return {"parity": parity, "faithfulness": faith}
