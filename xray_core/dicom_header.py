"""A DICOM file's header as a typed record, and the header rules of the input gate (pydicom, no pixels decoded).

:class:`DicomHeader` keeps what the gate looks at (modality, body part, presentation intent, photometric
interpretation, SOP class) and the identifiers a worklist needs (patient, accession, study, series and instance
UIDs, study date, view position). Every field is a string, empty when the element is absent, empty or unreadable.

:func:`header_problem` says in one line why an image is out of scope, or None:

- Modality must be one of ``allowed_modalities`` (CR and DX by default: computed and digital radiography, the plain
  X-rays the model is for); a file without Modality is refused, as nothing says it is a radiograph.
- "FOR PROCESSING" images are refused: raw detector data, before the vendor's processing that makes the image a
  reader (and the training data) sees. Told by PresentationIntentType or, where that is missing, by a For
  Processing SOP class.
- BodyPartExamined, where present and not empty, must name the chest: see xray_core/body_part.py.
- A lateral view is refused, the model reading frontal (PA or AP) radiographs: ViewPosition LL, RL, LLD, RLD (PS3.3
  C.8.11.5's terms) or LAT / LATERAL, or one of those words in BodyPartExamined ("CHEST LAT").
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import re
import warnings
import zlib

from xray_core.body_part import LATERAL_VIEWS, is_chest, still_refused, words
from xray_core.errors import one_line

# pydicom logs and warns, for each file, that its data set is in the other VR encoding than its transfer syntax says
# (legacy systems, SC_rgb_jpeg.dcm): 40 lines for 30 such files in one night's log, in every worker process. It
# reads the file all the same, correctly. Only that message is dropped; pydicom's others (pixel data it decodes
# against its header, say) still show.
VR_MISMATCH = re.compile(r"Expected (explicit|implicit) VR, but found (explicit|implicit) VR")
warnings.filterwarnings("ignore", message=VR_MISMATCH.pattern, category=UserWarning)
logging.getLogger("pydicom").addFilter(lambda record: not VR_MISMATCH.match(record.getMessage()))

# pydicom.uid's DigitalXRay-, DigitalMammographyXRay- and DigitalIntraOralXRayImageStorageForProcessing, spelled out
# so that importing this module (the preprocessing module does, for every JPEG too) does not import pydicom
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # a DICOMDIR's SOP class (PS3.10)
FOR_PROCESSING_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",
    "1.2.840.10008.5.1.4.1.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.1.3.1",
})
DEFAULT_MODALITIES = ("CR", "DX")
DICOM_MAGIC_OFFSET = 128
DEFLATED_SYNTAX = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian (PS3.5 A.5)
# pydicom inflates a deflated data set whole, in memory, however large: a 2 MB file can hold gigabytes of zeros. No
# image the job decodes needs more than Pillow's 89.5 M-pixel limit at 16 bits (179 MB); 256 MiB leaves room for
# the header.
MAX_INFLATED_BYTES = 1 << 28

# field name -> DICOM keyword
_KEYWORDS = {
    "modality": "Modality",
    "body_part_examined": "BodyPartExamined",
    "presentation_intent_type": "PresentationIntentType",
    "photometric": "PhotometricInterpretation",
    "sop_class_uid": "SOPClassUID",
    "patient_id": "PatientID",
    "accession_number": "AccessionNumber",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
    "study_date": "StudyDate",
    "view_position": "ViewPosition",
}


@dataclasses.dataclass(frozen=True)
class DicomHeader:
    """The header elements the scoring side uses; each is the element's value as a string, '' when absent."""

    modality: str = ""
    body_part_examined: str = ""
    presentation_intent_type: str = ""
    photometric: str = ""
    sop_class_uid: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    study_date: str = ""
    view_position: str = ""

    @classmethod
    def from_dataset(cls, ds) -> "DicomHeader":
        """From a pydicom Dataset (with or without its pixel data); a SOP class only the file meta names (a
        DICOMDIR's) as the SOP class."""
        header = cls(**{field: _text(ds, keyword) for field, keyword in _KEYWORDS.items()})
        meta = getattr(ds, "file_meta", None)
        if not header.sop_class_uid and meta is not None:
            header = dataclasses.replace(header, sop_class_uid=_text(meta, "MediaStorageSOPClassUID"))
        return header

    def identifiers(self) -> dict[str, str]:
        """The worklist identifiers under their DICOM keywords (PatientID, ..., ViewPosition)."""
        names = ("patient_id", "accession_number", "study_instance_uid", "series_instance_uid", "sop_instance_uid",
                 "study_date", "view_position")
        return {_KEYWORDS[name]: getattr(self, name) for name in names}


