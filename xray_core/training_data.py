"""What a model was trained on, as its model card and the batch job's report state it.

`train --data-source TEXT` records it in run.json; export copies it into metadata.json's ``training_data``
({"source": TEXT or null, "data_dir": the training folder}). The shipped versions say ``kermany2018``, the public
set their text names; anything else is the user's own words, shown as given. A package without the field, or a run
trained without the option, says that its training data was not recorded: it never claims the shipped models'
population, or their licence, for weights trained on other images.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

KERMANY_2018 = "kermany2018"
KERMANY_POPULATION = ("paediatric chest X-rays (children aged 1–5) from one hospital (Kermany et al. 2018): adults "
                      "and other sites are outside what it was validated on.")
KERMANY_DATA = ("Kermany et al. (2018) pediatric chest X-rays (Guangzhou Women and Children's Medical Center), the "
                "Kaggle\n\"chest-xray-pneumonia\" training folder")
NOT_RECORDED = "not recorded (train --data-source)"


@dataclass(frozen=True)
class TrainingData:
    source: str | None = None  # KERMANY_2018, the user's own words, or None: not recorded
    data_dir: str | None = None  # the training folder, as run.json recorded it
    modalities: tuple[str, ...] | None = None  # the DICOM modalities training read (train --modalities); None: CR, DX
    # sha256 of the training folder's training-split files (path and content) when the package was exported: a later
    # `export --add-gate --training-dir` refuses a folder changed since (export/gate_fit.py split_digest); None:
    # packages exported before 2026-12-02
    train_split_sha256: str | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> "TrainingData":
        data = data if isinstance(data, dict) else {}
        # a sentence goes on after it: no closing full stop
        source = str(data["source"]).strip().rstrip(".;,") if data.get("source") is not None else ""
        modalities = data.get("modalities")
        digest = data.get("train_split_sha256")
        return cls(source or None, str(data["data_dir"]) if data.get("data_dir") is not None else None,
                   tuple(str(m) for m in modalities) if isinstance(modalities, (list, tuple)) and modalities else None,
                   digest if isinstance(digest, str) and digest else None)

    def to_dict(self) -> dict:
        out = {"source": self.source, "data_dir": self.data_dir}
        if self.modalities is not None:  # packages before 2026-12-02 (and their round trip) have no such key
            out["modalities"] = list(self.modalities)
        if self.train_split_sha256 is not None:  # nor this one
            out["train_split_sha256"] = self.train_split_sha256
        return out

    @property
    def kermany(self) -> bool:
        return self.source == KERMANY_2018

    def population(self) -> str:
        """One sentence for report.html: "Trained on " + this."""
        if self.kermany:
            return KERMANY_POPULATION
        if self.source:
            return (f"{self.source} (as its training run described them): patients, sites and scanners unlike these "
                    "are outside what it was validated on.")
        return ("images whose source was not recorded (train --data-source): find out which patients, sites and "
                "scanners they cover before relying on it.")

    def card_data(self) -> str:
        """The card's name for the training folder, before ", re-split …"."""
        if self.kermany:
            return KERMANY_DATA
        folder = f"The images under {code(self.data_dir)}" if self.data_dir else "Images from a folder not recorded"
        return f"{folder} ({self.source or 'their source was not recorded: `train --data-source`'})"

    def card_limitation(self) -> str:
        """The card's first limitation."""
        if self.kermany:
            return ("Pediatric patients (1 to 5 years old) from one hospital; adults and other sites are out of "
                    "distribution.")
        if self.source:
            return f"Trained on {self.source}; patients, sites and scanners unlike these are out of distribution."
        return (f"The training data's source and population were {NOT_RECORDED}: state them here before sharing "
                "this card.")


def code(path: str) -> str:
    """A path as Markdown code, where it can be one; else as a JSON string (a backquote or a line break in it)."""
    return json.dumps(path) if "`" in path or not path.isprintable() else f"`{path}`"
