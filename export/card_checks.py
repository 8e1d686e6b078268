"""The model card's sections on what export checked and fitted: the heatmaps (parity, faithfulness), the drift
reference and the input gate (export/card.py assembles the card)."""
from __future__ import annotations

from export.faithfulness import REQUIRED_SHARE


def _drop(v: float) -> str:
    """A mean drop in P(pneumonia), 3 decimals; one that rounds to zero prints 0.000, never -0.000."""
    return f"{round(v, 3) + 0.0:.3f}"


def _heatmap_parity(parity: dict | None) -> str:
    if not parity:
        return "Parity with Keras: not recorded."
    return (f"Parity with Keras: max |Δ| {parity['max_abs_diff']:.2e}\n(limit {parity['tolerance']:.2e}, 1e-4 of "
            "the maps' range).")


def heatmap_section(meta: dict) -> str:
    heat = meta.get("heatmap")
    if not heat:
        return ("## Heatmaps\nNone: this model's head is not global average pooling plus one linear unit, so it has no "
                "exact class-activation map; the package has the `probability` output only.\n")
    h, w = meta["heatmap_output"]["shape"][1:]
    faith = heat["faithfulness"]
    method = meta.get("heatmap_method") or {"name": "graph"}
    size = meta["preprocessing"]["image_size"]
    graph = (f"Output `heatmap` (N, {h}, {w}): the class-activation map of the last convolutional block for "
             "P(pneumonia) (feature maps weighted by the final unit's weights; an ensemble averages its members' "
             f"maps). Higher means more evidence for pneumonia; same orientation as the input, at the block's "
             f"resolution ({h}×{w} for a {size} px input). {_heatmap_parity(heat.get('parity'))}")
    if method["name"] == "occlusion":
        k = method["grid"]
        shown = (f"**The batch job shows occlusion maps**, not that output: for each of the top-N flagged images it "
                 f"renders, the drop in P(pneumonia) when each cell of a {k}×{k} grid is blanked to the image's mean "
                 f"({k * k} extra passes of the network per image, so the cost is bounded by N × {k * k} passes). "
                 "They are the model's own answer, image by image; the class-activation map looks alike on every "
                 "image (below).")
        checks = (f"Faithfulness of the occlusion maps the job shows: {_verdict(faith)}\n\n"
                  f"The graph's class-activation map, for comparison: {_verdict(faith.get('graph_map') or {})}")
    else:
        shown = "The batch job shows this output."
        checks = f"Faithfulness check: {_verdict(faith)}"
    return f"""## Heatmaps
{graph}

{shown}

{checks}
"""


def _verdict(faith: dict) -> str:
    if faith.get("share_top_beats_random") is None:
        return "Not measured: no image was flagged."
    head = (f" on {faith['flagged']} images of the {faith['source']} flagged at {faith['threshold']:.4f}, "
            if "flagged" in faith else " on the same images, ")
    verdict = (f"**{'Passed' if faith['passed'] else 'FAILED'}**:{head}blanking (to the image mean) the 10% of "
               f"pixels with the highest map values lowered P(pneumonia) more than blanking a random 10% for "
               f"{faith['share_top_beats_random']:.1%} of them (required: {REQUIRED_SHARE:.0%}; mean "
               f"drop {_drop(faith['mean_drop_top'])} against {_drop(faith['mean_drop_random'])}).")
    if not faith["passed"]:
        verdict += " These maps are not shown to point at what drives the score: do not rely on them."
    if faith.get("share_own_beats_average") is not None:
        verdict += (f" Against the average map of those images (its hottest 10% blanked on each): the image's "
                    f"own map lowered P(pneumonia) more for {faith['share_own_beats_average']:.1%} of them "
                    f"(mean drop {_drop(faith['mean_drop_top'])} against {_drop(faith['mean_drop_average'])}; "
                    f"{faith['required_share_vs_average']:.0%} needed to call the maps about each image: "
                    f"{'yes' if faith['about_each_image'] else 'no, they show mostly where in the chest the model looks on any image'}).")
    return verdict


