"""Find image files under the --input arguments, streaming (no per-image state but the path)."""
from __future__ import annotations

import os
import re
import stat
from typing import Iterator

from xray_core.labels import CLASSES
from xray_core.dicom import is_dicom
from xray_core.preprocessing import is_image_file

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
    """An image by extension (.jpeg .jpg .png .dcm), or a regular file with the DICOM preamble.

    Files with an image extension are always listed (an unreadable one becomes an error row);
    others are only sniffed when they are regular files (a FIFO would block open()).
    """
    if is_image_file(path):
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return is_dicom(f.read(132))
    except OSError:
        return False


def glob_regex(pattern: str) -> re.Pattern:
    """Shell glob -> regex over whole paths: `*` and `?` stay within a folder, `**/` spans folders."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1:j].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _glob(pattern: str) -> Iterator[str]:
    """Walk from the pattern's literal folder prefix without following symlinked folders."""
    pattern = os.path.abspath(pattern)
    parts = pattern.split(os.sep)
    literal = next(i for i, part in enumerate(parts) if any(c in part for c in _GLOB_CHARS))
    root = os.sep.join(parts[:literal]) or os.sep
    regex = glob_regex(pattern)
    for path in _walk(root, select=lambda p: bool(regex.match(p))):
        yield path


def _walk(root: str, select=lambda path: True) -> Iterator[str]:
    """Recursive, sorted, streaming; symlinked folders are not followed (no loops)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if select(path) and is_candidate(path):
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
        yield from _glob(path)


def iter_images(inputs: list[str]) -> Iterator[tuple[int, str]]:
    """-> (index of the --input it came from, absolute path as found).

    A file reached twice (two inputs, or a symlink to a file also listed) is listed once:
    duplicates are detected on the resolved path.
    """
    seen: set[str] = set()
    for index, root in enumerate(inputs):
        try:
            for path in iter_input(root):
                shown = path if is_uri(path) else os.path.abspath(path)
                key = path if is_uri(path) else os.path.realpath(path)
                if key not in seen:
                    seen.add(key)
                    yield index, shown
        except ValueError as exc:  # e.g. gs:// without apache-beam[gcp]
            raise InputError(f"cannot list {root}: {str(exc).splitlines()[0][:200]}") from None


def label_from_path(path: str) -> str:
    """NORMAL/PNEUMONIA from the nearest such ancestor folder (any case), else ''."""
    parts = re.split(r"[/\\]", path)[:-1]
    for part in reversed(parts):
        if part.upper() in CLASSES:
            return part.upper()
    return ""
