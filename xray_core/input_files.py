"""Which files are inputs: images by their extension, DICOM files by their header whatever their name, and image
formats the job does not read (listed all the same, so that each is a row saying so). What the batch job, calibration
and training list."""
from __future__ import annotations

import os
import stat

from xray_core.dicom_header import DICOM_MAGIC_OFFSET, is_dicom

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".jpe", ".jfif", ".png", ".dcm")
# Image formats the job does not read, listed all the same (batch_job/listing.py) so that each is a row saying so: a
# folder of TIFF exports was a silent quiet night (QA, 2026-12-02). Training and calibration folders do not list them.
OTHER_IMAGE_EXTENSIONS = (".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2", ".j2k", ".jpf", ".jpx", ".jxl", ".heic",
                          ".heif", ".avif", ".pgm", ".ppm", ".pnm")


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_other_image_file(name: str) -> bool:
    """An image format the job does not read, by its extension (OTHER_IMAGE_EXTENSIONS)."""
    return name.lower().endswith(OTHER_IMAGE_EXTENSIONS)


APPLEDOUBLE_MAGIC = b"\x00\x05\x16\x07"  # macOS's `._<name>` beside each file copied from a Mac: its Finder data


def is_appledouble(path: str) -> bool:
    """A macOS AppleDouble file (`._scan.jpeg` beside `scan.jpeg`: the metadata a Mac writes on a foreign file system,
    no image), told by its name and its first four bytes."""
    if not os.path.basename(path).startswith("._"):
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == APPLEDOUBLE_MAGIC
    except OSError:
        return False


def is_input_file(path: str, unreadable: bool = False) -> bool:
    """An image by extension (.jpeg .jpg .jpe .jfif .png .dcm), or a regular file that is DICOM (dicom_header.is_dicom;
    archives name DICOM files by their SOP Instance UID): what the batch job, calibration and training list.
    A macOS AppleDouble file (`._scan.jpeg`) is not listed: it holds a Mac's metadata of scan.jpeg, no image.

    Files with an image extension are always listed (an unreadable one becomes an error row);
    others are only sniffed when they are regular files (a FIFO would block open()). One that cannot be opened
    (permission denied) is listed when `unreadable` (the batch job, where leaving it out would lose a DICOM file
    without a word: its row says why), left out otherwise (training and calibration folders are curated).
    """
    if is_image_file(path):
        return not is_appledouble(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return is_dicom(f.read(DICOM_MAGIC_OFFSET + 4))
    except PermissionError:
        return unreadable
    except OSError:
        return False
