"""Whether a DICOM BodyPartExamined value names the chest, and which words name a lateral view (no pydicom)."""
from __future__ import annotations

import re

# BodyPartExamined is a Code String: upper case, at most 16 characters; DICOM's defined term for the chest is CHEST
# (PS3.16 Annex L). Devices also send THORAX, the word in their own language, or add the view. A value is a chest
# when, split at spaces, underscores, hyphens, slashes, backslashes (DICOM's value separator), brackets, dots and
# commas, at least one word is a chest word and every other word a view word or a qualifier of how the film was taken:
# "CHEST", "THORAX", "CHEST_PA", "PA CHEST", "CHEST (PA)", "PORT CHEST", "CHEST 1V", "PEDIATRIC CHEST", "CXR" pass;
# "CHESTABDOMEN" and "CHEST ABDOMEN" (a larger field, e.g. a neonatal babygram), "RIBS", "BREAST" and "SHOULDER" do
# not. German "BRUST" is left out on purpose: it means chest and breast alike. (QA, 2026-12-03: real portable and
# paediatric chest films sent PORT CHEST, CXR, CHEST 1V, CHEST (PA) and PEDIATRIC CHEST, and were refused.)
CHEST_WORDS = frozenset({
    "CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS",
    "CXR",  # chest X-ray, as sites abbreviate it
    "TORAX",  # Spanish, Portuguese
    "PECHO",  # Spanish
    "TORACE",  # Italian
    "POITRINE",  # French (Thorax is THORAX)
    "BORST", "BORSTKAS",  # Dutch
    "BRUSTKORB",  # German, the rib cage (Thorax is THORAX)
})
VIEW_WORDS = frozenset({"PA", "AP", "LAT", "LATERAL", "LL", "RL", "LLD", "RLD", "FRONTAL", "PORTABLE", "ERECT",
                        "UPRIGHT", "SUPINE", "1", "2", "VIEW", "VIEWS",
                        # how or for whom the film was taken, not what of the body
                        "PORT", "MOBILE", "BEDSIDE", "1V", "2V", "1VIEW", "2VIEW", "PEDIATRIC", "PAEDIATRIC", "PED",
                        "PEDS", "ROUTINE", "XR", "CR", "DX"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LLD", "RLD", "LAT", "LATERAL"})


_BODY_PART = re.compile(r"\ABodyPartExamined (.*) is not a chest\Z", re.DOTALL)


def still_refused(reason: str) -> bool:
    """Whether an earlier night's refusal by the BodyPartExamined rule still holds under today's rule (the ledger):
    the rule learnt values it refused before (PORT CHEST, CXR: 2026-12-03), and such a film must be read again, not
    skipped. Any other reason holds."""
    found = _BODY_PART.match(reason)
    return found is None or not is_chest(found.group(1))


def words(value: str) -> list[str]:
    """A Code String's words, upper case: split at spaces, underscores, hyphens, slashes, backslashes, brackets, dots
    and commas."""
    return [w for w in re.split(r"[\s_\-/\\().,]+", value.upper()) if w]


def is_chest(body_part: str) -> bool:
    """Whether a BodyPartExamined value names the chest (see CHEST_WORDS)."""
    found = words(body_part)
    return any(w in CHEST_WORDS for w in found) and all(w in CHEST_WORDS or w in VIEW_WORDS for w in found)
