"""MODEL_CARD.md for a published version: the site sample's numbers first, then the internal split's."""
from __future__ import annotations

import json

from export.card_checks import drift_section, gate_section, heatmap_section
from xray_core.package import INPUT_NAME, OUTPUT_NAME
from xray_core.quality_floor import judged
from xray_core.training_data import TrainingData

_KEYS = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc")


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


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


def floor_note(meta: dict) -> str:
    """export's quality floor check as recorded ('' for versions published before it)."""
    if not meta.get("quality_floor"):
        return ""
    floor, how = judged(meta["quality_floor"], meta.get("site_calibration"), meta.get("test_metrics"))
    if floor is None:
        return ""
    if floor.met:
        return f"**Quality floor:** {floor.line()}.\n"
    return (f"**Below the quality floor:** {floor.below(how)}. The batch job warns each night it scores with "
            "this version.\n")


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
    cut = ("Edge bands of constant grey (a border, a pillarbox, a scanner's black edge) are cut off first "
           "(`crop_bands`). " if meta["preprocessing"].get("crop_bands") else "")
    source = meta.get("threshold_source", "internal validation split")
    data = TrainingData.from_dict(meta.get("training_data"))
    return f"""# Model card: {meta['name']} version {meta['version']}

**Architecture:** {meta.get('architecture')} (tf-keras, exported to ONNX opset {meta.get('opset')}).
**Input:** `{INPUT_NAME}` float32 (N, {size}, {size}, 1) in [0, 1];
**output:** `{OUTPUT_NAME}` float32 (N, 1) = P(pneumonia).
**Decision threshold:** {meta['decision_threshold']:.4f}, chosen on the {source} as the most specific
threshold reaching recall {meta.get('target_recall')}. PNEUMONIA when probability >= threshold.
{recalibration_note(meta)}{floor_note(meta)}
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
- {cut}Images are squashed to {size}x{size} grayscale; laterality, devices and text markers are not modelled.

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
