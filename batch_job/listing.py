"""Find image files under the --input arguments, streaming (no per-image state but the path)."""
from __future__ import annotations

import functools
import logging
import os
import re
from typing import Iterator

from batch_job.errors import InputError
from xray_core.errors import one_line
from xray_core.input_files import is_image_file, is_input_file, is_other_image_file

LOG = logging.getLogger("batch_job")

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_GLOB_CHARS = ("*", "?", "[")


def is_uri(path: str) -> bool:
    return bool(_URI.match(path))


def _is_glob(path: str) -> bool:
    return any(c in path for c in _GLOB_CHARS)


def _literal_prefix(pattern: str) -> str:
    """The folders of a glob before its first wildcard."""
    parts = pattern.split("/")
    literal = next((i for i, part in enumerate(parts) if _is_glob(part)), len(parts))
    return "/".join(parts[:literal]) or "/"


def input_root(arg: str) -> str:
    """What an --input names: the folder or file itself (absolute), or for a glob the folders before its
    first wildcard. Labels come only from at or below it; the output and the ledger must stay out of it."""
    if is_uri(arg):
        return _literal_prefix(arg) if _is_glob(arg) else arg.rstrip("/")
    if os.path.lexists(arg) or not _is_glob(arg):
        return os.path.abspath(arg)
    return _literal_prefix(os.path.abspath(arg))


def check_inputs(inputs: list[str], fail_if_empty: bool = False) -> None:
    """Every local --input must exist (a folder or file; for a glob, the folders before its first wildcard) and a
    folder must be listable: refused before anything is created. With `fail_if_empty`, local inputs must also hold
    an image (the walk stops at the first); without it, no image is a quiet night. URIs are listed only by the
    job."""
    missing = [p for p in inputs if not is_uri(p) and not os.path.exists(input_root(p))]
    if missing:
        raise InputError(f"input path not found: {', '.join(missing)}")
    odd = [p for p in inputs if not is_uri(p) and os.path.exists(p) and not (os.path.isdir(p) or os.path.isfile(p))]
    if odd:  # a FIFO, a socket, a device: nothing to list or score
        raise InputError(f"input is neither a folder nor a regular file: {', '.join(odd)}")
    for p in inputs:
        if not is_uri(p) and os.path.isdir(input_root(p)):
            try:
                with os.scandir(input_root(p)):
                    pass
            except OSError as exc:
                raise InputError(f"input folder cannot be listed: {input_root(p)}: {exc.strerror or exc}") from None
    if fail_if_empty and not any(is_uri(p) for p in inputs) and next(iter_images(inputs), None) is None:
        raise InputError(f"no image files (JPEG, PNG, DICOM or another image format) found in {', '.join(inputs)} "
                         "(--fail-if-empty)")


_NAME = r"(?!\.)[^/]*"  # a folder or file name a wildcard may stand for: not a hidden one (as the shell's)


