"""The two classes, in model-output order (probability is P(PNEUMONIA)), and the folder rule that labels
images."""
import os

CLASSES = ("NORMAL", "PNEUMONIA")


def label_from_path(path: str, root: str) -> str:
    """The folder rule (batch job and export --calibrate-dir): NORMAL or PNEUMONIA (any case) from the nearest
    folder of that name at or below the input's root (the root's own name counts), else ''. Folders above the
    root never count, nor does the file name, and a single-file input has no folder at or below it."""
    root = root.rstrip("/")
    if not path.startswith(root + "/"):
        return ""
    parts = (os.path.basename(root) + path[len(root):]).split("/")[:-1]
    for part in reversed(parts):
        if part.upper() in CLASSES:
            return part.upper()
    return ""