def drift_section(meta: dict) -> str:
    ref = meta.get("reference")
    if not ref:
        return ("## Drift reference\nNone: without an `embedding` output the batch job cannot compare a run with "
                "what the model was validated on (it says `drift: not checked`).\n")
    return f"""## Drift reference
Output `embedding` (N, {ref['embedding_dim']}): the pooled features that feed the final unit (an ensemble's members'
concatenated). `reference.npz` holds P(pneumonia) of the {ref['images']} readable images of the internal validation
split and the embeddings of {ref['embedding_rows']} of them (float16); the batch job compares every run with it
(domain-classifier ROC AUC of the embeddings, PSI of the probability histogram, positive rate). `splits.csv` lists
the run's {ref['splits']['val']} validation and {ref['splits']['test']} internal-test images (paths relative to the
training folder): scoring the test images must say `drift: none`. Embedding parity with Keras: max |Δ|
{ref.get('embedding_parity_max_abs_diff', float('nan')):.2e}.
"""


def gate_section(meta: dict) -> str:
    g = meta.get("gate")
    if not g:
        return ("## Input gate\nNo content check recorded: the batch job runs only the DICOM header rules and the "
                "cheap checks (near-constant images, too few grey levels, colour photographs) for this version.\n")
    if g["statistic"] == "mahalanobis_ledoit_wolf_training_split":
        fit = (f"the mean and Ledoit-Wolf covariance of the {g['rows']:,} training-split X-rays' embeddings "
               f"(`{g['file']}`) must be at most **{g['limit']:.1f}**. That limit comes from the training side "
               f"alone: the {g['percentile']}th percentile of the distances of the {g['held_out_rows']} validation-"
               f"split X-rays, which neither the network nor the fit saw ({g['held_out_quantile']:.1f}),")
    else:
        fit = (f"the {g['rows']} reference rows (Ledoit-Wolf covariance) must be at most **{g['limit']:.1f}**. That "
               f"limit comes from the training side alone: the {g['percentile']}th percentile of each reference "
               f"row's distance to a fit on the other {g['folds'] - 1} of {g['folds']} folds "
               f"({g['held_out_quantile']:.1f}),")
    o = g.get("orientation")
    turned = "" if not o else (
        f"An image that looks more likely upside down than upright (P > {o['limit']}: a {o['method']}; "
        f"{o['rows']:,} images) is out of scope too: held out ({o['folds']} folds), it refuses "
        f"{o['held_out_upside_down_refused']:.1%} of the turned or flipped scans and "
        f"{o['held_out_upright_refused']:.1%} of the upright ones (of the tilted copies: "
        f"{o['held_out_tilted_upside_down_refused']:.1%} and {o['held_out_tilted_refused']:.1%}).\n")
    lo = g.get("layout")
    laid = "" if not lo else (
        f"So is an image whose layout is unlike a chest film's: the {lo['method']} {lo['rows']:,} rows must be at "
        f"most **{lo['limit']:.1f}**, the {lo['percentile']}th percentile of the distances of the "
        f"{lo['held_out_rows']:,} validation rows, counted the same way ({lo['held_out_quantile']:.1f}), times "
        f"{lo['margin']}.\n")
    return f"""## Input gate
Before an image can be flagged, the batch job checks that it looks like the X-rays this model was trained and
validated on: the Mahalanobis distance of its `embedding` to {fit} times a margin of {g['margin']} for scans of a later
time or another machine. Images past it get status `out_of_scope` with the distance as the reason and no prediction.
{turned}{laid}DICOM must be CR or DX (not "for processing") of the chest; near-constant images, images with too few grey
levels, colour photographs and images more than twice as wide as high (or high as wide) are refused before the model
runs (docs/gate.md).
"""