def glob_regex(pattern: str) -> re.Pattern:
    """Shell glob -> regex over whole paths: `*` and `?` stay within a folder, `**/` spans folders. As in the shell,
    a wildcard never matches a name's leading dot: `/data/*` leaves `.snapshot` and `.Trash-1000` alone."""
    out, i = [], 0
    while i < len(pattern):
        if (i == 0 or pattern[i - 1] == "/") and pattern[i] in "*?[":
            out.append(r"(?!\.)")
        if pattern.startswith("**/", i):
            out.append(f"(?:{_NAME}/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(f"(?:{_NAME}(?:/{_NAME})*)?")
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
    """Walk from the pattern's literal folder prefix: the files the pattern matches, and everything in the folders it
    matches, as the shell would hand those folders over (each walked as a folder input is; a matched symbolic link
    to a folder too, but no other link to a folder is followed). With a trailing `/`, folders only. Folders that
    cannot hold a match are not entered (a nightly `/data/incoming/2026-12-*` never walks the whole archive)."""
    folders_only = pattern.endswith("/")
    pattern = os.path.abspath(pattern)
    regex, prefix = glob_regex(pattern), _literal_prefix(pattern)
    if not os.path.exists(prefix):  # gone since check_inputs: not a quiet night
        raise InputError(f"input path not found: {prefix}")

    def matched(path: str) -> bool:  # the path, or a folder it lies in below the prefix
        if folders_only:
            path = os.path.dirname(path)
        while len(path) > len(prefix):
            if regex.match(path):
                return True
            path = os.path.dirname(path)
        return False

    # a link the pattern names is followed; `**` follows none (as the shell's globstar: a link back up would loop)
    yield from _walk(prefix, select=matched, may_hold=lambda folder: may_hold(pattern, folder),
                     follow=lambda link: "**" not in pattern and bool(regex.match(link)))


def may_hold(pattern: str, folder: str) -> bool:
    """Whether files under `folder` could match the absolute glob `pattern`: its folder names match the pattern's
    parts, one by one, up to a `**` or to the pattern's end (a folder the pattern matches holds all below it)."""
    for part, name in zip(pattern.split("/"), folder.rstrip("/").split("/")):
        if "**" in part:  # spans folders: anything below may match
            return True
        if not _part_regex(part).match(name):  # glob_regex's own rules: the walk it prunes never loses a match
            return False
    return True


@functools.lru_cache(maxsize=256)
def _part_regex(part: str) -> re.Pattern:
    return glob_regex(part)


UNLISTED_IGNORED = {"lost+found"}  # a file system's own folder, root's alone: never holds scans


def hidden(name: str) -> bool:
    """A name starting with a dot: a snapshot (`.snapshot`: copies of every scan), a trash folder, a file still
    being transferred under a temporary name (`.tmp-scan.jpeg`, rsync's `.scan.jpeg.Ab12Cd`), a Mac's `._scan.jpeg`."""
    return name.startswith(".")


def hidden_input(path: str) -> bool:
    """A hidden file the walk would have listed under another name: an image or DICOM file (xray_core's rule: not a
    Mac's metadata), or a transfer's temporary copy of one (rsync's `.scan.jpeg.Ab12Cd`)."""
    return is_input_file(path) or is_image_file(os.path.splitext(path)[0])


def _walk(root: str, select=lambda path: True, may_hold=lambda folder: True,
          follow=lambda link: False) -> Iterator[str]:
    """Recursive, sorted, streaming; symlinked folders are not followed (no loops), but for those `follow` names,
    which are walked as folders of their own (their links not followed); folders `may_hold` says cannot hold inputs
    are not entered, nor are hidden folders, and hidden files are not listed (both counted and said, the folders at
    INFO, image files as a WARNING: QA, a folder's `.snapshot` doubled every count and listed each flagged scan
    twice; review, a `.git` beside the scans would have warned every night). A folder that cannot be listed (permission
    denied) and could hold inputs is yielded itself: its row says so (scoring.read_input), where skipping it would
    lose its images without a word. Hidden names are counted where `select` takes them (in a glob's walk: inside a
    folder the pattern matches, walked as a folder input is; not where the pattern itself would pass them by)."""
    unlisted: list[OSError] = []  # os.walk's errors, in the order it met them
    links: list[str] = []  # followed after the walk: a file reached both ways is listed under its real folder
    passed: list[str] = []  # links not followed: said, never a silent quiet night (QA)
    folders_passed: list[str] = []  # hidden folders (`.snapshot`, `.git`, trash): said at INFO, not each night's alarm
    files_passed: list[str] = []  # hidden image files (a transfer's temporary name): a WARNING
    for dirpath, dirnames, filenames in os.walk(root, onerror=unlisted.append, followlinks=False):
        yield from _folders(unlisted, may_hold)
        folders_passed += [path for path in (os.path.join(dirpath, name) for name in sorted(dirnames) if hidden(name))
                           if select(path)]
        dirnames[:] = sorted(name for name in dirnames if not hidden(name) and may_hold(os.path.join(dirpath, name)))
        for link in (os.path.join(dirpath, name) for name in dirnames):
            if os.path.islink(link):
                (links if follow(link) else passed).append(link)
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if hidden(name):
                if select(path) and hidden_input(path):
                    files_passed.append(path)
            elif select(path) and (is_input_file(path, unreadable=True) or is_other_image_file(name)):
                yield path  # another image format (TIFF, BMP, ...) too: its row says it is not read (QA)
    yield from _folders(unlisted, may_hold)
    if passed:  # the input named as given; the links under it at DEBUG only: a folder's name may be a patient's (QA)
        LOG.warning("%d symbolic link(s) to folders under %s not followed (--log-level DEBUG names them): name them "
                    "as --input, or with a glob, to score what they hold", len(passed), root)
        LOG.debug("not followed: %s", ", ".join(passed))
    if folders_passed:
        LOG.info("%d hidden folder(s) under %s not entered (a name starting with '.': snapshots, trash; --log-level "
                 "DEBUG names them): name one as --input to score what it holds", len(folders_passed), root)
        LOG.debug("hidden folders, not entered: %s", ", ".join(folders_passed))
    if files_passed:
        LOG.warning("%d hidden image file(s) under %s not listed (a name starting with '.': files still being "
                    "transferred; --log-level DEBUG names them): name one as --input to score it", len(files_passed),
                    root)
        LOG.debug("hidden image files, not listed: %s", ", ".join(files_passed))
    for link in links:
        yield from _walk(link, select, may_hold)


def _folders(errors: list[OSError], may_hold) -> Iterator[str]:
    while errors:
        exc = errors.pop(0)
        folder = os.fsdecode(exc.filename) if exc.filename else ""
        if folder and os.path.basename(folder) not in UNLISTED_IGNORED and may_hold(folder):
            yield folder


def _match_uri(pattern: str) -> Iterator[str]:
    from apache_beam.io.filesystems import FileSystems

    if not _is_glob(pattern):
        pattern = pattern.rstrip("/") + "/**"
    for result in FileSystems.match([pattern]):
        for meta in result.metadata_list:
            if is_image_file(meta.path) or is_other_image_file(meta.path):
                yield meta.path


def iter_input(path: str) -> Iterator[str]:
    if is_uri(path):
        yield from _match_uri(path)
    elif os.path.isdir(path):
        yield from _walk(path)
    elif os.path.isfile(path) or os.path.islink(path):
        yield path  # named by the user: scored by its content whatever its name, or a row that says why not
    elif _is_glob(path):
        yield from _glob(path)
    else:  # gone since check_inputs
        raise InputError(f"input path not found: {path}")


def resolved(path: str, real_dirs: dict[str, str]) -> str:
    """os.path.realpath(path), resolving each folder once (`real_dirs` caches them): a file that is not itself a
    link is its real folder plus its name (realpath's lstat of every path component for every file was 60% of
    listing 20,000 files)."""
    if os.path.islink(path):
        return os.path.realpath(path)
    folder, name = os.path.split(path)
    if folder not in real_dirs:
        real_dirs[folder] = os.path.realpath(folder)
    return os.path.join(real_dirs[folder], name)


def read_as_dicom(path: str) -> bool:
    """Whether the job reads a listed file as DICOM, by its name alone: .dcm, or no extension of an image format
    (is_input_file listed it on its DICOM header)."""
    return path.lower().endswith(".dcm") or not (is_image_file(path) or is_other_image_file(path))


def iter_images(inputs: list[str]) -> Iterator[tuple[int, str]]:
    """-> (index of the --input it came from, absolute path as found).

    A file reached twice (two inputs, or a symlink to a file also listed) is listed once:
    duplicates are detected on the resolved path.
    """
    seen: set[str] = set()
    real_dirs: dict[str, str] = {}
    for index, root in enumerate(inputs):
        try:
            for path in iter_input(root):
                shown = path if is_uri(path) else os.path.abspath(path)
                key = path if is_uri(path) else resolved(path, real_dirs)
                if key not in seen:
                    seen.add(key)
                    yield index, shown
        except InputError:
            raise
        except (ValueError, OSError) as exc:  # gs:// without apache-beam[gcp], s3:// without credentials (BeamIOError)
            raise InputError(f"cannot list {root}: {one_line(exc, 200)}") from None
