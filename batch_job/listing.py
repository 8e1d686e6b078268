"""Find image files under the --input arguments, streaming (no per-image state but the path)."""
from __future__ import annotations

import glob
import os
import re
from typing import Iterator

from train.data import CLASSES
from train.dicom import is_dicom
from train.preprocessing import is_image_file

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB_CHARS = ("*", "?", "[")


class InputError(ValueError):
    """A job-level input problem (exit 2); the message is one line."""


def is_uri(path: str) -> bool:
    return bool(_URI.match(path))


def check_inputs(inputs: list[str]) -> None:
    """Every --input must exist (a folder or file), match something (a glob), or be a URI."""
    missing = [p for p in inputs if not is_uri(p) and not any(c in p for c in _GLOB_CHARS) and not os.path.exists(p)]
    if missing:
        raise InputError(f"input path not found: {', '.join(missing)}")


def is_candidate(path: str) -> bool:
    """An image by extension (.jpeg .jpg .png .dcm), or any file with the DICOM preamble."""
    if is_image_file(path):
        return True
    try:
        with open(path, "rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def _walk(root: str) -> Iterator[str]:
    """Recursive, sorted, streaming; symlinked folders are not followed (no loops)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if is_candidate(path):
                yield path


def _match_uri(pattern: str) -> Iterator[str]:
    from apache_beam.io.filesystems import FileSystems

    if not any(c in pattern for c in _GLOB_CHARS):
        pattern = pattern.rstrip("/") + "/**"
    for result in FileSystems.match([pattern]):
        for meta in result.metadata_list:
            if is_image_file(meta.path):
                yield meta.path


def iter_input(path: str) -> Iterator[str]:
    if is_uri(path):
        yield from _match_uri(path)
    elif os.path.isdir(path):
        yield from _walk(path)
    elif os.path.isfile(path) or os.path.islink(path):
        if is_candidate(path):
            yield path
    else:  # a glob
        for match in sorted(glob.iglob(path, recursive=True)):
            if os.path.isdir(match):
                yield from _walk(match)
            elif is_candidate(match):
                yield match


def iter_images(inputs: list[str]) -> Iterator[tuple[int, str]]:
    """-> (index of the --input it came from, path); a file reached twice is listed once."""
    seen: set[str] = set()
    for index, root in enumerate(inputs):
        for path in iter_input(root):
            key = path if is_uri(path) else os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                yield index, key


def label_from_path(path: str) -> str:
    """NORMAL/PNEUMONIA from the nearest such ancestor folder (any case), else ''."""
    parts = re.split(r"[/\\]", path)[:-1]
    for part in reversed(parts):
        if part.upper() in CLASSES:
            return part.upper()
    return ""
