"""The two classes, in model-output order: probability is P(PNEUMONIA)."""
CLASSES = ("NORMAL", "PNEUMONIA")


def label_from_relative_path(relpath: str) -> str:
    """The folder rule: NORMAL/PNEUMONIA (any case) from the nearest folder of a path taken relative to the
    input's own root (the file name itself never counts), else '' (unlabelled)."""
    parts = relpath.replace("\\", "/").split("/")[:-1]
    for part in reversed(parts):
        if part.upper() in CLASSES:
            return part.upper()
    return ""
