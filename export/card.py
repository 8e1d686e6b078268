"""MODEL_CARD.md for a published version: the site sample's numbers first, then the internal split's."""
from __future__ import annotations

import json

from export.faithfulness import REQUIRED_SHARE
from xray_core.package import INPUT_NAME, OUTPUT_NAME
from xray_core.training_data import TrainingData

_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _drop(v: float) -> str:
    """A mean drop in P(pneumonia), 3 decimals; one that rounds to zero prints 0.000, never -0.000."""
    return f"{round(v, 3) + 0.0:.3f}"


def _row(label: str, m: dict | None) -> str:
    return f"| {label} | " + " | ".join(_fmt((m or {}).get(k)) for k in _KEYS) + " |"


def _ci(est: dict, key: str) -> str:
    lo, hi = est[f"{key}_ci95"]
    return f"{est[key]:.3f} (95% CI {lo:.3f}–{hi:.3f})"


def _previous_row(meta: dict) -> str:
    """A recalibrated version's table row for the threshold of the version it was recalibrated from."""
    previous = meta["site_calibration"].get("at_previous_threshold")
    if previous is None:
        return ""
    origin = meta.get("source", {}).get("recalibrated_from", {}).get("model", "the previous version")
    return _row(f"{previous['threshold']:.4f} ({origin}'s)", previous) + "\n"


def recalibration_note(meta: dict) -> str:
    """Where a version recalibrated without retraining came from; '' for any other version."""
    origin = meta.get("source", {}).get("recalibrated_from")
    if not origin:
        return ""
    site = meta["site_calibration"]
    return f"""
**Recalibrated** from {origin['model']} (threshold {origin['decision_threshold']:.4f}, chosen on the {origin['threshold_source']})
on {site['images']} labelled images ({site['normal']} normal, {site['pneumonia']} pneumonia) of `{site['dir']}`, without
retraining: `model.onnx`, the drift reference and the input gate are {origin['model']}'s, byte for byte.
"""


def site_section(meta: dict) -> str:
    site = meta.get("site_calibration")
    if not site:
        return ("## Site sample\nNot calibrated on a site sample: the threshold comes from the internal validation\n"
                "split, whose scans come from the same collection as training. Expect lower specificity on new\n"
                "scans and calibrate on local data (`python -m export ... --calibrate-dir`) before use.\n")
    est = site["two_fold"]
    return f"""## Site sample first: what to expect on new scans
Calibrated on {site['images']} labelled images ({site['normal']} normal, {site['pneumonia']} pneumonia,
{site['patients']} patients) from a later collection than the training data (`{site['dir']}`).
{_chosen_on_this_sample(meta, site)}
**Expected on unseen scans (2-fold estimate):** the threshold was chosen on one half of the patients and
measured on the other, then the other way round. ROC AUC {_ci(est, 'roc_auc')}; recall {_ci(est, 'recall')};
specificity {_ci(est, 'specificity')}; accuracy {_ci(est, 'accuracy')}. Fold thresholds:
{', '.join(f"{f['threshold']:.4f}" for f in est['folds'])}.

| threshold on the whole site sample | accuracy | precision | recall | specificity | F1 | ROC AUC |
|---|---|---|---|---|---|---|
{_row('0.5', site['at_0.5'])}
{_row(f"{meta['validation_threshold']:.4f} (internal validation)", site['at_validation_threshold'])}
{_previous_row(meta)}{_row(f"{site['threshold']:.4f} (calibrated here; in-sample, optimistic)", site['at_calibrated_threshold'])}

{_internal_against_site(meta)}
"""


def _limited(src: dict) -> str:
    """QA: a run on a subset (`--limit-per-class`) was described as trained on the whole folder."""
    limit = src.get("limit_per_class")
    return f" (at most {limit} images of each class: `--limit-per-class {limit}`)" if limit else ""


def _chosen_on_this_sample(meta: dict, site: dict) -> str:
    """A sentence when the run picked this model among others by its ROC AUC on this very sample (QA: not said,
    though that choice makes the estimate below optimistic too); "" otherwise."""
    src = meta.get("source") or {}
    candidates = src.get("candidates") or []
    if src.get("selected_by") != "site_roc_auc" or len(candidates) < 2 or not src.get("selected_on_calibration_sample"):
        return ""
    return (f"\n**Chosen on this sample too:** the training run picked this model among {len(candidates)} "
            f"({', '.join(candidates)}) by their ROC AUC on these same images (`--select-by site_roc_auc`), so the\n"
            "figures below are optimistic by that choice as well.\n")


def _aucs(meta: dict) -> tuple[float | None, float | None]:
    """(the internal test split's ROC AUC, the site sample's), each at 0.5; None where not recorded."""
    return (meta.get("test_metrics", {}).get("at_0.5", {}).get("roc_auc"),
            (meta.get("site_calibration") or {}).get("at_0.5", {}).get("roc_auc"))


def overestimates(meta: dict) -> bool:
    """The internal test split's ROC AUC is above the site sample's (the card says so only then)."""
    test_auc, site_auc = _aucs(meta)
    return test_auc is not None and site_auc is not None and test_auc > site_auc


