"""Export's use of the quality floor (xray_core/quality_floor.py): a version below it is not published unless the
user says `--publish-below-floor`; either way its check goes into metadata.json (`quality_floor`)."""
from __future__ import annotations

from xray_core.package import Metadata
from xray_core.quality_floor import QualityFloor, judged

OVERRIDE = "--publish-below-floor"


class BelowQualityFloor(RuntimeError):
    """A version below the quality floor, not published (exit 1); the message is one line."""


def checked(floor: QualityFloor | None, publish_below_floor: bool, log=print) -> dict | None:
    """metadata.json's `quality_floor` for a version about to be published (None: no figures to judge);
    BelowQualityFloor when it is below the floor and publish_below_floor is not set."""
    if floor is None:
        return None
    if floor.met:
        log(f"quality floor: {floor.line()}")
    elif publish_below_floor:
        log(f"warning: {floor.line()}; {OVERRIDE}: it is published if every other check passes, and the batch job "
            "will warn each night it scores with it")
    else:
        raise BelowQualityFloor(f"{floor.line()}; nothing published ({OVERRIDE} publishes it all the same, e.g. "
                                "into a scratch --serving-dir to study it)")
    return floor.to_dict()


def checked_again(meta: Metadata, publish_below_floor: bool, log=print) -> dict | None:
    """`checked` for a version published again with the same model and threshold (--add-gate): on the check its
    source recorded, or for a source from before the floor on its recorded figures (QA: a version published below the
    floor into a scratch folder went, with --add-gate, into the live one without a word)."""
    floor, _ = judged(meta.quality_floor, meta.site_calibration, meta.test_metrics)
    return checked(floor, publish_below_floor, log)
