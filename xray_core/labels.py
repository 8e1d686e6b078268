"""The two classes, in model-output order: probability is P(PNEUMONIA)."""
CLASSES = ("NORMAL", "PNEUMONIA")