def _internal_against_site(meta: dict) -> str:
    test_auc, site_auc = _aucs(meta)
    if not overestimates(meta):  # QA: it said "overestimates" whatever they were
        return (f"ROC AUC {_fmt(test_auc)} on the internal test split, {_fmt(site_auc)} on the site sample. Judge this "
                "model by the numbers above.")
    kermany = TrainingData.from_dict(meta.get("training_data")).kermany
    shipped = " (the first models: 0.998 against 0.92)" if kermany else ""
    return (f"The internal test split overestimates: ROC AUC {_fmt(test_auc)} there against {_fmt(site_auc)} on\n"
            f"the site sample{shipped}. Judge this model by the numbers above.")


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
    return f"""## Input gate
Before an image can be flagged, the batch job checks that it looks like the X-rays this model was trained and
validated on: the Mahalanobis distance of its `embedding` to {fit} times a margin of {g['margin']} for scans of a later
time or another machine. Images past it get status `out_of_scope` with the distance as the reason and no prediction.
{turned}DICOM must be CR or DX (not "for processing") of the chest; near-constant images, images with too few grey
levels, colour photographs and images more than twice as wide as high (or high as wide) are refused before the model
runs (docs/gate.md).
"""


KERMANY_LICENCE = """
## Licence
The weights are released under [CC BY 4.0](https://creativecommons.org/licenses/by/4.0/), as they are derived from
the training data: Kermany, Daniel; Zhang, Kang; Goldbaum, Michael (2018), "Labeled Optical Coherence Tomography
(OCT) and Chest X-Ray Images for Classification", Mendeley Data, v2, doi:10.17632/rscbjbr9sj.2, licensed under
CC BY 4.0. Credit them when you use or redistribute this model. The code that trained, exported and runs it is
licensed under the Apache License 2.0 (`LICENSE` in the repository).
"""
OTHER_LICENCE = """
## Licence
The weights are derived from the training data, so that data's licence and terms of use govern how this model may be
used and shared; this card does not state them. The code that trained, exported and runs it is licensed under the
Apache License 2.0 (`LICENSE` in the repository).
"""


def licence_section(data: TrainingData) -> str:
    return KERMANY_LICENCE if data.kermany else OTHER_LICENCE



def model_card(meta: dict) -> str:
    pts = meta.get("test_metrics", {})
    src = meta.get("source", {})
    parity = meta.get("parity", {})
    size = meta["preprocessing"]["image_size"]
    source = meta.get("threshold_source", "internal validation split")
    data = TrainingData.from_dict(meta.get("training_data"))
    return f"""# Model card: {meta['name']} version {meta['version']}

**Architecture:** {meta.get('architecture')} (tf-keras, exported to ONNX opset {meta.get('opset')}).
**Input:** `{INPUT_NAME}` float32 (N, {size}, {size}, 1) in [0, 1];
**output:** `{OUTPUT_NAME}` float32 (N, 1) = P(pneumonia).
**Decision threshold:** {meta['decision_threshold']:.4f}, chosen on the {source} as the most specific
threshold reaching recall {meta.get('target_recall')}. PNEUMONIA when probability >= threshold.
{recalibration_note(meta)}
## Intended use
A screening aid that flags chest X-rays that may show pneumonia so that a radiologist reads them first.
It is **not a diagnosis** and must not be used without a clinician's review.

{site_section(meta)}
{heatmap_section(meta)}
{drift_section(meta)}
{gate_section(meta)}
## Internal test split (same collection as training{'; overestimates' if overestimates(meta) else ''})
{data.card_data()}{_limited(src)}, re-split {src.get('split', '0.70,0.15,0.15')} into train/val/test,
stratified by class and grouped by patient (no patient, and no byte-identical image, in two splits).
Split sizes: {json.dumps(src.get('split_counts', {}))}.

| threshold | accuracy | precision | recall | specificity | F1 | ROC AUC |
|---|---|---|---|---|---|---|
{_row('0.5', pts.get('at_0.5'))}
{_row(f"{meta.get('validation_threshold', meta['decision_threshold']):.4f} (internal validation)", pts.get('at_chosen'))}

## Limitations
- {data.card_limitation()}
- Scans from a later collection score worse than the internal split says (see the site sample above);
  re-check the threshold on local data before use.
- Images are squashed to {size}x{size} grayscale; laterality, devices and text markers are not modelled.

## Parity (ONNX vs Keras)
{parity.get('images', 'n/a')} images: max |Δprobability| {parity.get('max_abs_diff', 'n/a')}, identical decisions: {parity.get('decisions_equal', 'n/a')}.

## Reproduce
```
{src.get('train_command', 'n/a')}
{src.get('export_command', 'n/a')}{chr(10) + src['republish_command'] if src.get('republish_command') else ''}
```
Seed {src.get('seed', 'n/a')}. Versions: {json.dumps(meta.get('versions', {}))}.
sha256 of model.onnx: `{meta['sha256']}`. Created {meta.get('created_utc')}.
""" + licence_section(data)