def _text(ds, keyword: str) -> str:
    """An element's value as one string: multiple values joined by a backslash (DICOM's own separator), control
    characters (a malformed value's NULs or line breaks) as spaces, the padding stripped; '' when absent or
    unreadable (a malformed value must not stop its neighbours being read)."""
    from pydicom.multival import MultiValue

    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom converts values lazily and raises many types for malformed ones
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return "".join(c if c.isprintable() else " " for c in str(value)).strip()


FIRST_GROUPS = (b"\x02\x00", b"\x08\x00")  # file meta (0002) or identifying (0008) group, little endian


def is_dicom(head: bytes) -> bool:
    """True for a DICOM file, whatever its name: the preamble ('DICM' at byte 128), or a data set without it, as
    older systems wrote them (pydicom reads both): its first element, of group 0002 or 0008, with an explicit VR
    (two capital letters after its tag), or two group-0008 elements in implicit VR (:func:`_implicit_start`).
    JPEG and PNG start otherwise. `head`: at least the file's first 132 bytes; only those are looked at, so the
    answer is the same for the whole file and for the 132 bytes the listing reads."""
    head = head[:DICOM_MAGIC_OFFSET + 4]
    if head[DICOM_MAGIC_OFFSET:DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return True
    vr = head[4:6]
    explicit = len(vr) == 2 and vr.isalpha() and vr.isupper()
    return head[:2] in FIRST_GROUPS and (explicit or _implicit_start(head))


def _implicit_start(head: bytes) -> bool:
    """A data set in implicit VR little endian (no VR: tag, 4-byte length, value) starts with a group-0008 element
    whose even length leads to a second group-0008 element within `head` (file meta, group 0002, is always
    explicit)."""
    length = int.from_bytes(head[4:8], "little")
    following = 8 + length
    return head[:2] == b"\x08\x00" and length % 2 == 0 and head[following:following + 2] == b"\x08\x00"


def pydicom_reader():
    """pydicom, set to read values without validating them against their VR. Validation warns and logs the value
    itself (a patient's name inside a Study Instance UID, as some modalities write), and log lines never carry
    patient data (docs/operations.md); the values are read as they are either way."""
    import pydicom
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    return pydicom


def check_inflated_size(data: bytes, limit: int | None = None) -> None:
    """For a deflated file, that its data set inflates to at most `limit` bytes (inflating at most that much to know:
    zlib's max_length), before pydicom inflates it all. Raises ValueError (one line); other files pass untouched.
    The data set starts after the file meta information, whose first element is its group length (PS3.10 7.1)."""
    start = DICOM_MAGIC_OFFSET + 4
    if data[DICOM_MAGIC_OFFSET:start] != b"DICM":
        return  # no file meta information, so no transfer syntax: pydicom reads it as little endian, never deflated
    if data[start:start + 8] != b"\x02\x00\x00\x00UL\x04\x00":  # (0002,0000) UL, 4 bytes
        if DEFLATED_SYNTAX in data[:4096]:
            raise ValueError("corrupt DICOM: deflated, without a File Meta Information Group Length")
        return
    end = start + 12 + int.from_bytes(data[start + 8:start + 12], "little")
    if DEFLATED_SYNTAX not in data[start:end]:
        return
    limit = MAX_INFLATED_BYTES if limit is None else limit
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflater.decompress(memoryview(data)[end:], limit)
    except zlib.error as exc:
        raise ValueError(f"corrupt DICOM: deflated data set: {exc}") from None
    if inflater.unconsumed_tail:
        raise ValueError(f"deflated DICOM whose data set inflates past {limit} bytes (a decompression bomb)")


def read_dicom_header(source: bytes | str | os.PathLike) -> DicomHeader:
    """The header of a DICOM file (path or bytes) without reading its pixel data. Raises ValueError (one line)."""
    pydicom = pydicom_reader()

    if not isinstance(source, (bytes, bytearray)):
        with open(source, "rb") as f:
            source = f.read()
    # force=True (as read_dicom) parses any bytes as elements: is_dicom keeps the rest out
    if not is_dicom(source[:DICOM_MAGIC_OFFSET + 4]):
        raise ValueError("corrupt DICOM: neither 'DICM' at byte 128 nor a data set's first element")
    check_inflated_size(source)
    try:
        ds = pydicom.dcmread(io.BytesIO(source), stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for corrupt files
        raise ValueError(f"corrupt DICOM: {one_line(exc)}") from None
    if len(ds) == 0:  # force=True parses anything; a file with no element after the meta header is no DICOM image
        raise ValueError("corrupt DICOM: no data elements")
    if not _text(ds, "Modality") and not is_directory(ds) and not has_pixel_data(pydicom, source):
        raise ValueError("corrupt DICOM: no Modality and no pixel data (a file cut short?)")
    return DicomHeader.from_dataset(ds)


PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: a DICOMDIR, the index of a CD's files


def is_directory(ds) -> bool:
    """A DICOMDIR: a whole file with neither Modality nor pixel data, out of scope, never a file cut short."""
    meta = getattr(ds, "file_meta", None)
    return "DirectoryRecordSequence" in ds or str(getattr(meta, "MediaStorageSOPClassUID", "")) == MEDIA_DIRECTORY


def has_pixel_data(pydicom, source: bytes) -> bool:
    """Whether a DICOM file holds pixel data: asked only of a file without Modality, to tell a file cut short (an
    error) from a whole one whose header does not say what it is (out of scope). Values over 1 KB are not read."""
    try:
        ds = pydicom.dcmread(io.BytesIO(source), defer_size="1 KB", force=True)
    except Exception:  # noqa: BLE001 - cut inside an element
        return False
    return any(keyword in ds for keyword in PIXEL_KEYWORDS)


def parse_modalities(text: str) -> tuple[str, ...]:
    """`--modalities CR,DX` (the batch job's and export's option) -> ("CR", "DX"); ValueError for an empty list."""
    found = tuple(m.strip().upper() for m in text.split(",") if m.strip())
    if not found:
        raise ValueError("--modalities needs at least one DICOM Modality, e.g. CR,DX")
    return found


def normalised(modalities: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m.strip().upper() for m in modalities)


def _allowed(modalities: tuple[str, ...]) -> str:
    return f" (allowed: {', '.join(modalities)})"


_ALLOWED = re.compile(r" \(allowed: ([^()]*)\)\Z")


def modalities_named(reason: str) -> frozenset[str] | None:
    """The allowed modalities a header_problem reason was decided under, or None for a reason that does not depend
    on them."""
    found = _ALLOWED.search(reason)
    return frozenset(m.strip() for m in found.group(1).split(",")) if found else None


def refusal_holds(reason: str, modalities: tuple[str, ...]) -> bool:
    """Whether an earlier night's refusal still holds tonight (the ledger): one by Modality only under the allowed
    modalities it was decided under, one by BodyPartExamined only while the rule still refuses that value
    (body_part.still_refused); any other reason holds."""
    named = modalities_named(reason)
    return (named is None or named == frozenset(normalised(modalities))) and still_refused(reason)


def header_problem(header: DicomHeader, allowed_modalities: tuple[str, ...] = DEFAULT_MODALITIES) -> str | None:
    """Why the image is out of scope, in one line, or None when its header allows scoring. A reason that depends on
    the allowed modalities names them at its end, "(allowed: CR, DX)" (:func:`modalities_named`)."""
    allowed = normalised(allowed_modalities)
    if header.sop_class_uid == MEDIA_STORAGE_DIRECTORY:  # every CD or USB export holds one; QA: "without Modality"
        return "DICOMDIR: the index of a CD or USB export, not an image (its images are files beside it)"
    modality = header.modality.upper()
    if not modality:
        return f"DICOM without Modality{_allowed(allowed)}"
    if modality not in allowed:
        return f"Modality {header.modality} not allowed{_allowed(allowed)}"
    intent = header.presentation_intent_type.upper()
    if intent == "FOR PROCESSING" or (not intent and header.sop_class_uid in FOR_PROCESSING_SOP_CLASSES):
        return f"{modality} FOR PROCESSING image (raw detector data, not an image for viewing)"
    if header.body_part_examined and not is_chest(header.body_part_examined):
        return f"BodyPartExamined {header.body_part_examined} is not a chest"
    for keyword, value in (("ViewPosition", header.view_position), ("BodyPartExamined", header.body_part_examined)):
        if LATERAL_VIEWS.intersection(words(value)):
            return f"lateral view ({keyword} {value}): the model reads frontal (PA or AP) chest X-rays"
    return None
