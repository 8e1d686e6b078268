"""What the train, export and batch_job stages share (no TensorFlow): the one preprocessing function,
DICOM decoding, the class labels, the metrics at an operating point, atomic file publishing, and the model-package
contract (package.py, verify.py, reference.py) that export writes and the batch job reads."""
